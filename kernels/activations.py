"""How an activation x is prepared for a weight type's row dots: one scheme per registry row.

Integer dots (llama.cpp's `ggml_vec_dot_<w>_<act>`) take x quantized once per call to int8 blocks;
float types take x as is. A scheme names its buffers' sizes and its quantizers, so the drivers never
assume a block size: they pass (x, xq, xd, xc) down to the type's dot, which reads them its way.

Shapes, C inputs, T tokens: xq int8 [C], xd f32 [C / block] scales, xc f32 [C / block * sums]
(block sums); [T, ...] of each for several tokens.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numba import njit

from .kquant import quantize_q8_k


@dataclass(frozen=True)
class ActScheme:
    name: str
    block: int                   # activations per scale in xd; 0: x is not quantized
    sums: int                    # entries of xc per block
    quantize: Callable | None    # njit (x [C], xq, xd, xc) -> None
    quantize_rows: Callable | None   # njit (X [T, C], xq [T, C], xd [T, ..], xc [T, ..]) -> None

    def buffers(self, cols: int, tokens: int | None = None):
        """Empty (xq, xd, xc) for one vector of cols inputs, or [tokens, ...] of each; zero-size if unquantized."""
        nb = cols // self.block if self.block else 0
        lead = () if tokens is None else (tokens,)
        return (np.empty(lead + (cols if self.block else 0,), np.int8), np.empty(lead + (nb,), np.float32),
                np.empty(lead + (nb * self.sums,), np.float32))


@njit(cache=True)
def quantize_q8(x, xq, xd, xc):
    """x f32 [C] -> xq int8 [C], xd f32 [NB] block scales, xc f32 [NB] = xd * sum(xq of the block).

    Same rounding as llama.cpp's reference quantize_row_q8_0: d = amax / 127, q = round(x / d); xc is
    its quantize_row_q8_1 `s` (kept in float32), which offset types (Q4_0's -8; Q5_1's min) need.
    """
    for b in range(xd.shape[0]):
        amax = np.float32(0.0)
        finite = True
        for j in range(32):
            ax = abs(x[b * 32 + j])
            finite &= ax <= np.float32(np.inf)                # False for NaN
            amax = max(amax, ax)
        if not finite:
            amax = np.float32(np.nan)                         # a NaN scale: the product is NaN, never finite garbage
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        s = 0
        for j in range(32):
            q = np.int8(np.rint(x[b * 32 + j] * inv))
            xq[b * 32 + j] = q
            s += q
        xd[b] = d
        xc[b] = d * np.float32(s)


@njit(cache=True)
def quantize_q8_rows(X, xq, xd, xc):
    """X f32 [T, C] -> per-token Q8 blocks xq [T, C], xd [T, NB], xc [T, NB]."""
    for k in range(X.shape[0]):
        quantize_q8(X[k], xq[k], xd[k], xc[k])


@njit(cache=True)
def quantize_q8_k_rows(X, xq, xd, xc):
    """X f32 [T, C] -> per-token Q8_K blocks xq [T, C], xd [T, C/256], xc [T, C/16] (sums of 16, as float32)."""
    for k in range(X.shape[0]):
        quantize_q8_k(X[k], xq[k], xd[k], xc[k])


# x as is (f32, f16, bf16 weights).
FLOAT = ActScheme("f32", 0, 0, None, None)
# 32-activation int8 blocks with a scale and a block sum: llama.cpp's Q8_0 and Q8_1 in one, for the
# 32-weight types (Q4_0, Q8_0, Q4_1, Q5_0, Q5_1).
Q8 = ActScheme("q8", 32, 1, quantize_q8, quantize_q8_rows)
# llama.cpp's Q8_K for the K-quants: 256 activations per scale, a sum per 16 (kquant.quantize_q8_k).
Q8_K = ActScheme("q8_k", 256, 16, quantize_q8_k, quantize_q8_k_rows)
