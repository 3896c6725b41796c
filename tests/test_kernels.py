"""Kernels against llama.cpp's numpy reference (gguf.quants) and a float64 product.

Tolerances. Block types quantize the activation x to Q8 blocks (d = amax/127 per 32, q =
round(x/d)), so the kernels compute W' x' exactly up to float32 rounding, where W' is the
dequantized weight and x' the dequantized activation. Two checks follow:
  * tight: against float64 W' x' with x' from `q8_reference` below, rel. error <= 1e-5
    (float32 accumulation over a few thousand terms); catches any layout slip (swapped
    nibbles, wrong scale, wrong row offset) at once, since those change y by O(1).
  * derived: against the exact float64 W' x. Rounding to steps d_b leaves an error e with
    E[e^2] = d_b^2 / 12 per element, so E||W' e||^2 = ||W'||_F^2 mean(d_b^2)/12 for weights
    uncorrelated with e. We assert ||y - W' x|| <= 4 ||W'||_F sqrt(mean(d_b^2)/12): for
    Gaussian x that is a relative error ~ 4 * 2.1/(127 sqrt 12) ~ 2 %, while the observed
    error is ~0.5 %, i.e. ~1/127 per block as expected.
Float types (f16, f32) and the dequantize+sgemm path take x as is: rel. error <= 1e-5.
"""
import os

import numpy as np
import pytest
from gguf import GGMLQuantizationType as G
from gguf import quants

from lazymoe import kernels as K
from lazymoe.kernels import simd
from lazymoe.kernels.activations import quantize_q8
from lazymoe.kernels.dequant_matmul import TILE_ROWS
from lazymoe.kernels.dispatch import INT_MATMUL_MAX_TOKENS

GG = {"q4_0": G.Q4_0, "q8_0": G.Q8_0, "q5_1": G.Q5_1, "f16": G.F16, "f32": G.F32}
TYPES = list(GG)
RNG = np.random.default_rng(1234)


def weights(name, shape, heavy=False):
    """(stored weights, float64 dequantized reference) for logical shape (..., rows, cols)."""
    W = (RNG.standard_t(2.5, size=shape) if heavy else RNG.standard_normal(shape)).astype(np.float32)
    if name == "f32":
        return W, W.astype(np.float64)
    if name == "f16":
        w = W.astype(np.float16)
        return w, w.astype(np.float64)
    w = quants.quantize(W, GG[name])
    return w, quants.dequantize(w, GG[name]).astype(np.float64)


def q8_reference(x):
    """x [.., C] -> (x' dequantized from Q8 blocks as the kernels quantize it, block scales d)."""
    b = x.astype(np.float32).reshape(*x.shape[:-1], -1, 32)
    d = np.abs(b).max(-1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    return (np.rint(b * inv) * d).reshape(x.shape).astype(np.float64), d[..., 0].astype(np.float64)


def rel(y, ref, scale=None):
    return np.linalg.norm(y - ref) / max(np.linalg.norm(ref), scale or 0.0, 1e-30)


def check_product(name, Wd, X, Y):
    """Y [T, R] from the kernels vs X [T, C] @ Wd^T, with the tolerances explained above."""
    exact = X.astype(np.float64) @ Wd.T
    if name in ("f16", "f32"):
        assert rel(Y, exact) <= 1e-5
        return
    xq, d = q8_reference(X)
    floor = np.linalg.norm(Wd) * np.linalg.norm(xq) / np.sqrt(Wd.shape[1])   # typical |y| if y ~ 0
    assert rel(Y, xq @ Wd.T, floor) <= 1e-5
    for y, e, db in zip(np.atleast_2d(Y), np.atleast_2d(exact), np.atleast_2d(d)):
        assert np.linalg.norm(y - e) <= 4 * np.linalg.norm(Wd) * np.sqrt(np.mean(db ** 2) / 12) + 1e-6


SHAPES = [(1, 32), (37, 256), (301, 1024), (64, 4096)]   # rows not divisible by the threads, a single row


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("heavy", [False, True])
def test_matvec(name, rows, cols, heavy):
    w, Wd = weights(name, (rows, cols), heavy)
    x = (RNG.standard_t(3, cols) if heavy else RNG.standard_normal(cols)).astype(np.float32)
    y = K.matvec(name, w, x)
    assert y.shape == (rows,) and y.dtype == np.float32
    check_product(name, Wd, x[None], y[None])
    out = np.full(rows, np.nan, np.float32)
    assert K.matvec(K.qtype(name), w, x, out=out) is out and np.array_equal(out, y)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("tokens", [1, 3, 4, 7, 13, INT_MATMUL_MAX_TOKENS + 6])   # tile edges: 4 tokens a tile
def test_matmul(name, tokens):
    w, Wd = weights(name, (203, 512), heavy=True)
    X = RNG.standard_normal((tokens, 512)).astype(np.float32)
    Y = K.matmul(name, w, X)
    assert Y.shape == (tokens, 203) and Y.dtype == np.float32
    if tokens > INT_MATMUL_MAX_TOKENS:   # dequantize + sgemm: x is not quantized
        assert rel(Y, X.astype(np.float64) @ Wd.T) <= 1e-5
    else:
        check_product(name, Wd, X, Y)


@pytest.mark.parametrize("name", ["q4_0", "q8_0", "q5_1", "f16"])
def test_matmul_several_tiles(name):
    w, Wd = weights(name, (TILE_ROWS + 77, 64))
    X = RNG.standard_normal((INT_MATMUL_MAX_TOKENS + 1, 64)).astype(np.float32)
    assert rel(K.matmul(name, w, X), X.astype(np.float64) @ Wd.T) <= 1e-5


@pytest.mark.parametrize("name", ["q4_0", "q8_0", "q5_1"])
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


@pytest.mark.parametrize("name", ["q4_0", "q8_0", "q5_1"])
def test_tiles_match_dots(name):
    """The AVX2 tiles (1 row x 4 tokens and edges) against one block dot per (row, token)."""
    from lazymoe.kernels.activations import quantize_q8_rows
    from lazymoe.kernels.int_matmul import int_matmul_parallel
    code = K.KERNELS[name].code
    w, Wd = weights(name, (37, 512), heavy=True)
    for tokens in (2, 5, 9):
        X = RNG.standard_normal((tokens, 512)).astype(np.float32)
        xq, xd, xc = np.empty((tokens, 512), np.int8), np.empty((tokens, 16), np.float32), np.empty((tokens, 16), np.float32)
        quantize_q8_rows(X, xq, xd, xc)
        a, b = np.empty((tokens, 37), np.float32), np.empty((tokens, 37), np.float32)
        int_matmul_parallel(code, False, w, X, xq, xd, xc, a, 2)
        if simd.HAVE_AVX2:
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


@pytest.mark.skipif(simd.HAVE_AVX2, reason="checks the build without AVX2")
def test_no_x86_ir_without_avx2():
    """Without AVX2 no AVX2 intrinsic reaches the compiled drivers (LLVM cannot select them on other CPUs).
    (The x86 backend's own llvm.x86.atomic.* for Numba's refcounts is the host's, not ours.)"""
    from lazymoe.kernels.int_matmul import _token_rows
    from lazymoe.kernels.matvec import dot_rows
    assert all(k.tile is None for k in K.KERNELS.values())
    w, _ = weights("q4_0", (8, 64))
    K.matvec("q4_0", w, np.ones(64, np.float32))
    K.matmul("q4_0", w, np.ones((5, 64), np.float32))
    for fn in (dot_rows, _token_rows):
        for ll in fn.inspect_llvm().values():
            assert "llvm.x86.avx" not in ll, fn


def ffn_reference(W1, W3, W2, X):
    g, u = X @ W1.T, X @ W3.T
    return (g / (1 + np.exp(-g)) * u) @ W2.T


# Mixed w1/w3 types take the unfused path; one type for w1 and w3 the fused one (in parallel, d * f >= 2^18).
FFN_TYPES = [("q4_0", "q4_0", "q4_0"), ("q8_0", "q8_0", "q4_0"), ("q4_0", "q8_0", "f16"), ("f32", "f16", "q8_0"),
             ("f16", "f16", "f32"), ("q5_1", "q5_1", "q5_1")]


def ffn_bound(types, X):
    # x is quantized before W1/W3 and h before W2 (for block types): ~1/127 per block each,
    # twice, through two layers; observed worst case 1.3 % over 20 draws, so 0.04 leaves ~3x.
    return 0.04 if any(t.startswith("q") for t in types) else 1e-5


@pytest.mark.parametrize("types", FFN_TYPES)
@pytest.mark.parametrize("d,f", [(128, 352), (256, 1056)])   # serial (small) and parallel, fused for q4_0/q4_0
def test_expert_ffn(types, d, f):
    (w1, W1), (w3, W3), (w2, W2) = weights(types[0], (f, d)), weights(types[1], (f, d)), weights(types[2], (d, f))
    x = RNG.standard_normal(d).astype(np.float32)
    y = K.expert_ffn(types[0], w1, types[1], w3, types[2], w2, x)
    assert y.shape == (d,) and y.dtype == np.float32
    assert rel(y, ffn_reference(W1, W3, W2, x.astype(np.float64))) <= ffn_bound(types, x)


@pytest.mark.parametrize("types", FFN_TYPES[:3])
@pytest.mark.parametrize("tokens", [1, 4, INT_MATMUL_MAX_TOKENS + 3])
def test_expert_ffn_batch(types, tokens):
    d, f = 128, 352
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
        lambda: K.matvec("q4_k", w, x),                                        # unknown type
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
