"""Files both ways with llama.cpp (llama-cpp-python, the `bench` extra; skipped when absent).

1. llama.cpp loads what `lazymoe quantize` writes and its logits agree with Hugging Face's
   MixtralForCausalLM on the same dequantized weights (the golden fixtures of make_golden.py).
2. lazymoe reads and runs what llama.cpp's own quantizer writes.
"""
from __future__ import annotations

import ctypes
import os

import gguf
import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from lazymoe.format.gguf_file import GGUFFile  # noqa: E402
from lazymoe.quantize.convert import convert  # noqa: E402
from tests.helpers import llama_logits  # noqa: E402

FIX = os.path.join(os.path.dirname(__file__), "fixtures")

# llama.cpp multiplies Q4_0/Q8_0 weights by activations it first rounds to Q8_0 blocks, and
# HF runs float32 on the dequantized weights, so quantized files agree only to about 1% of
# the logit range per layer; a top-1 router (tiny-moe-top1) can flip an expert on such a
# difference. F32 files must agree to float32 accuracy.
TOL = {"f32": (2e-3, 1.0), "f16": (2e-3, 1.0), "q8_0": (0.25, 0.85), "q4_0": (0.25, 0.85)}   # (max |diff| / max |logit|, top-1 agreement)


@pytest.mark.parametrize("fixture", ["tiny-mixtral", "tiny-moe-top1", "tiny-dense", "tiny-dense-bpe"])
@pytest.mark.parametrize("qt", ["f32", "f16", "q8_0", "q4_0"])
def test_llama_cpp_runs_our_files_like_hf(tmp_path, fixture, qt):
    out = str(tmp_path / "m.gguf")
    convert(os.path.join(FIX, fixture), out, qt, progress=False)
    # the fixtures' weights are bf16 values, exact in f16: an F16 file holds the F32 golden's weights
    golden = np.load(os.path.join(FIX, "golden", f"{fixture}-{'f32' if qt == 'f16' else qt}.npz"))
    ids = [int(i) for i in golden["ids"]]
    got, want = llama_logits(out, ids), golden["logits"]
    rel, top1 = TOL[qt]
    assert np.abs(got - want).max() / np.abs(want).max() < rel
    assert (got.argmax(1) == want.argmax(1)).mean() >= top1


def lazymoe_logits(path: str, ids: list[int]) -> np.ndarray:
    from lazymoe import load_model
    model = load_model(path, progress=False)
    try:
        return model.logits(ids)
    finally:
        model.close()


def llama_quantize(src: str, dst: str, ftype: int, pure: bool) -> None:
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.pure = pure
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
    assert rc == 0


def test_we_run_what_llama_cpp_writes(tmp_path):
    f32 = str(tmp_path / "f32.gguf")
    convert(os.path.join(FIX, "tiny-mixtral"), f32, "f32", progress=False)
    theirs = str(tmp_path / "llama-q4_0.gguf")
    llama_quantize(f32, theirs, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, pure=True)
    with GGUFFile(theirs) as g, GGUFFile(f32) as f:
        # llama.cpp's Q4_0 bytes are gguf.quants' (its reference quantizer), tensor for tensor
        for name in ("token_embd.weight", "blk.1.ffn_down_exps.weight"):
            a = np.array(f.tensor(name))
            assert bytes(g.raw(name)) == gguf.quants.quantize(a.reshape(-1, a.shape[-1]), gguf.GGMLQuantizationType.Q4_0).tobytes()
    golden = np.load(os.path.join(FIX, "golden", "tiny-mixtral-f32.npz"))
    ids = [int(i) for i in golden["ids"]]
    ours = lazymoe_logits(theirs, ids)
    ref = llama_logits(theirs, ids)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 0.1
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.9


def wide_checkpoint(folder) -> None:
    """A 1-layer Mixtral with rows of 256, so llama.cpp's K-quants (256-weight super-blocks) apply."""
    import json
    import shutil

    from lazymoe.quantize.safetensors_file import write_safetensors

    rng = np.random.default_rng(3)
    D, F, V, E = 256, 512, 512, 4
    g = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.05
    t = {"model.embed_tokens.weight": g(V, D), "model.norm.weight": np.ones(D, np.float32), "lm_head.weight": g(V, D),
         "model.layers.0.input_layernorm.weight": np.ones(D, np.float32),
         "model.layers.0.post_attention_layernorm.weight": np.ones(D, np.float32),
         "model.layers.0.self_attn.q_proj.weight": g(D, D), "model.layers.0.self_attn.k_proj.weight": g(D // 2, D),
         "model.layers.0.self_attn.v_proj.weight": g(D // 2, D), "model.layers.0.self_attn.o_proj.weight": g(D, D),
         "model.layers.0.block_sparse_moe.gate.weight": g(E, D)}
    for e in range(E):
        p = f"model.layers.0.block_sparse_moe.experts.{e}."
        t[p + "w1.weight"], t[p + "w3.weight"], t[p + "w2.weight"] = g(F, D), g(F, D), g(D, F)
    os.makedirs(folder)
    write_safetensors(os.path.join(folder, "model.safetensors"), t, "BF16")
    cfg = {"architectures": ["MixtralForCausalLM"], "hidden_size": D, "intermediate_size": F, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": V, "max_position_embeddings": 512,
           "rms_norm_eps": 1e-5, "rope_theta": 1e6, "num_local_experts": E, "num_experts_per_tok": 2}
    json.dump(cfg, open(os.path.join(folder, "config.json"), "w"))
    shutil.copy(os.path.join(FIX, "tiny-mixtral", "tokenizer.model"), folder)


def test_requantize_llama_cpp_k_quants(tmp_path):
    """A Q4_K_M file as most downloads are (Q4_K, Q6_K, ...): `lazymoe quantize` turns it into Q4_0 we run."""
    wide_checkpoint(str(tmp_path / "wide"))
    f32 = str(tmp_path / "f32.gguf")
    convert(str(tmp_path / "wide"), f32, "f32", progress=False)
    km = str(tmp_path / "q4_k_m.gguf")
    llama_quantize(f32, km, llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, pure=False)
    with GGUFFile(km) as f:
        assert {"Q4_K", "Q6_K"} <= {t.type_name for t in f.tensors.values()}
    out = str(tmp_path / "q4_0.gguf")
    convert(km, out, "q4_0", progress=False)
    with GGUFFile(out) as f, GGUFFile(km) as k:
        assert {f.tensors[n].type_name for n in f.tensors} == {"F32", "Q4_0"}
        for n, t in k.tensors.items():   # each tensor is llama.cpp's values requantized: within Q4_0's error of them
            kt = gguf.GGMLQuantizationType(t.ggml_type)
            want = gguf.quants.dequantize(k.raw(n).reshape(t.shape[:-1] + (-1,)) if kt.name not in ("F32", "F16") else k.tensor(n), kt)
            got = gguf.quants.dequantize(f.tensor(n), gguf.GGMLQuantizationType(f.tensors[n].ggml_type))
            assert np.abs(got.reshape(t.shape) - want.reshape(t.shape)).max() <= 0.15 * np.abs(want).max(), n
    ids = [1, 5, 77, 300, 12, 9, 400, 33]
    ours = lazymoe_logits(out, ids)
    ref = llama_logits(out, ids)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 0.05
