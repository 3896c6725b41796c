"""quantize.mixes against llama.cpp's own quantizer: the per-tensor types of every ftype, on models whose rows
are multiples of 256 (on shorter rows llama.cpp falls back to other types) with and without 8 experts."""
from __future__ import annotations

import ctypes

import pytest

from lazymoe.format.config import ModelConfig
from lazymoe.format.gguf_file import GGUFFile
from lazymoe.quantize.convert import write_gguf
from lazymoe.quantize.mixes import FTYPES, tensor_types, use_more_bits
from lazymoe.quantize.synth import synth_source

llama_cpp = pytest.importorskip("llama_cpp")

K_FTYPES = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
            "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


def test_use_more_bits_is_llama_cpps():
    # first and last eighth, then every third layer from n/8 + 2 (llama-quant.cpp)
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


@pytest.fixture(scope="module", params=[8, 4], ids=["8-experts", "4-experts"])
def source(request, tmp_path_factory):
    cfg = ModelConfig(n_layer=8, n_embd=256, n_ff=256, n_head=4, n_head_kv=1, n_vocab=320, n_ctx_train=256,
                      rms_eps=1e-5, rope_theta=1e4, n_expert=request.param, n_expert_used=2)
    path = str(tmp_path_factory.mktemp("mix") / "f16.gguf")
    from lazymoe.kernels.qtypes import qtype
    write_gguf(synth_source(cfg, type_name="f16"), path, qtype("f16"), progress=False)
    return cfg, path


@pytest.mark.parametrize("ft", K_FTYPES)
def test_tensor_types_equal_llama_cpps(source, ft, tmp_path):
    cfg, src = source
    out = str(tmp_path / f"{ft}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(FTYPES[ft][0])
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params)) == 0
    with GGUFFile(out) as g:
        got = {n: t.type_name.upper() for n, t in g.tensors.items()}
    want = tensor_types(cfg, ft)
    assert {n: got[n] for n in want} == want
    assert all(got[n] in ("F32", "F16") for n in got if n not in want)        # norms and router left alone



def _quantize_160(tmp_path, ft):
    """llama.cpp's `ft` (a LLAMA_FTYPE_MOSTLY_ name) of an 8-expert model whose rows are 160 (whole 32-blocks, not
    256-blocks): (config, path, its types by tensor name)."""
    from lazymoe.kernels.qtypes import qtype
    cfg = ModelConfig(n_layer=2, n_embd=160, n_ff=160, n_head=4, n_head_kv=2, n_vocab=320, n_ctx_train=256,
                      rms_eps=1e-5, rope_theta=1e4, n_expert=8, n_expert_used=2)
    src, out = str(tmp_path / "f16.gguf"), str(tmp_path / f"{ft}.gguf")
    write_gguf(synth_source(cfg, type_name="f16", seed=3), src, qtype("f16"), progress=False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ft}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params)) == 0
    with GGUFFile(out) as g:
        return cfg, out, {n: t.type_name.upper() for n, t in g.tensors.items()}


@pytest.mark.parametrize("ft", ["q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k"])
def test_fallback_types_are_llama_cpps(tmp_path, ft):
    """On rows of 160 every K-quant falls back to a 32-block type, as mixes.py's _FALLBACK says."""
    cfg, _, got = _quantize_160(tmp_path, ft.upper())
    want = tensor_types(cfg, ft)
    assert {n: got[n] for n in want} == want


def test_iq4_nl_fallback_file_runs(tmp_path):
    """llama.cpp's IQ4_XS on rows of 160 falls back to IQ4_NL (with Q5_1 attn_output, Q8_0 attn_k/v and head): lazymoe
    runs that file, its logits as close to llama.cpp's on the same bytes as test_kquants holds two engines (mean error
    within ENGINES_MEAN_RTOL of the logit scale: each is ~0.002 of it from Hugging Face)."""
    import numpy as np

    from lazymoe.runtime.model import load_model
    from tests.helpers import llama_logits
    from tests.test_kquants import ENGINES_MEAN_RTOL
    _, out, got = _quantize_160(tmp_path, "IQ4_XS")
    assert got["blk.0.ffn_gate_exps.weight"] == got["token_embd.weight"] == "IQ4_NL"
    ids = list(range(1, 17))
    ref = llama_logits(out, ids)
    with load_model(out, ctx=64, progress=False) as m:
        ours = m.logits(ids)
    assert np.abs(ours - ref).mean() <= ENGINES_MEAN_RTOL * np.abs(ref).max()
