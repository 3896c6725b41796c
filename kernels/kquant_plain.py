"""Plain-Numba twins of kquant.py's row dots: the same integer sums and float operations, one weight at a time.

The tests check both against gguf; the K-quant twins give the same float32 bit for bit as the vector forms.
Same calling convention as kquant.py (see there for the activation arrays); the block count is clamped to
what the arrays hold, as there.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .kquant import QK_K, bf16_to_f32
from .simd import f16_to_f32


@njit(cache=True, inline="always")
def _u(w, i):
    """Byte i of w as int64: Numba types uint8 >> int64 as float64."""
    return np.int64(w[i])


@njit(cache=True, inline="always")
def _h(w, o):
    return f16_to_f32(np.uint16(w[o]) | np.uint16(w[o + 1]) << np.uint16(8))


@njit(cache=True, inline="always")
def _k_nblocks(w, wo, xq, xd, xbs, ts):
    if wo < 0:
        return 0
    return min(xd.shape[0], xq.shape[0] // QK_K, xbs.shape[0] // 16, (w.shape[0] - wo) // ts)


@njit(cache=True, inline="always")
def _k_finish(acc, d, dmin, dx, isum, corr, off):
    if off == 0:
        return acc + ((d * dx) * np.float32(isum) - (dmin * dx) * np.float32(corr))
    return acc + (d * dx) * np.float32(np.int32(isum - off * corr))


@njit(cache=True, inline="always")
def _scale_min_k4(w, p, j):
    """Q4_K/Q5_K scale and min of sub-block j from the 12 bytes at p (get_scale_min_k4)."""
    if j < 4:
        return _u(w, p + j) & 63, _u(w, p + j + 4) & 63
    return (_u(w, p + j + 4) & 15) | ((_u(w, p + j - 4) >> 6) << 4), (_u(w, p + j + 4) >> 4) | ((_u(w, p + j) >> 6) << 4)


@njit(cache=True)
def dot_q4_k_plain(w, wo, xq, xd, xbs):
    acc = np.float32(0.0)
    for i in range(_k_nblocks(w, wo, xq, xd, xbs, 144)):
        p, xo = wo + 144 * i, QK_K * i
        isum, corr = 0, 0
        for s in range(8):
            sc, mn = _scale_min_k4(w, p + 4, s)
            t = 0
            for l in range(32):
                q = _u(w, p + 16 + 32 * (s // 2) + l)
                t += ((q >> 4) if s & 1 else (q & 15)) * xq[xo + 32 * s + l]
            isum += sc * t
            corr += mn * (xbs[16 * i + 2 * s] + xbs[16 * i + 2 * s + 1])
        acc = _k_finish(acc, _h(w, p), _h(w, p + 2), xd[i], isum, corr, 0)
    return acc


@njit(cache=True)
def dot_q5_k_plain(w, wo, xq, xd, xbs):
    acc = np.float32(0.0)
    for i in range(_k_nblocks(w, wo, xq, xd, xbs, 176)):
        p, xo = wo + 176 * i, QK_K * i
        isum, corr = 0, 0
        for s in range(8):
            sc, mn = _scale_min_k4(w, p + 4, s)
            t = 0
            for l in range(32):
                q = _u(w, p + 48 + 32 * (s // 2) + l)
                u = ((q >> 4) if s & 1 else (q & 15)) | (((_u(w, p + 16 + l) >> s) & 1) << 4)
                t += u * xq[xo + 32 * s + l]
            isum += sc * t
            corr += mn * (xbs[16 * i + 2 * s] + xbs[16 * i + 2 * s + 1])
        acc = _k_finish(acc, _h(w, p), _h(w, p + 2), xd[i], isum, corr, 0)
    return acc


@njit(cache=True)
def dot_q6_k_plain(w, wo, xq, xd, xbs):
    acc = np.float32(0.0)
    for i in range(_k_nblocks(w, wo, xq, xd, xbs, 210)):
        p, xo = wo + 210 * i, QK_K * i
        isum, corr = 0, 0
        for g in range(16):                     # 16 weights 16 g .. 16 g + 15, scale g
            c, half = g // 2, (g // 2) // 4
            k = c % 4
            sc = np.int8(_u(w, p + 192 + g))
            t = 0
            for l in range(16 * (g % 2), 16 * (g % 2) + 16):
                ql = _u(w, p + 64 * half + 32 * (k & 1) + l)
                u = ((ql >> 4) if k >= 2 else (ql & 15)) | (((_u(w, p + 128 + 32 * half + l) >> (2 * k)) & 3) << 4)
                t += u * xq[xo + 32 * c + l]
            isum += sc * t
            corr += sc * xbs[16 * i + g]
        acc = _k_finish(acc, _h(w, p + 208), np.float32(0.0), xd[i], isum, corr, 32)
    return acc


@njit(cache=True, inline="always")
def _scale_q3_k(w, p, k):
    """Q3_K scale k (0..15) from the 12 bytes at p, minus 32."""
    lo = (_u(w, p + k % 8) >> (4 * (k // 8))) & 15
    hi = (_u(w, p + 8 + k % 4) >> (2 * (k // 4))) & 3
    return (lo | (hi << 4)) - 32


@njit(cache=True)
def dot_q3_k_plain(w, wo, xq, xd, xbs):
    acc = np.float32(0.0)
    for i in range(_k_nblocks(w, wo, xq, xd, xbs, 110)):
        p, xo = wo + 110 * i, QK_K * i
        isum, corr = 0, 0
        for g in range(16):
            c = g // 2
            n, j = c // 4, c % 4
            sc = _scale_q3_k(w, p + 96, g)
            t = 0
            for l in range(16 * (g % 2), 16 * (g % 2) + 16):
                u = ((_u(w, p + 32 + 32 * n + l) >> (2 * j)) & 3) | (((_u(w, p + l) >> c) & 1) << 2)
                t += u * xq[xo + 32 * c + l]
            isum += sc * t
            corr += sc * xbs[16 * i + g]
        acc = _k_finish(acc, _h(w, p + 108), np.float32(0.0), xd[i], isum, corr, 4)
    return acc


@njit(cache=True)
def dot_q2_k_plain(w, wo, xq, xd, xbs):
    acc = np.float32(0.0)
    for i in range(_k_nblocks(w, wo, xq, xd, xbs, 84)):
        p, xo = wo + 84 * i, QK_K * i
        isum, corr = 0, 0
        for g in range(16):
            c = g // 2
            n, j = c // 4, c % 4
            s = _u(w, p + g)
            t = 0
            for l in range(16 * (g % 2), 16 * (g % 2) + 16):
                t += ((_u(w, p + 16 + 32 * n + l) >> (2 * j)) & 3) * xq[xo + 32 * c + l]
            isum += (s & 15) * t
            corr += (s >> 4) * xbs[16 * i + g]
        acc = _k_finish(acc, _h(w, p + 80), _h(w, p + 82), xd[i], isum, corr, 0)
    return acc


@njit(cache=True, inline="always")
def _dot32_plain(w, wo, xq, xd, xc, ts, qs_at, qh_at, has_m):
    """The 32-block dots one weight at a time; qh_at < 0: no high bits (Q4_1)."""
    nb = min(xd.shape[0], xq.shape[0] // 32, xc.shape[0], (w.shape[0] - wo) // ts) if wo >= 0 else 0
    acc = np.float32(0.0)
    corr = np.float32(0.0)
    for i in range(nb):
        p = wo + ts * i
        qh = 0
        if qh_at >= 0:
            qh = _u(w, p + qh_at) | (_u(w, p + qh_at + 1) << 8) | (_u(w, p + qh_at + 2) << 16) | (_u(w, p + qh_at + 3) << 24)
        t = 0
        for j in range(16):
            q = _u(w, p + qs_at + j)
            t += ((q & 15) | (((qh >> j) & 1) << 4)) * xq[32 * i + j]
            t += ((q >> 4) | (((qh >> (j + 16)) & 1) << 4)) * xq[32 * i + 16 + j]
        d = _h(w, p)
        acc += (d * xd[i]) * np.float32(t)
        corr += (_h(w, p + 2) if has_m else d) * xc[i]
    return acc + corr if has_m else acc - np.float32(16.0) * corr


@njit(cache=True)
def dot_q4_1_plain(w, wo, xq, xd, xc):
    return _dot32_plain(w, wo, xq, xd, xc, 20, 4, -1, True)


@njit(cache=True)
def dot_q5_0_plain(w, wo, xq, xd, xc):
    return _dot32_plain(w, wo, xq, xd, xc, 22, 6, 2, False)


@njit(cache=True)
def dot_bf16_plain(w, wo, x, n8):
    n = 8 * min(n8, x.shape[0] // 8, (w.shape[0] - wo) // 8) if wo >= 0 else 0
    acc = np.float32(0.0)
    for i in range(n):
        acc += bf16_to_f32(w[wo + i]) * x[i]
    return acc
