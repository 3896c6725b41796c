"""Matrix-vector kernels on stored weights: y[r] = sum_c W[r, c] * x[c].

Shapes: R rows (outputs), C cols (inputs), NB = C / 32 blocks per row.
Block types (q4_0, q8_0) take x quantized once per call to Q8 blocks
(`quantize_q8`, llama.cpp's `quantize_row_q8_0`) and do integer dot products
(see simd.py). Float types (f32, f16) take x as is.

Every type has one serial body `_rows_<type>(w, x, xq, xd, xc, y, r0, r1)` over a
row range and one parallel driver `matvec_<type>(..., nt)` that gives each of nt
threads one contiguous block of rows (prange over threads, not rows, so each
thread streams one contiguous stretch of the weights).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .simd import (HAVE_AVX2, dot_f16, dot_q4_0, dot_q8_0, f16_to_f32, tile_q4_0_x1, tile_q4_0_x2, tile_q4_0_x3,
                   tile_q4_0_x4, tile_q8_0_x1, tile_q8_0_x2, tile_q8_0_x3, tile_q8_0_x4)


@njit(cache=True, inline="always")
def split(n, nt, t):
    """Rows [r0, r1) of thread t when n rows are split into nt contiguous blocks."""
    return n * t // nt, n * (t + 1) // nt


@njit(cache=True)
def quantize_q8(x, xq, xd, xc):
    """x f32 [C] -> xq int8 [C], xd f32 [NB] block scales, xc f32 [NB] = 8 * xd * sum(xq).

    Same rounding as llama.cpp's reference quantize_row_q8_0: d = amax / 127, q = round(x / d).
    """
    for b in range(xd.shape[0]):
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(x[b * 32 + j]))
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        s = 0
        for j in range(32):
            q = np.int8(np.rint(x[b * 32 + j] * inv))
            xq[b * 32 + j] = q
            s += q
        xd[b] = d
        xc[b] = np.float32(8.0) * d * np.float32(s)


# ---- serial bodies over rows [r0, r1) ------------------------------------------------------

@njit(cache=True)
def _rows_q4_0(w, x, xq, xd, xc, y, r0, r1):
    flat = w.reshape(-1)           # w [R, NB*18] C-contiguous: no copy
    rb = w.shape[1]
    for r in range(r0, r1):
        y[r] = dot_q4_0(flat, r * rb, xq, xd, xc)


@njit(cache=True)
def _rows_q8_0(w, x, xq, xd, xc, y, r0, r1):
    flat = w.reshape(-1)           # w [R, NB*34]
    rb = w.shape[1]
    for r in range(r0, r1):
        y[r] = dot_q8_0(flat, r * rb, xq, xd, xc)


@njit(cache=True, fastmath=True)
def _rows_f32(w, x, xq, xd, xc, y, r0, r1):
    for r in range(r0, r1):
        acc = np.float32(0.0)
        for c in range(w.shape[1]):
            acc += w[r, c] * x[c]
        y[r] = acc


@njit(cache=True, fastmath=True)
def _rows_f16(w, x, xq, xd, xc, y, r0, r1):
    flat = w.reshape(-1)           # w uint16 (f16 bits) [R, C]
    cols = w.shape[1]
    n8 = cols // 8
    for r in range(r0, r1):
        acc = dot_f16(flat, r * cols, x, n8)
        for c in range(n8 * 8, cols):
            acc += f16_to_f32(w[r, c]) * x[c]
        y[r] = acc


# ---- parallel drivers: nt threads, one contiguous row block each ------------------------

@njit(parallel=True, cache=True)
def matvec_q4_0(w, x, xq, xd, xc, y, nt):
    for t in prange(nt):
        r0, r1 = split(w.shape[0], nt, t)
        _rows_q4_0(w, x, xq, xd, xc, y, r0, r1)


@njit(parallel=True, cache=True)
def matvec_q8_0(w, x, xq, xd, xc, y, nt):
    for t in prange(nt):
        r0, r1 = split(w.shape[0], nt, t)
        _rows_q8_0(w, x, xq, xd, xc, y, r0, r1)


@njit(parallel=True, cache=True)
def matvec_f32(w, x, xq, xd, xc, y, nt):
    for t in prange(nt):
        r0, r1 = split(w.shape[0], nt, t)
        _rows_f32(w, x, xq, xd, xc, y, r0, r1)


@njit(parallel=True, cache=True)
def matvec_f16(w, x, xq, xd, xc, y, nt):
    for t in prange(nt):
        r0, r1 = split(w.shape[0], nt, t)
        _rows_f16(w, x, xq, xd, xc, y, r0, r1)


# ---- several tokens: Y [T, R]; each weight row is read from DRAM once and reused from L1 ---
# With AVX2, tiles of 1 row x 4 tokens (simd.tile_*): each block unpacked once per 4 tokens, 4 independent
# accumulators. Against one block dot per (row, token) a 2 x 4 tile measured 1.4-2.2x at 2 tokens and
# 1.9-3.6x at 4-64 tokens; 1 x 4 is 1.3-1.5x faster again (see simd.py; this machine, 2026-11-27).

@njit(cache=True)
def _tile_rows(flat, rb, xq, xd, xct, Y, r0, r1, q8):
    T = xq.shape[0]
    for r in range(r0, r1):
        o = r * rb
        k = 0
        while k + 4 <= T:
            t = tile_q8_0_x4(flat, o, rb, xq, xd, xct, k) if q8 else tile_q4_0_x4(flat, o, rb, xq, xd, xct, k)
            for j in range(4):
                Y[k + j, r] = t[j]
            k += 4
        n = T - k
        if n == 3:
            t3 = tile_q8_0_x3(flat, o, rb, xq, xd, xct, k) if q8 else tile_q4_0_x3(flat, o, rb, xq, xd, xct, k)
            for j in range(3):
                Y[k + j, r] = t3[j]
        elif n == 2:
            t2 = tile_q8_0_x2(flat, o, rb, xq, xd, xct, k) if q8 else tile_q4_0_x2(flat, o, rb, xq, xd, xct, k)
            Y[k, r] = t2[0]
            Y[k + 1, r] = t2[1]
        elif n == 1:
            t1 = tile_q8_0_x1(flat, o, rb, xq, xd, xct, k) if q8 else tile_q4_0_x1(flat, o, rb, xq, xd, xct, k)
            Y[k, r] = t1[0]


@njit(cache=True)
def _dot_rows(flat, rb, xq, xd, xc, Y, r0, r1, q8):
    for r in range(r0, r1):
        for k in range(Y.shape[0]):
            Y[k, r] = dot_q8_0(flat, r * rb, xq[k], xd[k], xc[k]) if q8 else dot_q4_0(flat, r * rb, xq[k], xd[k], xc[k])


@njit(parallel=True, cache=True)
def _matmul_tiles(w, xq, xd, xc, Y, nt, q8):
    flat = w.reshape(-1)
    rb = w.shape[1]
    T, nb = xd.shape
    xct = np.zeros((nb, T + 7), np.float32)          # [NB, T + 7]: a tile loads up to 8 tokens' terms at once
    for k in range(T):
        for b in range(nb):
            xct[b, k] = xc[k, b]
    for t in prange(nt):
        r0, r1 = split(w.shape[0], nt, t)
        _tile_rows(flat, rb, xq, xd, xct, Y, r0, r1, q8)


@njit(parallel=True, cache=True)
def _matmul_dots(w, xq, xd, xc, Y, nt, q8):
    for t in prange(nt):
        r0, r1 = split(w.shape[0], nt, t)
        _dot_rows(w.reshape(-1), w.shape[1], xq, xd, xc, Y, r0, r1, q8)


_matmul_int = _matmul_tiles if HAVE_AVX2 else _matmul_dots     # (tiles are x86 IR: never compiled elsewhere)


def matmul_q4_0(w, xq, xd, xc, Y, nt):
    """Y [T, R] from Q4_0 w [R, NB*18] and tokens quantized by quantize_q8_rows."""
    _matmul_int(w, xq, xd, xc, Y, nt, False)


def matmul_q8_0(w, xq, xd, xc, Y, nt):
    """Y [T, R] from Q8_0 w [R, NB*34] and tokens quantized by quantize_q8_rows."""
    _matmul_int(w, xq, xd, xc, Y, nt, True)


@njit(cache=True)
def quantize_q8_rows(X, xq, xd, xc):
    """X f32 [T, C] -> per-token Q8 blocks xq [T, C], xd [T, NB], xc [T, NB]."""
    for k in range(X.shape[0]):
        quantize_q8(X[k], xq[k], xd[k], xc[k])


# ---- fused gate+up for one token: h = silu(W1 x) * (W3 x), same type for W1 and W3 -----

@njit(cache=True, fastmath=True, inline="always")
def _silu_mul(g, u):
    return g / (np.float32(1.0) + np.exp(-g)) * u


# Each thread computes its rows of W1, then the same rows of W3, then silu * up: one weight stream at a
# time. Alternating W1 row r and W3 row r (two streams per thread) measured 9.1-9.9 GB/s against 11.8-12.3
# GB/s for this order and for two separate matvecs (2 threads, 14336 x 4096 Q4_0, this machine, 2026-11-27).

@njit(parallel=True, cache=True)
def gate_up_q4_0(w1, w3, x, xq, xd, xc, h, nt):
    u = np.empty(w1.shape[0], np.float32)
    for t in prange(nt):
        r0, r1 = split(w1.shape[0], nt, t)
        _rows_q4_0(w1, x, xq, xd, xc, h, r0, r1)
        _rows_q4_0(w3, x, xq, xd, xc, u, r0, r1)
        for r in range(r0, r1):
            h[r] = _silu_mul(h[r], u[r])


@njit(parallel=True, cache=True)
def gate_up_q8_0(w1, w3, x, xq, xd, xc, h, nt):
    u = np.empty(w1.shape[0], np.float32)
    for t in prange(nt):
        r0, r1 = split(w1.shape[0], nt, t)
        _rows_q8_0(w1, x, xq, xd, xc, h, r0, r1)
        _rows_q8_0(w3, x, xq, xd, xc, u, r0, r1)
        for r in range(r0, r1):
            h[r] = _silu_mul(h[r], u[r])
