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
ROWS_PER_CHUNK = 256   # rows quantized per call: bounds the float temporaries

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


@njit(cache=True, inline="always")
def _f16(v, fb, ib):
    """The nearest f16 value to the float32 v (round half to even, as F16C), clamped to f16's finite range; as
    float32. fb float32 [1] and ib = fb.view(int32) are scratch: the rounding is done on v's bits."""
    v = min(F16_MAX, max(-F16_MAX, v))
    if abs(v) < np.float32(6.103515625e-05):                  # f16 subnormals: multiples of 2^-24
        return np.float32(np.rint(np.float64(v) * 16777216.0) / 16777216.0)
    fb[0] = v
    u = ib[0]
    ib[0] = (u + 0xFFF + ((u >> 13) & 1)) & -8192               # 23 -> 10 mantissa bits, ties to even
    return fb[0]


@njit(cache=True, inline="always")
def _range(x, b, t):
    """(min, max) of the block. LLVM leaves a min/max reduction a scalar chain (a quarter of the time): the
    four 8-weight quarters are compared element-wise into t [16] float32 scratch (vector min/max), then 8 remain."""
    for i in range(8):
        t[i] = min(min(x[b, i], x[b, i + 8]), min(x[b, i + 16], x[b, i + 24]))
        t[i + 8] = max(max(x[b, i], x[b, i + 8]), max(x[b, i + 16], x[b, i + 24]))
    lo = t[0]
    hi = t[8]
    for i in range(1, 8):
        lo = min(lo, t[i])
        hi = max(hi, t[i + 8])
    return lo, hi


@njit(cache=True, inline="always")
def _rank_sym(x, b, vmax, qmax, qoff, sxq, sqq, w, jw):
    """The best candidate scale of a symmetric block (codes clamp(round(x·inv)) + qoff), by the squared
    error (weighted by w[jw] [32], when w is not None) of its least-squares scale, unrounded (float32).
    sxq, sqq: float32 scratch [candidates] (the sums of every candidate first, then the choice: no branch in
    the loop over weights)."""
    lo = np.float32(-qoff)
    hi = np.float32(qmax - qoff)
    tneg = T_NEG if w is None else T_NEG_W
    tpos = T_POS if w is None else T_POS_W
    nn = tneg.shape[0]
    nk = nn + tpos.shape[0]
    for k in range(0, nk, 2):                                   # two candidates per pass over the weights
        k2 = min(k + 1, nk - 1)
        inv1 = (-(np.float32(qoff) + tneg[k]) if k < nn else hi - tpos[k - nn]) / vmax
        inv2 = (-(np.float32(qoff) + tneg[k2]) if k2 < nn else hi - tpos[k2 - nn]) / vmax
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        c1 = np.float32(0.0)
        c2 = np.float32(0.0)
        for i in range(QK):
            xi = x[b, i]
            wi = np.float32(1.0) if w is None else w[jw, i]
            v1 = min(hi, max(lo, np.floor(xi * inv1 + np.float32(0.5))))
            v2 = min(hi, max(lo, np.floor(xi * inv2 + np.float32(0.5))))
            a1 += wi * xi * v1
            c1 += wi * v1 * v1
            a2 += wi * xi * v2
            c2 += wi * v2 * v2
        sxq[k] = a1
        sqq[k] = c1
        sxq[k2] = a2
        sqq[k2] = c2
    best = 0                                                    # error - Sxx = -Sxq² / Sqq: the largest Sxq²/Sqq
    for k in range(1, nk):
        if sxq[k] * sxq[k] * sqq[best] > sxq[best] * sxq[best] * sqq[k]:
            best = k
    if not sqq[best] > 0:
        return np.float32(0.0)
    d = sxq[best] / sqq[best]
    # the nearest codes for d, their least-squares scale, then that scaled so that the block is not shrunk
    # along x (x̂·x = x·x; least squares leaves x̂·x = (1 - relerr²)·x·x, and every output of the matrix
    # shrinks coherently: see kernels.kquantizers._unshrink)
    inv = np.float32(1.0) / d
    a1 = np.float32(0.0)
    sxx = np.float32(0.0)
    for i in range(QK):
        xi = x[b, i]
        wi = np.float32(1.0) if w is None else w[jw, i]
        v1 = min(hi, max(lo, np.floor(xi * inv + np.float32(0.5))))
        a1 += wi * xi * v1
        sxx += wi * xi * xi
    return sxx / a1 if a1 != 0 else d


@njit(cache=True, inline="always")
def _rank_min(x, b, lo, hi, qmax, sq, sqq, sxq, w, jw):
    """The best candidate (scale, min) of a block with a min (codes clamp(round((x - m)/d)), 0..qmax), by the
    squared error (weighted by w[jw] [32], when w is not None) of its least-squares (d, m), unrounded
    (float32). sq, sqq, sxq: float32 scratch [candidates]."""
    sx = np.float32(0.0)
    n = np.float32(0.0)
    for i in range(QK):
        wi = np.float32(1.0) if w is None else w[jw, i]
        sx += wi * x[b, i]
        n += wi
    fq = np.float32(qmax)
    trange = T_RANGE if w is None else T_RANGE_W
    nk = trange.shape[0]
    for k in range(0, nk, 2):                                   # two candidates per pass over the weights
        k2 = min(k + 1, nk - 1)
        inv1 = (fq + trange[k]) / (hi - lo)
        inv2 = (fq + trange[k2]) / (hi - lo)
        o1 = np.float32(0.5) - lo * inv1
        o2 = np.float32(0.5) - lo * inv2
        a1 = np.float32(0.0)
        b1 = np.float32(0.0)
        c1 = np.float32(0.0)
        a2 = np.float32(0.0)
        b2 = np.float32(0.0)
        c2 = np.float32(0.0)
        for i in range(QK):
            xi = x[b, i]
            wi = np.float32(1.0) if w is None else w[jw, i]
            v1 = min(fq, max(np.float32(0.0), np.floor(xi * inv1 + o1)))
            v2 = min(fq, max(np.float32(0.0), np.floor(xi * inv2 + o2)))
            a1 += wi * v1
            b1 += wi * v1 * v1
            c1 += wi * xi * v1
            a2 += wi * v2
            b2 += wi * v2 * v2
            c2 += wi * xi * v2
        sq[k], sqq[k], sxq[k] = a1, b1, c1
        sq[k2], sqq[k2], sxq[k2] = a2, b2, c2
    # the least-squares (d, m) of candidate k is (nd_k, nm_k) / den_k, its error - Sxx is -(nd·Sxq + nm·Sx) / den:
    # the best is chosen by cross-multiplied errors, one division for the winner
    best = -1
    best_num = np.float32(0.0)
    best_den = np.float32(1.0)
    for k in range(nk):
        den = n * sqq[k] - sq[k] * sq[k]
        num = (n * sxq[k] - sx * sq[k]) * sxq[k] + (sqq[k] * sx - sq[k] * sxq[k]) * sx
        if den > 0 and (best < 0 or num * best_den > best_num * den):
            best, best_num, best_den = k, num, den
    if best < 0:
        return np.float32(0.0), lo
    best_d = (n * sxq[best] - sx * sq[best]) / best_den
    best_m = (sqq[best] * sx - sq[best] * sxq[best]) / best_den
    if not best_d > 0:
        return best_d, best_m
    # the nearest codes for (d, m), their least squares, then scaled so that x̂·x = x·x (as _rank_sym)
    inv = np.float32(1.0) / best_d
    o1 = np.float32(0.5) - best_m * inv
    a1 = np.float32(0.0)
    b1 = np.float32(0.0)
    c1 = np.float32(0.0)
    sxx = np.float32(0.0)
    for i in range(QK):
        xi = x[b, i]
        wi = np.float32(1.0) if w is None else w[jw, i]
        v1 = min(fq, max(np.float32(0.0), np.floor(xi * inv + o1)))
        a1 += wi * v1
        b1 += wi * v1 * v1
        c1 += wi * xi * v1
        sxx += wi * xi * xi
    den = n * b1 - a1 * a1
    if den > 0:
        best_d = (n * c1 - sx * a1) / den
        best_m = (b1 * sx - a1 * c1) / den
    sxy = best_d * c1 + best_m * sx
    if sxy > 0:
        best_d *= sxx / sxy
        best_m *= sxx / sxy
    return best_d, best_m


@njit(cache=True, inline="always")
def _code(xi, inv, m, qmax, qoff):
    """The nearest code to xi for the stored scale 1/inv and min m (x̂ = d·(q - qoff) + m), as float32."""
    return min(np.float32(qmax), max(np.float32(0.0), np.floor((xi - m) * inv + np.float32(qoff + 0.5))))


@njit(cache=True, inline="always")
def _error(x, b, d, m, qmax, qoff, w, jw):
    """The block's squared error with the stored (f16) d and m and the best codes for them (weighted by w[jw],
    when w is not None), summed in float32: every term is positive, so it is within ~1e-6 of its value."""
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    e = np.float32(0.0)
    for i in range(QK):
        r = x[b, i] - (d * (_code(x[b, i], inv, m, qmax, qoff) - np.float32(qoff)) + m)
        e += r * r if w is None else w[jw, i] * r * r
    return e


@njit(cache=True, inline="always")
def _put_f16(out, b, o, v, fb, ib):
    """The IEEE half bits of the f16-exact float32 v into out[o:o+2], little-endian."""
    fb[0] = v
    u = ib[0]
    a = u & 0x7FFFFFFF
    if a >= 0x38800000:                                         # normal f16: rebias the exponent 127 -> 15
        h = ((a >> 13) - (112 << 10)) & 0x7FFF
    else:                                                      # subnormal f16 (or 0): multiples of 2^-24
        h = int(abs(np.float64(v)) * 16777216.0)
    h |= (u >> 16) & 0x8000
    out[b, o] = h & 0xFF
    out[b, o + 1] = h >> 8


@njit(cache=True, inline="always")
def _pack(x, b, d, m, qmax, qoff, q, out, fb, ib):
    """One block's bytes (ggml-common.h): f16 d, f16 m with a min, 32 high bits for 5-bit codes, then nibbles
    (byte j = q[j] & 15 | (q[j+16] & 15) << 4), codes the best for the stored d and m. q: uint8 scratch [32]."""
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    for i in range(QK):
        q[i] = np.uint8(_code(x[b, i], inv, m, qmax, qoff))
    _put_f16(out, b, 0, d, fb, ib)
    o = 2
    if qoff == 0:
        _put_f16(out, b, 2, m, fb, ib)
        o = 4
    if qmax == 31:
        qh = np.uint32(0)
        for i in range(QK):
            qh |= np.uint32(q[i] >> 4) << np.uint32(i)
        for k in range(4):
            out[b, o + k] = np.uint8((qh >> np.uint32(8 * k)) & np.uint32(0xFF))
        o += 4
    for j in range(16):
        out[b, o + j] = (q[j] & np.uint8(15)) | (q[j + 16] << np.uint8(4))


@njit(cache=True, inline="always")
def _candidates(x, b, qmax, qoff, has_min, s1, s2, s3, fb, ib, w, jw, ld, lm):
    """Block b's two candidates as f16 values: (d, m) of our best, and of llama.cpp's quantizer: without an
    importance its scale max/-offset, or (max - min)/qmax with min m; with one (w not None) ld[b], lm[b]
    (_llama_fits)."""
    lo, hi = _range(x, b, s3)
    if has_min:
        if hi == lo:                              # constant block: d 0, m its value (to f16)
            m = _f16(lo, fb, ib)
            da, ma = np.float32(0.0), m
            db, mb = np.float32(0.0), m
        else:
            d, m = _rank_min(x, b, lo, hi, qmax, s1, s2, s3, w, jw)
            da, ma = _f16(d, fb, ib), _f16(m, fb, ib)
            db, mb = _f16((hi - lo) / np.float32(qmax), fb, ib), _f16(lo, fb, ib)
    else:
        vmax = hi if hi > -lo else lo
        if hi == -lo:                             # |max| = |min|: llama.cpp takes the first
            for i in range(QK):
                if abs(x[b, i]) == hi:
                    vmax = x[b, i]
                    break
        ma = mb = np.float32(0.0)
        if vmax == 0:
            da = db = np.float32(0.0)
        else:
            da = _f16(_rank_sym(x, b, vmax, qmax, qoff, s1, s2, w, jw), fb, ib)
            db = _f16(vmax / np.float32(-qoff), fb, ib)
    if w is not None:
        db, mb = ld[b], lm[b]
    return da, ma, db, mb


TILE = 64    # blocks per tile: each stage of the search runs over a tile, as its own simple loop


@njit(cache=True, parallel=True)
def _q32_search(x, qmax, qoff, has_min, w, ld, lm, out):
    """x [n_blocks, 32] float32 (rows of C = 32·nbr weights, one after another) -> out [n_blocks, type_size]
    uint8 (_pack's layout); w: None, or the importance [nbr, 32] with llama.cpp's f16 d and m for it, ld, lm
    [n_blocks] (_llama_fits). Per block the better, as stored (weighted by w), of our best candidate and
    llama.cpp's, each with the best codes for its f16 values: llama.cpp's own codes are those for its
    unrounded values, so no block is worse than llama.cpp makes it (near ties, within the float32 sums'
    accuracy, go to llama.cpp's). The helpers are inlined: a call that passes arrays costs atomic
    reference counts, which took a third of the time. No fast-math: with reassociated sums the ranking
    depended on the vector width (the arm64 build chose other candidates in near ties, other bytes than
    x86's), and a plain function first compiled from a fast-math caller is compiled fast-math (the port
    then lost its bit-exactness); in IEEE order every machine writes the same bytes, at ~0.3x the speed."""
    n = x.shape[0]
    nbr = 1 if w is None else w.shape[0]
    ntile = (n + TILE - 1) // TILE
    nc = max(T_RANGE_W.shape[0], T_NEG_W.shape[0] + T_POS_W.shape[0], T_RANGE.shape[0], T_NEG.shape[0] + T_POS.shape[0])
    nthr = min(ntile, 64)
    step = (ntile + nthr - 1) // nthr
    for t in prange(nthr):
        s1 = np.empty(nc, np.float32)
        s2 = np.empty(nc, np.float32)
        s3 = np.empty(max(nc, 16), np.float32)       # also _range's scratch
        q = np.empty(QK, np.uint8)
        fb = np.empty(1, np.float32)
        ib = fb.view(np.int32)
        da = np.empty(TILE, np.float32)
        ma = np.empty(TILE, np.float32)
        db = np.empty(TILE, np.float32)
        mb = np.empty(TILE, np.float32)
        for tile in range(t * step, min(ntile, (t + 1) * step)):
            b0 = tile * TILE
            nb = min(TILE, n - b0)
            for j in range(nb):
                da[j], ma[j], db[j], mb[j] = _candidates(x, b0 + j, qmax, qoff, has_min, s1, s2, s3, fb, ib,
                                                         w, (b0 + j) % nbr, ld, lm)
            for j in range(nb):
                b = b0 + j
                if (da[j] != db[j] or ma[j] != mb[j]) and (
                        _error(x, b, db[j], mb[j], qmax, qoff, w, b % nbr)
                        <= _error(x, b, da[j], ma[j], qmax, qoff, w, b % nbr) * np.float32(1.0 + 1e-5)):
                    da[j] = db[j]
                    ma[j] = mb[j]
            for j in range(nb):
                _pack(x, b0 + j, da[j], ma[j], qmax, qoff, q, out, fb, ib)


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
    quantizer's bytes (kernels.kquantizers' port; Q8_0 is that anyway). Works through ROWS_PER_CHUNK
    rows at a time, so temporaries stay small whatever the size of x. ValueError if cols is not a whole
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
    for r in range(0, src.shape[0], ROWS_PER_CHUNK):
        rows = np.ascontiguousarray(src[r:r + ROWS_PER_CHUNK], dtype=np.float32)
        if qt.is_block and not np.isfinite(rows).all():
            bad = r + int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
            raise ValueError(f"row {bad} holds NaN or Inf; {qt.name} blocks need finite weights")
        dst[r:r + ROWS_PER_CHUNK] = fn(rows, importance, search)
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
