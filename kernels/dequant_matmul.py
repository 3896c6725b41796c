"""Many tokens: Y [T, R] = X [T, C] @ W[R, C]^T by dequantizing W in tiles and calling sgemm.

Strategy for many tokens (measured in benchmarks/kernels.py): dequantize a tile of RT weight rows to
float32 once (parallel Numba, one driver for every type) and hand it to OpenBLAS sgemm against all T
tokens, so each weight is unpacked once and sgemm runs at its full rate. For few tokens dispatch.py
uses int_matmul.py instead (see INT_MATMUL_MAX_TOKENS).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .blocks import dequant_row
from .matvec import split

TILE_ROWS = 1024   # rows per dequantized tile: fewer, larger sgemm calls. At 64-256 rows
                   # sgemm re-packs X for every small tile and the two thread pools (Numba's
                   # OpenMP, OpenBLAS's) hand over often; 256 tokens measured 33 GFLOP/s
                   # (256 rows) vs 69-105 (1024 rows) vs ~120 for one sgemm on float32 W.


@njit(cache=True)
def _dequant_rows(code, w, r0, r1, out, orow):
    # rows go through vector IR (simd.dequant_*): the plain loop ran at ~1 G weights/s
    # (2-D uint8 indexing kept LLVM from vectorizing it), which cost as much as the sgemm it feeds at 64 tokens
    flat, o = w.reshape(-1), out.reshape(-1)
    cols = out.shape[1]
    for r in range(r0, r1):
        dequant_row(code, flat, r * w.shape[1], o, (r - r0 + orow) * cols, cols)


@njit(parallel=True, cache=True)
def dequant_parallel(code, w, r0, r1, out, nt):
    """out [r1 - r0, C] f32 = rows r0..r1-1 of w uint8 [R, row_bytes] of type code, split over nt threads."""
    for t in prange(nt):
        a, b = split(r1 - r0, nt, t)
        _dequant_rows(code, w, r0 + a, r0 + b, out, a)


def tiled_matmul(code, as_stored, w, X, rows, cols, out, nt, tile_rows=None):
    """out [T, R] = X [T, C] @ W^T for w uint8 [R, row_bytes], dequantizing W in tiles of rows.

    as_stored: the rows are float32 already, so one sgemm on them as stored, no tiles.
    """
    if as_stored:
        np.matmul(X, w.view(np.float32).T, out=out)
        return out
    rt = min(rows, tile_rows or TILE_ROWS)
    tile = np.empty((rt, cols), np.float32)
    yt = np.empty((rows, X.shape[0]), np.float32)               # [R, T]: contiguous tile rows
    for r0 in range(0, rows, rt):
        r1 = min(rows, r0 + rt)
        dequant_parallel(code, w, r0, r1, tile, nt)
        np.matmul(tile[: r1 - r0], X.T, out=yt[r0:r1])          # sgemm, X^T read transposed
    out[...] = yt.T
    return out
