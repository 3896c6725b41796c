"""Float32 rows -> stored GGUF bytes, for the types of kernels.qtypes that lazymoe writes.

Q4_0, Q4_1, Q5_0 and Q5_1 without an importance vector (32 weights: f16 d, f16 m with a min, the codes)
pick each block's scale to minimise squared error: a few candidate scales around llama.cpp's (max/-8, or
(max - min)/15 with the min), each refit by least squares (with the min), and the block keeps whichever of
the best candidate and llama.cpp's scale dequantizes closer, each with the best codes for its f16 values;
llama.cpp's codes are those for its unrounded scale, so no block is ever worse than llama.cpp makes it.
The K-quants (Q2_K..Q6_K), and the 32-weight types with an importance vector, are kernels.kquantizers':
per block the better of llama.cpp's quantizer (ported bit for bit) and our search. Q8_0 is llama.cpp's
reference quantizer itself (round(x/d), d = amax/127; llama.cpp ignores the importance there too): at 8 bits
a search buys almost nothing.
"""
from __future__ import annotations

import numpy as np
from gguf import quants as gq
from numba import njit, prange

from lazymoe.kernels import kquantizers as kq
from lazymoe.kernels.qtypes import QType, qtype

QK = 32
CHUNK_WEIGHTS = 1 << 20   # weights quantized per call (whole rows): bounds the float temporaries. Calls of 256 rows
                          # of 256 weights ran Q5_0 at 0.47x llama.cpp's speed, 1M-weight calls at 0.62x (fixed costs)

# The 32-weight types without an importance vector: (largest code, code offset, has a min) by name;
# x̂ = d·(q - offset) (Q4_0, Q5_0) or d·q + m (Q4_1, Q5_1), q in 0..qmax.
Q32 = {"q4_0": (15, 8, False), "q5_0": (31, 16, False), "q4_1": (15, 0, True), "q5_1": (31, 0, True)}
# Candidate scales, as offsets t: the block's extreme value (symmetric types) maps to code -(offset + t) or to
# qmax - offset - T_POS; the range (types with a min) to qmax + t steps. Even counts: candidates are ranked in
# pairs, one pass over the weights for two. Chosen for weights/s (python -m lazymoe.benchmarks.quantize speed):
# 14 symmetric / 11 min candidates gained 0.1-0.2 / 0.8-1.3 % more RMSE at 1.4 / 1.9x the time.
T_NEG = np.array([0.6, 0.2, -0.2, -0.6, -1.0], np.float32)
T_POS = np.array([0.0], np.float32)
T_RANGE = np.array([-0.6, -0.2, 0.2, 0.6], np.float32)
# With an importance vector llama.cpp's own fit is a search (19 or 37 scales), which leaves ours less to
# gain and more time: more candidates.
T_NEG_W = np.array([1.0, 0.8, 0.6, 0.4, 0.2, 0.0, -0.2, -0.4, -0.6, -0.8, -1.0, -1.2], np.float32)
T_POS_W = np.array([0.5, 0.25, 0.0, -0.25], np.float32)
T_RANGE_W = np.array([-1.2, -1.0, -0.8, -0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0], np.float32)
F16_MAX = np.float32(65504.0)


# The search runs on NL consecutive blocks at once, block j of the group in column j of a thread's scratch: every
# step is a loop over the lanes j that carries nothing from one lane to the next, and each lane does the float32
# operations of one block searched alone, in the same order (sums over the weights in order i = 0..31), so LLVM
# vectorises across the blocks without reassociating anything: the bytes are the same on every machine. 32
# lanes: 16 ran at ~0.6x their speed (each group's fixed costs), 48 and 64 within the noise of 32.
NL = 32
NC = max(T_NEG.size + T_POS.size, T_RANGE.size, T_NEG_W.size + T_POS_W.size, T_RANGE_W.size)   # candidates at most
# Rows of the scratch [NR, NL] float32: one array, so LLVM sees every access at a constant offset from one base
# and needs no run-time alias checks between the rows.
R_X = 0                  # [32] the group's weights: weight i of lane j at [R_X + i, j]
R_W = R_X + QK           # [32] their importance (with one)
R_Q = R_W + QK           # [32] the codes
R_S = R_Q + QK           # [3 * NC] each candidate's sums
R_T = R_S + 3 * NC       # [16] temporaries of one step
R_V = R_T + 16           # one value per lane each: the range, the two candidates (d, m), scratch
V_LO, V_HI, V_VMAX, V_DA, V_MA, V_DB, V_MB, V_INV, V_F16, V_HD, V_HM = range(R_V, R_V + 11)
NR = R_V + 11


@njit(cache=True, inline="always")
def _f16(sc, si, r0, r1):
    """Rows r0 .. r1-1 of sc [NR, NL] <- the nearest f16 values (round half to even, as F16C), clamped to f16's
    finite range, as float32, in place; si: sc's int32 view (the rounding is done on the bits, in row V_F16)."""
    fv, iv = sc[V_F16], si[V_F16]
    for r in range(r0, r1):
        for j in range(NL):
            fv[j] = min(F16_MAX, max(-F16_MAX, sc[r, j]))
        for j in range(NL):
            u = iv[j]
            iv[j] = (u + 0xFFF + ((u >> 13) & 1)) & -8192         # 23 -> 10 mantissa bits, ties to even
        for j in range(NL):
            c = min(F16_MAX, max(-F16_MAX, sc[r, j]))
            sub = np.float32(np.rint(np.float64(c) * 16777216.0) / 16777216.0)   # f16 subnormals: 2^-24 steps
            sc[r, j] = sub if abs(c) < np.float32(6.103515625e-05) else fv[j]


@njit(cache=True, inline="always")
def _f16_bits(sc, si, r0, n, h0):
    """Rows h0 .. h0+n-1 of si <- the IEEE half bits of the f16-exact float32 rows r0 .. r0+n-1 of sc (si: sc's
    int32 view)."""
    for k in range(n):
        for j in range(NL):
            u = si[r0 + k, j]
            a = u & 0x7FFFFFFF
            hn = ((a >> 13) - (112 << 10)) & 0x7FFF               # normal f16: rebias the exponent 127 -> 15
            hs = int(abs(np.float64(sc[r0 + k, j])) * 16777216.0)   # subnormal f16 (or 0): 2^-24 steps
            si[h0 + k, j] = (hn if a >= 0x38800000 else hs) | ((u >> 16) & 0x8000)


@njit(cache=True, inline="always")
def _range(xt, lo, hi):
    """lo, hi [NL] <- each block's (min, max), compared in a fixed order (the four 8-weight quarters element-wise,
    then those 8 in order): min and max are exact, but which zero of -0 and 0 they return follows the order."""
    for j in range(NL):
        lo[j] = min(min(xt[0, j], xt[8, j]), min(xt[16, j], xt[24, j]))
        hi[j] = max(max(xt[0, j], xt[8, j]), max(xt[16, j], xt[24, j]))
    for i in range(1, 8):
        for j in range(NL):
            lo[j] = min(lo[j], min(min(xt[i, j], xt[i + 8, j]), min(xt[i + 16, j], xt[i + 24, j])))
            hi[j] = max(hi[j], max(max(xt[i, j], xt[i + 8, j]), max(xt[i + 16, j], xt[i + 24, j])))


@njit(cache=True, inline="always")
def _rank_sym(xt, wt, w, vmax, qmax, qoff, sxq, sqq, tmp, d):
    """d [NL] <- each symmetric block's best candidate scale (codes clamp(round(x·inv)) + qoff), by the squared
    error (weighted by wt [32, NL] when w is not None) of its least-squares scale, unrounded (float32); garbage
    where vmax is 0 (the caller's). sxq, sqq [candidates, NL], tmp [8, NL]: scratch rows."""
    lo = np.float32(-qoff)
    hi = np.float32(qmax - qoff)
    tneg = T_NEG if w is None else T_NEG_W
    tpos = T_POS if w is None else T_POS_W
    nn = tneg.shape[0]
    nk = nn + tpos.shape[0]
    inv1, inv2, a1, c1, a2, c2, bx, bq = tmp[0], tmp[1], tmp[2], tmp[3], tmp[4], tmp[5], tmp[6], tmp[7]
    for k in range(0, nk, 2):                                   # two candidates per pass over the weights
        k2 = min(k + 1, nk - 1)
        n1 = -(np.float32(qoff) + tneg[k]) if k < nn else hi - tpos[k - nn]
        n2 = -(np.float32(qoff) + tneg[k2]) if k2 < nn else hi - tpos[k2 - nn]
        for j in range(NL):
            inv1[j] = n1 / vmax[j]
            inv2[j] = n2 / vmax[j]
            a1[j] = c1[j] = a2[j] = c2[j] = np.float32(0.0)
        for i in range(QK):
            for j in range(NL):
                xi = xt[i, j]
                wi = np.float32(1.0) if w is None else wt[i, j]
                v1 = min(hi, max(lo, np.floor(xi * inv1[j] + np.float32(0.5))))
                v2 = min(hi, max(lo, np.floor(xi * inv2[j] + np.float32(0.5))))
                a1[j] += wi * xi * v1
                c1[j] += wi * v1 * v1
                a2[j] += wi * xi * v2
                c2[j] += wi * v2 * v2
        for j in range(NL):
            sxq[k, j] = a1[j]
            sqq[k, j] = c1[j]
            sxq[k2, j] = a2[j]
            sqq[k2, j] = c2[j]
    for j in range(NL):                                         # error - Sxx = -Sxq² / Sqq: the largest Sxq²/Sqq
        bx[j] = sxq[0, j]
        bq[j] = sqq[0, j]
    for k in range(1, nk):
        for j in range(NL):
            better = sxq[k, j] * sxq[k, j] * bq[j] > bx[j] * bx[j] * sqq[k, j]
            bx[j] = sxq[k, j] if better else bx[j]
            bq[j] = sqq[k, j] if better else bq[j]
    # the nearest codes for d, their least-squares scale, then that scaled so that the block is not shrunk
    # along x (x̂·x = x·x; least squares leaves x̂·x = (1 - relerr²)·x·x, and every output of the matrix
    # shrinks coherently: see kernels.kquantizers._unshrink)
    for j in range(NL):
        d[j] = bx[j] / bq[j]
        inv1[j] = np.float32(1.0) / d[j]
        a1[j] = c1[j] = np.float32(0.0)
    for i in range(QK):
        for j in range(NL):
            xi = xt[i, j]
            wi = np.float32(1.0) if w is None else wt[i, j]
            v1 = min(hi, max(lo, np.floor(xi * inv1[j] + np.float32(0.5))))
            a1[j] += wi * xi * v1
            c1[j] += wi * xi * xi
    for j in range(NL):
        r = c1[j] / a1[j] if a1[j] != 0 else d[j]
        d[j] = r if bq[j] > 0 else np.float32(0.0)


@njit(cache=True, inline="always")
def _rank_min(xt, wt, w, lo, hi, qmax, sq, sqq, sxq, tmp, d, m):
    """d, m [NL] <- each block's best candidate (scale, min) (codes clamp(round((x - m)/d)), 0..qmax), by the
    squared error (weighted by wt [32, NL] when w is not None) of its least-squares (d, m), unrounded (float32);
    garbage where hi == lo (the caller's). sq, sqq, sxq [candidates, NL], tmp [16, NL]: scratch rows."""
    sx, n, found = tmp[0], tmp[1], tmp[2]
    inv1, o1, a1, b1, c1, inv2, o2, a2, b2, c2 = tmp[3], tmp[4], tmp[5], tmp[6], tmp[7], tmp[8], tmp[9], tmp[10], tmp[11], tmp[12]
    for j in range(NL):
        sx[j] = n[j] = np.float32(0.0)
    for i in range(QK):
        for j in range(NL):
            wi = np.float32(1.0) if w is None else wt[i, j]
            sx[j] += wi * xt[i, j]
            n[j] += wi
    fq = np.float32(qmax)
    trange = T_RANGE if w is None else T_RANGE_W
    nk = trange.shape[0]
    for k in range(0, nk, 2):                                   # two candidates per pass over the weights
        k2 = min(k + 1, nk - 1)
        for j in range(NL):
            inv1[j] = (fq + trange[k]) / (hi[j] - lo[j])
            inv2[j] = (fq + trange[k2]) / (hi[j] - lo[j])
            o1[j] = np.float32(0.5) - lo[j] * inv1[j]
            o2[j] = np.float32(0.5) - lo[j] * inv2[j]
            a1[j] = b1[j] = c1[j] = a2[j] = b2[j] = c2[j] = np.float32(0.0)
        for i in range(QK):
            for j in range(NL):
                xi = xt[i, j]
                wi = np.float32(1.0) if w is None else wt[i, j]
                v1 = min(fq, max(np.float32(0.0), np.floor(xi * inv1[j] + o1[j])))
                v2 = min(fq, max(np.float32(0.0), np.floor(xi * inv2[j] + o2[j])))
                a1[j] += wi * v1
                b1[j] += wi * v1 * v1
                c1[j] += wi * xi * v1
                a2[j] += wi * v2
                b2[j] += wi * v2 * v2
                c2[j] += wi * xi * v2
        for j in range(NL):
            sq[k, j], sqq[k, j], sxq[k, j] = a1[j], b1[j], c1[j]
            sq[k2, j], sqq[k2, j], sxq[k2, j] = a2[j], b2[j], c2[j]
    # the least-squares (d, m) of candidate k is (nd_k, nm_k) / den_k, its error - Sxx is -(nd·Sxq + nm·Sx) / den:
    # the best is chosen by cross-multiplied errors, one division for the winner
    bnum, bden, bsq, bsqq, bsxq = inv2, o2, a2, b2, c2
    for j in range(NL):
        found[j] = np.float32(0.0)
        bnum[j] = np.float32(0.0)
        bden[j] = np.float32(1.0)
    for k in range(nk):
        for j in range(NL):
            den = n[j] * sqq[k, j] - sq[k, j] * sq[k, j]
            num = (n[j] * sxq[k, j] - sx[j] * sq[k, j]) * sxq[k, j] + (sqq[k, j] * sx[j] - sq[k, j] * sxq[k, j]) * sx[j]
            take = (den > 0) & ((found[j] == 0) | (num * bden[j] > bnum[j] * den))
            found[j] = np.float32(1.0) if take else found[j]
            bnum[j] = num if take else bnum[j]
            bden[j] = den if take else bden[j]
            bsq[j] = sq[k, j] if take else bsq[j]
            bsqq[j] = sqq[k, j] if take else bsqq[j]
            bsxq[j] = sxq[k, j] if take else bsxq[j]
    # the nearest codes for (d, m), their least squares, then scaled so that x̂·x = x·x (as _rank_sym)
    sxx = a2
    for j in range(NL):
        d[j] = (n[j] * bsxq[j] - sx[j] * bsq[j]) / bden[j]
        m[j] = (bsqq[j] * sx[j] - bsq[j] * bsxq[j]) / bden[j]
        inv1[j] = np.float32(1.0) / d[j]
        o1[j] = np.float32(0.5) - m[j] * inv1[j]
        a1[j] = b1[j] = c1[j] = sxx[j] = np.float32(0.0)
    for i in range(QK):
        for j in range(NL):
            xi = xt[i, j]
            wi = np.float32(1.0) if w is None else wt[i, j]
            v1 = min(fq, max(np.float32(0.0), np.floor(xi * inv1[j] + o1[j])))
            a1[j] += wi * v1
            b1[j] += wi * v1 * v1
            c1[j] += wi * xi * v1
            sxx[j] += wi * xi * xi
    for j in range(NL):
        den = n[j] * b1[j] - a1[j] * a1[j]
        d2 = (n[j] * c1[j] - sx[j] * a1[j]) / den if den > 0 else d[j]
        m2 = (b1[j] * sx[j] - a1[j] * c1[j]) / den if den > 0 else m[j]
        sxy = d2 * c1[j] + m2 * sx[j]
        d3 = d2 * (sxx[j] / sxy) if sxy > 0 else d2
        m3 = m2 * (sxx[j] / sxy) if sxy > 0 else m2
        refit = d[j] > 0
        d[j] = (d3 if refit else d[j]) if found[j] != 0 else np.float32(0.0)
        m[j] = (m3 if refit else m[j]) if found[j] != 0 else lo[j]


@njit(cache=True, inline="always")
def _code(xi, inv, m, qmax, qoff):
    """The nearest code to xi for the stored scale 1/inv and min m (x̂ = d·(q - qoff) + m), as float32."""
    return min(np.float32(qmax), max(np.float32(0.0), np.floor((xi - m) * inv + np.float32(qoff + 0.5))))


@njit(cache=True, inline="always")
def _candidates(xt, wt, w, qmax, qoff, has_min, sc, si):
    """The group's two candidates per block as f16 values, into rows V_DA .. V_MB of sc: (d, m) of our best,
    and of llama.cpp's quantizer without an importance (max/-offset, or (max - min)/qmax with min m; with one
    the caller puts _llama_fits' there); si: sc's int32 view."""
    lo, hi, vmax, da, ma, db, mb = sc[V_LO], sc[V_HI], sc[V_VMAX], sc[V_DA], sc[V_MA], sc[V_DB], sc[V_MB]
    s1, s2, s3 = sc[R_S:R_S + NC], sc[R_S + NC:R_S + 2 * NC], sc[R_S + 2 * NC:R_S + 3 * NC]
    tmp = sc[R_T:R_T + 16]
    _range(xt, lo, hi)
    if has_min:
        _rank_min(xt, wt, w, lo, hi, qmax, s1, s2, s3, tmp, da, ma)
        for j in range(NL):
            db[j] = (hi[j] - lo[j]) / np.float32(qmax)
            mb[j] = lo[j]
    else:
        tie = False
        for j in range(NL):
            vmax[j] = hi[j] if hi[j] > -lo[j] else lo[j]
            tie |= hi[j] == -lo[j]
        if tie:                                                 # |max| = |min|: llama.cpp takes the first
            for i in range(QK - 1, -1, -1):
                for j in range(NL):
                    first = (hi[j] == -lo[j]) & (abs(xt[i, j]) == hi[j])
                    vmax[j] = xt[i, j] if first else vmax[j]
        _rank_sym(xt, wt, w, vmax, qmax, qoff, s1, s2, tmp, da)
        for j in range(NL):
            db[j] = vmax[j] / np.float32(-qoff)
            ma[j] = mb[j] = np.float32(0.0)
    _f16(sc, si, V_DA, V_MB + 1)                                # da, ma, db, mb, one after another
    if has_min:
        for j in range(NL):                                     # constant block: d 0, m its value (to f16)
            flat = hi[j] == lo[j]
            da[j] = np.float32(0.0) if flat else da[j]
            ma[j] = mb[j] if flat else ma[j]
            db[j] = np.float32(0.0) if flat else db[j]
    else:
        for j in range(NL):
            zero = vmax[j] == 0
            da[j] = np.float32(0.0) if zero else da[j]
            db[j] = np.float32(0.0) if zero else db[j]


@njit(cache=True, inline="always")
def _keep_better(xt, wt, w, qmax, qoff, sc):
    """Per block, (da, ma) <- (db, mb) where those dequantize as close or closer, each with the best codes for
    its f16 values (squared error weighted by wt [32, NL] when w is not None, summed in float32: every term is
    positive, so it is within ~1e-6 of its value)."""
    da, ma, db, mb = sc[V_DA], sc[V_MA], sc[V_DB], sc[V_MB]
    ia, ib, ea, eb = sc[R_T], sc[R_T + 1], sc[R_T + 2], sc[R_T + 3]
    fo = np.float32(qoff)
    for j in range(NL):
        ia[j] = np.float32(1.0) / da[j] if da[j] != 0 else np.float32(0.0)
        ib[j] = np.float32(1.0) / db[j] if db[j] != 0 else np.float32(0.0)
        ea[j] = eb[j] = np.float32(0.0)
    for i in range(QK):
        for j in range(NL):
            xi = xt[i, j]
            ra = xi - (da[j] * (_code(xi, ia[j], ma[j], qmax, qoff) - fo) + ma[j])
            rb = xi - (db[j] * (_code(xi, ib[j], mb[j], qmax, qoff) - fo) + mb[j])
            ea[j] += ra * ra if w is None else wt[i, j] * ra * ra
            eb[j] += rb * rb if w is None else wt[i, j] * rb * rb
    for j in range(NL):
        take = ((da[j] != db[j]) | (ma[j] != mb[j])) & (eb[j] <= ea[j] * np.float32(1.0 + 1e-5))
        da[j] = db[j] if take else da[j]
        ma[j] = mb[j] if take else ma[j]


@njit(cache=True, inline="always")
def _pack(xt, qmax, qoff, sc, si, out, b0, nb):
    """Blocks b0 .. b0+nb-1's bytes (ggml-common.h) from (da, ma) of sc: f16 d, f16 m with a min, 32 high bits
    for 5-bit codes, then nibbles (byte j = q[j] & 15 | (q[j+16] & 15) << 4), codes the best for the stored d
    and m; si: sc's int32 view."""
    d, m, inv = sc[V_DA], sc[V_MA], sc[V_INV]
    q = sc[R_Q:R_Q + QK]
    hd, hm, qh = si[V_HD], si[V_HM], si[R_T]
    nib = si[R_S:R_S + 16]                                      # the sums are done with
    for j in range(NL):
        inv[j] = np.float32(1.0) / d[j] if d[j] != 0 else np.float32(0.0)
    for i in range(QK):
        for j in range(NL):
            q[i, j] = _code(xt[i, j], inv[j], m[j], qmax, qoff)
    _f16_bits(sc, si, V_DA, 2, V_HD)                            # d, m -> hd, hm
    for i in range(16):
        for j in range(NL):
            nib[i, j] = (np.int32(q[i, j]) & 15) | (np.int32(q[i + 16, j]) << 4)
    if qmax == 31:
        for j in range(NL):
            qh[j] = 0
        for i in range(QK):
            for j in range(NL):
                qh[j] |= (np.int32(q[i, j]) >> 4) << i
    for j in range(nb):
        b = b0 + j
        out[b, 0] = hd[j] & 0xFF
        out[b, 1] = hd[j] >> 8
        o = 2
        if qoff == 0:
            out[b, 2] = hm[j] & 0xFF
            out[b, 3] = hm[j] >> 8
            o = 4
        if qmax == 31:
            for k in range(4):
                out[b, o + k] = (qh[j] >> (8 * k)) & 0xFF
            o += 4
        for i in range(16):
            out[b, o + i] = nib[i, j]


@njit(cache=True, error_model="numpy")
def _q32_groups(x, qmax, qoff, has_min, w, ld, lm, out, g0, g1):
    """_q32_search's groups g0 .. g1-1 (NL blocks each), on one thread with a scratch of its own. A function of
    its own, not the prange body: Numba's parallel passes copy and propagate through a loop body, and this
    one (the helpers inlined) took them 15 s more to compile than the search runs in a minute. error_model
    numpy: a division checked for zero is a branch that no loop vectorises (every division is guarded or its
    lane's result discarded)."""
    n = x.shape[0]
    nbr = 1 if w is None else w.shape[0]
    sc = np.empty((NR, NL), np.float32)
    si = sc.view(np.int32)
    xt, wt = sc[R_X:R_X + QK], sc[R_W:R_W + QK]
    db, mb = sc[V_DB], sc[V_MB]
    for g in range(g0, g1):
        b0 = g * NL
        nb = min(NL, n - b0)
        for j in range(nb):
            for i in range(QK):
                xt[i, j] = x[b0 + j, i]
        for j in range(nb, NL):
            for i in range(QK):
                xt[i, j] = np.float32(0.0)
        if w is not None:
            for j in range(nb):
                for i in range(QK):
                    wt[i, j] = w[(b0 + j) % nbr, i]
            for j in range(nb, NL):
                for i in range(QK):
                    wt[i, j] = np.float32(0.0)
        _candidates(xt, wt, w, qmax, qoff, has_min, sc, si)
        if w is not None:
            for j in range(nb):
                db[j] = ld[b0 + j]
                mb[j] = lm[b0 + j]
        _keep_better(xt, wt, w, qmax, qoff, sc)
        _pack(xt, qmax, qoff, sc, si, out, b0, nb)


@njit(cache=True, parallel=True)
def _q32_search(x, qmax, qoff, has_min, w, ld, lm, out):
    """x [n_blocks, 32] float32 (rows of C = 32·nbr weights, one after another) -> out [n_blocks, type_size]
    uint8 (_pack's layout); w: None, or the importance [nbr, 32] with llama.cpp's f16 d and m for it, ld, lm
    [n_blocks] (_llama_fits). Per block the better, as stored (weighted by w), of our best candidate and
    llama.cpp's, each with the best codes for its f16 values: llama.cpp's own codes are those for its
    unrounded values, so no block is worse than llama.cpp makes it (near ties, within the float32 sums'
    accuracy, go to llama.cpp's). NL blocks at a time, one per vector lane (the group after the last block
    padded with zeros). The helpers are inlined: a call that passes arrays costs atomic reference counts.
    No fast-math: with reassociated sums the ranking depended on the vector width (the arm64 build chose
    other candidates in near ties, other bytes than x86's), and a plain function first compiled from a
    fast-math caller is compiled fast-math; in IEEE order every machine writes the same bytes."""
    ngroup = (x.shape[0] + NL - 1) // NL
    nthr = min(ngroup, 64)
    step = (ngroup + nthr - 1) // nthr
    for t in prange(nthr):
        _q32_groups(x, qmax, qoff, has_min, w, ld, lm, out, t * step, min(ngroup, (t + 1) * step))


@njit(cache=True, parallel=True)
def _llama_fits(x, kind, has_min, w, sigma2, ld, lm):
    """llama.cpp's importance-weighted fit of each block (kernels.kquantizers' port, bit for bit): its f16 d
    and m into ld, lm [n_blocks]; x [n_blocks, 32], w [nbr, 32], sigma2 [rows]. Not fast-math, as _q32_search;
    each block and its importance copied into buffers of this thread's own (a view of x or w would count
    references on an array both threads share)."""
    n = x.shape[0]
    nbr = w.shape[0]
    nthr = min(n, 64)
    step = (n + nthr - 1) // nthr
    for t in prange(nthr):
        dd = np.empty(2, np.float32)
        sc = np.empty(1, np.int64)
        mn = np.empty(1, np.int64)
        L = np.empty(QK, np.int64)
        fa = np.empty(1, np.float32)
        fb = np.empty(1, np.float32)
        tw = np.empty((8, kq.NTRIAL), np.float32)
        xb = np.empty(QK, np.float32)
        qb = np.empty(QK, np.float32)
        for b in range(t * step, min(n, (t + 1) * step)):
            for i in range(QK):
                xb[i] = x[b, i]
                qb[i] = w[b % nbr, i]
            kq.port_block(kind, xb, qb, True, sigma2[b // nbr], dd, sc, mn, L, fa, fb, tw)
            ld[b] = dd[0]
            lm[b] = dd[1] if has_min else np.float32(0.0)


@njit(cache=True)
def _mean_squares(rows):
    """rows [R, C] float32 -> [R] float32: sum x² / C, summed in order in float32 as llama.cpp's quantize_qN
    does for its importance weights (and kernels.kquantizers.quantize_rows)."""
    R, C = rows.shape
    out = np.empty(R, np.float32)
    for r in range(R):
        s = np.float32(0.0)
        for i in range(C):
            s += rows[r, i] * rows[r, i]
        out[r] = s / np.float32(C)
    return out


def _quantize_q32(rows: np.ndarray, name: str, importance: np.ndarray | None = None) -> np.ndarray:
    """rows float32 [R, C] -> uint8 [R, C/32*type_size] of Q4_0, Q4_1, Q5_0 or Q5_1; importance [C] or None."""
    qmax, qoff, has_min = Q32[name]
    R, C = rows.shape
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    x = rows.reshape(-1, QK)                                                  # [B, 32]
    out = np.empty((x.shape[0], 2 + 2 * has_min + 4 * (qmax == 31) + 16), np.uint8)
    if importance is None:
        _q32_search(x, qmax, qoff, has_min, None, None, None, out)
    else:
        w = np.ascontiguousarray(importance, dtype=np.float32).reshape(C // QK, QK)
        ld = np.empty(x.shape[0], np.float32)
        lm = np.empty(x.shape[0], np.float32)
        _llama_fits(x, kq.KIND[name], has_min, w, _mean_squares(rows), ld, lm)
        _q32_search(x, qmax, qoff, has_min, w, ld, lm, out)
    return out.reshape(R, -1)


def _quantize_q8_0(rows: np.ndarray) -> np.ndarray:
    from gguf import GGMLQuantizationType
    return gq.quantize(np.ascontiguousarray(rows, dtype=np.float32), GGMLQuantizationType.Q8_0)


def _quantize_block(name: str):
    """rows float32 [R, C], importance float32 [C] or None, search -> uint8 [R, C/bs*type_size]: the
    32-weight types by _quantize_q32, the K-quants by kernels.kquantizers (search False: llama.cpp's
    quantizer, its port)."""
    if name in Q32:
        return lambda rows, importance, search: (_quantize_q32(rows, name, importance) if search
                                                 else kq.quantize_blocks(rows, name, importance, False))
    return lambda rows, importance, search: kq.quantize_blocks(rows, name, importance, search)


# Types `lazymoe quantize -t` and synth's uniform files write in every weight matrix.
_QUANTIZE = {
    "f32": lambda r, imp, search: np.ascontiguousarray(r, dtype=np.float32),
    "f16": lambda r, imp, search: np.asarray(r, dtype=np.float32).astype(np.float16),
    "q8_0": lambda r, imp, search: _quantize_q8_0(r),
    "q4_0": _quantize_block("q4_0"),
    "q5_1": _quantize_block("q5_1"),
}
WRITES = tuple(_QUANTIZE)
# Types quantize() writes: the above, the K-quants and the other 32-weight types (llama.cpp's mixes use them).
_QUANTIZE.update({name: _quantize_block(name) for name in ("q4_1", "q5_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")})
QUANTIZES = tuple(_QUANTIZE)


def quantize(x: np.ndarray, qt: QType | str, importance: np.ndarray | None = None, search: bool = True) -> np.ndarray:
    """Float array (..., cols) -> stored array of type qt, shape qt.storage_shape(x.shape).

    importance [cols] float32 (llama.cpp's imatrix entry for this tensor: mean squared activation per
    column) weights each column's squared error; None weighs all alike. search False: llama.cpp's
    quantizer's bytes (kernels.kquantizers' port; Q8_0 is that anyway). Works through CHUNK_WEIGHTS
    weights (whole rows) at a time, so temporaries stay small whatever the size of x. ValueError if cols is not a whole
    number of blocks, if the importance has another length or is negative or not finite, or if x holds
    NaN or Inf (llama.cpp's quantizer writes garbage scales for those).
    """
    qt = qtype(qt) if isinstance(qt, str) else qt
    shape = tuple(x.shape)
    out = np.empty(qt.storage_shape(shape), dtype=qt.dtype)   # checks cols for block types
    fn = _QUANTIZE.get(qt.name)
    if fn is None:
        raise ValueError(f"lazymoe cannot write {qt.name} (it computes on it); types it writes: {', '.join(_QUANTIZE)}")
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if importance.shape[0] != shape[-1]:
            raise ValueError(f"the importance vector has {importance.shape[0]} entries; expected one per column ({shape[-1]})")
        if not (np.isfinite(importance).all() and (importance >= 0).all()):
            raise ValueError("the importance vector must hold finite, non-negative values")
    if x.size == 0:
        return out
    src = x.reshape(-1, shape[-1])
    dst = out.reshape(src.shape[0], -1)
    step = max(1, CHUNK_WEIGHTS // shape[-1])
    for r in range(0, src.shape[0], step):
        rows = np.ascontiguousarray(src[r:r + step], dtype=np.float32)
        if qt.is_block and not np.isfinite(rows).all():
            bad = r + int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
            raise ValueError(f"row {bad} holds NaN or Inf; {qt.name} blocks need finite weights")
        dst[r:r + step] = fn(rows, importance, search)
    return out


def reference_quantize(x: np.ndarray, qt: QType | str, importance: np.ndarray | None = None) -> np.ndarray:
    """quantize() with llama.cpp's quantizer alone: its bytes, bit for bit (kernels.kquantizers' port)."""
    return quantize(x, qt, importance, search=False)


def dequantize(data: np.ndarray, qt: QType | str) -> np.ndarray:
    """Stored array of type qt -> float32 of the logical shape (llama.cpp's numpy reference)."""
    qt = qtype(qt) if isinstance(qt, str) else qt
    if qt.name == "bf16":
        return (np.asarray(data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    if not qt.is_block:
        return np.asarray(data, dtype=np.float32)
    return gq.dequantize(np.asarray(data), qt.ggml).astype(np.float32, copy=False)
