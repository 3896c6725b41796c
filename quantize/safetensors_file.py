"""A lazy safetensors reader (no torch; nothing is read until a tensor is asked for).

Format: u64 little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data; offsets are relative to the end of the header. Checked against the
file before use: a checkpoint is untrusted input like any model file.

Tensors are read with os.preadv into new buffers, not through a memory map: pages of a
mapping that were touched count in the process's RSS until it is unmapped, which would
make a converter's RSS grow with the checkpoint's size.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from lazymoe.format.checks import open_regular

# A header's JSON: real ones are < 1 MiB (thousands of tensors); parsed, 16 MiB of JSON is at most a few
# hundred MB of Python objects (safetensors itself allows 100 MB, which can parse into more than 1 GB).
MAX_HEADER = 16 << 20
MAX_DIMS = 8
MAX_DIM = 1 << 40

# bf16 has no numpy dtype: it is read as uint16 and widened to float32 by a shift.
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}


class SafetensorsFile:
    """One .safetensors file. `shapes` maps tensor names to shapes; `get(name)` returns float32."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._fd = -1
        try:
            self._fd = open_regular(self.path)
            size = os.fstat(self._fd).st_size
            head = os.pread(self._fd, 8, 0)
        except OSError as e:
            self.close()
            raise ValueError(f"{self.path}: cannot read ({e.strerror})") from None
        if size < 8 or len(head) < 8:
            self.close()
            raise ValueError(f"{self.path}: not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            self.close()
            raise ValueError(f"{self.path}: not a safetensors file or truncated (header of {n} bytes, file of {size})")
        try:
            self._parse(n, size)
        except BaseException:
            self.close()
            raise

    def _parse(self, n: int, size: int) -> None:
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{self.path}: not a safetensors file (header is not JSON)") from None
        except RecursionError:
            raise ValueError(f"{self.path}: not a safetensors file (header JSON nested too deeply)") from None
        except OSError as e:
            raise ValueError(f"{self.path}: cannot read ({e.strerror})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: not a safetensors file (header is not an object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        base = 8 + n
        self._entries: dict[str, tuple[np.dtype | None, str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            self._entries[name] = self._check(name, e, base, size)

    def _check(self, name, e, base, size):
        """An entry {"dtype": str, "shape": [int], "data_offsets": [int, int]}, JSON integers only (a shape
        of 1e999 or 2.5 is refused, not rounded)."""
        ok = (isinstance(e, dict) and isinstance(e.get("dtype"), str) and isinstance(e.get("shape"), list)
              and len(e["shape"]) <= MAX_DIMS and isinstance(e.get("data_offsets"), list)
              and len(e["data_offsets"]) == 2
              and all(isinstance(d, int) and not isinstance(d, bool) for d in e["shape"] + e["data_offsets"]))
        if not ok:
            raise ValueError(f"{self.path}: tensor {str(name)[:80]} has a malformed header entry (expected dtype, "
                             f"shape and data_offsets as JSON integers)")
        dt, shape, (begin, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
        if any(not 0 <= d <= MAX_DIM for d in shape) or not 0 <= begin <= end or base + end > size:
            raise ValueError(f"{self.path}: truncated or corrupt: tensor {name} lies outside the file")
        np_dt = _DTYPES.get(dt)
        if np_dt is not None:
            n = 1
            for d in shape:
                n *= d
            if n * np_dt.itemsize != end - begin:
                raise ValueError(f"{self.path}: tensor {name} of shape {list(shape)} {dt} does not fill its {end - begin} bytes")
        return np_dt, dt, shape, base + begin, base + end

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2]

    def get(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Tensor `name` as float32, a new array (the source dtype may be F32, F16, BF16, F64);
        with rows=(r0, r1) only those rows of its first axis are read."""
        np_dt, dt, shape, begin, end = self._entries[name]
        if np_dt is None:
            raise ValueError(f"{self.path}: tensor {name} has dtype {dt}; expected F32, F16 or BF16 weights")
        if rows is not None and shape:
            r0, r1 = max(0, rows[0]), min(shape[0], rows[1])
            row_bytes = (end - begin) // max(1, shape[0])
            begin, end, shape = begin + r0 * row_bytes, begin + max(r0, r1) * row_bytes, (max(0, r1 - r0),) + shape[1:]
        raw = np.empty(shape, dtype=np_dt)
        buf = memoryview(raw.reshape(-1).view(np.uint8))
        got = 0
        while got < end - begin:             # preadv may return short counts on large reads
            k = os.preadv(self._fd, [buf[got:]], begin + got)
            if k <= 0:
                raise ValueError(f"{self.path}: truncated while reading tensor {name}")
            got += k
        if dt == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw if dt == "F32" else raw.astype(np.float32)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path: str, tensors: dict, dtype: str = "F32") -> None:
    """Write a safetensors file with every tensor stored as `dtype` (F32, F16 or BF16).

    `tensors` maps names to float arrays, or to (shape, make) pairs where make() returns the
    array: those are produced and written one at a time, so a file larger than RAM can be made.
    """
    itemsize = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    header, off = {}, 0
    for name, t in tensors.items():
        shape = tuple(t[0]) if isinstance(t, tuple) else t.shape
        n = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for t in tensors.values():
            a = t[1]() if isinstance(t, tuple) else t
            if dtype == "BF16":
                f.write(to_bf16_bits(a).astype("<u2").tobytes())
            else:
                f.write(np.ascontiguousarray(a, dtype="<f4" if dtype == "F32" else "<f2").tobytes())
