"""kernels/iq4.py (IQ4_NL, IQ4_XS) against gguf.quants.dequantize and a float64 dot, every form and entry point.

Weights are random bytes with sane f16 scales d (gguf has no IQ4 quantizer; llama.cpp's own files are the model-level
test, tests/test_kquants.py), heavy-tailed scales for the heavy cases, so every index, IQ4_XS sub-block scale and bit
pattern occurs. Tolerances (y the kernel's float32 row dot, x̂ the activations as the kernel sees them, dequantized):
- against ŵ . x̂ in float64: |y - ref| <= (n + 8) 2^-23 S, n the blocks per row and S = sum |ŵ| |x̂|: each float32
  operation (d_w d_x, int -> float, the product, the running sum, gguf's own d * ls) costs at most half an ulp of its
  part of S, and the chained sums add n of them (8 more for the final lanes).
- against ŵ . x in float64: that, plus sum |ŵ| |x - x̂|, the activation quantization error, exactly bounded.
- IQ4_XS's three forms agree bit for bit (exact int32 sums, the same float operations); IQ4_NL's add 8 float lanes
  grouped differently, so each meets the bounds on its own.
- Dequantizers equal gguf's bit for bit. The drivers (matvec, matmul, expert FFN) are tests/test_kernels.py's for
  every type; here: one-expert slices, odd rows, every path of matmul and the batched FFN on these types.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as G
from gguf.quants import dequantize

from lazymoe import kernels as K
from lazymoe.kernels import iq4
from lazymoe.kernels.activations import quantize_q8
from lazymoe.kernels.dispatch import INT_DOTS_MAX_TOKENS, INT_MATMUL_MAX_TOKENS, int_path
from lazymoe.kernels.kquant import HAVE_AVX2, quantize_q8_k
from tests.helpers import check_dequant_bit_exact, deq_of, f16_bytes, one_of, rows_of

IQ = ["iq4_nl", "iq4_xs"]
GG = {"iq4_nl": G.IQ4_NL, "iq4_xs": G.IQ4_XS}
SIZE = {t: GGML_QUANT_SIZES[GG[t]] for t in IQ}            # (weights, bytes) per block
IMPLS = {t: {"ir": getattr(iq4, f"dot_{t}_ir"), "x86": getattr(iq4, f"dot_{t}_x86"),
             "plain": getattr(iq4, f"dot_{t}_plain")} for t in IQ}
FORMS = ["ir", "x86", "plain"] if HAVE_AVX2 else ["ir", "plain"]
DEQ = {t: getattr(iq4, f"dequant_{t}") for t in IQ}



ROWS = {t: {f: rows_of(d) for f, d in v.items()} for t, v in IMPLS.items()}
ONE = {t: {f: one_of(d) for f, d in v.items()} for t, v in IMPLS.items()}
DEQS = {t: deq_of(DEQ[t]) for t in IQ}



def make_weights(t, rows, cols, rng, heavy=False):
    """Stored rows uint8 [rows, row_bytes]: random bytes, d of ~1e-3 (heavy: Student-t magnitudes, any sign)."""
    ts, nb = SIZE[t][1], rows * cols // SIZE[t][0]
    raw = rng.integers(0, 256, (nb, ts), dtype=np.uint8)
    mag = rng.standard_t(3, nb) if heavy else rng.uniform(0.5, 1.5, nb)
    raw[:, 0:2] = f16_bytes(mag * 1e-3)
    return raw.reshape(rows, -1)


def activations(t, x):
    """(xq, xd, xc, x̂ float64) as the kernels of type t take them (t's ActScheme's buffers)."""
    k = K.KERNELS[t]
    xq, xd, xc = k.act.buffers(x.shape[0])
    (quantize_q8 if t == "iq4_nl" else quantize_q8_k)(x, xq, xd, xc)
    xh = (xq.reshape(-1, k.act.block).astype(np.float64) * xd.astype(np.float64)[:, None]).reshape(-1)
    return xq, xd, xc, xh


def reference(t, w, x, xh):
    """(ŵ . x̂, ŵ . x, tolerance against each) per row, float64."""
    wh = dequantize(w, GG[t]).reshape(w.shape[0], -1).astype(np.float64)
    tol = (w.shape[1] // SIZE[t][1] + 8) * 2.0 ** -23 * (np.abs(wh) @ np.abs(xh))
    return wh @ xh, wh @ x.astype(np.float64), tol, tol + np.abs(wh) @ np.abs(x.astype(np.float64) - xh)


def run_dot(t, form, w, xq, xd, xc):
    y = np.empty(w.shape[0], np.float32)
    ROWS[t][form](w.reshape(-1), w.shape[1], xq, xd, xc, y)
    return y


def test_table_is_gguf_s():
    from gguf.quants import IQ4_NL
    assert iq4.KVALUES == tuple(IQ4_NL.kvalues)


@pytest.mark.parametrize("t", IQ)
@pytest.mark.parametrize("rows,cols,heavy", [(1, 256, False), (7, 768, True), (67, 1024, False), (16, 4096, True)])
def test_dot_against_reference(t, rows, cols, heavy):
    rng = np.random.default_rng(rows * 1000 + cols)
    w = make_weights(t, rows, cols, rng, heavy)
    x = (rng.standard_t(3, cols) if heavy else rng.standard_normal(cols)).astype(np.float32)
    xq, xd, xc, xh = activations(t, x)
    ref_q, ref_x, tol_q, tol_x = reference(t, w, x, xh)
    ys = {f: run_dot(t, f, w, xq, xd, xc) for f in FORMS}
    for f, y in ys.items():
        err = np.abs(y - ref_q)
        assert np.all(err <= tol_q), (f, (err / tol_q).max())
        assert np.all(np.abs(y - ref_x) <= tol_x), f
    if t == "iq4_xs":
        for f in FORMS[1:]:
            np.testing.assert_array_equal(ys[f], ys["ir"])


@pytest.mark.parametrize("t", IQ)
def test_every_index_and_scale(t):
    """One block per index (all 32 weights the same index) and, for IQ4_XS, every 6-bit sub-block scale: the dot of
    each against ones is sum(ŵ) exactly as gguf dequantizes it (a wrong table entry or scale bit shows at once)."""
    ts, bs = SIZE[t][1], SIZE[t][0]
    blocks = np.zeros((16, ts), np.uint8) if t == "iq4_nl" else np.zeros((64, ts), np.uint8)
    blocks[:, 0:2] = f16_bytes([1.0 / 1024])
    if t == "iq4_nl":
        blocks[:, 2:] = (np.arange(16, dtype=np.uint8) * 17)[:, None]
    else:
        for k in range(64):                                        # super-block k: sub-block c has scale (k + 8c) % 64
            ls = (k + 8 * np.arange(8)) % 64
            blocks[k, 4:8] = (ls[0::2] & 15) | ((ls[1::2] & 15) << 4)
            blocks[k, 2:4] = np.array([int(sum(((int(v) >> 4) & 3) << (2 * c) for c, v in enumerate(ls)))],
                                      np.uint16).view(np.uint8)
            blocks[k, 8:] = ((k + np.arange(128)) % 16 * 17).astype(np.uint8)
    ref = dequantize(blocks, GG[t]).astype(np.float64)           # [nb, bs]
    x = np.ones(bs, np.float32)
    xq, xd, xc, xh = activations(t, x)
    for f in FORMS:
        y = run_dot(t, f, blocks, xq, xd, xc)
        np.testing.assert_allclose(y, ref @ xh, rtol=1e-6, err_msg=f)


@pytest.mark.parametrize("t", IQ)
def test_row_of_3d_expert_tensor(t):
    """Expert 2, row 5 of an [E=4, R=9, C=512] tensor: the row at its byte offset in the flat array."""
    rng = np.random.default_rng(3)
    E, R, C = 4, 9, 512
    w = make_weights(t, E * R, C, rng).reshape(E, R, -1)
    x = rng.standard_normal(C).astype(np.float32)
    xq, xd, xc, xh = activations(t, x)
    ref_q, _, tol_q, _ = reference(t, w[2, 5:6], x, xh)
    for f in FORMS:
        y = ONE[t][f](w.reshape(-1), (2 * R + 5) * w.shape[2], xq, xd, xc)
        assert abs(y - ref_q[0]) <= tol_q[0], f


@pytest.mark.parametrize("t", IQ)
def test_dequant_bit_exact(t):
    w = make_weights(t, 6, 768, np.random.default_rng(5), heavy=True)
    check_dequant_bit_exact(DEQS[t], w, dequantize(w, GG[t]).reshape(-1).astype(np.float32), SIZE[t][1])


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("t", IQ)
def test_hostile_bytes_stay_in_bounds(t):
    rng = np.random.default_rng(11)
    ts, bs = SIZE[t][1], SIZE[t][0]
    nb = 4
    raw = rng.integers(0, 256, (nb, ts), dtype=np.uint8)
    raw[:, 0:2] = f16_bytes([np.nan, np.inf, -np.inf, 65504.0, -0.0, 6e-8])[rng.integers(0, 6, nb)]
    row = raw.reshape(-1)
    x = rng.standard_normal(nb * bs).astype(np.float32)
    xq, xd, xc, _ = activations(t, x)
    xq[:] = rng.integers(-127, 128, xq.size)                      # any activation the quantizers can write
    for f in FORMS:
        y = ONE[t][f](row, 0, xq, xd, xc)
        # the same row inside garbage gives the same float: nothing outside the row is read
        big = np.concatenate([rng.integers(0, 256, 3 * ts, dtype=np.uint8), row,
                              rng.integers(0, 256, 3 * ts, dtype=np.uint8)])
        y2 = ONE[t][f](big, 3 * ts, xq, xd, xc)
        assert np.isnan(y) and np.isnan(y2) or y == y2, f
        # offsets and counts past the arrays: blocks clamp to what every array holds
        for wo in (-1, -ts, len(row) - ts + 1, len(row), len(row) + 10 ** 6):
            assert isinstance(ONE[t][f](row, wo, xq, xd, xc), float)
        a, b = ONE[t][f](row, 0, xq[:bs], xd, xc), ONE[t][f](row[:ts], 0, xq, xd, xc)   # short xq: one block
        assert np.isnan(a) and np.isnan(b) or a == b, f
        assert ONE[t][f](row, len(row) - ts + 1, xq, xd, xc) == 0.0
    # dequant: never writes outside out[oo : oo + what fits], for any count
    out = np.full(nb * bs + 64, 3.0, np.float32)
    DEQS[t](row, 0, out[32:-32], 0, nb + 100)
    assert np.all(out[:32] == 3.0) and np.all(out[-32:] == 3.0)
    ref = dequantize(raw, GG[t]).reshape(-1)
    np.testing.assert_array_equal(out[32:-32], ref)
    small = np.full(bs + bs // 2, 5.0, np.float32)
    DEQS[t](row, 0, small, 0, nb)                                 # room for one block only
    np.testing.assert_array_equal(small[:bs], ref[:bs])
    assert np.all(small[bs:] == 5.0)
    for wo, oo in ((-1, 0), (0, -1), (len(row) - 1, 0), (0, small.size)):
        DEQS[t](row, wo, small, oo, nb)
    assert np.all(small[bs:] == 5.0)


# ---- the public entry points on these types: every path of matmul, one-expert slices, the batched FFN ---------

def _stored(t, shape, rng, heavy=False):
    """(stored [.., rows, row_bytes], float64 dequantized [.., rows, cols])."""
    rows = int(np.prod(shape[:-1]))
    w = make_weights(t, rows, shape[-1], rng, heavy)
    wd = dequantize(w, GG[t]).astype(np.float64).reshape(shape)
    return w.reshape(*shape[:-1], -1), wd


def _check(t, wd, X, Y):
    """Y [T, R] against X [T, C] @ ŵ^T per row: the dot bound of the activations the kernels saw (int path)."""
    for x, y in zip(X, Y):
        xh = activations(t, x)[3]
        tol = (wd.shape[1] // SIZE[t][0] + 8) * 2.0 ** -23 * (np.abs(wd) @ np.abs(xh))
        assert np.all(np.abs(y - wd @ xh) <= tol)


@pytest.mark.parametrize("t", IQ)
@pytest.mark.parametrize("tokens", [1, 2, 5, INT_DOTS_MAX_TOKENS, INT_DOTS_MAX_TOKENS + 1, INT_MATMUL_MAX_TOKENS + 5])
def test_matmul_paths(t, tokens):
    rng = np.random.default_rng(tokens)
    w, wd = _stored(t, (203, 512), rng, heavy=True)                  # odd rows: the thread split has a remainder
    X = rng.standard_t(3, (tokens, 512)).astype(np.float32)
    Y = K.matmul(t, w, X)
    if tokens > 1 and not int_path(K.KERNELS[t], tokens):           # dequantize + sgemm: X as is
        exact = X.astype(np.float64) @ wd.T
        assert np.linalg.norm(Y - exact) <= 1e-5 * np.linalg.norm(exact)
    else:
        _check(t, wd, X, Y)
    np.testing.assert_array_equal(K.matvec(t, w, X[0]), Y[0]) if tokens == 1 else None


@pytest.mark.parametrize("t", IQ)
def test_one_expert_slices(t):
    rng = np.random.default_rng(8)
    w3d, wd3 = _stored(t, (4, 97, 512), rng)
    X = rng.standard_normal((3, 512)).astype(np.float32)
    for e in range(4):
        _check(t, wd3[e], X[:1], K.matvec(t, w3d[e], X[0])[None])
        _check(t, wd3[e], X, K.matmul(t, w3d[e], X))


def _ffn_ref(w1, w3, w2, X):
    g, u = X @ w1.T, X @ w3.T
    return (g / (1 + np.exp(-g)) * u) @ w2.T


# each type beside itself, the other, a K-quant and a 32-block type: fused (one scheme) and unfused paths
FFN = [("iq4_xs", "iq4_xs", "iq4_xs"), ("iq4_nl", "iq4_nl", "iq4_nl"), ("iq4_nl", "iq4_xs", "q6_k"),
       ("iq4_xs", "q4_k", "iq4_nl"), ("q4_0", "iq4_nl", "iq4_xs")]


@pytest.mark.parametrize("types", FFN)
@pytest.mark.parametrize("tokens", [1, 4, 33, INT_MATMUL_MAX_TOKENS + 3])
def test_expert_ffn_batch(types, tokens):
    from tests.test_kernels import weights as other_weights
    rng = np.random.default_rng(tokens)
    d, f = 256, 768
    ws = [_stored(t, s, rng) if t in IQ else other_weights(t, s) for t, s in zip(types, ((f, d), (f, d), (d, f)))]
    (w1, W1), (w3, W3), (w2, W2) = ws
    X = rng.standard_normal((tokens, d)).astype(np.float32)
    Y = K.expert_ffn_batch(types[0], w1, types[1], w3, types[2], w2, X)
    ref = _ffn_ref(W1, W3, W2, X.astype(np.float64))
    # Q8_K's one scale per 256 (IQ4_XS, K-quants) through two layers: tests/test_kernels.ffn_bound's 0.1
    assert np.linalg.norm(Y - ref) <= 0.1 * np.linalg.norm(ref)
    if tokens == 1:
        y = K.expert_ffn(types[0], w1, types[1], w3, types[2], w2, X[0])
        np.testing.assert_array_equal(y, Y[0])


def test_generic_forms_compile_for_arm64():
    """The generic-IR dots carry no x86 intrinsic: LLVM's AArch64 backend compiles them (a form CI cannot run)."""
    from lazymoe.benchmarks.arm64_asm import compile_arm64, counts
    for t, cg in (("iq4_nl", iq4._nl_dot_codegen(False)), ("iq4_xs", iq4._xs_dot_codegen(False))):
        c = counts(compile_arm64(cg))
        assert c["sdot"] + c["smull"] + c["smlal"] + c["smlal2"] > 0, t   # the dot's integer products (arm64.dot16)


@pytest.mark.skipif(not HAVE_AVX2, reason="tiles are AVX2 only")
@pytest.mark.parametrize("t", IQ)
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_tiles_against_dots(t):
    """1 row x 4 token tiles (and the 1..3 edge) against one row dot per (row, token): IQ4_XS's bit for bit (the same
    float operations per token), IQ4_NL's within the dot bound; hostile bytes give the dot's NaN or value."""
    from lazymoe.kernels.int_matmul import int_matmul_parallel
    k = K.KERNELS[t]
    rng = np.random.default_rng(21)
    for heavy, tokens in ((False, 7), (True, 6), (True, 1)):
        w = make_weights(t, 37, 512, rng, heavy)
        if heavy:                                                      # every fifth block's d non-finite or extreme
            blocks = w.reshape(-1, SIZE[t][1])
            blocks[::5, 0:2] = f16_bytes([np.nan, np.inf, 65504.0, -0.0])[rng.integers(0, 4, len(blocks[::5]))]
        X = rng.standard_t(3, (tokens, 512)).astype(np.float32)
        qx = k.act.buffers(512, tokens)
        k.act.quantize_rows(X, *qx)
        tiled, dots = np.empty((tokens, 37), np.float32), np.empty((tokens, 37), np.float32)
        int_matmul_parallel(k.code, True, w, X, *qx, tiled, 2)
        int_matmul_parallel(k.code, False, w, X, *qx, dots, 2)
        if t == "iq4_xs":
            np.testing.assert_array_equal(tiled, dots)
        else:
            np.testing.assert_array_equal(np.isnan(tiled), np.isnan(dots))
            ok = ~np.isnan(dots) & np.isfinite(dots)
            np.testing.assert_allclose(tiled[ok], dots[ok], rtol=1e-5, atol=1e-5 * np.abs(dots[ok]).max())
