"""The one table of weight storage types lazymoe knows.

A tensor of type T with logical numpy shape (..., rows, cols) is stored as
(..., rows, row_bytes(cols)) where row_bytes = cols // block_size * type_size.
Block layouts are llama.cpp's (ggml-common.h); sizes come from gguf-py's table.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@dataclass(frozen=True)
class QType:
    name: str                      # "q4_0", as users type it
    ggml: GGMLQuantizationType     # the id stored in GGUF tensor infos
    block_size: int                # weights per block
    type_size: int                 # bytes per block
    dtype: np.dtype                # numpy dtype of the stored array (uint8 for block types)

    @property
    def is_block(self) -> bool:
        return self.block_size > 1

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, cols: int) -> int:
        """Bytes of one row of `cols` weights; ValueError unless cols is a whole number of blocks."""
        if cols <= 0 or cols % self.block_size:
            raise ValueError(f"{self.name} needs a row length that is a multiple of {self.block_size}, got {cols}")
        return cols // self.block_size * self.type_size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor of logical shape (..., cols)."""
        n = 1
        for d in shape[:-1]:
            n *= int(d)
        return n * self.row_bytes(int(shape[-1]))

    def storage_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the stored numpy array for logical shape (..., cols)."""
        if not self.is_block:
            return tuple(shape)
        return tuple(shape[:-1]) + (self.row_bytes(int(shape[-1])),)


def _qt(name: str, ggml: GGMLQuantizationType, dtype) -> QType:
    bs, ts = GGML_QUANT_SIZES[ggml]
    return QType(name, ggml, bs, ts, np.dtype(dtype))


# Types the kernels compute on (a KERNELS row each in blocks.py). BF16 is stored as its uint16 bits.
QTYPES: dict[str, QType] = {
    q.name: q
    for q in (
        _qt("f32", GGMLQuantizationType.F32, np.float32),
        _qt("f16", GGMLQuantizationType.F16, np.float16),
        _qt("bf16", GGMLQuantizationType.BF16, np.uint16),
        _qt("q8_0", GGMLQuantizationType.Q8_0, np.uint8),
        _qt("q4_0", GGMLQuantizationType.Q4_0, np.uint8),
        _qt("q4_1", GGMLQuantizationType.Q4_1, np.uint8),
        _qt("q5_0", GGMLQuantizationType.Q5_0, np.uint8),
        _qt("q5_1", GGMLQuantizationType.Q5_1, np.uint8),
        _qt("q2_k", GGMLQuantizationType.Q2_K, np.uint8),
        _qt("q3_k", GGMLQuantizationType.Q3_K, np.uint8),
        _qt("q4_k", GGMLQuantizationType.Q4_K, np.uint8),
        _qt("q5_k", GGMLQuantizationType.Q5_K, np.uint8),
        _qt("q6_k", GGMLQuantizationType.Q6_K, np.uint8),
        _qt("iq4_nl", GGMLQuantizationType.IQ4_NL, np.uint8),
        _qt("iq4_xs", GGMLQuantizationType.IQ4_XS, np.uint8),
    )
}

_BY_GGML = {q.ggml: q for q in QTYPES.values()}


def qtype(name: str) -> QType:
    """The QType called `name` ("q4_0", "q8_0", "f16", "f32")."""
    try:
        return QTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown weight type {name!r}; expected one of {', '.join(QTYPES)}") from None


def qtype_of_ggml(t: int) -> QType:
    """The QType for a GGML type id read from a file; ValueError for types lazymoe cannot compute on."""
    try:
        return _BY_GGML[GGMLQuantizationType(t)]
    except (ValueError, KeyError):
        try:
            label = GGMLQuantizationType(t).name
        except ValueError:
            label = f"id {t}"
        raise ValueError(
            f"tensor type {label} is not supported (supported: {', '.join(q.name.upper() for q in QTYPES.values())})"
        ) from None
