"""Block quantizers for the K-quants (Q2_K..Q6_K), optionally weighted by an importance vector (llama.cpp's
imatrix: one float per column), and the port of llama.cpp's quantizer for the 32-weight Q4_0, Q4_1, Q5_0, Q5_1
too (their search is kernels.quantizers', which takes the port's importance-weighted fits as its guard).

Every K block is quantized twice:
  1. by a port of llama.cpp's own quantizer (ggml-quants.c: quantize_row_qN_K_ref without importance,
     quantize_row_qN_K_impl with it), float32 operation for operation, so its bytes are llama.cpp's
     (tests/test_quantizers.py holds them against `ggml_quantize_chunk`, the function `llama_model_quantize` runs);
  2. by our search, started from the port's per-sub-block fits: refit each sub-block's scale and min to the
     squared error (weighted by the importance), search the super-block's f16 scales jointly with the
     integer sub-block scales, then refit the f16 scales by least squares and scale them so that the block
     is not shrunk along x (x̂·x = x·x; least squares alone shrinks every output of the matrix coherently
     by the relative squared error, which costs more KL than the RMSE it saves: RESULTS.md, Quantizer),
and the block keeps whichever of the two dequantizes closer to x (the error of the f16 and integer values
as stored). So no block, and no tensor, is ever worse than llama.cpp's quantizer makes it.

The error counted is sum_i w_i (x_i - x̂_i)², w = importance[column] (1 without one): without an imatrix
that is plain squared error, which llama.cpp approximates with its own weights (x², |x|, av|x| + |x|).

One representation serves all types: per super-block an f16 scale d, an f16 min scale dm, integer
sub-block scales sc[j] and mins mn[j], codes L[i] in 0..2^bits-1, and x̂ = d·sc[j]·(L[i] - QOFF) - dm·mn[j].
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from lazymoe.kernels import klanes
from lazymoe.kernels.f16 import f16_bits, f16_finite
from lazymoe.kernels.f16 import f16_f32 as _f16

f32 = np.float32
QK_K = 256
GROUP_MAX_EPS = f32(1e-15)
# Our sub-block fits, by type: NGRID candidate scales, N_OFF offsets of the lowest value tried per scale (types
# with mins), NIT rounds of codes then least squares from each of the N_KEEP best starts. NGRID 11 gained under
# 0.1 % RMSE over these (0.14 % on Q6_K over 7) at 20-45 % more time (RESULTS.md, Quantizer); Q2_K's N_OFF 2 and
# NIT 1 cost it 0.05 % of its 9.3 % RMSE reduction, Q6_K's NIT 1, N_KEEP 2 0.04 % of its 5.4 % and Q3_K's NIT 1
# 0.01 % of its 3.8 %, for 8-25 % of their time (gaussian 128 x 4096): the time they lacked of half llama.cpp's speed.
NGRID = {"q2_k": 5, "q3_k": 5, "q4_k": 5, "q5_k": 5, "q6_k": 7}
N_OFF = {"q2_k": 2, "q3_k": 1, "q4_k": 4, "q5_k": 4, "q6_k": 1}
NIT = {"q2_k": 1, "q3_k": 1, "q4_k": 2, "q5_k": 2, "q6_k": 1}
N_KEEP = {"q2_k": 3, "q3_k": 3, "q4_k": 3, "q5_k": 3, "q6_k": 2}
T_LO, T_HI = -1.0, 1.5     # the candidate scales' range: the sub-block's extreme maps to qmax + T_LO .. qmax + T_HI
# Super-block scales, by type: N_D candidates (the largest sub-block scale maps to 63, 62.75, ...), of whose
# (d, dmin) pairs ranked by the quadratic model N_FULL are evaluated, then N_REFINE rounds of integer-scale
# neighbours and least-squares (d, dmin). Q3_K's 3, 2, 1 (from 9, 3, 2) cost 0.03 % of its 3.75 % RMSE reduction
# and took it from 0.24 to 0.27 of llama.cpp's speed (`benchmarks.quantize speed`).
N_D = {"q2_k": 9, "q3_k": 3, "q4_k": 9, "q5_k": 9, "q6_k": 9}
N_FULL = {"q2_k": 3, "q3_k": 2, "q4_k": 3, "q5_k": 3, "q6_k": 3}
N_REFINE = {"q2_k": 2, "q3_k": 1, "q4_k": 2, "q5_k": 2, "q6_k": 2}
D_STEP = 0.25
N_UNSHRINK = 2             # rounds of scaling (d, dmin) against the shrink along x, then codes
# The search only ranks candidates: reductions may be reordered (vectorised); no assumption of finite values.
FAST = {"reassoc", "contract"}

# Per type: (sub-blocks per block, sub-block length, largest code, code offset, smallest and largest
# sub-block scale, whether it has mins). Kind ids index the rows.
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q4_0, Q4_1, Q5_0, Q5_1 = range(9)
KIND = {"q2_k": Q2_K, "q3_k": Q3_K, "q4_k": Q4_K, "q5_k": Q5_K, "q6_k": Q6_K,
        "q4_0": Q4_0, "q4_1": Q4_1, "q5_0": Q5_0, "q5_1": Q5_1}
#                 nsub sublen qmax qoff  slo  shi has_min  block bytes
LAYOUT = np.array([[16, 16, 3, 0, 0, 15, 1, 256, 84],       # q2_k
                   [16, 16, 7, 4, -32, 31, 0, 256, 110],    # q3_k
                   [8, 32, 15, 0, 0, 63, 1, 256, 144],      # q4_k
                   [8, 32, 31, 0, 0, 63, 1, 256, 176],      # q5_k
                   [16, 16, 63, 32, -128, 127, 0, 256, 210],  # q6_k
                   [1, 32, 15, 8, 1, 1, 0, 32, 18],         # q4_0: sc = 1, d carries the scale
                   [1, 32, 15, 0, 1, 1, 1, 32, 20],         # q4_1: mn = -1, dm = -m (x̂ = d·L + m)
                   [1, 32, 31, 16, 1, 1, 0, 32, 22],        # q5_0
                   [1, 32, 31, 0, 1, 1, 1, 32, 24]],        # q5_1
                  dtype=np.int64)


# ---------------------------------------------------------------- scalar helpers (llama.cpp's arithmetic)

@njit(cache=True)
def _ni(v) -> int:
    """nearest_int: round half to even of a float32 (|v| < 2^22 in llama.cpp's use)."""
    return int(np.rint(v))


# ---------------------------------------------------------------- ports of llama.cpp's helpers (float32)

@njit(cache=True)
def _make_qx_quants(n, nmax, x, L, rmse_type, qw, has_qw):
    """make_qx_quants: symmetric codes L = nmax + clamp(l, -nmax, nmax-1); returns the scale."""
    if rmse_type == 1:
        return _make_qx(x, 0, n, nmax, L, qw, has_qw, np.empty((3, NQX), f32))
    mx = f32(0.0)
    amax = f32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return f32(0.0)
    iscale = f32(-nmax) / mx
    for i in range(n):
        l = _ni(iscale * x[i])
        L[i] = nmax + max(-nmax, min(nmax - 1, l))
    return f32(1.0) / iscale


NQX = 18          # make_qx_quants' trial scales: -(nmax + 0.1·s)/max, s = -9..9 but 0


@njit(cache=True)
def _make_qx(x, o, n, nmax, L, qw, has_qw, tw):
    """make_qx_quants with rmse_type 1 on x[o:o+n] (weights qw[o:o+n], or x²), codes into L[o:o+n]; returns
    the scale. Its 18 trial scales are independent: they run side by side (lanes of tw), each
    trial's sums in llama.cpp's order over i, then llama.cpp's sequential choice among them. tw [3, NQX] f32."""
    if o < 0 or n <= 0:                           # offsets >= 0: no index wrap-around
        return f32(0.0)
    mx = f32(0.0)
    amax = f32(0.0)
    for i in range(o, o + n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(o, o + n):
            L[i] = 0
        return f32(0.0)
    fmax = f32(nmax)
    iscale = f32(-nmax) / mx
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    for i in range(o, o + n):
        l = max(-nmax, min(nmax - 1, _ni(iscale * x[i])))
        L[i] = l + nmax
        w = qw[i] if has_qw else x[i] * x[i]
        fl = f32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else f32(0.0)
    best = scale * sumlx
    for t in range(NQX):
        s = t - 9 if t < 9 else t - 8
        tw[0, t] = f32(0.0)
        tw[1, t] = f32(0.0)
        tw[2, t] = -(fmax + f32(0.1) * f32(s)) / mx
    for i in range(o, o + n):
        xi = x[i]
        w = qw[i] if has_qw else xi * xi
        wx = w * xi
        for t in range(NQX):
            fl = max(-fmax, min(fmax - f32(1.0), np.rint(tw[2, t] * xi)))
            tw[0, t] += wx * fl
            tw[1, t] += w * fl * fl
    bt = -1
    for t in range(NQX):
        if tw[1, t] > 0 and tw[0, t] * tw[0, t] > best * tw[1, t]:
            scale = tw[0, t] / tw[1, t]
            best = scale * tw[0, t]
            bt = t
    if bt >= 0:
        iscale = tw[2, bt]
        for i in range(o, o + n):
            L[i] = nmax + max(-nmax, min(nmax - 1, _ni(iscale * x[i])))
    return scale


NTRIAL = 40       # the most trial scales of a port function (make_qkx3_quants' 37), padded to whole vectors


@njit(cache=True, inline="always")
def _qkx_level(v, fmax, v3):
    """A trial's code for x - min scaled by its iscale, as float32: make_qkx3_quants' (v3) or make_qkx2_quants'."""
    if v3:
        return np.rint(min(v, fmax)) if v > 0 else f32(0.0)
    return max(f32(0.0), min(fmax, np.rint(v)))


@njit(cache=True)
def _make_qkx_at(x, o, n, nmax, weights, wo, L, rmin, rdelta, nstep, use_mad, v3, tw):
    """make_qkx2_quants (v3 False) / make_qkx3_quants (v3 True) on x[o:o+n], weights[wo:wo+n]: codes 0..nmax
    into L[o:o+n]; returns (scale, -min). tw [8, NTRIAL] f32 scratch.

    llama.cpp tries nstep + 1 scales in turn, and a trial that wins moves the min the later ones start from.
    Here the trials from the current min run side by side (lanes of tw), each one's float32 sums in llama.cpp's
    order over i; walking them in order, the first that wins is taken and the trials after it rerun from its
    min. So every trial sees llama.cpp's min and its arithmetic: the same bits."""
    nl = (nstep + 8) // 8 * 8                       # lanes: the trials, padded to whole vectors
    if o < 0 or wo < 0 or n <= 0 or nstep < 0 or nl > NTRIAL:  # offsets >= 0: no index wrap-around
        return f32(0.0), f32(0.0)
    mn = x[o]
    mx = x[o]
    sum_w = weights[wo]
    sum_x = sum_w * x[o]
    for i in range(1, n):
        xi = x[o + i]
        if xi < mn:
            mn = xi
        if xi > mx:
            mx = xi
        w = weights[wo + i]
        sum_w += w
        sum_x += w * xi
    if mn > 0:
        mn = f32(0.0)
    if (mx <= mn) if v3 else (mx == mn):
        for i in range(o, o + n):
            L[i] = 0
        return f32(0.0), -mn
    fmax = f32(nmax)
    iscale = fmax / (mx - mn)
    scale = f32(1.0) / iscale
    best_error = f32(0.0)
    for i in range(n):
        l = _ni(iscale * (x[o + i] - mn))
        L[o + i] = max(0, min(nmax, l))
        diff = scale * f32(L[o + i]) + mn - x[o + i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[wo + i] * diff
    ISC, SL, SL2, SXL, TSC, TMN, CUR, OK = 0, 1, 2, 3, 4, 5, 6, 7
    win_isc = f32(0.0)                               # the last winner's scale and the min its codes came from
    win_mn = f32(0.0)
    won_any = False
    s0 = 0
    while s0 <= nstep:
        for t in range(nl):                        # all lanes (a loop of known length); only s0..nstep are used
            tw[ISC, t] = (rmin + rdelta * f32(t) + fmax) / (mx - mn)
            tw[SL, t] = f32(0.0)
            tw[SL2, t] = f32(0.0)
            tw[SXL, t] = f32(0.0)
            tw[CUR, t] = f32(0.0)
        for i in range(n):
            xi = x[o + i]
            xm = xi - mn
            w = weights[wo + i]
            for t in range(nl):
                fl = _qkx_level(tw[ISC, t] * xm, fmax, v3)
                wl = w * fl
                tw[SL, t] += wl
                tw[SL2, t] += wl * fl
                tw[SXL, t] += wl * xi
        for t in range(nl):
            sl, sl2, sxl = tw[SL, t], tw[SL2, t], tw[SXL, t]
            D = sum_w * sl2 - sl * sl
            tw[OK, t] = f32(1.0) if D > 0 else f32(0.0)
            this_scale = (sum_w * sxl - sum_x * sl) / D if D > 0 else f32(0.0)
            this_min = (sl2 * sum_x - sl * sxl) / D if D > 0 else f32(0.0)
            if this_min > 0:
                this_min = f32(0.0)
                this_scale = sxl / sl2
            tw[TSC, t] = this_scale
            tw[TMN, t] = this_min
        for i in range(n):
            xi = x[o + i]
            xm = xi - mn
            w = weights[wo + i]
            for t in range(nl):
                fl = _qkx_level(tw[ISC, t] * xm, fmax, v3)
                diff = tw[TSC, t] * fl + tw[TMN, t] - xi
                diff = abs(diff) if use_mad else diff * diff
                tw[CUR, t] += w * diff
        won = -1
        for t in range(s0, nstep + 1):
            if tw[OK, t] > 0 and tw[CUR, t] < best_error:
                won = t
                break
        if won < 0:
            break
        best_error = tw[CUR, won]
        scale = tw[TSC, won]
        win_isc = tw[ISC, won]
        win_mn = mn
        won_any = True
        mn = tw[TMN, won]
        s0 = won + 1
    if won_any:
        for i in range(n):
            v = win_isc * (x[o + i] - win_mn)
            if v3:
                L[o + i] = _ni(min(v, fmax)) if v > 0 else 0
            else:
                L[o + i] = max(0, min(nmax, _ni(v)))
    return scale, -mn


@njit(cache=True)
def _make_qp_quants(n, nmax, x, L, qw):
    """make_qp_quants: non-negative codes for the sub-block scales (or mins) x [n]; returns their scale."""
    mx = f32(0.0)
    for i in range(n):
        mx = max(mx, x[i])
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return f32(0.0)
    iscale = f32(nmax) / mx
    for i in range(n):
        L[i] = _ni(iscale * x[i])
    scale = f32(1.0) / iscale
    best_mse = f32(0.0)
    for i in range(n):
        diff = x[i] - scale * f32(L[i])
        best_mse += qw[i] * diff * diff
    for s in range(-4, 5):
        if s == 0:
            continue
        iscale_is = (f32(0.1) * f32(s) + f32(nmax)) / mx
        scale_is = f32(1.0) / iscale_is
        mse = f32(0.0)
        for i in range(n):
            l = min(nmax, _ni(iscale_is * x[i]))
            diff = x[i] - scale_is * f32(l)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    for i in range(n):
        l = min(nmax, _ni(iscale * x[i]))
        L[i] = l
        sumlx += qw[i] * x[i] * f32(l)
        suml2 += qw[i] * f32(l) * f32(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            slx = sumlx - w * x[i] * f32(L[i])
            sl2 = suml2 - w * f32(L[i]) * f32(L[i])
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, _ni(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += w * x[i] * f32(new_l)
                    sl2 += w * f32(new_l) * f32(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else f32(0.0)


# ---------------------------------------------------------------- ports of llama.cpp's block quantizers
# Each fills (d, dm) [2] f32 (f16 values), sc, mn [nsub] int64, L [bs] int64 codes, and the float
# sub-block fits fa, fb [nsub] f32 (x ≈ fa·l - fb) our search starts from. x [bs] f32, qw [bs] f32.

@njit(cache=True)
def _requant_min(x, sublen, nsub, qmax, dd, sc, mn, L):
    """llama.cpp's final pass for min types: L = clamp(round((x + dm·mn)/(d·sc))) where d·sc != 0."""
    for j in range(nsub):
        d = dd[0] * f32(sc[j])
        if d == 0:
            continue
        m = dd[1] * f32(mn[j])
        for ii in range(sublen):
            i = sublen * j + ii
            L[i] = max(0, min(qmax, _ni((x[i] + m) / d)))


@njit(cache=True)
def _requant_sym(x, sublen, nsub, qoff, dd, sc, L):
    """llama.cpp's final pass for Q3_K/Q6_K: L = clamp(round(x/(d·sc)), -qoff, qoff-1) + qoff."""
    for j in range(nsub):
        d = dd[0] * f32(sc[j])
        if d == 0:
            continue
        for ii in range(sublen):
            i = sublen * j + ii
            L[i] = max(-qoff, min(qoff - 1, _ni(x[i] / d))) + qoff


@njit(cache=True)
def _port_q2_k(x, qw, has_qw, dd, sc, mn, L, fa, fb, tw):
    wt = np.empty(16, f32)
    if not has_qw:                                   # quantize_row_q2_K_ref
        max_scale = f32(0.0)
        max_min = f32(0.0)
        for j in range(16):
            for l in range(16):
                wt[l] = abs(x[16 * j + l])
            s, m = _make_qkx_at(x, 16 * j, 16, 3, wt, 0, L, f32(-0.5), f32(0.1), 15, True, False, tw)
            fa[j] = s
            fb[j] = m
            max_scale = max(max_scale, s)
            max_min = max(max_min, m)
        if max_scale > 0:
            iscale = f32(15.0) / max_scale
            for j in range(16):
                sc[j] = _ni(iscale * fa[j])
            dd[0] = _f16(max_scale / f32(15.0))
        else:
            for i_ in range(16):
                sc[i_] = 0
            dd[0] = f32(0.0)
        if max_min > 0:
            iscale = f32(15.0) / max_min
            for j in range(16):
                mn[j] = _ni(iscale * fb[j])
            dd[1] = _f16(max_min / f32(15.0))
        else:
            for i_ in range(16):
                mn[i_] = 0
            dd[1] = f32(0.0)
    else:                                            # quantize_row_q2_K_impl
        sw = np.zeros(16, f32)
        sumx2 = f32(0.0)
        for j in range(256):
            sumx2 += x[j] * x[j]
        sigma2 = sumx2 / f32(256.0)
        for j in range(16):
            for l in range(16):
                wt[l] = qw[16 * j + l] * f32(math.sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]))
            for l in range(16):
                sw[j] += wt[l]
            s, m = _make_qkx_at(x, 16 * j, 16, 3, wt, 0, L, f32(-0.9), f32(0.05), 36, False, True, tw)
            fa[j] = s
            fb[j] = m
        Ls = np.empty(16, np.int64)
        Lm = np.empty(16, np.int64)
        dm_ = _make_qp_quants(16, 15, fa, Ls, sw)
        mm_ = _make_qp_quants(16, 15, fb, Lm, sw)
        dd[0] = _f16(dm_)
        dd[1] = _f16(mm_)
        for j in range(16):
            sc[j] = Ls[j] & 15
            mn[j] = (Lm[j] << 4 & 0xFF) >> 4
    _requant_min(x, 16, 16, 3, dd, sc, mn, L)


@njit(cache=True)
def _port_q3_k(x, qw, has_qw, dd, sc, mn, L, fa, fb):
    """quantize_row_q3_K_impl; without importance (quantize_row_q3_K_ref) the port is klanes.q3_port."""
    if not has_qw:
        raise ValueError("Q3_K's port without importance is klanes.q3_port")
    for i_ in range(16):
        mn[i_] = 0
    dd[1] = f32(0.0)
    wt = np.empty(16, f32)
    sw = np.empty(16, f32)
    Ls = np.empty(16, np.int64)
    sumx2 = f32(0.0)
    for j in range(256):
        sumx2 += x[j] * x[j]
    sigma2 = f32(2.0) * sumx2 / f32(256.0)
    for j in range(16):
        for l in range(16):
            wt[l] = qw[16 * j + l] * f32(math.sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]))
        sumw = f32(0.0)
        for l in range(16):
            sumw += wt[l]
        sw[j] = sumw
        fa[j] = _make_qx_quants(16, 4, x[16 * j:16 * j + 16], L[16 * j:16 * j + 16], 1, wt, True)
    d_block = _make_qx_quants(16, 32, fa, Ls, 1, sw, True)
    for j in range(16):
        sc[j] = (Ls[j] & 63) - 32
    dd[0] = _f16(d_block)
    for j in range(16):
        fb[j] = f32(0.0)
    _requant_sym(x, 16, 16, 4, dd, sc, L)


@njit(cache=True)
def _port_q45_k(x, qw, has_qw, dd, sc, mn, L, fa, fb, nmax, tw):
    """Q4_K (nmax 15) and Q5_K (nmax 31), ref and impl."""
    wt = np.empty(32, f32)
    if not has_qw:
        max_scale = f32(0.0)
        max_min = f32(0.0)
        for j in range(8):
            sum_x2 = f32(0.0)
            for l in range(32):
                sum_x2 += x[32 * j + l] * x[32 * j + l]
            av_x = f32(math.sqrt(sum_x2 / f32(32.0)))
            for l in range(32):
                wt[l] = av_x + abs(x[32 * j + l])
            if nmax == 15:
                s, m = _make_qkx_at(x, 32 * j, 32, 15, wt, 0, L, f32(-1.0), f32(0.1), 20, False, False, tw)
            else:
                s, m = _make_qkx_at(x, 32 * j, 32, 31, wt, 0, L, f32(-0.5), f32(0.1), 15, False, False, tw)
            fa[j] = s
            fb[j] = m
            max_scale = max(max_scale, s)
            max_min = max(max_min, m)
        inv_scale = f32(63.0) / max_scale if max_scale > 0 else f32(0.0)
        inv_min = f32(63.0) / max_min if max_min > 0 else f32(0.0)
        for j in range(8):
            sc[j] = min(63, _ni(inv_scale * fa[j]) & 0xFF)
            mn[j] = min(63, _ni(inv_min * fb[j]) & 0xFF)
        dd[0] = _f16(max_scale / f32(63.0))
        dd[1] = _f16(max_min / f32(63.0))
    else:
        sw = np.empty(8, f32)
        Ls = np.empty(8, np.int64)
        Lm = np.empty(8, np.int64)
        sum_x2 = f32(0.0)
        for l in range(256):
            sum_x2 += x[l] * x[l]
        sigma2 = f32(2.0) * sum_x2 / f32(256.0)
        for j in range(8):
            for l in range(32):
                wt[l] = qw[32 * j + l] * f32(math.sqrt(sigma2 + x[32 * j + l] * x[32 * j + l]))
            sumw = f32(0.0)
            for l in range(32):
                sumw += wt[l]
            sw[j] = sumw
            s, m = _make_qkx_at(x, 32 * j, 32, nmax, wt, 0, L, f32(-0.9), f32(0.05), 36, False, True, tw)
            fa[j] = s
            fb[j] = m
        d_block = _make_qp_quants(8, 63, fa, Ls, sw)
        m_block = _make_qp_quants(8, 63, fb, Lm, sw)
        for j in range(8):
            sc[j] = min(63, Ls[j] & 0xFF)
            mn[j] = min(63, Lm[j] & 0xFF)
        dd[0] = _f16(d_block)
        dd[1] = _f16(m_block)
    _requant_min(x, 32, 8, nmax, dd, sc, mn, L)


@njit(cache=True)
def _port_q6_k(x, qw, has_qw, dd, sc, mn, L, fa, fb, tw):
    for i_ in range(16):
        mn[i_] = 0
    dd[1] = f32(0.0)
    max_scale = f32(0.0)
    max_abs = f32(0.0)
    for j in range(16):
        s = _make_qx(x, 16 * j, 16, 32, L, qw, has_qw, tw)
        fa[j] = s
        fb[j] = f32(0.0)
        if abs(s) > max_abs:
            max_abs = abs(s)
            max_scale = s
    if max_abs < GROUP_MAX_EPS:                     # llama.cpp zeroes the block: codes 0, scales 0
        dd[0] = f32(0.0)
        for i_ in range(16):
            sc[i_] = 0
        for i_ in range(256):
            L[i_] = 0
        return
    iscale = f32(-128.0) / max_scale
    dd[0] = _f16(f32(1.0) / iscale)
    for j in range(16):
        sc[j] = min(127, _ni(iscale * fa[j]))
    _requant_sym(x, 16, 16, 32, dd, sc, L)


@njit(cache=True)
def _port_q32(x, qw, has_qw, sigma2, kind, dd, sc, mn, L, fa, fb, tw):
    """Q4_0, Q4_1, Q5_0, Q5_1: quantize_row_qN_ref without importance, quantize_row_qN_impl with it."""
    sc[0] = 1
    if kind == Q4_0 or kind == Q5_0:
        half = 8 if kind == Q4_0 else 16
        mn[0] = 0
        dd[1] = f32(0.0)
        if has_qw:
            wt = np.empty(32, f32)
            for j in range(32):
                wt[j] = qw[j] * f32(math.sqrt(sigma2 + x[j] * x[j]))
            d = _make_qx(x, 0, 32, half, L, wt, True, tw)
            dd[0] = _f16(d)
            fa[0] = d
        else:
            amax = f32(0.0)
            mx = f32(0.0)
            for j in range(32):
                if amax < abs(x[j]):
                    amax = abs(x[j])
                    mx = x[j]
            d = mx / f32(-half)
            idv = f32(1.0) / d if d != 0 else f32(0.0)
            dd[0] = _f16(d)
            fa[0] = d
            for j in range(32):
                L[j] = min(2 * half - 1, _trunc8(x[j] * idv + f32(half + 0.5)))
        fb[0] = f32(0.0)
        return
    nmax = 15 if kind == Q4_1 else 31
    mn[0] = -1
    if has_qw:
        wt = np.empty(32, f32)
        for j in range(32):
            wt[j] = qw[j] * f32(math.sqrt(sigma2 + x[j] * x[j]))
        d, m = _make_qkx_at(x, 0, 32, nmax, wt, 0, L, f32(-0.9), f32(0.05), 36, False, True, tw)
        dd[0] = _f16(d)
        dd[1] = _f16(-m)                             # stored m = min (<= 0); x̂ = d·L + m = d·L - dm·(-1)
        fa[0] = d
        fb[0] = m
        return
    lo = f32(3.4028234663852886e38)
    hi = f32(-3.4028234663852886e38)
    for j in range(32):
        lo = min(lo, x[j])
        hi = max(hi, x[j])
    d = (hi - lo) / f32(nmax)
    idv = f32(1.0) / d if d != 0 else f32(0.0)
    dd[0] = _f16(d)
    dd[1] = _f16(lo)
    fa[0] = d
    fb[0] = -lo
    for j in range(32):
        v = (x[j] - lo) * idv + f32(0.5)
        L[j] = min(nmax, _trunc8(v)) if kind == Q4_1 else int(v) & 0xFF


@njit(cache=True)
def _trunc8(v) -> int:
    """(int8_t)(float v) as llama.cpp's x86 build computes it: truncate toward zero, wrap into int8."""
    t = int(v)
    return ((t + 128) & 0xFF) - 128


@njit(cache=True)
def port_block(kind, x, qw, has_qw, sigma2, dd, sc, mn, L, fa, fb, tw):
    """llama.cpp's quantizer on one block x [bs] (importance qw [bs] when has_qw): fills the representation.
    tw [8, NTRIAL] f32 is scratch."""
    if kind == Q2_K:
        _port_q2_k(x, qw, has_qw, dd, sc, mn, L, fa, fb, tw)
    elif kind == Q3_K:
        _port_q3_k(x, qw, has_qw, dd, sc, mn, L, fa, fb)
    elif kind == Q4_K:
        _port_q45_k(x, qw, has_qw, dd, sc, mn, L, fa, fb, 15, tw)
    elif kind == Q5_K:
        _port_q45_k(x, qw, has_qw, dd, sc, mn, L, fa, fb, 31, tw)
    elif kind == Q6_K:
        _port_q6_k(x, qw, has_qw, dd, sc, mn, L, fa, fb, tw)
    else:
        _port_q32(x, qw, has_qw, sigma2, kind, dd, sc, mn, L, fa, fb, tw)


# ---------------------------------------------------------------- errors of a representation

@njit(cache=True, fastmath={"reassoc"})
def block_error(kind, x, w, dd, sc, mn, L):
    """sum w (x - x̂)² of the block as stored: x̂ dequantized in float32 as gguf.quants does (float64 sum)."""
    nsub, sublen, qoff = LAYOUT[kind, 0], LAYOUT[kind, 1], LAYOUT[kind, 3]
    e = 0.0
    for j in range(nsub):
        dl = dd[0] * f32(sc[j])
        ml = dd[1] * f32(mn[j])
        for ii in range(sublen):
            i = sublen * j + ii
            y = dl * f32(L[i] - qoff) - ml
            r = float(x[i]) - float(y)
            e += w[i] * r * r
    return e if e == e else math.inf


# rows of the search's float64 scratch fw [FW_ROWS, FW_COLS]: per sub-block fits a, b and sums of their codes;
# (d, dmin) candidates and their ranks; dmin values; _fit_sub's kept starts
_A, _B, _HVV, _HV, _HW, _CD, _CDM, _CE, _CDMK, _KA, _KB, _KE = range(12)
FW_ROWS, FW_COLS = 12, max(16, *N_KEEP.values(), *N_FULL.values(), *N_D.values())

# The search's functions are inlined (Numba IR) into one compiled search per type (_ours_k_for), which passes the
# type's layout and settings as constants, all but the sub-block length: loops over a known 16 or 32 were unrolled
# into scalar chains; on a runtime length (and offsets known >= 0) they vectorise.

@njit(inline="always", fastmath=FAST)
def _kcodes(x, w, o, n, qmax, qoff, dl, m, L):
    """Best codes for x[o:o+n] given the effective scale dl and min m (x̂ = dl·(L - qoff) - m), as float32 into
    L[o:o+n]; returns the error sum w (x - x̂)². float32 throughout, so that the loop vectorises."""
    if o < 0 or n <= 0:                           # lets LLVM drop the negative-index wrap-around (a gather)
        return 0.0
    fq = f32(qmax)
    fo = f32(qoff)
    m32 = f32(m)
    e = f32(0.0)
    if dl == 0.0:
        for i in range(o, o + n):
            L[i] = fo
            r = x[i] + m32
            e += w[i] * r * r
        return float(e)
    inv = f32(1.0 / dl)
    c = f32(m / dl + (qoff + 0.5))
    d32 = f32(dl)
    for i in range(o, o + n):
        q = min(fq, max(f32(0.0), np.floor(x[i] * inv + c)))
        L[i] = q
        r = x[i] - d32 * (q - fo) + m32
        e += w[i] * r * r
    return float(e)


@njit(inline="always", fastmath=FAST)
def _fit_sub(x, w, o, n, qmax, qoff, has_min, a, b, L, ngrid, noff, nit, nkeep, fw):
    """Refine one sub-block's float fit x ≈ a·(L - qoff) - b (b >= 0 with mins, b = 0 without) to the
    weighted squared error; x[o:o+n], w f32. Starts: llama.cpp's fit, and ngrid scales over the range (the
    extreme mapped to qmax + T_LO .. qmax + T_HI) times noff offsets of the lowest value (-0.5 .. 0.5 of a
    step; 1 without mins); one round of codes then least squares from each, nit more from the nkeep best (rows _KA, _KB, _KE
    of the scratch fw). Returns (a, b, error); L[o:o+n] f32 holds the codes."""
    if o < 0 or n <= 0:
        return float(a), float(b), 0.0
    lo32 = f32(0.0)
    hi32 = f32(0.0)
    sw32 = f32(0.0)
    sx32 = f32(0.0)
    sxx32 = f32(0.0)
    for i in range(o, o + n):
        xi = x[i]
        lo32 = min(lo32, xi)
        hi32 = max(hi32, xi)
        wx = w[i] * xi
        sw32 += w[i]
        sx32 += wx
        sxx32 += wx * xi
    lo, hi = float(lo32), float(hi32)
    sw, sx, sxx = float(sw32), float(sx32), float(sxx32)
    vmax = hi if hi >= -lo else lo                # the value of largest magnitude
    if vmax == 0.0:
        _kcodes(x, w, o, n, qmax, qoff, 0.0, 0.0, L)
        return 0.0, 0.0, 0.0
    # one round from every start; nit rounds more from the nkeep best
    for q in range(nkeep):
        fw[_KE, q] = math.inf
    best_e = math.inf
    best_a, best_b = float(a), float(b)
    nstart = 1 + ngrid * noff
    fq = f32(qmax)
    fo = f32(qoff)
    for k in range(nstart + nkeep):
        if k == 0:                                    # llama.cpp's own fit
            ca, cb = float(a), float(b)
        elif k < nstart:
            ka, kb = (k - 1) // noff, (k - 1) % noff
            t = T_LO + (T_HI - T_LO) * ka / max(1, ngrid - 1)
            if has_min:
                if hi <= lo:
                    continue
                ca = (hi - lo) / (qmax + t)
                cb = -lo + ca * (-0.5 + kb / max(1, noff - 1)) if noff > 1 else -lo
            else:                                     # the extreme to the negative end, then the positive end
                ca = vmax / (-(qoff + t)) if ka % 2 == 0 else vmax / (qmax - qoff - t)
                cb = 0.0
        else:
            if fw[_KE, k - nstart] == math.inf:
                continue
            ca, cb = fw[_KA, k - nstart], fw[_KB, k - nstart]
        for _it in range(1 if k < nstart else nit):
            if ca == 0.0 or not math.isfinite(ca):
                break
            inv = f32(1.0 / ca)
            c = f32(cb / ca + (qoff + 0.5))
            sv32 = f32(0.0)
            svv32 = f32(0.0)
            sxv32 = f32(0.0)
            for i in range(o, o + n):
                v = min(fq, max(f32(0.0), np.floor(x[i] * inv + c))) - fo
                wv = w[i] * v
                sv32 += wv
                svv32 += wv * v
                sxv32 += wv * x[i]
            sv, svv, sxv = float(sv32), float(svv32), float(sxv32)
            if svv <= 0.0:
                break
            if has_min:
                D = sw * svv - sv * sv
                if D <= 0.0:
                    break
                na = (sw * sxv - sx * sv) / D
                nb = (sv * sxv - svv * sx) / D        # x ≈ na·v - nb
                if nb < 0.0:
                    nb = 0.0
                    na = sxv / svv
            else:
                na = sxv / svv
                nb = 0.0
            if na == 0.0:
                break
            # sum w (x - na·v + nb)², from the sums
            e = sxx - 2.0 * na * sxv + 2.0 * nb * sx + na * na * svv - 2.0 * na * nb * sv + nb * nb * sw
            if e < best_e:
                best_e, best_a, best_b = e, na, nb
            if k < nstart:                            # keep the nkeep best starts (sorted)
                p = nkeep
                while p > 0 and e < fw[_KE, p - 1]:
                    p -= 1
                if p < nkeep:
                    for q in range(nkeep - 1, p, -1):
                        fw[_KA, q], fw[_KB, q], fw[_KE, q] = fw[_KA, q - 1], fw[_KB, q - 1], fw[_KE, q - 1]
                    fw[_KA, p], fw[_KB, p], fw[_KE, p] = na, nb, e
            ca, cb = na, nb
    if best_a == 0.0 or best_e == math.inf:
        return float(a), float(b), _kcodes(x, w, o, n, qmax, qoff, float(a), float(b), L)
    return best_a, best_b, _kcodes(x, w, o, n, qmax, qoff, best_a, best_b, L)


@njit(inline="always", fastmath=FAST)
def _eval_scales(nsub, sublen, qmax, qoff, slo, shi, has_min, x, w, d, dm, fw, sc, mn, L, bound):
    """Integer sub-block scales nearest a/d and b/dm (the fits, rows _A, _B of fw), their codes (into sc, mn, L [bs] f32) and the block's
    error; inf as soon as the error passes bound (a candidate that cannot win)."""
    e = 0.0
    for j in range(nsub):
        o = sublen * j
        sc[j] = min(shi, max(slo, int(np.rint(fw[_A, j] / d)))) if d != 0.0 else 0
        mn[j] = min(shi, max(0, int(np.rint(fw[_B, j] / dm)))) if (has_min and dm != 0.0) else 0
        e += _kcodes(x, w, o, sublen, qmax, qoff, d * sc[j], dm * mn[j], L)
        if e >= bound:
            return math.inf
    return e


@njit(inline="always", fastmath=FAST)
def _ours_k(nsub, sublen, qmax, qoff, slo, shi, has_min, ngrid, noff, nit, nkeep, nd, nfull, nrefine,
            x, w, dd, sc, mn, L, fa, fb, fw, tsc, tmn, tL, sL):
    """Our K-quant block: better sub-block fits, f16 and integer scales searched jointly, least-squares refit.
    Starts from llama.cpp's result in (dd, sc, mn, L, fa, fb) and overwrites it with ours; w [bs] f32.
    Scratch (rows, not views: a view costs ~30 ns): fw float64 [FW_ROWS, FW_COLS], tsc, tmn int64 [nsub],
    tL, sL float32 [bs] (codes)."""
    nl = L.shape[0]
    if sublen <= 0 or nsub <= 0:                      # offsets o = sublen·j >= 0: no index wrap-around
        return
    for j in range(nsub):
        o = sublen * j
        fw[_A, j], fw[_B, j], _ = _fit_sub(x, w, o, sublen, qmax, qoff, has_min, float(fa[j]), float(fb[j]), tL, ngrid, noff, nit,
                                 nkeep, fw)
    amax = 0.0
    asg = 0.0
    bmax = 0.0
    for j in range(nsub):
        if abs(fw[_A, j]) > amax:
            amax = abs(fw[_A, j])
            asg = fw[_A, j]
        bmax = max(bmax, fw[_B, j])
    if amax == 0.0:
        return
    # super-block scales (d, dm): the largest sub-block scale (min) maps to shi - t (or slo + t: signed
    # scales), nd values of t each. With the fits' codes fixed, a sub-block's error grows by the quadratic
    # q_j(A - a_j, B - b_j) (sums over its codes) when its scale and min become A = d·s_j, B = dm·m_j: every
    # pair is ranked by that, the nfull best are evaluated with their best codes.
    fo = f32(qoff)
    for j in range(nsub):
        o = sublen * j
        s_vv = f32(0.0)
        s_v = f32(0.0)
        s_w = f32(0.0)
        for i in range(o, o + sublen):
            v = tL[i] - fo
            wv = w[i] * v
            s_vv += wv * v
            s_v += wv
            s_w += w[i]
        fw[_HVV, j], fw[_HV, j], fw[_HW, j] = s_vv, s_v, s_w
    nd_ = nd if has_min else 2 * nd
    ndm_ = nd if (has_min and bmax > 0.0) else 1
    for r in range(nfull):
        fw[_CE, r] = math.inf
    for km in range(ndm_):
        fw[_CDMK, km] = f16_finite(bmax / (shi - D_STEP * km)) if ndm_ > 1 else (f16_finite(bmax / shi) if has_min else 0.0)
    for k in range(nd_):
        t = D_STEP * (k if has_min else k // 2)
        if has_min:
            dk = f16_finite(amax / (shi - t))
        else:
            dk = f16_finite(asg / (slo + t)) if k % 2 == 0 else f16_finite(asg / (shi - t))
        if dk == 0.0:
            continue
        for km in range(ndm_):
            dmk = fw[_CDMK, km]
            q = 0.0
            for j in range(nsub):
                dA = dk * min(shi, max(slo, int(np.rint(fw[_A, j] / dk)))) - fw[_A, j]
                dB = (dmk * min(shi, max(0, int(np.rint(fw[_B, j] / dmk)))) - fw[_B, j]) if dmk != 0.0 else -fw[_B, j]
                q += fw[_HVV, j] * dA * dA - 2.0 * fw[_HV, j] * dA * dB + fw[_HW, j] * dB * dB
            p = nfull
            while p > 0 and q < fw[_CE, p - 1]:
                p -= 1
            if p < nfull:
                for r in range(nfull - 1, p, -1):
                    fw[_CD, r], fw[_CDM, r], fw[_CE, r] = fw[_CD, r - 1], fw[_CDM, r - 1], fw[_CE, r - 1]
                fw[_CD, p], fw[_CDM, p], fw[_CE, p] = dk, dmk, q
    best_e = math.inf
    bd = 0.0
    bdm = 0.0
    for r in range(nfull):
        if fw[_CE, r] == math.inf:
            break
        e = _eval_scales(nsub, sublen, qmax, qoff, slo, shi, has_min, x, w, fw[_CD, r], fw[_CDM, r], fw, tsc, tmn, tL,
                         best_e)
        if e < best_e:
            best_e, bd, bdm = e, fw[_CD, r], fw[_CDM, r]
    if best_e == math.inf:
        return
    cur_e = _eval_scales(nsub, sublen, qmax, qoff, slo, shi, has_min, x, w, bd, bdm, fw, tsc, tmn, tL, math.inf)
    for _ in range(nrefine):
        # each sub-block's integer scale and min: the 3x3 neighbours (3 without mins), with their best codes
        cur_e = 0.0
        for j in range(nsub):
            o = sublen * j
            be = _kcodes(x, w, o, sublen, qmax, qoff, bd * tsc[j], bdm * tmn[j], tL)
            s0, m0 = tsc[j], tmn[j]
            for ds in range(-1, 2):
                for dmi in range(-1 if has_min else 0, 2 if has_min else 1):
                    s1 = s0 + ds
                    m1 = m0 + dmi
                    if (ds == 0 and dmi == 0) or s1 < slo or s1 > shi or m1 < 0 or m1 > shi:
                        continue
                    e = _kcodes(x, w, o, sublen, qmax, qoff, bd * s1, bdm * m1, sL)
                    if e < be:
                        be = e
                        tsc[j], tmn[j] = s1, m1
                        for i in range(o, o + sublen):
                            tL[i] = sL[i]
            cur_e += be
        # least squares for (d, dm) on these codes and integer scales: x ≈ d·u - dm·v, u = sc·(L - qoff), v = mn
        suu = 0.0
        suv = 0.0
        svv = 0.0
        sxu = 0.0
        sxv = 0.0
        for j in range(nsub):
            o = sublen * j
            s_ll = f32(0.0)
            s_l = f32(0.0)
            s_w = f32(0.0)
            s_xl = f32(0.0)
            s_x = f32(0.0)
            for i in range(o, o + sublen):
                li = tL[i] - fo
                wl = w[i] * li
                s_ll += wl * li
                s_l += wl
                s_w += w[i]
                s_xl += wl * x[i]
                s_x += w[i] * x[i]
            u = float(tsc[j])
            v = float(tmn[j])
            suu += u * u * s_ll
            suv += u * v * s_l
            svv += v * v * s_w
            sxu += u * s_xl
            sxv += v * s_x
        if has_min and svv > 0.0:
            D = suu * svv - suv * suv
            if D <= 0.0:
                break
            nd = (sxu * svv - sxv * suv) / D
            ndm = (sxu * suv - sxv * suu) / D
        elif suu > 0.0:
            nd = sxu / suu
            ndm = bdm
        else:
            break
        nd = f16_finite(nd)
        ndm = f16_finite(ndm) if has_min else 0.0
        if nd == 0.0 or ndm < 0.0 or not (math.isfinite(nd) and math.isfinite(ndm)):
            break
        e = 0.0
        for j in range(nsub):
            o = sublen * j
            e += _kcodes(x, w, o, sublen, qmax, qoff, nd * tsc[j], ndm * tmn[j], sL)
        if e < cur_e:
            bd, bdm, cur_e = nd, ndm, e
            for i in range(nl):
                tL[i] = sL[i]
        else:
            break
    bd, bdm = _unshrink(nsub, sublen, qmax, qoff, x, w, bd, bdm, tsc, tmn, tL)
    dd[0] = f32(bd)
    dd[1] = f32(bdm)
    for j in range(nsub):
        sc[j] = tsc[j]
        mn[j] = tmn[j]
    for i in range(nl):
        L[i] = int(tL[i])


@njit(inline="always", fastmath=FAST)
def _unshrink(nsub, sublen, qmax, qoff, x, w, d, dm, sc, mn, L):
    """Scale (d, dm) so that the block is not shrunk along x: sum w·x̂·x = sum w·x² (least squares leaves
    x̂ ⟂ error, i.e. x̂·x = (1 - relerr²)·x·x: every output shrinks coherently). Scaling the least-squares
    (d, dm) is the least-squares fit under that constraint. Codes L [bs] f32 re-fitted to the f16 scales;
    returns (d, dm)."""
    if sublen <= 0 or nsub <= 0:
        return d, dm
    fo = f32(qoff)
    sxx32 = f32(0.0)
    for i in range(x.shape[0]):
        sxx32 += w[i] * x[i] * x[i]
    sxx = float(sxx32)
    for _ in range(N_UNSHRINK):
        sxy = 0.0
        for j in range(nsub):
            o = sublen * j
            s_xl = f32(0.0)
            s_x = f32(0.0)
            for i in range(o, o + sublen):
                wx = w[i] * x[i]
                s_xl += wx * (L[i] - fo)
                s_x += wx
            sxy += d * sc[j] * float(s_xl) - dm * mn[j] * float(s_x)
        if sxy <= 0.0 or sxx <= 0.0:
            break
        k = sxx / sxy
        nd = f16_finite(d * k)
        ndm = f16_finite(dm * k)
        if nd == d and ndm == dm:
            break
        d, dm = nd, ndm
        for j in range(nsub):
            o = sublen * j
            _kcodes(x, w, o, sublen, qmax, qoff, d * sc[j], dm * mn[j], L)
    return d, dm


def _ours_k_for(name: str):
    """_ours_k compiled for one K type, its layout and search settings as constants."""
    nsub, sublen, qmax, qoff, slo, shi, has_min = (int(v) for v in LAYOUT[KIND[name], :7])
    ngrid, noff, nit, nkeep = NGRID[name], N_OFF[name] if has_min else 1, NIT[name], N_KEEP[name]
    nd, nfull, nrefine = N_D[name], N_FULL[name], N_REFINE[name]

    @njit(cache=True, fastmath=FAST)
    def ours(x, w, dd, sc, mn, L, fa, fb, fw, tsc, tmn, tL, sL):
        # the sub-block length as a runtime value: a known 16 or 32 is unrolled whole into scalar chains before
        # the loop vectoriser sees it
        sublen_ = x.shape[0] // nsub
        _ours_k(nsub, sublen_, qmax, qoff, slo, shi, has_min, ngrid, noff, nit, nkeep, nd, nfull, nrefine,
                x, w, dd, sc, mn, L, fa, fb, fw, tsc, tmn, tL, sL)
    return ours


_ours_q2_k, _ours_q4_k, _ours_q5_k = (_ours_k_for(n) for n in ("q2_k", "q4_k", "q5_k"))   # Q3_K, Q6_K: klanes


# Q3_K's and Q6_K's search with their sub-blocks as lanes (kernels.klanes), the same settings
_lanes_q3_k, _lanes_q6_k = (klanes.search_for(LAYOUT[KIND[n]], NGRID[n], NIT[n], N_KEEP[n], N_D[n], N_FULL[n],
                                              N_REFINE[n], N_UNSHRINK, T_LO, T_HI, D_STEP) for n in ("q3_k", "q6_k"))


# ---------------------------------------------------------------- packing (ggml-common.h's block layouts)

@njit(cache=True)
def _put_f16(out, o, v):
    h = f16_bits(float(v))
    out[o] = h & 0xFF
    out[o + 1] = h >> 8


@njit(cache=True)
def _pack(kind, dd, sc, mn, L, out):
    """Write one block's representation into its bytes out [type_size]."""
    out[:] = 0
    if kind == Q2_K:                                  # scales[16], qs[64], d, dmin
        for j in range(16):
            out[j] = (sc[j] | (mn[j] << 4)) & 0xFF
        for h in range(2):
            for l in range(32):
                j = 128 * h
                out[16 + 32 * h + l] = L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)
        _put_f16(out, 80, dd[0])
        _put_f16(out, 82, dd[1])
    elif kind == Q3_K:                                # hmask[32], qs[64], scales[12], d
        for j in range(16):
            l = sc[j] + 32
            if j < 8:
                out[96 + j] |= l & 0xF
            else:
                out[96 + j - 8] |= (l & 0xF) << 4
            out[96 + 8 + j % 4] |= (l >> 4) << (2 * (j // 4))
        for j in range(256):
            if L[j] > 3:
                out[j % 32] |= 1 << (j // 32)
        for h in range(2):
            for l in range(32):
                j = 128 * h
                out[32 + 32 * h + l] = ((L[j + l] & 3) | ((L[j + l + 32] & 3) << 2) | ((L[j + l + 64] & 3) << 4)
                                        | ((L[j + l + 96] & 3) << 6))
        _put_f16(out, 108, dd[0])
    elif kind == Q4_K or kind == Q5_K:                # d, dmin, scales[12], (qh[32]), qs[128]
        _put_f16(out, 0, dd[0])
        _put_f16(out, 2, dd[1])
        for j in range(8):
            ls, lm = sc[j], mn[j]
            if j < 4:
                out[4 + j] = ls
                out[4 + j + 4] = lm
            else:
                out[4 + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
                out[4 + j - 4] |= (ls >> 4) << 6
                out[4 + j] |= (lm >> 4) << 6
        qs = 16 if kind == Q4_K else 48
        for g in range(4):
            for l in range(32):
                l1 = L[64 * g + l]
                l2 = L[64 * g + l + 32]
                if kind == Q5_K:
                    if l1 > 15:
                        l1 -= 16
                        out[16 + l] |= 1 << (2 * g)
                    if l2 > 15:
                        l2 -= 16
                        out[16 + l] |= 2 << (2 * g)
                out[qs + 32 * g + l] = l1 | (l2 << 4)
    elif kind == Q6_K:                                # ql[128], qh[64], scales[16], d
        for h in range(2):
            j = 128 * h
            for l in range(32):
                q1 = L[j + l] & 0xF
                q2 = L[j + l + 32] & 0xF
                q3 = L[j + l + 64] & 0xF
                q4 = L[j + l + 96] & 0xF
                out[64 * h + l] = q1 | (q3 << 4)
                out[64 * h + l + 32] = q2 | (q4 << 4)
                out[128 + 32 * h + l] = ((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4)
                                         | ((L[j + l + 96] >> 4) << 6))
        for j in range(16):
            out[192 + j] = sc[j] & 0xFF
        _put_f16(out, 208, dd[0])
    else:                                             # d, (m), (qh[4]), qs[16]
        _put_f16(out, 0, dd[0])
        o = 2
        if kind == Q4_1 or kind == Q5_1:
            _put_f16(out, 2, dd[1])
            o = 4
        if kind == Q5_0 or kind == Q5_1:
            qh = 0
            for j in range(16):
                qh |= ((L[j] >> 4) & 1) << j
                qh |= ((L[j + 16] >> 4) & 1) << (j + 16)
            for k in range(4):
                out[o + k] = (qh >> (8 * k)) & 0xFF
            o += 4
        for j in range(16):
            out[o + j] = (L[j] & 0xF) | ((L[j + 16] & 0xF) << 4)


# ---------------------------------------------------------------- the driver

@njit(cache=True, parallel=True)
def quantize_rows(kind, x, imp, has_imp, search, out):
    """x [R, C] float32 -> out [R, C/bs*type_size] uint8; imp [C] float32 (used when has_imp).

    search False: llama.cpp's quantizer (the port) alone; True: per block the better of it and ours. Every type
    but Q3_K and Q6_K (quantize_sym16).
    """
    R, C = x.shape
    nsub, bs, tb = LAYOUT[kind, 0], LAYOUT[kind, 7], LAYOUT[kind, 8]
    nb = C // bs
    for r in prange(R):
        dd = np.empty(2, f32)
        sc = np.empty(nsub, np.int64)
        mn = np.empty(nsub, np.int64)
        L = np.empty(bs, np.int64)
        fa = np.empty(nsub, f32)
        fb = np.empty(nsub, f32)
        dd2 = np.empty(2, f32)
        sc2 = np.empty(nsub, np.int64)
        mn2 = np.empty(nsub, np.int64)
        L2 = np.empty(bs, np.int64)
        w = np.ones(bs)
        w32 = np.ones(bs, f32)
        tw = np.empty((8, NTRIAL), f32)
        fw = np.empty((FW_ROWS, FW_COLS))
        tsc = np.empty(nsub, np.int64)
        tmn = np.empty(nsub, np.int64)
        tL = np.empty(bs, f32)
        sL = np.empty(bs, f32)
        # the block, its importance and its bytes in buffers of this row's own: a view of x, imp or out would
        # count a reference on the shared array's header, an atomic both threads contend for (~10 % of the time)
        xb = np.empty(bs, f32)
        qb = np.empty(bs, f32)
        ob = np.empty(tb, np.uint8)
        sigma2 = f32(0.0)
        if has_imp:
            for i in range(C):
                sigma2 += x[r, i] * x[r, i]
            sigma2 = sigma2 / f32(C)
        for b in range(nb):
            for i in range(bs):
                xb[i] = x[r, b * bs + i]
                qb[i] = imp[b * bs + i]
            port_block(kind, xb, qb, has_imp, sigma2, dd, sc, mn, L, fa, fb, tw)
            if search:
                if has_imp:
                    for i in range(bs):
                        w[i] = qb[i]
                        w32[i] = qb[i]
                dd2[0], dd2[1] = dd[0], dd[1]
                for j in range(nsub):
                    sc2[j], mn2[j] = sc[j], mn[j]
                for i in range(bs):
                    L2[i] = L[i]
                if kind == Q2_K:
                    _ours_q2_k(xb, w32, dd2, sc2, mn2, L2, fa, fb, fw, tsc, tmn, tL, sL)
                elif kind == Q4_K:
                    _ours_q4_k(xb, w32, dd2, sc2, mn2, L2, fa, fb, fw, tsc, tmn, tL, sL)
                else:
                    _ours_q5_k(xb, w32, dd2, sc2, mn2, L2, fa, fb, fw, tsc, tmn, tL, sL)
                if block_error(kind, xb, w, dd2, sc2, mn2, L2) < block_error(kind, xb, w, dd, sc, mn, L):
                    dd[0], dd[1] = dd2[0], dd2[1]
                    for j in range(nsub):
                        sc[j], mn[j] = sc2[j], mn2[j]
                    for i in range(bs):
                        L[i] = L2[i]
            _pack(kind, dd, sc, mn, L, ob)
            for i in range(tb):
                out[r, b * tb + i] = ob[i]


CHUNK = 32                 # blocks per parallel task of the lanes driver (scratch allocated once per task)


@njit(cache=True, parallel=True)
def quantize_sym16(kind, x, imp, has_imp, search, out):
    """quantize_rows for Q3_K and Q6_K: the matrix's blocks in row-major order, klanes.G at a time (across rows:
    a row of one block fills the lanes too); the port (Q3_K without importance in lanes too, else per block),
    and with search our search in lanes and per block the better of the two."""
    R, C = x.shape
    nb = C // QK_K
    tb = LAYOUT[kind, 8]
    NL = klanes.NL
    RS = klanes.RS
    total = R * nb
    for t in prange((total + CHUNK - 1) // CHUNK):
        F, B, H = klanes.scratch()
        dd = np.empty(2, f32)
        sc = np.empty(16, np.int64)
        mn = np.zeros(16, np.int64)
        L = np.empty(QK_K, np.int64)
        fa = np.empty(16, f32)
        fb = np.empty(16, f32)
        tw = np.empty((8, NTRIAL), f32)
        xb = np.empty(QK_K, f32)
        qb = np.empty(QK_K, f32)
        ob = np.empty(tb, np.uint8)
        for k0 in range(CHUNK * t, min(total, CHUNK * (t + 1)), klanes.G):
            ng = min(klanes.G, total - k0, CHUNK * (t + 1) - k0)
            nl = 16 * ng
            for g in range(ng):
                r, c0 = (k0 + g) // nb, QK_K * ((k0 + g) % nb)
                for j in range(16):
                    for i in range(16):
                        F[(klanes.XT + i) * RS + 16 * g + j] = x[r, c0 + 16 * j + i]
                        F[(klanes.WT + i) * RS + 16 * g + j] = imp[c0 + 16 * j + i] if has_imp else f32(1.0)
            if kind == Q3_K and not has_imp:
                klanes.q3_port(F, nl, B)
            else:
                for g in range(ng):
                    r, c0 = (k0 + g) // nb, QK_K * ((k0 + g) % nb)
                    for i in range(QK_K):
                        xb[i] = x[r, c0 + i]
                        qb[i] = imp[c0 + i]
                    if kind == Q3_K:
                        _port_q3_k(xb, qb, has_imp, dd, sc, mn, L, fa, fb)
                    else:
                        _port_q6_k(xb, qb, has_imp, dd, sc, mn, L, fa, fb, tw)
                    B[klanes.DP, g] = dd[0]
                    for j in range(16):
                        F[klanes.SCP * RS + 16 * g + j] = sc[j]
                        F[klanes.FA * RS + 16 * g + j] = fa[j]
                        for i in range(16):
                            F[(klanes.LP + i) * RS + 16 * g + j] = L[16 * j + i]
            if not search:
                for g in range(ng):
                    B[klanes.OK, g] = 0.0
            elif kind == Q3_K:
                _lanes_q3_k(F, nl, B)
            else:
                _lanes_q6_k(F, nl, B)
            if search:
                klanes.errors(F, nl, B, H, LAYOUT[kind, 3])
            for g in range(ng):
                ep = 0.0
                eo = 0.0
                if B[klanes.OK, g] != 0:
                    for j in range(16):
                        ep += H[16 * g + j]
                        eo += H[NL + 16 * g + j]
                ours = B[klanes.OK, g] != 0 and eo < ep
                rs, rl = (klanes.SC, klanes.LT) if ours else (klanes.SCP, klanes.LP)
                dd[0], dd[1] = f32(B[klanes.D, g]) if ours else f32(B[klanes.DP, g]), f32(0.0)
                for j in range(16):
                    sc[j] = int(F[rs * RS + 16 * g + j])
                    for i in range(16):
                        L[16 * j + i] = int(F[(rl + i) * RS + 16 * g + j])
                _pack(kind, dd, sc, mn, L, ob)
                r, b = (k0 + g) // nb, (k0 + g) % nb
                for i in range(tb):
                    out[r, b * tb + i] = ob[i]


def quantize_blocks(x: np.ndarray, name: str, importance: np.ndarray | None = None, search: bool = True) -> np.ndarray:
    """x [R, C] float32 (C a multiple of the block) -> uint8 [R, C/bs*type_size] of type `name` (a KIND key).

    importance [C] float32 or None. search=False gives llama.cpp's quantizer's bytes (quantize_qN_K with
    the importance as quant_weights), bit for bit; True, per block the better of those and ours (the K-quants:
    the 32-weight types' search is kernels.quantizers').
    """
    kind = KIND[name]
    if search and LAYOUT[kind, 7] != QK_K:
        raise ValueError(f"{name}'s search is kernels.quantizers.quantize's; here only its port (search=False)")
    bs, tb = int(LAYOUT[kind, 7]), int(LAYOUT[kind, 8])
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], x.shape[1] // bs * tb), np.uint8)
    imp = np.ones(x.shape[1], np.float32) if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    if kind == Q3_K or kind == Q6_K:
        quantize_sym16(kind, x, imp, importance is not None, search, out)
    else:
        quantize_rows(kind, x, imp, importance is not None, search, out)
    return out
