"""A few tokens: Y [T, R] = X [T, C] W^T with integer row dots, each weight row read from DRAM once.

For up to dispatch.INT_MATMUL_MAX_TOKENS tokens (KTILE_MAX_TOKENS for the K-quants' tiles, INT_DOTS_MAX_TOKENS
for a type without tiles) this
beats dequantize + sgemm (dequant_matmul.py), which is memory-bound on few tokens. The tokens come
quantized per the type's activation scheme: xq int8 [T, C], xd [T, NB], xc [T, NB * sums].

A type whose registry row has a tile (AVX2 only) runs tiles of 1 row x 4 tokens (blocks.row_tile), over blocks of rows:
each block unpacked once per 4 tokens, 4 independent accumulators. Against one block dot per (row,
token) a 2 x 4 tile measured 1.4-2.2x at 2 tokens and 1.9-3.6x at 4-64 tokens; 1 x 4 is 1.3-1.5x faster
again (see simd.py; this machine, 2026-11-27). The K-quants' tiles (kquant.py) unpack each 256-weight
super-block (nibbles, 6-bit scales) once per 4 tokens: against their row dots 1.3-1.7x at 16-32 tokens
(14336 x 4096 and 4096 x 14336, 2 threads, 2026-12-01). Other types take one block dot per (row, token).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .blocks import row_dot, row_tile
from .matvec import split

# Rows per block of the tile loop: a block's weight rows stay in L2 while each 4 tokens' activations stream
# through it (row by row, all T tokens' xq were re-read from L2 for every row). Full-size Mixtral matrices from
# DRAM, 2 threads, 32-64 tokens: 1.07-1.29x the row-by-row order (RESULTS.md, K-quant token tiles).
TILE_BLOCK_ROWS = 16


@njit(cache=True)
def _token_rows(code, tiles, flat, rb, X, xq, xd, xc, xct, Y, r0, r1):
    T = Y.shape[0]
    for a in range(r0, r1, TILE_BLOCK_ROWS):       # a block of rows stays in L2 while 4 tokens' xq stay in L1
        e = min(r1, a + TILE_BLOCK_ROWS)
        k = 0
        while tiles and k + 4 <= T:      # kk = 4 a constant: LLVM folds the tile's switch on kk
            for r in range(a, e):
                t = row_tile(code, flat, r * rb, xq, xd, xc, xct, k, 4)
                Y[k, r], Y[k + 1, r], Y[k + 2, r], Y[k + 3, r] = t
            k += 4
        if tiles and k < T:
            for r in range(a, e):
                t = row_tile(code, flat, r * rb, xq, xd, xc, xct, k, T - k)
                for j in range(T - k):
                    Y[k + j, r] = t[j]
            k = T
        for r in range(a, e):
            for j in range(k, T):
                Y[j, r] = row_dot(code, flat, r * rb, X[j], xq[j], xd[j], xc[j])


@njit(parallel=True, cache=True)
def int_matmul_parallel(code, tiles, w, X, xq, xd, xc, Y, nt):
    """Y [T, R] from w uint8 [R, row_bytes] of type code and X [T, C] quantized as (xq, xd, xc);
    tiles: the type has a tile (else one row dot per (row, token))."""
    flat = w.reshape(-1)
    T, ns = xc.shape
    xct = np.zeros((ns, T + 3), np.float32)          # [NB * sums, T + 3]: a tile loads 4 tokens' sums at once
    if tiles:
        for k in range(T):
            for b in range(ns):
                xct[b, k] = xc[k, b]
    for t in prange(nt):
        r0, r1 = split(w.shape[0], nt, t)
        _token_rows(code, tiles, flat, w.shape[1], X, xq, xd, xc, xct, Y, r0, r1)
