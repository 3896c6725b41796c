"""Write safetensors files from numpy (F32, F16 and BF16), for building test checkpoints."""
from __future__ import annotations

import json
import struct

import numpy as np


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def write_safetensors(path: str, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    """Write `tensors` (float arrays) to `path` with every tensor stored as `dtype` (F32, F16, BF16)."""
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        if dtype == "F32":
            b = np.ascontiguousarray(a, dtype="<f4").tobytes()
        elif dtype == "F16":
            b = np.ascontiguousarray(a, dtype="<f2").tobytes()
        elif dtype == "BF16":
            b = to_bf16_bits(a).astype("<u2").tobytes()
        else:
            raise ValueError(dtype)
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
