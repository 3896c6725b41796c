"""quantize.mixes against llama.cpp's own quantizer: the per-tensor types of every ftype, on models whose rows
are multiples of 256 (on shorter rows llama.cpp falls back to other types) with and without 8 experts."""
from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

from lazymoe.format.config import ModelConfig
from lazymoe.format.gguf_file import GGUFFile
from lazymoe.quantize.convert import convert, write_gguf
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


# --- the files `lazymoe quantize` writes, against llama.cpp's quantizer on the same F32 file -------------------

MIXES = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]
FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def file_types(path):
    with GGUFFile(path) as g:
        return {n: t.type_name.upper() for n, t in g.tensors.items()}, int(g.metadata["general.file_type"])


def llama_cpp_file(src, out, ft, overrides=None):
    from lazymoe.benchmarks.llama_imatrix import llama_quantize
    llama_quantize(src, out, int(FTYPES[ft][0]), overrides=overrides)
    return file_types(out)


@pytest.fixture(scope="module")
def f32_256(tmp_path_factory):
    """tiny-mixtral-256 (rows of 256 and 256*k) as F32, and a copy whose rows do not divide into 256 (tiny-mixtral)."""
    d = tmp_path_factory.mktemp("f32")
    out = {}
    for fx in ("tiny-mixtral-256", "tiny-mixtral"):
        out[fx] = str(d / f"{fx}.gguf")
        convert(os.path.join(FIX, fx), out[fx], "f32", progress=False)
    return out


def planned(path, *args, **kw):
    from lazymoe.quantize.convert import plan_types
    from lazymoe.quantize.sources import open_source
    src = open_source(path)
    try:
        p = plan_types(src, *args, **kw)
    finally:
        src.close()
    return p


@pytest.mark.parametrize("ft", MIXES)
def test_quantize_plans_llama_cpps_types(f32_256, ft, tmp_path):
    """Every mix, per tensor, on rows of 256 (tiny-mixtral-256) and on rows llama.cpp must fall back on (64, 96)."""
    for fx, path in f32_256.items():
        types, file_type = llama_cpp_file(path, str(tmp_path / f"{fx}.gguf"), ft)
        p = planned(path, ft)
        assert p.types == types, fx
        assert p.file_type == file_type
        assert bool(p.fallbacks) == (fx == "tiny-mixtral")


@pytest.mark.parametrize("ft", ["q2_k", "q4_k_m"])
def test_quantize_writes_llama_cpps_types(f32_256, ft, tmp_path):
    ours = str(tmp_path / "ours.gguf")
    s = convert(f32_256["tiny-mixtral-256"], ours, ft, progress=False)
    assert "fallback" not in str(s)
    assert file_types(ours) == llama_cpp_file(f32_256["tiny-mixtral-256"], str(tmp_path / "theirs.gguf"), ft)


@pytest.mark.parametrize("ft, llamas", [("q4_k_m", True), ("q6_k", True), ("q3_k_m", False)])
def test_token_embedding_is_llama_cpps_quantizer(f32_256, ft, llamas, tmp_path):
    """mixes.LLAMA_QUANTIZER: the embedding's bytes are llama.cpp's in Q4_K..Q6_K, ours in Q3_K; the other
    matrices are our search's."""
    import gguf
    ours, theirs = str(tmp_path / "ours.gguf"), str(tmp_path / "theirs.gguf")
    convert(f32_256["tiny-mixtral-256"], ours, ft, progress=False)
    llama_cpp_file(f32_256["tiny-mixtral-256"], theirs, ft)
    a, b = ({t.name: np.asarray(t.data) for t in gguf.GGUFReader(p).tensors} for p in (ours, theirs))
    assert (a["token_embd.weight"] == b["token_embd.weight"]).all() == llamas
    assert not (a["blk.0.attn_q.weight"] == b["blk.0.attn_q.weight"]).all()


@pytest.mark.parametrize("ft, expert, resident", [("q4_k_m", "q2_k", None), ("q4_k_m", "q3_k", None),
                                                  ("q5_k_m", "q2_k", "q8_0"), ("q3_k_m", None, "q6_k")])
def test_expert_and_resident_types_are_llama_cpps_tensor_type(f32_256, ft, expert, resident, tmp_path):
    """--expert-type / --resident-type equal llama-quantize --tensor-type with the patterns below."""
    from gguf import GGMLQuantizationType as G
    overrides = ([(r"_exps\.weight$", G[expert.upper()])] if expert else []) + \
                ([(r"^(?!.*_exps).*\.weight$", G[resident.upper()])] if resident else [])
    for fx, path in f32_256.items():
        types, file_type = llama_cpp_file(path, str(tmp_path / f"{fx}.gguf"), ft, overrides)
        p = planned(path, ft, expert, resident)
        assert p.types == types and p.file_type == file_type, fx


def test_mixed_file_written(f32_256, tmp_path):
    ours = str(tmp_path / "mixed.gguf")
    convert(f32_256["tiny-mixtral-256"], ours, "q4_k_m", expert_type="q2_k", progress=False)
    types, ft = file_types(ours)
    assert ft == int(FTYPES["q4_k_m"][0])
    assert {t for n, t in types.items() if "_exps" in n} == {"Q2_K"}
    assert types["blk.0.attn_output.weight"] == "Q5_K" and types["output.weight"] == "Q6_K"


def test_custom_mix_file_type_is_llama_cpps_guess(f32_256):
    """No --type and both overrides: the ftype llama.cpp's loader guesses from the most common tensor type."""
    p = planned(f32_256["tiny-mixtral-256"], None, "q2_k", "q4_k")
    assert p.file_type == int(FTYPES["q4_k_m"][0])     # 4 attention + embedding + output matrices in Q4_K
    p = planned(f32_256["tiny-mixtral-256"], "q3_k_m", "q2_k", "q4_k")
    assert p.file_type == int(FTYPES["q3_k_m"][0])     # a --type is written as llama.cpp writes its ftype


def test_fallback_said_in_the_summary(f32_256, tmp_path, capsys):
    from lazymoe.cli import main
    assert main(["quantize", f32_256["tiny-mixtral"], "-o", str(tmp_path / "x.gguf"), "-t", "q4_k_m", "-q"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "fallback" in line and "Q4_K -> Q5_0" in line and "Q6_K -> Q8_0" in line


@pytest.mark.parametrize("argv, match", [
    (["-t", "q4_k_x"], "unknown file type"), (["--expert-type", "q4_k_m"], "is not a block type (a file type"),
    (["--resident-type", "iq2_xs"], "not a block type"), (["-t", "bf16"], "cannot write bf16"),
])
def test_bad_type_flags_refused_in_one_line(f32_256, tmp_path, capsys, argv, match):
    from lazymoe.cli import main
    out = tmp_path / "x.gguf"
    assert main(["quantize", f32_256["tiny-mixtral-256"], "-o", str(out), "-q", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err, err
    assert not out.exists() and os.listdir(tmp_path) == []


def test_expert_type_on_a_dense_model_refused(tmp_path, capsys):
    from lazymoe.cli import main
    assert main(["quantize", os.path.join(FIX, "tiny-dense"), "-o", str(tmp_path / "x.gguf"), "--expert-type", "q2_k"]) == 2
    assert "no expert matrices" in capsys.readouterr().err
