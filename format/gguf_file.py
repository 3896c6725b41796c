"""A strict, memory-mapped GGUF reader.

Model files are untrusted: every count, length, dimension, offset and size is
checked against the file before it is used, and any defect is a `GGUFError`
(a ValueError) naming the file and the problem. Tensor data is returned as
zero-copy numpy views into the mapping; nothing is read until it is touched.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count,
u64 key/value count, the key/values, the tensor infos (name, u32 n_dims,
u64 dims fastest-first, u32 type, u64 offset), padding to `general.alignment`
(default 32), then the tensor data.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from lazymoe.format.checks import open_regular
from lazymoe.format.metadata import meta
from lazymoe.kernels.qtypes import QType, qtype_of_ggml

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4
MAX_STRING = 1 << 24          # 16 MiB: longer than any real key, token or chat template
MAX_KEY = 1 << 16

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}


class GGUFError(ValueError):
    """A file that is not a valid GGUF, or one whose contents do not fit the file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]      # numpy order (slowest first): ggml [cols, rows, E] -> (E, rows, cols)
    ggml_type: int
    offset: int                 # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, file has {self.size}")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str, limit: int = MAX_STRING) -> str:
        n = self.unpack("<Q", what)
        if n > limit:
            raise self.fail(f"{what} is {n} bytes long, more than the limit of {limit}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        try:
            vt = GGUFValueType(vtype)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {vtype}") from None
        if vt in _SCALAR:
            return self.unpack(_SCALAR[vt], what)
        if vt == GGUFValueType.STRING:
            return self.string(what)
        if depth > 0:
            raise self.fail(f"{what} is a nested array, which lazymoe does not accept")
        etype = self.unpack("<I", what + " element type")
        count = self.unpack("<Q", what + " length")
        if etype in _SCALAR:
            esize = struct.calcsize(_SCALAR[etype])
            self.need(count * esize, f"{what} ({count} elements)")
            arr = np.frombuffer(self.buf, dtype=np.dtype(_SCALAR[etype]), count=count, offset=self.pos).copy()
            self.pos += count * esize
            return arr
        # Strings and anything else: each element takes at least 8 bytes, so a count
        # larger than the rest of the file is refused before any list is built.
        if count * 8 > self.size - self.pos:
            raise self.fail(f"truncated: {what} claims {count} elements, more than the file holds")
        if etype == GGUFValueType.STRING:
            return self.strings(count, what)
        return [self.value(etype, what, depth + 1) for _ in range(count)]

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings (a vocabulary: tens of thousands), with string()'s checks in one tight loop."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, what)
            n = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8
            if n > MAX_STRING:
                raise self.fail(f"{what} is {n} bytes long, more than the limit of {MAX_STRING}")
            if pos + n > size:
                self.pos = pos
                self.need(n, what)
            try:
                out.append(buf[pos:pos + n].decode("utf-8"))
            except UnicodeDecodeError:
                raise self.fail(f"{what} is not valid UTF-8") from None
            pos += n
        self.pos = pos
        return out


class GGUFFile:
    """A GGUF file mapped read-only. `metadata` maps keys to values (numeric arrays as
    numpy arrays, string arrays as lists); `tensors` maps names to TensorInfo."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            fd = open_regular(self.path)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            size = os.fstat(fd).st_size
            if size < 24:
                raise GGUFError(f"{self.path}: not a GGUF file ({size} bytes, too short for a header)")
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot map ({e.strerror})") from None
        finally:
            os.close(fd)
        self.size = size
        self.data = np.frombuffer(self._mm, dtype=np.uint8)
        self.metadata: dict[str, object] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    # --- parsing ----------------------------------------------------------
    def _parse(self) -> None:
        c = _Cursor(self._mm, self.path)
        if bytes(self._mm[:4]) != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (bad magic {bytes(self._mm[:4])!r})")
        c.pos = 4
        self.version = c.unpack("<I", "version")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (expected 2 or 3)")
        n_tensors = c.unpack("<Q", "tensor count")
        n_kv = c.unpack("<Q", "key/value count")
        # Each key/value takes >= 13 bytes, each tensor info >= 28: refuse counts the file cannot hold.
        if n_kv * 13 > self.size or n_tensors * 28 > self.size:
            raise GGUFError(f"{self.path}: truncated or corrupt: header claims {n_kv} keys and {n_tensors} tensors")
        for _ in range(n_kv):
            key = c.string("metadata key", MAX_KEY)
            vtype = c.unpack("<I", f"type of {key}")
            if key in self.metadata:
                raise GGUFError(f"{self.path}: metadata key {key} appears twice")
            self.metadata[key] = c.value(vtype, f"metadata {key}")
        try:
            align = meta(self.metadata, "general.alignment", self.path, 32)
        except ValueError as e:
            raise GGUFError(str(e)) from None
        if align & (align - 1):
            raise GGUFError(f"{self.path}: general.alignment {align!r} is not a power of two")
        infos = []
        for _ in range(n_tensors):
            name = c.string("tensor name", MAX_KEY)
            n_dims = c.unpack("<I", f"dimensions of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"{self.path}: tensor {name} has {n_dims} dimensions (expected 1 to {MAX_DIMS})")
            dims = [c.unpack("<Q", f"dimension of {name}") for _ in range(n_dims)]
            gtype = c.unpack("<I", f"type of {name}")
            offset = c.unpack("<Q", f"offset of {name}")
            infos.append((name, dims, gtype, offset))
        data_start = -(-c.pos // align) * align
        self.data_offset = data_start
        for name, dims, gtype, offset in infos:
            self.tensors[name] = self._tensor_info(name, dims, gtype, offset, data_start, align)

    def _tensor_info(self, name, dims, gtype, offset, data_start, align) -> TensorInfo:
        if name in self.tensors:
            raise GGUFError(f"{self.path}: tensor {name} appears twice")
        try:
            qt = GGMLQuantizationType(gtype)
            block, tsize = GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise GGUFError(f"{self.path}: tensor {name} has unknown type id {gtype}") from None
        n = 1
        for d in dims:
            if d <= 0:
                raise GGUFError(f"{self.path}: tensor {name} has a zero or negative dimension {dims}")
            n *= d
            if n > self.size * 8:   # no type stores more than 8 elements per byte... of a file this size
                raise GGUFError(f"{self.path}: tensor {name} dimensions {dims} are larger than the file can hold")
        if dims[0] % block:
            raise GGUFError(f"{self.path}: tensor {name} row length {dims[0]} is not a multiple of {qt.name}'s block of {block}")
        nbytes = n // block * tsize
        if offset % align:
            raise GGUFError(f"{self.path}: tensor {name} data offset {offset} is not aligned to {align}")
        start = data_start + offset
        if start + nbytes > self.size:
            raise GGUFError(f"{self.path}: truncated: tensor {name} needs bytes {start}..{start + nbytes}, file has {self.size}")
        return TensorInfo(name, tuple(int(d) for d in reversed(dims)), int(gtype), start, nbytes)

    # --- access -----------------------------------------------------------
    def qtype(self, name: str) -> QType:
        """The storage type of tensor `name`; GGUFError if lazymoe cannot compute on it."""
        try:
            return qtype_of_ggml(self.tensors[name].ggml_type)
        except ValueError as e:
            raise GGUFError(f"{self.path}: tensor {name}: {e}; `lazymoe quantize {self.path} -o OUT.gguf` "
                            f"converts the file") from None

    def raw(self, name: str) -> np.ndarray:
        """The bytes of tensor `name` as a uint8 view [nbytes] of the mapping (any type)."""
        t = self.tensor_info(name)
        return self.data[t.offset:t.offset + t.nbytes]

    def tensor(self, name: str) -> np.ndarray:
        """Tensor `name` as stored, a zero-copy view: float32/float16 arrays of its logical
        shape, or for block types uint8 (..., rows, row_bytes)."""
        t = self.tensor_info(name)
        qt = self.qtype(name)
        return self.raw(name).view(qt.dtype).reshape(qt.storage_shape(t.shape))

    def tensor_info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: tensor {name} is missing") from None

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def madvise(self, offset: int, length: int, advice: int) -> None:
        """Advise the kernel about a byte range of the file (page-aligned here)."""
        page = mmap.PAGESIZE
        start = offset // page * page
        end = min(self.size, offset + length)
        if end > start:
            self._mm.madvise(advice, start, end - start)

    def close(self) -> None:
        self.data = None
        try:
            self._mm.close()
        except BufferError:
            pass  # views are still alive; the mapping is released when they are

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
