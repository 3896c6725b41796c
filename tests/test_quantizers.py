"""Block quantizers (kernels.quantizers, kernels.kquantizers) against llama.cpp's own quantizer.

References we did not write: gguf.quants.dequantize reads every byte we write (the format); llama.cpp's
quantizer (llama-cpp-python's libggml: `ggml_quantize_chunk`, the function `llama_model_quantize` runs per
chunk, checked here against `llama_model_quantize` itself) gives the bytes and errors we compare with.
The tests that need llama.cpp skip without the `llama` extra; the round-trip tests do not need it.
"""
from __future__ import annotations

import ctypes
import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from lazymoe.kernels import kquantizers as kq
from lazymoe.kernels.quantizers import QUANTIZES, quantize

BLOCK_TYPES = [t for t in QUANTIZES if t not in ("f32", "f16")]
SEARCHED = list(kq.KIND)                         # the types with a port of llama.cpp and our search
K_TYPES = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
DEMO = os.path.join(os.path.dirname(__file__), "..", "runtime", "data", "lazymoe-demo-q4_0.gguf")
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny-mixtral-256")

# Our RMSE below llama.cpp's on gaussian weights, at least (measured 2.9-12.6 %, RESULTS.md "Quantizer"):
# a floor that catches a search that stopped searching, well under the figures.
MIN_GAIN = {"q2_k": 0.08, "q3_k": 0.03, "q4_k": 0.02, "q5_k": 0.04, "q6_k": 0.04,
            "q4_0": 0.04, "q4_1": 0.08, "q5_0": 0.04, "q5_1": 0.08}


def llama_cpp_quantize(x, name, importance=None):
    pytest.importorskip("llama_cpp")
    from lazymoe.benchmarks.quantize import llama_cpp_quantize as ref
    return ref(x, name, importance)


def dequant(q: np.ndarray, name: str) -> np.ndarray:
    return gguf.quants.dequantize(q, T[name.upper()]).astype(np.float64)


def row_errors(q: np.ndarray, x: np.ndarray, name: str, w: np.ndarray | None = None) -> np.ndarray:
    """sum over each row of w (x - x̂)², [R]."""
    d = (dequant(q, name) - x.astype(np.float64)) ** 2
    return (d if w is None else d * w.astype(np.float64)).sum(axis=1)


def weights(kind: str, rows: int = 32, cols: int = 1024, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) if kind == "gaussian" else rng.standard_t(3, (rows, cols))
    return x.astype(np.float32)


DEMO_TENSORS = ("blk.0.attn_q.weight", "blk.0.ffn_up_exps.weight", "blk.1.ffn_down_exps.weight")


def demo_weights() -> list[np.ndarray]:
    """Real trained matrices of the shipped demo model (rows of 256, 256, 512), dequantized to float32, 48 rows each."""
    tensors = {t.name: t for t in gguf.GGUFReader(DEMO).tensors}
    out = []
    for name in DEMO_TENSORS:
        t = tensors[name]
        x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1, int(t.shape[0]))
        out.append(np.ascontiguousarray(x[:48], dtype=np.float32))
    assert [a.shape[1] for a in out] == [256, 256, 512]
    return out


# --- llama.cpp's quantizer, ported bit for bit --------------------------------------------------------

@pytest.mark.parametrize("name", SEARCHED)
@pytest.mark.parametrize("imatrix", [False, True])
def test_port_is_llama_cpp_bit_for_bit(name, imatrix):
    x = np.concatenate([weights("gaussian", 8, 512), weights("student_t3", 8, 512, 1), demo_weights()[2][:8]])
    imp = np.random.default_rng(3).exponential(size=512).astype(np.float32) if imatrix else None
    ref = llama_cpp_quantize(x, name, imp)
    port = kq.quantize_blocks(x, name, imp, search=False)
    assert port.shape == ref.shape
    bad = np.flatnonzero((port != ref).any(axis=1))
    assert bad.size == 0, f"{name}: rows {bad.tolist()} differ from llama.cpp's bytes"


@pytest.mark.parametrize("name", ["q3_k", "q6_k"])
@pytest.mark.parametrize("imatrix", [False, True])
def test_port_in_lanes_is_llama_cpp_on_partial_groups_and_odd_sub_blocks(name, imatrix):
    """Q3_K and Q6_K run klanes.G blocks at a time: a row of 3 blocks leaves a partial group; zero, tiny and
    constant sub-blocks take the ports' special cases."""
    x = weights("student_t3", 6, 768, 4)
    x[0, 16:32] = 0
    x[1, :256] = 0
    x[2, 32:48] = 1e-30
    x[3, 48:64] = 0.5
    x[4, 256:512] *= 1e4
    imp = np.random.default_rng(5).exponential(size=768).astype(np.float32) if imatrix else None
    ref = llama_cpp_quantize(x, name, imp)
    assert (kq.quantize_blocks(x, name, imp, search=False) == ref).all()
    ours = kq.quantize_blocks(x, name, imp)
    assert (row_errors(ours, x, name, imp) <= row_errors(ref, x, name, imp)).all()


@pytest.mark.parametrize("ftype,name", [("Q4_K_M", "q4_k"), ("Q2_K", "q2_k")])
def test_chunk_reference_is_what_llama_model_quantize_writes(tmp_path, ftype, name):
    """The reference the other tests call (ggml_quantize_chunk) against llama_model_quantize on a model file."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from lazymoe.quantize.convert import convert
    src, dst = str(tmp_path / "f32.gguf"), str(tmp_path / "out.gguf")
    convert(FIXTURE, src, "f32", force=True, progress=False)
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    p.pure = True
    p.nthread = 2
    assert llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)) == 0
    f32 = {t.name: t for t in gguf.GGUFReader(src).tensors}
    checked = 0
    for t in gguf.GGUFReader(dst).tensors:
        if t.tensor_type != T[name.upper()]:
            continue
        cols = int(t.shape[0])
        x = np.asarray(f32[t.name].data, dtype=np.float32).reshape(-1, cols)
        got = np.asarray(t.data).reshape(x.shape[0], -1)
        assert (kq.quantize_blocks(x, name, search=False) == got).all(), t.name
        checked += 1
    assert checked >= 5


# --- never worse than llama.cpp, and better -------------------------------------------------------------

@pytest.mark.parametrize("name", SEARCHED)
def test_never_above_llama_cpp_on_any_row(name):
    tensors = [weights("gaussian"), weights("student_t3", seed=1), *demo_weights()]
    for i, x in enumerate(tensors):
        ours, ref = quantize(x, name), llama_cpp_quantize(x, name)
        e_ours, e_ref = row_errors(ours, x, name), row_errors(ref, x, name)
        assert (e_ours <= e_ref * (1 + 1e-9)).all(), f"{name}, tensor {i}: rows {np.flatnonzero(e_ours > e_ref).tolist()}"
        if i == 0:
            gain = 1 - np.sqrt(e_ours.sum() / e_ref.sum())
            assert gain >= MIN_GAIN[name], f"{name}: RMSE only {100 * gain:.2f}% below llama.cpp's on gaussian weights"


@pytest.mark.parametrize("name", SEARCHED)
def test_importance_weighted_error_below_llama_cpp_with_the_same_imatrix(name):
    x = weights("gaussian", 32, 512, 5)
    imp = (np.random.default_rng(6).lognormal(0.0, 1.5, 512)).astype(np.float32)
    ours, ref = quantize(x, name, imp), llama_cpp_quantize(x, name, imp)
    e_ours, e_ref = row_errors(ours, x, name, imp), row_errors(ref, x, name, imp)
    assert (e_ours <= e_ref * (1 + 1e-9)).all()
    assert e_ours.sum() < 0.99 * e_ref.sum()
    # and the importance steers the error: weighted error below that of the unweighted quantization
    assert e_ours.sum() < row_errors(quantize(x, name), x, name, imp).sum()


@pytest.mark.parametrize("name, bound", [("q2_k", 0.1), ("q3_k", 0.1), ("q4_k", 0.1), ("q5_k", 0.1),
                                         ("q4_0", 0.5), ("q4_1", 0.5), ("q5_0", 0.5), ("q5_1", 0.5)])
def test_blocks_are_not_shrunk_along_the_weights(name, bound):
    # least squares alone leaves the error orthogonal to x̂, so x̂·x = (1 - relerr²)·x·x: every output of the
    # matrix shrinks by relerr² (6.6 % on Q2_K), coherently; that, not the RMSE, is what made our K files'
    # KL worse than llama.cpp's (RESULTS.md). Ours is scaled back to x̂·x = x·x up to the f16 scale's step.
    x = weights("gaussian", 32, 1024, 3).astype(np.float64)
    e = dequant(quantize(x.astype(np.float32), name), name) - x
    shrink = -(e * x).sum() / (x * x).sum()
    relerr2 = (e * e).sum() / (x * x).sum()
    assert abs(shrink) < bound * relerr2, f"{name}: shrink {shrink:.5f}, relative squared error {relerr2:.5f}"


# --- bytes that gguf reads, on any input -------------------------------------------------------------

def special_rows(cols: int = 512) -> np.ndarray:
    rng = np.random.default_rng(9)
    g = rng.standard_normal(cols)
    rows = [np.zeros(cols), np.full(cols, 0.37), np.full(cols, -2.5), g * 1e4, g * 1e-3, g * 1e-30,
            np.where(np.arange(cols) % 64 == 0, 100.0, g * 1e-3),           # a few outliers
            np.abs(g), -np.abs(g), g * 3e5]                                   # one-signed; beyond f16's range
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_round_trip_through_gguf_dequantize(name):
    x = np.concatenate([special_rows(), weights("gaussian", 6, 512)])
    q = quantize(x, name)
    qt = T[name.upper()]
    bs, ts = gguf.GGML_QUANT_SIZES[qt]
    assert q.dtype == np.uint8 and q.shape == (x.shape[0], 512 // bs * ts)
    y = dequant(q, name)
    assert y.shape == x.shape and np.isfinite(y).all()
    assert (y[0] == 0).all()                                                  # zeros stay zeros
    for r in (1, 2):                                                          # a constant row is close
        assert np.abs(y[r] - x[r]).max() <= 0.02 * abs(float(x[r, 0]))
    scale = np.abs(x).max(axis=1, keepdims=True)
    rel = np.sqrt(((y - x) ** 2).mean(axis=1)) / np.maximum(scale[:, 0], 1e-38)
    assert (rel[3:5] < 0.3).all() and (rel[10:] < 0.3).all()                  # large and small rows keep their shape
    assert np.abs(y[5]).max() <= 1e-29                                         # below f16: (near) zero
    # Q8_0 is llama.cpp's quantizer itself; the other types never do worse than it, also on these rows
    if name in SEARCHED:
        pytest.importorskip("llama_cpp")
        ref = dequant(llama_cpp_quantize(x, name), name)
        e_ref = ((ref - x) ** 2).sum(axis=1)
        e_ours = ((y - x) ** 2).sum(axis=1)
        finite = np.isfinite(e_ref)
        assert (e_ours[finite] <= e_ref[finite] * (1 + 1e-9) + 1e-300).all()


@pytest.mark.parametrize("name", ["q4_k", "q4_0", "q8_0"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused(name, bad):
    x = weights("gaussian", 4, 512)
    x[2, 100] = bad
    with pytest.raises(ValueError, match="row 2 holds NaN or Inf"):
        quantize(x, name)


@pytest.mark.parametrize("imp,msg", [(np.ones(256), "256 entries; expected one per column"),
                                     (-np.ones(512), "finite, non-negative"),
                                     (np.full(512, np.nan), "finite, non-negative")])
def test_bad_importance_is_refused(imp, msg):
    with pytest.raises(ValueError, match=msg):
        quantize(weights("gaussian", 2, 512), "q4_k", imp.astype(np.float32))


def test_rows_that_do_not_divide_into_blocks_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(np.ones((2, 288), np.float32), "q4_k")


def test_zero_importance_columns_and_3d_input():
    x = weights("gaussian", 8, 512).reshape(2, 4, 512)
    imp = np.ones(512, np.float32)
    imp[:256] = 0.0                                   # llama.cpp's imatrix has zeros for unseen columns
    q = quantize(x, "q3_k", imp)
    assert q.shape == (2, 4, 2 * 110)
    assert np.isfinite(dequant(q.reshape(8, -1), "q3_k")).all()
