"""Kernels against llama.cpp's numpy reference (gguf.quants) and a float64 product, for every KERNELS type.

Weights: gguf's quantizer for the 32-block types and BF16; for the K-quants (gguf has no quantizer for
them) random bytes with sane f16 scales (tests/test_kquant_kernels.make_weights), dequantized by gguf.

Tolerances. Block types quantize the activation x to Q8 blocks (d = amax/127 per 32, q =
round(x/d); the K-quants to Q8_K: d = max/-127 per 256), so the kernels compute W' x' exactly up to
float32 rounding, where W' is the dequantized weight and x' the dequantized activation. Two checks follow:
  * tight: against float64 W' x' with x' from `q8_reference` below, rel. error <= 1e-5
    (float32 accumulation over a few thousand terms); catches any layout slip (swapped
    nibbles, wrong scale, wrong row offset) at once, since those change y by O(1).
  * derived: against the exact float64 W' x. Rounding to steps d_b leaves an error e with
    E[e^2] = d_b^2 / 12 per element, so E||W' e||^2 = ||W'||_F^2 mean(d_b^2)/12 for weights
    uncorrelated with e. We assert ||y - W' x|| <= 4 ||W'||_F sqrt(mean(d_b^2)/12): for
    Gaussian x that is a relative error ~ 4 * 2.1/(127 sqrt 12) ~ 2 %, while the observed
    error is ~0.5 %, i.e. ~1/127 per block as expected.
    (For Q8_K the steps d_b are per 256 and larger, the same bound with its d_b.)
Float types (f16, bf16, f32) and the dequantize+sgemm path take x as is: rel. error <= 1e-5.
"""
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from gguf import quants
from numba import njit

from lazymoe import kernels as K
from lazymoe.kernels import arm64, simd
from lazymoe.kernels.activations import Q8_K, quantize_q8
from lazymoe.kernels.dequant_matmul import TILE_ROWS
from lazymoe.kernels.dispatch import INT_MATMUL_MAX_TOKENS, KTILE_MAX_TOKENS, int_path
from lazymoe.kernels.kquant import quantize_q8_k
from tests.test_iq4_kernels import make_weights as iq4_weights
from tests.test_kquant_kernels import make_weights as kquant_weights

GG = {"q4_0": G.Q4_0, "q8_0": G.Q8_0, "q5_1": G.Q5_1, "q4_1": G.Q4_1, "q5_0": G.Q5_0, "q2_k": G.Q2_K, "q3_k": G.Q3_K,
      "q4_k": G.Q4_K, "q5_k": G.Q5_K, "q6_k": G.Q6_K, "f16": G.F16, "bf16": G.BF16, "f32": G.F32,
      "iq4_nl": G.IQ4_NL, "iq4_xs": G.IQ4_XS}
TYPES = list(GG)
KQ = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
IQ4 = ["iq4_nl", "iq4_xs"]              # random bytes as the K-quants' (tests/test_iq4_kernels.make_weights)
Q8K = KQ + ["iq4_xs"]                   # the types whose dots take Q8_K activations
FLOATS = ("f16", "bf16", "f32")
RNG = np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _rng_per_test(request):
    """Each test draws from RNG as if it ran alone: other modules (test_grouped, test_iq4_kernels) draw from it
    too, and a test's data must not depend on which ran before it."""
    import zlib
    RNG.bit_generator.state = np.random.default_rng(zlib.crc32(request.node.nodeid.encode())).bit_generator.state


def weights(name, shape, heavy=False):
    """(stored weights, float64 dequantized reference) for logical shape (..., rows, cols)."""
    W = (RNG.standard_t(2.5, size=shape) if heavy else RNG.standard_normal(shape)).astype(np.float32)
    if name == "f32":
        return W, W.astype(np.float64)
    if name == "f16":
        w = W.astype(np.float16)
        return w, w.astype(np.float64)
    if name in KQ + IQ4:
        rows = int(np.prod(shape[:-1]))
        make = iq4_weights if name in IQ4 else kquant_weights
        w = make(name, rows, shape[-1], RNG, heavy).reshape(*shape[:-1], -1)
    else:
        w = quants.quantize(W, GG[name])
    Wd = quants.dequantize(w.view(np.uint8), GG[name]).astype(np.float64)
    return (w.view(np.uint16) if name == "bf16" else w), Wd


def q8_reference(x, name="q4_0"):
    """x [.., C] -> (x' dequantized from Q8 (Q8_K for K-quants) blocks as the kernels quantize it, block scales d)."""
    if name in Q8K:
        X = np.atleast_2d(x).astype(np.float32)
        xq, xd = np.empty(X.shape, np.int8), np.empty((X.shape[0], X.shape[1] // 256), np.float32)
        for k in range(X.shape[0]):
            quantize_q8_k(X[k], xq[k], xd[k], np.empty(X.shape[1] // 16, np.int16))
        xh = xq.reshape(X.shape[0], -1, 256).astype(np.float64) * xd[..., None].astype(np.float64)
        return xh.reshape(x.shape), np.abs(xd.astype(np.float64)).reshape(*x.shape[:-1], -1)
    b = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    d = np.abs(b).max(-1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    return (np.rint(b * inv) * d).reshape(x.shape).astype(np.float64), d[..., 0].astype(np.float64)


def rel(y, ref, scale=None):
    return np.linalg.norm(y - ref) / max(np.linalg.norm(ref), scale or 0.0, 1e-30)


def check_product(name, Wd, X, Y):
    """Y [T, R] from the kernels vs X [T, C] @ Wd^T, with the tolerances explained above."""
    exact = X.astype(np.float64) @ Wd.T
    if name in FLOATS:
        assert rel(Y, exact) <= 1e-5
        return
    xq, d = q8_reference(X, name)
    floor = np.linalg.norm(Wd) * np.linalg.norm(xq) / np.sqrt(Wd.shape[1])   # typical |y| if y ~ 0
    assert rel(Y, xq @ Wd.T, floor) <= 1e-5
    for y, e, db in zip(np.atleast_2d(Y), np.atleast_2d(exact), np.atleast_2d(d)):
        assert np.linalg.norm(y - e) <= 4 * np.linalg.norm(Wd) * np.sqrt(np.mean(db ** 2) / 12) + 1e-6


SHAPES = [(1, 32), (1, 256), (37, 256), (301, 1024), (64, 4096)]   # rows not divisible by the threads, a single row


def block_of(name):
    return K.qtype(name).block_size


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("heavy", [False, True])
def test_matvec(name, rows, cols, heavy):
    if cols % block_of(name):
        pytest.skip(f"{name} rows are whole {block_of(name)}-blocks")
    w, Wd = weights(name, (rows, cols), heavy)
    x = (RNG.standard_t(3, cols) if heavy else RNG.standard_normal(cols)).astype(np.float32)
    y = K.matvec(name, w, x)
    assert y.shape == (rows,) and y.dtype == np.float32
    check_product(name, Wd, x[None], y[None])
    out = np.full(rows, np.nan, np.float32)
    assert K.matvec(K.qtype(name), w, x, out=out) is out and np.array_equal(out, y)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("tokens", [1, 3, 4, 7, 13, 34, INT_MATMUL_MAX_TOKENS + 6, KTILE_MAX_TOKENS + 3])   # tile edges: 4 tokens a tile
def test_matmul(name, tokens):
    w, Wd = weights(name, (203, 512), heavy=True)
    X = RNG.standard_normal((tokens, 512)).astype(np.float32)
    Y = K.matmul(name, w, X)
    assert Y.shape == (tokens, 203) and Y.dtype == np.float32
    if tokens > 1 and not int_path(K.KERNELS[name], tokens):   # dequantize + sgemm: x is not quantized
        assert rel(Y, X.astype(np.float64) @ Wd.T) <= 1e-5
    else:
        check_product(name, Wd, X, Y)


@pytest.mark.parametrize("name", ["q4_0", "q8_0", "q5_1", "q4_1", "q5_0", "q4_k", "q6_k", "f16", "bf16"])
def test_matmul_several_tiles(name):
    cols = max(64, block_of(name))
    w, Wd = weights(name, (TILE_ROWS + 77, cols))
    X = RNG.standard_normal((max(INT_MATMUL_MAX_TOKENS, KTILE_MAX_TOKENS) + 1, cols)).astype(np.float32)
    assert rel(K.matmul(name, w, X), X.astype(np.float64) @ Wd.T) <= 1e-5


@pytest.mark.parametrize("name", [t for t in TYPES if t != "f32"])
def test_expert_slices_of_3d_tensor(name):
    w3d, Wd3 = weights(name, (4, 96, 256))          # [E, rows, row_bytes] as GGUF stores experts
    x = RNG.standard_normal(256).astype(np.float32)
    X = RNG.standard_normal((5, 256)).astype(np.float32)
    for e in range(4):
        check_product(name, Wd3[e], x[None], K.matvec(name, w3d[e], x)[None])
        check_product(name, Wd3[e], X, K.matmul(name, w3d[e], X))


@pytest.mark.parametrize("name", ["q4_0", "q8_0", "q5_1"])
def test_portable_dots_match_avx2(name):
    w, Wd = weights(name, (7, 512), heavy=True)
    x = RNG.standard_normal(512).astype(np.float32)
    xq, xd, xc = np.empty(512, np.int8), np.empty(16, np.float32), np.empty(16, np.float32)
    quantize_q8(x, xq, xd, xc)
    dot = getattr(simd, f"dot_{name}_portable")
    flat = w.reshape(-1)
    y = np.array([dot(flat, r * w.shape[1], xq, xd, xc) for r in range(7)], np.float32)
    check_product(name, Wd, x[None], y[None])
    np.testing.assert_allclose(y, K.matvec(name, w, x), rtol=1e-4, atol=1e-4 * np.abs(y).max())


def _rows_of(dot):
    @njit
    def rows(flat, rb, xq, xd, xc, y):
        for r in range(y.shape[0]):
            y[r] = dot(flat, r * rb, xq, xd, xc)
    return rows


@pytest.mark.parametrize("name", ["q4_0", "q8_0", "q5_1"])
def test_arm64_dots(name):
    """arm64.py's dots of simd.py's types (what an arm64 host runs; here lowered for this CPU) against the
    reference, odd and even block counts (its two accumulators), and a row beyond the arrays: clamped."""
    rows = _rows_of(getattr(arm64, f"dot_{name}"))
    for cols in (512, 544):
        w, Wd = weights(name, (7, cols), heavy=True)
        x = RNG.standard_normal(cols).astype(np.float32)
        xq, xd, xc = np.empty(cols, np.int8), np.empty(cols // 32, np.float32), np.empty(cols // 32, np.float32)
        quantize_q8(x, xq, xd, xc)
        y = np.empty(7, np.float32)
        rows(w.reshape(-1), w.shape[1], xq, xd, xc, y)
        check_product(name, Wd, x[None], y[None])
        one = np.empty(1, np.float32)
        rows(w[6:].reshape(-1)[: w.shape[1] - 1], w.shape[1], xq, xd, xc, one)   # a block short
        whole = (cols // 32 - 1) * w.shape[1] // (cols // 32)
        ref = np.empty(1, np.float32)
        rows(w[6:].reshape(-1)[:whole], w.shape[1], xq, xd, xc, ref)
        assert one[0] == ref[0]


@pytest.mark.parametrize("name", ["q4_0", "q8_0", "q5_1", "q4_1", "q5_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
                                  "iq4_nl", "iq4_xs"])
def test_tiles_match_dots(name):
    """The tiles (AVX2; arm64's K-quant tiles), 1 row x 4 tokens and edges, against one block dot per (row, token)."""
    from lazymoe.kernels.int_matmul import int_matmul_parallel
    k = K.KERNELS[name]
    code = k.code
    w, Wd = weights(name, (37, 512), heavy=True)
    for tokens in (2, 5, 9):
        X = RNG.standard_normal((tokens, 512)).astype(np.float32)
        xq, xd, xc = k.act.buffers(512, tokens)
        k.act.quantize_rows(X, xq, xd, xc)
        a, b = np.empty((tokens, 37), np.float32), np.empty((tokens, 37), np.float32)
        int_matmul_parallel(code, False, w, X, xq, xd, xc, a, 2)
        if k.tile is not None:
            int_matmul_parallel(code, True, w, X, xq, xd, xc, b, 2)
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
        check_product(name, Wd, X, a)


@pytest.mark.skipif(not simd.HAVE_AVX2 or bool(os.environ.get("LAZYMOE_NO_AVX2")),
                    reason="this run is the portable build already")
def test_portable_build(tmp_path):
    """LAZYMOE_NO_AVX2=1 builds what a CPU without AVX2 runs (the *_portable dots compiled in place, no tiles):
    every product test of this file passes on it too, in a fresh process and cache."""
    import subprocess
    import sys
    env = os.environ | {"LAZYMOE_NO_AVX2": "1", "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                          "-k", "matvec or matmul or ffn or portable or tiles or x86"],
                         env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


@pytest.mark.skipif(not simd.HAVE_AVX512, reason="without AVX-512 this run is the AVX2 build already")
def test_avx2_build(tmp_path):
    """LAZYMOE_NO_AVX512=1 builds what an AVX2-only CPU runs (the 256-bit K-quant sums, tiles up to 64 tokens):
    the product tests of this file and the K-quant dot tests pass on it too, in a fresh process and cache."""
    import subprocess
    import sys
    env = os.environ | {"LAZYMOE_NO_AVX512": "1", "NUMBA_CACHE_DIR": str(tmp_path)}
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                          os.path.join(here, "test_kquant_kernels.py"),
                          "-k", "matvec or matmul or ffn or tiles or x86 or dot_against or hostile_bytes"],
                         env=env, cwd=os.path.dirname(here), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


def test_avx512_flag_follows_env():
    """HAVE_AVX512 never without AVX2, and off under LAZYMOE_NO_AVX512 (what test_avx2_build relies on)."""
    assert simd.HAVE_AVX2 or not simd.HAVE_AVX512
    if os.environ.get("LAZYMOE_NO_AVX512"):
        assert not simd.HAVE_AVX512 and KTILE_MAX_TOKENS == 64


@pytest.mark.skipif(simd.HAVE_AVX2, reason="checks the build without AVX2")
def test_no_x86_ir_without_avx2():
    """Without AVX2 no AVX2 intrinsic reaches the compiled drivers (LLVM cannot select them on other CPUs).
    (The x86 backend's own llvm.x86.atomic.* for Numba's refcounts is the host's, not ours.)"""
    from lazymoe.kernels.int_matmul import _token_rows
    from lazymoe.kernels.matvec import dot_rows
    assert all(k.tile is None or arm64.ARM64 and k.act is Q8_K for k in K.KERNELS.values())   # arm64: K-quant tiles
    w, _ = weights("q4_0", (8, 64))
    K.matvec("q4_0", w, np.ones(64, np.float32))
    K.matmul("q4_0", w, np.ones((5, 64), np.float32))
    for fn in (dot_rows, _token_rows):
        for ll in fn.inspect_llvm().values():
            assert "llvm.x86.avx" not in ll, fn


def ffn_reference(W1, W3, W2, X):
    g, u = X @ W1.T, X @ W3.T
    return (g / (1 + np.exp(-g)) * u) @ W2.T


# w1/w3 of one activation scheme take the fused path (in parallel, d * f >= 2^18), each in its own type;
# w1/w3 of two schemes (q4_k beside q8_0: Q8_K and Q8 blocks) the unfused one, x quantized once per scheme.
FFN_TYPES = [("q4_0", "q4_0", "q4_0"), ("q8_0", "q8_0", "q4_0"), ("q4_0", "q8_0", "f16"), ("f32", "f16", "q8_0"),
             ("f16", "f16", "f32"), ("q5_1", "q5_1", "q5_1"), ("q4_1", "q5_0", "q5_1"), ("bf16", "f16", "q4_1")]
# K-quant mixes need D and F in whole 256-blocks: Q4_K_M's (gate, up Q4_K, down Q6_K), schemes mixed in one expert
K_FFN_TYPES = [("q4_k", "q4_k", "q6_k"), ("q4_k", "q8_0", "q5_k"), ("q2_k", "q3_k", "q4_k"), ("q5_k", "q5_k", "bf16"),
               ("q6_k", "q4_0", "q2_k"), ("iq4_xs", "iq4_xs", "iq4_nl"), ("iq4_nl", "q4_k", "iq4_xs")]
FFN_CASES = ([(t, 128, 352) for t in FFN_TYPES] + [(t, 256, 1056) for t in FFN_TYPES]
             + [(t, 256, 768) for t in K_FFN_TYPES] + [(t, 512, 1024) for t in K_FFN_TYPES])


def ffn_bound(types, X):
    # x is quantized before W1/W3 and h before W2 (for block types): ~1/127 per block each,
    # twice, through two layers; observed worst case 1.3 % over 20 draws, so 0.04 leaves ~3x.
    # Q8_K's one scale per 256 is coarser: 1.2-2.4 % median, 5.3 % worst over 10 draws per K mix, so 0.1.
    if any(t in Q8K for t in types):
        return 0.1
    return 0.04 if any(t.startswith("q") for t in types) else 1e-5


def as_kernels_see(name, X):
    """X [.., C] float64 as a row dot of type name reads it: dequantized from its activation blocks, or as is."""
    return X if name in FLOATS else q8_reference(X.astype(np.float32), name)[0]


def ffn_quantized_reference(types, W1, W3, W2, X):
    """ffn_reference with each activation quantized per the scheme of the matrix it meets: the kernels' product
    up to float32 rounding (and, rarely, an element of h rounded to the neighbouring Q8 step)."""
    g, u = as_kernels_see(types[0], X) @ W1.T, as_kernels_see(types[1], X) @ W3.T
    return as_kernels_see(types[2], g / (1 + np.exp(-g)) * u) @ W2.T


FFN_TIGHT = 1e-3


@pytest.mark.parametrize("types,d,f", FFN_CASES)   # serial (small) and parallel, fused where w1, w3 share a scheme
def test_expert_ffn(types, d, f):
    (w1, W1), (w3, W3), (w2, W2) = weights(types[0], (f, d)), weights(types[1], (f, d)), weights(types[2], (d, f))
    x = RNG.standard_normal(d).astype(np.float32)
    y = K.expert_ffn(types[0], w1, types[1], w3, types[2], w2, x)
    assert y.shape == (d,) and y.dtype == np.float32
    assert rel(y, ffn_reference(W1, W3, W2, x.astype(np.float64))) <= ffn_bound(types, x)
    assert rel(y, ffn_quantized_reference(types, W1, W3, W2, x.astype(np.float64))) <= FFN_TIGHT


@pytest.mark.parametrize("types", FFN_TYPES[:3] + K_FFN_TYPES[:3])
@pytest.mark.parametrize("tokens", [1, 4, 33, INT_MATMUL_MAX_TOKENS + 3])
def test_expert_ffn_batch(types, tokens):
    d, f = (256, 768) if types in K_FFN_TYPES else (128, 352)
    (w1, W1), (w3, W3), (w2, W2) = weights(types[0], (f, d)), weights(types[1], (f, d)), weights(types[2], (d, f))
    X = RNG.standard_normal((tokens, d)).astype(np.float32)
    Y = K.expert_ffn_batch(types[0], w1, types[1], w3, types[2], w2, X)
    assert Y.shape == (tokens, d) and Y.dtype == np.float32
    assert rel(Y, ffn_reference(W1, W3, W2, X.astype(np.float64))) <= ffn_bound(types, X)


def test_registry_rows_agree_with_qtypes():
    """A KERNELS row's code is its GGML type id, and its activation blocks tile the weight blocks."""
    for name, k in K.KERNELS.items():
        q = K.qtype(name)
        assert k.code == int(q.ggml), name
        assert k.act.block == 0 or q.block_size % k.act.block == 0, name
        assert k.int_matmul == (k.act.quantize is not None), name
    assert set(K.KERNELS) == set(GG)


def test_swapped_nibbles_are_caught():
    w, Wd = weights("q4_0", (16, 256))
    blocks = w.reshape(16, -1, 18).copy()
    blocks[..., 2:] = (blocks[..., 2:] >> 4) | (blocks[..., 2:] << 4)
    x = RNG.standard_normal(256).astype(np.float32)
    with pytest.raises(AssertionError):
        check_product("q4_0", Wd, x[None], K.matvec("q4_0", blocks.reshape(16, -1), x)[None])


def test_bad_inputs():
    w, _ = weights("q4_0", (8, 64))                 # [8, 36]
    x = np.ones(64, np.float32)
    bad = [
        lambda: K.matvec("q4_0", w[:, :18], x),                                # not C-contiguous
        lambda: K.matvec("q4_0", w[::2], x[:32]),                              # not C-contiguous
        lambda: K.matvec("q4_0", w.astype(np.int8), x),                        # wrong dtype
        lambda: K.matvec("q4_0", np.ascontiguousarray(w[:, :35]), x),          # row_bytes not whole blocks
        lambda: K.matvec("q8_0", w, x),                                        # 36 bytes is not q8_0 of 64
        lambda: K.matvec("q4_0", w, x.astype(np.float64)),                     # wrong x dtype
        lambda: K.matvec("q4_0", w, x[:32]),                                   # wrong length
        lambda: K.matvec("q4_0", w, np.ones(128, np.float32)[::2]),            # non-contiguous x
        lambda: K.matvec("q4_0", w.reshape(-1), x),                            # 1-D weights
        lambda: K.matvec("q4_0", w, x, out=np.empty(7, np.float32)),           # wrong out shape
        lambda: K.matvec("iq3_s", w, x),                                       # unknown type
        lambda: K.matvec("q4_k", w, x),                                        # 36 bytes is not whole 144-byte blocks
        lambda: K.matvec("q4_k", np.zeros((8, 144), np.uint8), x),             # a q4_k row is 256 weights, x has 64
        lambda: K.matvec("bf16", np.ones((8, 64), np.float16), x),             # bf16 is stored as uint16 bits
        lambda: K.matmul("q6_k", np.zeros((8, 210), np.uint8), np.ones((3, 128), np.float32)),
        lambda: K.expert_ffn("q4_k", np.zeros((8, 144), np.uint8), "q4_k", np.zeros((8, 144), np.uint8),
                             "q6_k", np.zeros((256, 210), np.uint8), np.ones(256, np.float32)),   # w2 [256, 256] not [D, F=8]
        lambda: K.matvec("f32", np.ones((8, 64), np.float16), x),              # f16 array as f32
        lambda: K.matmul("q4_0", w, x),                                        # X must be 2-D
        lambda: K.matmul("q4_0", w, np.ones((3, 64), np.float32).T.copy()),    # [64, 3]: wrong cols
        lambda: K.matmul("q4_0", w, np.ones((64, 3), np.float32).T),           # F-order X
        lambda: K.expert_ffn("q4_0", w, "q4_0", w, "q4_0", w, x),              # w2 not [D, F]
        lambda: K.expert_ffn_batch("q4_0", w, "q4_0", w[:4], "q4_0", w, x[None]),
    ]
    for i, f in enumerate(bad):
        with pytest.raises(ValueError):
            f()
        try:
            f()
        except ValueError as err:
            msg = str(err)
            assert msg and "\n" not in msg, (i, msg)


def test_numba_cache_dir_follows_the_sources(tmp_path):
    """The compiled-kernel cache lives in a directory keyed by the kernels' sources, so editing simd.py (whose
    intrinsics are inlined into matvec.py's cached functions) cannot leave stale machine code in use."""
    import subprocess
    import sys

    from lazymoe.kernels import sources_key
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.txt").write_text("ignored\n")
    k1 = sources_key(str(tmp_path))
    (tmp_path / "b.txt").write_text("still ignored\n")
    assert sources_key(str(tmp_path)) == k1
    (tmp_path / "a.py").write_text("x = 2\n")
    assert sources_key(str(tmp_path)) != k1 and len(k1) == 16
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"} | {"XDG_CACHE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", "import lazymoe.kernels, os, numba; print(os.environ['NUMBA_CACHE_DIR']); "
                          "print(numba.config.CACHE_DIR)"], env=env, capture_output=True, text=True, check=True)
    want = os.path.join(str(tmp_path), "lazymoe", "numba-" + sources_key(os.path.dirname(K.__file__)))
    assert out.stdout.split() == [want, want]


def test_keyed_cache_when_numba_is_imported_first():
    """A caller that imports numba before lazymoe.kernels (benchmarks/kernels.py did) still gets the cache keyed by
    the kernels' sources: numba had read NUMBA_CACHE_DIR at its import, so the drivers cached beside their files and
    kept code compiled before a registry row existed (IQ4 tiles came out NaN, 80x 'faster')."""
    import subprocess
    import sys
    code = ("import numba, sys, lazymoe.kernels; m = sys.modules['lazymoe.kernels.matvec']; "
            "print(m.dot_rows._cache._cache_path.startswith(numba.config.CACHE_DIR) and 'numba-' in numba.config.CACHE_DIR)")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "True", out.stdout + out.stderr[-2000:]
