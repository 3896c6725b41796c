"""kernels/kquant.py and kquant_plain.py against gguf.quants.dequantize and a float64 dot.

Tolerances (y the kernel's float32 row dot, x̂ the activations as the kernel sees them, dequantized):
- against ŵ . x̂ in float64: |y - ref| <= (n + 8) 2^-23 S, n the float32 additions the kernel chains (blocks
  per row; C / 8 for BF16) and S = sum |ŵ - ŵ0| |x̂| + |ŵ0| |x̂| with ŵ0 the block's weights at u = 0 (the min or
  offset term), because the kernel adds the scale and min/offset terms separately and each float32 operation
  (d_w d_x, int -> float, product, running sum, gguf's own d * sc) costs at most half an ulp of its part of S.
- against ŵ . x in float64: that, plus sum |ŵ| |x - x̂|: the activation quantization error, exactly bounded.
- K-quant dots: the three implementations agree bit for bit (exact int32 sums, the same float operations).
  The 32-block forms add their 8 float lanes in different groupings, so each meets the bounds on its own.
- Dequantizers equal gguf's bit for bit (the same float32 operations in the same order, no FMA).
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as G
from gguf.quants import dequantize, quantize
from numba import njit

from lazymoe.kernels import arm64, simd
from lazymoe.kernels import kquant as K
from lazymoe.kernels import kquant_plain as P
from lazymoe.kernels.activations import quantize_q8
from lazymoe.kernels.blocks import dequant_row, row_dot
from tests.helpers import check_dequant_bit_exact, deq_of, f16_bytes, one_of, rows_of

KQ = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
B32 = ["q4_1", "q5_0", "q5_1"]
GG = {"q2_k": G.Q2_K, "q3_k": G.Q3_K, "q4_k": G.Q4_K, "q5_k": G.Q5_K, "q6_k": G.Q6_K, "q4_1": G.Q4_1,
      "q5_0": G.Q5_0, "q5_1": G.Q5_1, "bf16": G.BF16}
# byte ranges of a block holding the quants (zeroed: every u = 0, leaving the min / offset term ŵ0)
QUANT_BYTES = {"q2_k": (16, 80), "q3_k": (0, 96), "q4_k": (16, 144), "q5_k": (16, 176), "q6_k": (0, 192),
               "q4_1": (4, 20), "q5_0": (2, 22), "q5_1": (4, 24)}
# f16 scale positions inside a K-quant block: d (and dmin)
SCALES_AT = {"q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}



# Q5_1 is simd.py's (kquant.py's docstring says why): its AVX2 registry dot, its arm64 form (arm64.py) and its
# portable twin stand in for the forms, its dequantizer is the registry's.
Q5_1 = int(G.Q5_1)


@njit
def _q5_1_registry(w, wo, xq, xd, xc):
    return row_dot(Q5_1, w, wo, xd, xq, xd, xc)         # x is not read by Q5_1's dot: xd stands in


@njit
def _q5_1_dequant(w, wo, out, oo, nb):
    if wo >= 0 and oo >= 0:                             # the registry's dequantizer trusts its driver's bounds
        nb = min(nb, (w.shape[0] - wo) // 24, (out.shape[0] - oo) // 32)
        if nb > 0:
            dequant_row(Q5_1, w, wo, out, oo, 32 * nb)


IMPLS = {t: {"ir": getattr(K, f"dot_{t}_ir"), "x86": getattr(K, f"dot_{t}_x86"), "plain": getattr(P, f"dot_{t}_plain")}
         for t in KQ + B32 if t != "q5_1"}
IMPLS["q5_1"] = {"ir": arm64.dot_q5_1, "plain": simd.dot_q5_1_portable} | ({"x86": _q5_1_registry} if simd.HAVE_AVX2 else {})
for _t in KQ:                                          # the 512-bit sums (AVX-512BW only)
    IMPLS[_t]["x86w"] = getattr(K, f"dot_{_t}_x86w")
ROWS = {t: {f: rows_of(d) for f, d in v.items()} for t, v in IMPLS.items()}
ONE = {t: {f: one_of(d) for f, d in v.items()} for t, v in IMPLS.items()}
DEQ = {t: deq_of(getattr(K, f"dequant_{t}")) for t in KQ + B32 if t != "q5_1"}
DEQ["q5_1"] = _q5_1_dequant
DEQ["bf16"] = K.dequant_bf16
FORMS = (["ir", "x86", "plain"] if K.HAVE_AVX2 else ["ir", "plain"]) + (["x86w"] if simd.HAVE_AVX512 else [])
# simd.py's dots read what their drivers validated (dispatch.check_weight): no clamp of their own
CLAMPED = [t for t in KQ + B32 if t != "q5_1"]
SIZE = {t: GGML_QUANT_SIZES[GG[t]] for t in KQ + B32}     # (weights, bytes) per block


def forms(t):
    return [f for f in FORMS if f in IMPLS[t]]


@njit
def _bf16_rows(w, cols, x, y, plain):
    for r in range(y.shape[0]):
        y[r] = P.dot_bf16_plain(w, r * cols, x, cols // 8) if plain else K.dot_bf16_ir(w, r * cols, x, cols // 8)


@njit
def _bf16_one(w, wo, x, n8, plain):
    return P.dot_bf16_plain(w, wo, x, n8) if plain else K.dot_bf16_ir(w, wo, x, n8)



def make_weights(t, rows, cols, rng, heavy=False):
    """Stored rows uint8 [rows, row_bytes]: gguf's quantizer where it has one, else random bytes, sane scales."""
    if t in B32:
        w = rng.standard_t(3, (rows, cols)) if heavy else rng.standard_normal((rows, cols))
        return quantize(w.astype(np.float32) * 0.02, GG[t])
    ts, nb = SIZE[t][1], rows * cols // 256
    raw = rng.integers(0, 256, (nb, ts), dtype=np.uint8)
    for k, at in enumerate(SCALES_AT[t]):
        mag = np.abs(rng.standard_t(3, nb)) if heavy else rng.uniform(0.5, 1.5, nb)
        raw[:, at:at + 2] = f16_bytes(mag * (1e-3 if k == 0 else 5e-4))
    return raw.reshape(rows, -1)


def activations(t, x):
    """(xq, xd, xc, x̂ float64) as the kernels of type t take them."""
    c = x.shape[0]
    if t in KQ:
        xq, xd, xc = np.empty(c, np.int8), np.empty(c // 256, np.float32), np.empty(c // 16, np.int16)
        K.quantize_q8_k(x, xq, xd, xc)
        bs = 256
    else:
        xq, xd, xc = np.empty(c, np.int8), np.empty(c // 32, np.float32), np.empty(c // 32, np.float32)
        quantize_q8(x, xq, xd, xc)
        bs = 32
    xh = (xq.reshape(-1, bs).astype(np.float64) * xd.astype(np.float64)[:, None]).reshape(-1)
    return xq, xd, xc, xh


def reference(t, w, x, xh):
    """(ŵ . x̂, ŵ . x, tolerance against each) per row, float64."""
    rows = w.shape[0]
    wh = dequantize(w, GG[t]).reshape(rows, -1).astype(np.float64)
    z = w.reshape(-1, SIZE[t][1]).copy()
    a, b = QUANT_BYTES[t]
    z[:, a:b] = 0
    w0 = dequantize(z, GG[t]).reshape(rows, -1).astype(np.float64)
    s = np.abs(wh - w0) @ np.abs(xh) + np.abs(w0) @ np.abs(xh)
    n = w.shape[1] // SIZE[t][1]
    tol = (n + 8) * 2.0 ** -23 * s
    return wh @ xh, wh @ x.astype(np.float64), tol, tol + np.abs(wh) @ np.abs(x.astype(np.float64) - xh)


def run_dot(t, form, w, xq, xd, xc):
    y = np.empty(w.shape[0], np.float32)
    ROWS[t][form](w.reshape(-1), w.shape[1], xq, xd, xc, y)
    return y


@pytest.mark.parametrize("t", KQ + B32)
@pytest.mark.parametrize("rows,cols,heavy", [(1, 256, False), (7, 768, True), (67, 1024, False), (16, 4096, True)])
def test_dot_against_reference(t, rows, cols, heavy):
    rng = np.random.default_rng(rows * 1000 + cols)
    w = make_weights(t, rows, cols, rng, heavy)
    x = (rng.standard_t(3, cols) if heavy else rng.standard_normal(cols)).astype(np.float32)
    xq, xd, xc, xh = activations(t, x)
    ref_q, ref_x, tol_q, tol_x = reference(t, w, x, xh)
    ys = {f: run_dot(t, f, w, xq, xd, xc) for f in forms(t)}
    for f, y in ys.items():
        err = np.abs(y - ref_q)
        assert np.all(err <= tol_q), (f, (err / tol_q).max())
        assert np.all(np.abs(y - ref_x) <= tol_x), f
    if t in KQ:
        for f in FORMS[1:]:
            np.testing.assert_array_equal(ys[f], ys["ir"])


@pytest.mark.parametrize("t", KQ + B32)
def test_row_of_3d_expert_tensor(t):
    """Expert 2, row 5 of an [E=4, R=9, C=512] tensor: the row at its byte offset in the flat array."""
    rng = np.random.default_rng(3)
    E, R, C = 4, 9, 512
    w = make_weights(t, E * R, C, rng).reshape(E, R, -1)
    x = rng.standard_normal(C).astype(np.float32)
    xq, xd, xc, xh = activations(t, x)
    rb = w.shape[2]
    ref_q, _, tol_q, _ = reference(t, w[2, 5:6], x, xh)
    for f in forms(t):
        y = ONE[t][f](w.reshape(-1), (2 * R + 5) * rb, xq, xd, xc)
        assert abs(y - ref_q[0]) <= tol_q[0], f


@pytest.mark.parametrize("t", KQ + B32)
def test_dequant_bit_exact(t):
    w = make_weights(t, 6, 768, np.random.default_rng(5), heavy=True)
    check_dequant_bit_exact(DEQ[t], w, dequantize(w, GG[t]).reshape(-1).astype(np.float32), SIZE[t][1])


@pytest.mark.parametrize("cols", [4096, 4104, 8])
def test_bf16(cols):
    rng = np.random.default_rng(6)
    rows = 5
    wf = (rng.standard_t(3, (rows, cols)) * 0.02).astype(np.float32)
    w = quantize(wf, G.BF16).view(np.uint16)
    wh = dequantize(w.view(np.uint8), G.BF16).astype(np.float64)
    x = rng.standard_normal(cols).astype(np.float32)
    ref = wh @ x.astype(np.float64)
    tol = (cols // 8 + 8) * 2.0 ** -23 * (np.abs(wh) @ np.abs(x.astype(np.float64)))
    for plain in (False, True):
        y = np.empty(rows, np.float32)
        _bf16_rows(w.reshape(-1), cols, x, y, plain)
        assert np.all(np.abs(y - ref) <= tol)
    out = np.empty(rows * cols, np.float32)
    K.dequant_bf16(w.reshape(-1), 0, out, 0, rows * cols)
    np.testing.assert_array_equal(out, wh.reshape(-1).astype(np.float32))


def _q8k_reference(x):
    """llama.cpp's quantize_row_q8_K_ref in numpy float32."""
    xq = np.zeros(x.size, np.int8)
    xd = np.zeros(x.size // 256, np.float32)
    for b in range(x.size // 256):
        v = x[b * 256:(b + 1) * 256]
        if not np.any(v):
            continue
        mx = v[np.argmax(np.abs(v))]
        iscale = np.float32(-127.0) / mx
        xq[b * 256:(b + 1) * 256] = np.minimum(127, np.rint(iscale * v)).astype(np.int8)
        xd[b] = np.float32(1.0) / iscale
    return xq, xd, xq.reshape(-1, 16).astype(np.int16).sum(1).astype(np.int16)


def test_quantize_q8_k_matches_reference():
    rng = np.random.default_rng(7)
    x = (rng.standard_t(3, 1024)).astype(np.float32)
    x[256:512] = 0.0                                   # an all-zero block: d = 0, q = 0
    x[600] = -50.0                                     # the block's max is negative: iscale > 0
    xq, xd, xbs = np.empty(1024, np.int8), np.empty(4, np.float32), np.empty(64, np.int16)
    K.quantize_q8_k(x, xq, xd, xbs)
    rq, rd, rbs = _q8k_reference(x)
    np.testing.assert_array_equal(xq, rq)
    np.testing.assert_array_equal(xd, rd)
    np.testing.assert_array_equal(xbs, rbs)


# ---- hostile bytes: anything in a block, offsets and counts past the arrays -------------------

def _hostile_blocks(t, nb, rng):
    raw = rng.integers(0, 256, (nb, SIZE[t][1]), dtype=np.uint8)
    specials = f16_bytes([np.nan, np.inf, -np.inf, 65504.0, -0.0, 6e-8])
    for at in SCALES_AT.get(t, (0, 2) if t != "q5_0" else (0,)):
        raw[:, at:at + 2] = specials[rng.integers(0, len(specials), nb)]
    return raw


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("t", KQ + B32)
def test_hostile_bytes_stay_in_bounds(t):
    rng = np.random.default_rng(11)
    ts, bs = SIZE[t][1], SIZE[t][0]
    nb = 4
    row = _hostile_blocks(t, nb, rng).reshape(-1)
    x = rng.standard_normal(nb * bs).astype(np.float32)
    xq, xd, xc, _ = activations(t, x)
    xq[:] = rng.integers(-128, 128, xq.size)           # any activation bytes too
    for f in forms(t):
        y = ONE[t][f](row, 0, xq, xd, xc)
        # the same row inside garbage gives the same float: nothing outside the row is read
        big = np.concatenate([rng.integers(0, 256, 3 * ts, dtype=np.uint8), row,
                              rng.integers(0, 256, 3 * ts, dtype=np.uint8)])
        y2 = ONE[t][f](big, 3 * ts, xq, xd, xc)
        assert np.isnan(y) and np.isnan(y2) or y == y2, f
        if t not in CLAMPED:
            continue
        # offsets and counts past the arrays: blocks clamp to what every array holds
        for wo in (-1, -ts, len(row) - ts + 1, len(row), len(row) + 10 ** 6):
            v = ONE[t][f](row, wo, xq, xd, xc)
            assert isinstance(v, float)
        a, b = ONE[t][f](row, 0, xq[:bs], xd, xc), ONE[t][f](row[:ts], 0, xq, xd, xc)   # short xq: one block
        assert np.isnan(a) and np.isnan(b) or a == b, f
        assert ONE[t][f](row, len(row) - ts + 1, xq, xd, xc) == 0.0
    # dequant: never writes outside out[oo : oo + what fits], for any count
    out = np.full(nb * bs + 64, 3.0, np.float32)
    DEQ[t](row, 0, out[32:-32], 0, nb + 100)
    assert np.all(out[:32] == 3.0) and np.all(out[-32:] == 3.0)
    ref = dequantize(row.reshape(nb, ts), GG[t]).reshape(-1)
    np.testing.assert_array_equal(out[32:-32], ref)
    small = np.full(bs + bs // 2, 5.0, np.float32)
    DEQ[t](row, 0, small, 0, nb)                       # room for one block only
    np.testing.assert_array_equal(small[:bs], ref[:bs])
    assert np.all(small[bs:] == 5.0)
    for wo, oo in ((-1, 0), (0, -1), (len(row) - 1, 0), (0, small.size)):
        DEQ[t](row, wo, small, oo, nb)
    assert np.all(small[bs:] == 5.0)


def test_bf16_hostile_bounds():
    rng = np.random.default_rng(12)
    w = rng.integers(0, 1 << 16, 64, dtype=np.uint16)
    x = rng.standard_normal(64).astype(np.float32)
    out = np.full(80, 2.0, np.float32)
    K.dequant_bf16(w, 0, out[8:-8], 0, 1000)
    assert np.all(out[:8] == 2.0) and np.all(out[-8:] == 2.0)
    for plain in (False, True):
        assert _bf16_one(w, -1, x, 8, plain) == 0.0
        assert _bf16_one(w, 64, x, 8, plain) == 0.0
        assert _bf16_one(w, 10 ** 6, x, 8, plain) == 0.0
        assert _bf16_one(w, 60, x, 8, plain) == 0.0            # 4 elements left: no whole 8
        a, b = _bf16_one(w, 0, x, 1000, plain), _bf16_one(w, 0, x, 8, plain)
        assert np.isnan(a) and np.isnan(b) or a == b


def test_second_process_loads_from_numba_cache():
    """A fresh process with the same NUMBA_CACHE_DIR compiles nothing: cache=True kernels calling the intrinsics hit."""
    from lazymoe.benchmarks.kquant_dots import cache_check
    r = cache_check()
    assert r["cold"]["cache_misses"] > 0
    assert r["warm"]["cache_misses"] == 0 and r["warm"]["cache_hits"] >= 4
    assert r["warm"]["total"] < r["cold"]["total"]


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_activations_give_nan_not_an_exception(bad):
    """A hostile norm weight can put Inf or NaN into the activations: the product must come out NaN (the network
    reports the layer) rather than raise ZeroDivisionError in the quantizer or return finite garbage."""

    from lazymoe import kernels as K
    rng = np.random.default_rng(3)
    for name, g in (("q4_k", G.Q4_K), ("q8_0", G.Q8_0)):
        w = np.frombuffer(rng.bytes(8 * 512 // 256 * 144), np.uint8).reshape(8, -1).copy() if name == "q4_k" else None
        if w is None:
            w = quantize(rng.standard_normal((8, 512)).astype(np.float32), g)
        else:
            w.reshape(-1, 144)[:, :4] = np.array([0.01, 0.0], np.float16).view(np.uint8)
        x = rng.standard_normal(512).astype(np.float32)
        x[7] = bad
        assert np.isnan(K.matvec(name, w, x)).all(), name
        X = np.stack([x] * 5)
        assert np.isnan(K.matmul(name, w, X)).all(), name
