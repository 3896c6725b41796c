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

from .simd import dot_f16, dot_q4_0, dot_q8_0, f16_to_f32


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

@njit(parallel=True, cache=True)
def matmul_q4_0(w, xq, xd, xc, Y, nt):
    flat = w.reshape(-1)
    rb = w.shape[1]
    for t in prange(nt):
        r0, r1 = split(w.shape[0], nt, t)
        for r in range(r0, r1):
            for k in range(Y.shape[0]):
                Y[k, r] = dot_q4_0(flat, r * rb, xq[k], xd[k], xc[k])


@njit(parallel=True, cache=True)
def matmul_q8_0(w, xq, xd, xc, Y, nt):
    flat = w.reshape(-1)
    rb = w.shape[1]
    for t in prange(nt):
        r0, r1 = split(w.shape[0], nt, t)
        for r in range(r0, r1):
            for k in range(Y.shape[0]):
                Y[k, r] = dot_q8_0(flat, r * rb, xq[k], xd[k], xc[k])


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
