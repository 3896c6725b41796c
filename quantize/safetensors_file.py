"""A lazy, memory-mapped safetensors reader (no torch, no copy until a tensor is asked for).

Format: u64 little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data; offsets are relative to the end of the header. Checked against the
file before use: a checkpoint is untrusted input like any model file.
"""
from __future__ import annotations

import json
import mmap
import os
import struct

import numpy as np

MAX_HEADER = 100 << 20

# bf16 has no numpy dtype: it is read as uint16 and widened to float32 by a shift.
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}


class SafetensorsFile:
    """One .safetensors file. `shapes` maps tensor names to shapes; `get(name)` returns float32."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise ValueError(f"{self.path}: not a safetensors file ({size} bytes)")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ValueError(f"{self.path}: cannot read ({e.strerror})") from None
        (n,) = struct.unpack_from("<Q", self._mm, 0)
        if n > min(MAX_HEADER, size - 8):
            raise ValueError(f"{self.path}: not a safetensors file or truncated (header of {n} bytes, file of {size})")
        try:
            header = json.loads(bytes(self._mm[8:8 + n]))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{self.path}: not a safetensors file (header is not JSON)") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: not a safetensors file (header is not an object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        base = 8 + n
        self._entries: dict[str, tuple[np.dtype | None, str, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            self._entries[name] = self._check(name, e, base, size)

    def _check(self, name, e, base, size):
        try:
            dt, shape, (begin, end) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{self.path}: tensor {name} has a malformed header entry") from None
        if any(d < 0 for d in shape) or not 0 <= begin <= end or base + end > size:
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

    def get(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 (a new array; the source dtype may be F32, F16, BF16, F64)."""
        np_dt, dt, shape, begin, end = self._entries[name]
        if np_dt is None:
            raise ValueError(f"{self.path}: tensor {name} has dtype {dt}; expected F32, F16 or BF16 weights")
        raw = np.frombuffer(self._mm, dtype=np_dt, count=(end - begin) // np_dt.itemsize, offset=begin).reshape(shape)
        if dt == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:
            pass
