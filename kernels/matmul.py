"""Matrix-matrix kernels: Y [T, R] = X [T, C] @ W[R, C]^T for a group of T tokens.

Strategy (measured in benchmarks/kernels.py): dequantize a tile of RT weight rows to
float32 once (parallel Numba, ~4 MiB so it stays in L2/L3) and hand it to OpenBLAS
sgemm against all T tokens. Each weight is unpacked once per call and reused T times,
and sgemm runs at its full rate; an integer per-token loop would redo the unpacking T
times. For a single token the caller uses the matvec kernels instead.

Dequantization bodies `_dq_<type>(w, r0, r1, out)` write rows [r0, r1) of W to
out[0 : r1-r0]; parallel drivers `dequant_<type>(w, r0, r1, out, nt)` split that range
over nt threads.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .matvec import split
from .simd import f16_to_f32

TILE_BYTES = 4 << 20          # float32 bytes of one dequantized tile


@njit(cache=True)
def _dq_q4_0(w, r0, r1, out):
    # Q4_0 block: f16 d, 16 bytes; byte j = element j (low nibble) | element j+16 (high).
    for r in range(r0, r1):
        o = out[r - r0]
        for b in range(out.shape[1] // 32):
            p = b * 18
            d = f16_to_f32(np.uint16(w[r, p]) | np.uint16(w[r, p + 1]) << np.uint16(8))
            for j in range(16):
                v = np.int32(w[r, p + 2 + j])
                o[b * 32 + j] = d * np.float32((v & 15) - 8)
                o[b * 32 + 16 + j] = d * np.float32((v >> 4) - 8)


@njit(cache=True)
def _dq_q8_0(w, r0, r1, out):
    for r in range(r0, r1):
        o = out[r - r0]
        for b in range(out.shape[1] // 32):
            p = b * 34
            d = f16_to_f32(np.uint16(w[r, p]) | np.uint16(w[r, p + 1]) << np.uint16(8))
            for j in range(32):
                o[b * 32 + j] = d * np.float32(np.int8(w[r, p + 2 + j]))


@njit(cache=True)
def _dq_f16(w, r0, r1, out):
    for r in range(r0, r1):
        for c in range(out.shape[1]):
            out[r - r0, c] = f16_to_f32(w[r, c])


@njit(parallel=True, cache=True)
def dequant_q4_0(w, r0, r1, out, nt):
    for t in prange(nt):
        a, b = split(r1 - r0, nt, t)
        _dq_q4_0(w, r0 + a, r0 + b, out[a:])


@njit(parallel=True, cache=True)
def dequant_q8_0(w, r0, r1, out, nt):
    for t in prange(nt):
        a, b = split(r1 - r0, nt, t)
        _dq_q8_0(w, r0 + a, r0 + b, out[a:])


@njit(parallel=True, cache=True)
def dequant_f16(w, r0, r1, out, nt):
    for t in prange(nt):
        a, b = split(r1 - r0, nt, t)
        _dq_f16(w, r0 + a, r0 + b, out[a:])


def tiled_matmul(dequant, w, X, rows, cols, out, nt, tile_rows=None):
    """out [T, R] = X [T, C] @ W^T, dequantizing W in tiles of rows with `dequant`.

    dequant=None means w is already float32 [R, C] (one sgemm, no tiles).
    """
    if dequant is None:
        np.matmul(X, w.T, out=out)
        return out
    rt = tile_rows or max(16, min(rows, TILE_BYTES // (4 * cols)))
    tile = np.empty((rt, cols), np.float32)
    yt = np.empty((rows, X.shape[0]), np.float32)               # [R, T]: contiguous tile rows
    for r0 in range(0, rows, rt):
        r1 = min(rows, r0 + rt)
        dequant(w, r0, r1, tile, nt)
        np.matmul(tile[: r1 - r0], X.T, out=yt[r0:r1])          # sgemm, X^T read transposed
    out[...] = yt.T
    return out
