"""Q3_K's and Q6_K's block search, and Q3_K's port of llama.cpp's make_q3_quants, with the 16-weight
sub-blocks of up to G blocks as vector lanes.

Both types are symmetric, x̂ = d·sc[j]·(L - QOFF), with 16 sub-blocks of 16 weights. kquantizers' one-block
search spends its time in loops of 16 weights (too short to vectorise) and in scalar per-sub-block decisions.
Here every step runs for all sub-blocks of the group at once, in loops over lanes that carry nothing from one lane
to the next: they vectorise without reordering any lane's sums, so the port still computes llama.cpp's float32
operations in llama.cpp's order, and each decision is a select per lane.

Per-lane values are rows of one float32 scratch F [NROWS * RS] at constant offsets (row r, lane j: F[r*RS + j]):
LLVM separates such rows by their constant distance. Rows of a 2-D array (a runtime stride) made it fall back to
its scalar loop (Q3_K's port ~1.5x slower than the one-sub-block code). The row stride RS is NL + 8: with NL
it put a weight's x and its codes (rows 32 apart) 4 KiB apart, which cost ~20 % (the CPU's load/store
disambiguation sees false aliases).

The search is kquantizers' _ours_k for symmetric types, lane by lane: each sub-block's fit from llama.cpp's and
NGRID grid starts, the super-block scale among N_D candidates ranked by the quadratic model, N_REFINE rounds of
integer-scale neighbours and a least-squares f16 scale, then the unshrink (x̂·x = x·x). It starts from the port's
fits (row FA) and leaves ours beside the port's result; the caller keeps the better of the two per block.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from lazymoe.kernels.f16 import f16_f32, f16_finite

f32 = np.float32
G = 2                       # blocks per group (32 lanes): G = 1, 2, 4 ran at 0.51, 0.57, 0.49x llama.cpp's Q3_K speed
                            # (one thread, before the stride pad and the code-free search passes)
NL = 16 * G
RS = NL + 8                 # row stride of F (see above)
EPS = f32(1e-15)            # GROUP_MAX_EPS
FAST = {"reassoc", "contract"}

# rows of F: 16 weight rows each (x, importance, our codes, the port's codes), then one row per lane value
XT, WT, LT, LP = 0, 16, 32, 48
(FA, A, SC, SCP, DG, DL, INV, E, E2, SLL, SXL, SLL2, SXL2, SVV, SXV, CA, BE, BA, LO, HI, SXX, VMAX, ACT,
 KA0, KA1, KA2, KE0, KE1, KE2, AMAX, MX, SUMLX, SUML2, CHG, S0) = range(64, 99)
NROWS = 99
# rows of the per-block float64 scratch B [NB, G]: the port's d, ours, whether ours was searched, its error,
# the candidate d's and their ranks
DP, D, OK, CUR, CD0 = range(5)
NCAND = 9
CE0 = CD0 + NCAND
NB = CE0 + NCAND


@njit(cache=True)
def scratch():
    """F, B and H (float64 [2 * NL]: per lane the errors of the port's and our representation) for one thread."""
    return np.empty(NROWS * RS, f32), np.empty((NB, G), np.float64), np.empty(2 * NL)


# ---------------------------------------------------------------- Q3_K's port (IEEE float32, llama.cpp's order)

@njit(cache=True, inline="always")
def _nic(v, lo, hi):
    """max(lo, min(hi, nearest_int(v))) as kquantizers' port computes it (int(rint(v)); beyond int64 and for nan
    that is INT64_MIN, hence lo), in float32."""
    r = np.rint(v)
    r = r if abs(r) < f32(9.2e18) else f32(-1e30)
    return min(hi, max(lo, r))


@njit(cache=True, error_model="numpy")
def q3_port(F, nl, B):
    """quantize_row_q3_K_ref on the nl / 16 blocks of the group (rows XT): the port's d into B[DP], its integer
    scales into row SCP, its codes 0..7 into rows LP, the make_q3_quants fits into row FA."""
    for j in range(nl):
        F[AMAX * RS + j] = f32(0.0)
        F[MX * RS + j] = f32(0.0)
    for i in range(16):
        for j in range(nl):
            v = F[(XT + i) * RS + j]
            ax = abs(v)
            gt = ax > F[AMAX * RS + j]
            F[AMAX * RS + j] = ax if gt else F[AMAX * RS + j]
            F[MX * RS + j] = v if gt else F[MX * RS + j]
    # make_q3_quants(16, 4, do_rmse): x²-weighted, greedy code changes, up to 5 passes. A lane whose pass changed
    # nothing would stop; its next pass changes nothing again, so all lanes run until none changes.
    for j in range(nl):
        F[INV * RS + j] = f32(-4.0) / F[MX * RS + j]
        F[SUMLX * RS + j] = f32(0.0)
        F[SUML2 * RS + j] = f32(0.0)
    for i in range(16):
        for j in range(nl):
            v = F[(XT + i) * RS + j]
            lv = _nic(F[INV * RS + j] * v, f32(-4.0), f32(3.0))
            F[(LP + i) * RS + j] = lv
            w = v * v
            F[SUMLX * RS + j] += w * v * lv
            F[SUML2 * RS + j] += w * lv * lv
    for _ in range(5):
        for j in range(nl):
            F[CHG * RS + j] = f32(0.0)
        for i in range(16):
            for j in range(nl):
                v = F[(XT + i) * RS + j]
                w = v * v
                li = F[(LP + i) * RS + j]
                sumlx = F[SUMLX * RS + j]
                suml2 = F[SUML2 * RS + j]
                slx = sumlx - w * v * li
                sl2 = suml2 - w * li * li
                new = _nic(v * sl2 / slx, f32(-4.0), f32(3.0))
                slx2 = slx + w * v * new
                sl22 = sl2 + w * new * new
                acc = ((F[AMAX * RS + j] >= EPS) & (slx > 0) & (new != li) & (sl22 > 0)
                       & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22))
                F[(LP + i) * RS + j] = new if acc else li
                F[SUMLX * RS + j] = slx2 if acc else sumlx
                F[SUML2 * RS + j] = sl22 if acc else suml2
                F[CHG * RS + j] = f32(1.0) if acc else F[CHG * RS + j]
        changed = f32(0.0)
        for j in range(nl):
            changed = max(changed, F[CHG * RS + j])
        if changed == 0:
            break
    for j in range(nl):
        zero = F[AMAX * RS + j] < EPS
        suml2 = F[SUML2 * RS + j]
        F[FA * RS + j] = f32(0.0) if (zero | (not suml2 > 0)) else F[SUMLX * RS + j] / suml2
    for i in range(16):
        for j in range(nl):
            F[(LP + i) * RS + j] = f32(0.0) if F[AMAX * RS + j] < EPS else F[(LP + i) * RS + j] + f32(4.0)
    # the block's scale: the largest fit maps to -32; integer scales; then every code again for d·sc
    for g in range(nl // 16):
        max_scale = f32(0.0)
        amax = f32(0.0)
        for jj in range(16):
            s = F[FA * RS + 16 * g + jj]
            if abs(s) > amax:
                amax = abs(s)
                max_scale = s
        if max_scale != 0:
            iscale = f32(-32.0) / max_scale
            for jj in range(16):
                F[SCP * RS + 16 * g + jj] = _nic(iscale * F[FA * RS + 16 * g + jj], f32(-32.0), f32(31.0))
            d = f16_f32(f32(1.0) / iscale)
        else:
            for jj in range(16):
                F[SCP * RS + 16 * g + jj] = f32(-32.0)
            d = f32(0.0)
        B[DP, g] = d
        for jj in range(16):
            F[DL * RS + 16 * g + jj] = d * F[SCP * RS + 16 * g + jj]
    for i in range(16):
        for j in range(nl):
            dl = F[DL * RS + j]
            q = _nic(F[(XT + i) * RS + j] / dl, f32(-4.0), f32(3.0)) + f32(4.0)
            F[(LP + i) * RS + j] = q if dl != 0 else F[(LP + i) * RS + j]


@njit(cache=True, error_model="numpy")
def errors(F, nl, B, H, qoff):
    """Per lane the error sum w (x - x̂)² of the port's representation (B[DP], SCP, LP) into H[:NL] and of ours
    (B[D], SC, LT) into H[NL:], x̂ dequantized in float32 as gguf.quants does, summed in float64 in order."""
    for g in range(nl // 16):
        dp = f32(B[DP, g])
        do = f32(B[D, g])
        for jj in range(16):
            F[DL * RS + 16 * g + jj] = dp * F[SCP * RS + 16 * g + jj]
            F[INV * RS + 16 * g + jj] = do * F[SC * RS + 16 * g + jj]
    for j in range(nl):
        H[j] = 0.0
        H[NL + j] = 0.0
    fo = f32(qoff)
    for i in range(16):
        for j in range(nl):
            x = F[(XT + i) * RS + j]
            w = float(F[(WT + i) * RS + j])
            rp = float(x) - float(F[DL * RS + j] * (F[(LP + i) * RS + j] - fo))
            ro = float(x) - float(F[INV * RS + j] * (F[(LT + i) * RS + j] - fo))
            H[j] += w * rp * rp
            H[NL + j] += w * ro * ro


# ---------------------------------------------------------------- the search (float32 lanes, reassociated)

@njit(inline="always", fastmath=FAST, error_model="numpy")
def _pass(F, nl, qmax, qoff, rE, rSLL, rSXL, store):
    """Best codes for the effective scales in row DL (x̂ = dl·(L - qoff)), per lane the error sum w (x - x̂)² into
    row rE and the sums w·v², w·x·v (v = L - qoff) into rSLL, rSXL; the codes (0..qmax) into rows LT if store."""
    fq = f32(qmax)
    fo = f32(qoff)
    c = f32(qoff + 0.5)
    for j in range(nl):
        dl = F[DL * RS + j]
        F[INV * RS + j] = f32(1.0) / dl if dl != 0 else f32(0.0)
        F[rE * RS + j] = f32(0.0)
        F[rSLL * RS + j] = f32(0.0)
        F[rSXL * RS + j] = f32(0.0)
    for i in range(16):
        for j in range(nl):
            x = F[(XT + i) * RS + j]
            w = F[(WT + i) * RS + j]
            q = min(fq, max(f32(0.0), np.floor(x * F[INV * RS + j] + c)))
            if store:
                F[(LT + i) * RS + j] = q
            v = q - fo
            r = x - F[DL * RS + j] * v
            wv = w * v
            F[rE * RS + j] += w * r * r
            F[rSLL * RS + j] += wv * v
            F[rSXL * RS + j] += wv * x


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _sums(F, nl, qmax, qoff, rE, rSLL, rSXL):
    """_pass without the codes: the search keeps each lane's scale and sums; its codes follow from the scale."""
    _pass(F, nl, qmax, qoff, rE, rSLL, rSXL, False)


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _codes(F, nl, qmax, qoff):
    """_pass with the codes into rows LT (row E, SLL, SXL: their sums)."""
    _pass(F, nl, qmax, qoff, E, SLL, SXL, True)


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _fit_round(F, nl, qmax, qoff):
    """One round from the scales in row CA: nearest codes, then their least-squares scale na and its error,
    kept in rows BA, BE where better. Returns nothing; leaves na in SXV and the error in SVV (inf: no fit)."""
    fq = f32(qmax)
    fo = f32(qoff)
    c = f32(qoff + 0.5)
    for j in range(nl):
        ca = F[CA * RS + j]
        F[INV * RS + j] = f32(1.0) / ca if (ca != 0) & (abs(ca) < f32(np.inf)) else f32(0.0)
        F[SVV * RS + j] = f32(0.0)
        F[SXV * RS + j] = f32(0.0)
    for i in range(16):
        for j in range(nl):
            x = F[(XT + i) * RS + j]
            v = min(fq, max(f32(0.0), np.floor(x * F[INV * RS + j] + c))) - fo
            wv = F[(WT + i) * RS + j] * v
            F[SVV * RS + j] += wv * v
            F[SXV * RS + j] += wv * x
    for j in range(nl):
        svv = F[SVV * RS + j]
        sxv = F[SXV * RS + j]
        na = sxv / svv if svv > 0 else f32(0.0)
        e = F[SXX * RS + j] - f32(2.0) * na * sxv + na * na * svv
        e = e if (na != 0) & (F[INV * RS + j] != 0) else f32(np.inf)
        better = e < F[BE * RS + j]
        F[BE * RS + j] = e if better else F[BE * RS + j]
        F[BA * RS + j] = na if better else F[BA * RS + j]
        F[SXV * RS + j] = na
        F[SVV * RS + j] = e


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _keep(F, nl, nkeep):
    """Insert each lane's last fit (SXV: scale, SVV: error) into its nkeep best (rows KA*, KE*, sorted)."""
    for j in range(nl):
        a = F[SXV * RS + j]
        e = F[SVV * RS + j]
        for q in range(nkeep):
            ke = F[(KE0 + q) * RS + j]
            ka = F[(KA0 + q) * RS + j]
            c = e < ke
            F[(KE0 + q) * RS + j] = e if c else ke
            F[(KA0 + q) * RS + j] = a if c else ka
            e = ke if c else e
            a = ka if c else a


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _lane_scales(F, nl, slo, shi):
    """Integer scales nearest A / DG (row SC) and effective scales DG·SC (row DL)."""
    for j in range(nl):
        d = F[DG * RS + j]
        s = min(f32(shi), max(f32(slo), np.rint(F[A * RS + j] / d))) if d != 0 else f32(0.0)
        F[SC * RS + j] = s
        F[DL * RS + j] = d * s


@njit(cache=True, fastmath=FAST)
def _block_sum(F, row, g):
    s = 0.0
    for jj in range(16):
        s += F[row * RS + 16 * g + jj]
    return s


@njit(cache=True, fastmath=FAST)
def _set_d(F, g, d):
    for jj in range(16):
        F[DG * RS + 16 * g + jj] = d


@njit(cache=True, fastmath=FAST, error_model="numpy")
def _take(F, nl):
    """Where row ACT is set and E2 < E: the trial's error, sums and the scale in CA replace the current ones (E,
    SLL, SXL, SC)."""
    for j in range(nl):
        t = (F[ACT * RS + j] != 0) & (F[E2 * RS + j] < F[E * RS + j])
        F[E * RS + j] = F[E2 * RS + j] if t else F[E * RS + j]
        F[SLL * RS + j] = F[SLL2 * RS + j] if t else F[SLL * RS + j]
        F[SXL * RS + j] = F[SXL2 * RS + j] if t else F[SXL * RS + j]
        F[SC * RS + j] = F[CA * RS + j] if t else F[SC * RS + j]


@njit(inline="always", fastmath=FAST, error_model="numpy")
def _search(F, nl, B, qmax, qoff, slo, shi, ngrid, nit, nkeep, nd, nfull, nrefine, nunshrink, t_lo, t_hi, d_step):
    """Our search on the group's blocks (rows XT, WT; llama.cpp's fits in FA): per block its f16 d into B[D],
    its integer scales into row SC and codes into rows LT; B[OK] 0 where there is none (the port's stands)."""
    nblk = nl // 16
    inf = f32(np.inf)
    # ---- each sub-block's float scale: llama.cpp's fit and the grid starts, one round each; nit more from the
    # nkeep best
    for j in range(nl):
        F[LO * RS + j] = f32(0.0)
        F[HI * RS + j] = f32(0.0)
        F[SXX * RS + j] = f32(0.0)
    for i in range(16):
        for j in range(nl):
            x = F[(XT + i) * RS + j]
            F[LO * RS + j] = min(F[LO * RS + j], x)
            F[HI * RS + j] = max(F[HI * RS + j], x)
            F[SXX * RS + j] += F[(WT + i) * RS + j] * x * x
    for j in range(nl):
        lo = F[LO * RS + j]
        hi = F[HI * RS + j]
        F[VMAX * RS + j] = hi if hi >= -lo else lo
        F[BE * RS + j] = inf
        F[BA * RS + j] = F[FA * RS + j]
        F[CA * RS + j] = F[FA * RS + j]
    for q in range(nkeep):
        for j in range(nl):
            F[(KE0 + q) * RS + j] = inf
            F[(KA0 + q) * RS + j] = f32(0.0)
    for k in range(1 + ngrid):
        if k > 0:                                     # the extreme to the negative end, then the positive end
            ka = k - 1
            t = f32(t_lo + (t_hi - t_lo) * ka / max(1, ngrid - 1))
            den = -(f32(qoff) + t) if ka % 2 == 0 else f32(qmax - qoff) - t
            for j in range(nl):
                F[CA * RS + j] = F[VMAX * RS + j] / den
        _fit_round(F, nl, qmax, qoff)
        _keep(F, nl, nkeep)
    for q in range(nkeep):
        for j in range(nl):
            F[CA * RS + j] = F[(KA0 + q) * RS + j] if F[(KE0 + q) * RS + j] < inf else f32(0.0)
        for _ in range(nit):
            _fit_round(F, nl, qmax, qoff)
            for j in range(nl):
                F[CA * RS + j] = F[SXV * RS + j]
    for j in range(nl):
        ba = F[BA * RS + j]
        ok = (ba != 0) & (F[BE * RS + j] < inf)
        F[A * RS + j] = ba if ok else F[FA * RS + j]
        F[DL * RS + j] = F[A * RS + j]
    _sums(F, nl, qmax, qoff, E, SLL, SXL)              # SLL: each sub-block's w·v² (the quadratic model)
    # ---- the super-block scale: 2·nd candidates (the largest |fit| to slo + t or shi - t), ranked by
    # sum_j w·v²·(d·s_j - a_j)², the nfull best evaluated with their best codes
    for g in range(nblk):
        amax = 0.0
        asg = 0.0
        for jj in range(16):
            a = float(F[A * RS + 16 * g + jj])
            if abs(a) > amax:
                amax = abs(a)
                asg = a
        B[OK, g] = 1.0 if amax > 0 else 0.0
        B[CUR, g] = math.inf
        B[D, g] = 0.0
        for r in range(nfull):
            B[CE0 + r, g] = math.inf
            B[CD0 + r, g] = 0.0
        if amax == 0:
            continue
        for k in range(2 * nd):
            t = d_step * (k // 2)
            dk = f16_finite(asg / (slo + t)) if k % 2 == 0 else f16_finite(asg / (shi - t))
            if dk == 0.0:
                continue
            q = 0.0
            for jj in range(16):
                a = float(F[A * RS + 16 * g + jj])
                dA = dk * min(shi, max(slo, np.rint(a / dk))) - a
                q += float(F[SLL * RS + 16 * g + jj]) * dA * dA
            p = nfull
            while p > 0 and q < B[CE0 + p - 1, g]:
                p -= 1
            if p < nfull:
                for r in range(nfull - 1, p, -1):
                    B[CD0 + r, g] = B[CD0 + r - 1, g]
                    B[CE0 + r, g] = B[CE0 + r - 1, g]
                B[CD0 + p, g] = dk
                B[CE0 + p, g] = q
    for r in range(nfull):
        for g in range(nblk):
            _set_d(F, g, f32(B[CD0 + r, g]) if B[CE0 + r, g] < math.inf else f32(0.0))
        _lane_scales(F, nl, slo, shi)
        _sums(F, nl, qmax, qoff, E2, SLL2, SXL2)
        for g in range(nblk):
            if B[CE0 + r, g] < math.inf:
                e = _block_sum(F, E2, g)
                if e < B[CUR, g]:
                    B[CUR, g] = e
                    B[D, g] = B[CD0 + r, g]
    for g in range(nblk):
        if B[CUR, g] == math.inf:
            B[OK, g] = 0.0
        _set_d(F, g, f32(B[D, g]))
    _lane_scales(F, nl, slo, shi)
    _sums(F, nl, qmax, qoff, E, SLL, SXL)
    # ---- nrefine rounds: each sub-block's integer scale ±1 with its best codes, then the least-squares d
    for g in range(nblk):
        for jj in range(16):
            F[ACT * RS + 16 * g + jj] = f32(B[OK, g])
    for _ in range(nrefine):
        for j in range(nl):
            F[S0 * RS + j] = F[SC * RS + j]
        for ds in (-1.0, 1.0):
            for j in range(nl):
                s1 = F[S0 * RS + j] + f32(ds)
                F[CA * RS + j] = s1
                F[DL * RS + j] = F[DG * RS + j] * s1 if (s1 >= slo) & (s1 <= shi) else f32(0.0)
            _sums(F, nl, qmax, qoff, E2, SLL2, SXL2)
            for j in range(nl):
                s1 = F[CA * RS + j]
                F[E2 * RS + j] = F[E2 * RS + j] if (s1 >= slo) & (s1 <= shi) else inf
            _take(F, nl)
        for g in range(nblk):
            if B[OK, g] == 0:
                continue
            B[CUR, g] = _block_sum(F, E, g)
            suu = 0.0
            sxu = 0.0
            for jj in range(16):
                u = float(F[SC * RS + 16 * g + jj])
                suu += u * u * float(F[SLL * RS + 16 * g + jj])
                sxu += u * float(F[SXL * RS + 16 * g + jj])
            nd_ = f16_finite(sxu / suu) if suu > 0 else 0.0
            ok = nd_ != 0.0 and math.isfinite(nd_)
            _set_d(F, g, f32(nd_) if ok else f32(B[D, g]))
            B[CE0, g] = nd_ if ok else 0.0
        for j in range(nl):
            F[DL * RS + j] = F[DG * RS + j] * F[SC * RS + j]
        _sums(F, nl, qmax, qoff, E2, SLL2, SXL2)
        for g in range(nblk):
            act = B[OK, g] != 0 and B[CE0, g] != 0.0 and _block_sum(F, E2, g) < B[CUR, g]
            for jj in range(16):
                F[ACT * RS + 16 * g + jj] = f32(1.0) if act else f32(0.0)
            if act:
                B[D, g] = B[CE0, g]
                for jj in range(16):
                    F[E * RS + 16 * g + jj] = f32(np.inf)    # so that _take keeps E2
            else:
                _set_d(F, g, f32(B[D, g]))
        for j in range(nl):
            F[CA * RS + j] = F[SC * RS + j]
        _take(F, nl)
    # ---- the unshrink: scale d so that sum w·x̂·x = sum w·x², then the codes again
    for _ in range(nunshrink):
        moved = False
        for g in range(nblk):
            if B[OK, g] == 0:
                continue
            sxx = _block_sum(F, SXX, g)
            d = B[D, g]
            sxy = 0.0
            for jj in range(16):
                sxy += d * float(F[SC * RS + 16 * g + jj]) * float(F[SXL * RS + 16 * g + jj])
            if sxy <= 0.0 or sxx <= 0.0:
                continue
            nd_ = f16_finite(d * (sxx / sxy))
            if nd_ != d:
                B[D, g] = nd_
                _set_d(F, g, f32(nd_))
                moved = True
        if not moved:
            break
        for j in range(nl):
            F[DL * RS + j] = F[DG * RS + j] * F[SC * RS + j]
        _sums(F, nl, qmax, qoff, E, SLL, SXL)
    # ---- the codes of the final scales
    for g in range(nblk):
        _set_d(F, g, f32(B[D, g]))
    for j in range(nl):
        F[DL * RS + j] = F[DG * RS + j] * F[SC * RS + j]
    _codes(F, nl, qmax, qoff)


def search_for(layout, ngrid, nit, nkeep, nd, nfull, nrefine, nunshrink, t_lo, t_hi, d_step):
    """_search compiled for one symmetric type: layout (nsub, sublen, qmax, qoff, slo, shi, ...) and the
    search's settings as constants."""
    qmax, qoff, slo, shi = (int(v) for v in layout[2:6])
    if nkeep > 3 or nfull > NCAND:
        raise ValueError(f"klanes keeps at most 3 starts and {NCAND} scale candidates")

    @njit(cache=True, fastmath=FAST, error_model="numpy")
    def search(F, nl, B):
        _search(F, nl, B, qmax, qoff, slo, shi, ngrid, nit, nkeep, nd, nfull, nrefine, nunshrink, t_lo, t_hi, d_step)
    return search
