"""Matrix-matrix kernels: Y [T, R] = X [T, C] @ W[R, C]^T for a group of T tokens.

Strategy for many tokens (measured in benchmarks/kernels.py): dequantize a tile of RT
weight rows to float32 once (parallel Numba) and hand it to OpenBLAS sgemm against all T
tokens, so each weight is unpacked once and sgemm runs at its full rate. For few tokens
dispatch.py uses the integer kernels of matvec.py instead (see INT_MATMUL_MAX_TOKENS).

Dequantization bodies `_dq_<type>(w, r0, r1, out, orow)` write rows [r0, r1) of W to
out[orow : orow + r1-r0]; parallel drivers `dequant_<type>(w, r0, r1, out, nt)` split that range
over nt threads.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .matvec import split
from . import simd
from .simd import f16_to_f32

TILE_ROWS = 1024   # rows per dequantized tile: fewer, larger sgemm calls. At 64-256 rows
                   # sgemm re-packs X for every small tile and the two thread pools (Numba's
                   # OpenMP, OpenBLAS's) hand over often; 256 tokens measured 33 GFLOP/s
                   # (256 rows) vs 69-105 (1024 rows) vs ~120 for one sgemm on float32 W.


@njit(cache=True)
def _dq_q4_0(w, r0, r1, out, orow):
    # vector IR (simd.dequant_q4_0): the plain loop ran at ~1 G weights/s (2-D uint8 indexing
    # kept LLVM from vectorizing it), which cost as much as the sgemm it feeds at 64 tokens
    flat, o = w.reshape(-1), out.reshape(-1)
    cols = out.shape[1]
    for r in range(r0, r1):
        simd.dequant_q4_0(flat, r * w.shape[1], o, (r - r0 + orow) * cols, cols // 32)


@njit(cache=True)
def _dq_q8_0(w, r0, r1, out, orow):
    flat, o = w.reshape(-1), out.reshape(-1)
    cols = out.shape[1]
    for r in range(r0, r1):
        simd.dequant_q8_0(flat, r * w.shape[1], o, (r - r0 + orow) * cols, cols // 32)


@njit(cache=True)
def _dq_f16(w, r0, r1, out, orow):
    for r in range(r0, r1):
        for c in range(out.shape[1]):
            out[r - r0 + orow, c] = f16_to_f32(w[r, c])


@njit(parallel=True, cache=True)
def dequant_q4_0(w, r0, r1, out, nt):
    for t in prange(nt):
        a, b = split(r1 - r0, nt, t)
        _dq_q4_0(w, r0 + a, r0 + b, out, a)


@njit(parallel=True, cache=True)
def dequant_q8_0(w, r0, r1, out, nt):
    for t in prange(nt):
        a, b = split(r1 - r0, nt, t)
        _dq_q8_0(w, r0 + a, r0 + b, out, a)


@njit(parallel=True, cache=True)
def dequant_f16(w, r0, r1, out, nt):
    for t in prange(nt):
        a, b = split(r1 - r0, nt, t)
        _dq_f16(w, r0 + a, r0 + b, out, a)


def tiled_matmul(dequant, w, X, rows, cols, out, nt, tile_rows=None):
    """out [T, R] = X [T, C] @ W^T, dequantizing W in tiles of rows with `dequant`.

    dequant=None means w is already float32 [R, C] (one sgemm, no tiles).
    """
    if dequant is None:
        np.matmul(X, w.T, out=out)
        return out
    rt = min(rows, tile_rows or TILE_ROWS)
    tile = np.empty((rt, cols), np.float32)
    yt = np.empty((rows, X.shape[0]), np.float32)               # [R, T]: contiguous tile rows
    for r0 in range(0, rows, rt):
        r1 = min(rows, r0 + rt)
        dequant(w, r0, r1, tile, nt)
        np.matmul(tile[: r1 - r0], X.T, out=yt[r0:r1])          # sgemm, X^T read transposed
    out[...] = yt.T
    return out
