"""Qwen3-MoE, Qwen2-MoE, OLMoE and the dense Llama 3 (tied head), Qwen3 and Qwen2 (tied head) against Hugging
Face's golden logits, in lazymoe and in llama.cpp (no torch).

Each checkpoint (tests/fixtures/make_tiny.ARCH_CONFIGS: rows of 256, 2 layers, a padded vocabulary) is built
here from its seed, converted by lazymoe at F32 and Q8_0, and quantized by llama.cpp's own quantizer to Q4_K_M
from lazymoe's F32 file (the `llama` extra; those tests skip without it). The goldens (tests/make_golden.py
--archs) are transformers' float32 logits on each file's dequantized weights, with the weights' hash.

Tolerances, relative to the golden's largest |logit|:
- F32 in lazymoe: max |diff| <= 1e-4 (float32 summation order only; measured 4-6e-7).
- Q8_0 and Q4_K_M in lazymoe: the kernels round activations to Q8_0 / Q8_K blocks as llama.cpp does:
  mean |diff| <= 8e-3 (measured 1.2-1.9e-3 on the MoE files, 3.2-4.4e-3 on the tied dense one, each the same
  as llama.cpp's on that file to two digits), top-1 >= 90% (a token within 1% of the scale of HF's best
  counts: test_kquants' rule).
- llama.cpp on lazymoe's F32 file: max |diff| <= 2e-3 (measured 1.2-1.6e-4, 7e-4 tied dense); on Q8_0 and its
  own Q4_K_M mean |diff| <= 8e-3, top-1 >= 90%.
Measured by `python -m tests.make_golden --compare-archs`.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

from lazymoe.format.gguf_file import GGUFFile
from lazymoe.quantize.convert import convert
from lazymoe.runtime.memory import PROCESS_ESTIMATE
from lazymoe.runtime.model import load_model
from tests import make_golden
from tests.fixtures.make_tiny import ARCH_CONFIGS, ARCH_VOCAB, build_arch
from tests.helpers import FIXTURES, cli, min_budget

pytestmark = pytest.mark.usefixtures("one_thread")

F32_RTOL = 1e-4
MEAN_RTOL = 8e-3
TOP1 = 0.9
TOP1_TIE = 0.01
LLAMA_F32_RTOL = 2e-3

ARCH_OF = {"tiny-qwen3moe": "qwen3moe", "tiny-qwen2moe": "qwen2moe", "tiny-olmoe": "olmoe", "tiny-llama3-tied": "llama",
           "tiny-qwen3": "qwen3", "tiny-qwen2-tied": "qwen2"}
MOE = [fx for fx, c in ARCH_CONFIGS.items() if c["experts"]]


@pytest.fixture(scope="session")
def arch_file(tmp_path_factory):
    """arch_file(fixture, type) -> path: the checkpoint folder (type "hf") or its GGUF, made once per session."""
    d = tmp_path_factory.mktemp("archs")
    made = {}

    def get(fx, ty):
        if (fx, ty) not in made:
            if ty == "hf":
                made[fx, ty] = build_arch(fx, os.fspath(d / fx))
            elif ty == make_golden.ARCH_KQUANT:
                pytest.importorskip("llama_cpp")
                made[fx, ty] = make_golden.llama_cpp_quantize(get(fx, "f32"), os.fspath(d / f"{fx}-{ty}.gguf"), ty)
            else:
                made[fx, ty] = os.fspath(d / f"{fx}-{ty}.gguf")
                convert(get(fx, "hf"), made[fx, ty], ty, progress=False)
        return made[fx, ty]
    return get


def golden(fx: str, ty: str, path: str):
    g = np.load(os.path.join(FIXTURES, "golden", f"{fx}-{ty}.npz"))
    assert str(g["weights_sha256"]) == make_golden.weights_sha256(path), \
        "the file's weights changed since the golden was made: run python -m tests.make_golden --archs"
    return g["ids"], g["logits"]


def rel(got, ref):
    """(max, mean) |got - ref| relative to ref's largest |logit|, and top-1 agreement: the share of positions where
    the token picked is HF's best or within TOP1_TIE of the scale of it (random weights over 2,048 tokens leave
    near-ties that Q8_0 rounding decides either way)."""
    scale = float(np.abs(ref).max())
    d = np.abs(got.astype(np.float64) - ref)
    picked = np.take_along_axis(ref, got.argmax(axis=1)[:, None], axis=1)[:, 0]       # [T]
    return d.max() / scale, d.mean() / scale, float((picked >= ref.max(axis=1) - TOP1_TIE * scale).mean())


def check(got, ref, ty):
    mx, mean, top1 = rel(got, ref)
    if ty == "f32":
        assert mx <= F32_RTOL, mx
    assert mean <= MEAN_RTOL and top1 >= TOP1, (mean, top1)


@pytest.mark.parametrize("fx", list(ARCH_CONFIGS))
@pytest.mark.parametrize("ty", ["f32", "q8_0", make_golden.ARCH_KQUANT])
def test_lazymoe_logits_match_hf(arch_file, fx, ty):
    path = arch_file(fx, ty)
    ids, ref = golden(fx, ty, path)
    model = load_model(path, ctx=64, progress=False)
    batch = model.logits(ids)
    assert batch.shape == ref.shape == (len(ids), ARCH_VOCAB)
    check(batch, ref, ty)
    model.rewind(0)
    one_by_one = np.stack([model.eval([i]) for i in ids[:6]])                     # the decode path
    check(one_by_one, ref[:6], ty)


@pytest.mark.parametrize("fx", list(ARCH_CONFIGS))
@pytest.mark.parametrize("ty", ["f32", "q8_0", make_golden.ARCH_KQUANT])
def test_llama_cpp_logits_match_hf(arch_file, fx, ty):
    pytest.importorskip("llama_cpp")
    from tests.helpers import llama_logits
    path = arch_file(fx, ty)
    ids, ref = golden(fx, ty, path)
    got = llama_logits(path, [int(i) for i in ids])
    mx, mean, top1 = rel(got, ref)
    if ty == "f32":
        assert mx <= LLAMA_F32_RTOL, mx
    assert mean <= MEAN_RTOL and top1 >= TOP1, (mean, top1)


@pytest.mark.parametrize("fx", MOE)
@pytest.mark.parametrize("ty", ["q8_0", make_golden.ARCH_KQUANT])
def test_logits_identical_across_budgets(arch_file, fx, ty, monkeypatch):
    import lazymoe.runtime.model
    monkeypatch.setattr(lazymoe.runtime.model, "process_baseline", lambda: PROCESS_ESTIMATE)
    path = arch_file(fx, ty)
    ids = list(range(3, 40)) + [ARCH_VOCAB - 1]
    big = load_model(path, ram_budget="4G", ctx=64, progress=False)
    small = load_model(path, ram_budget=min_budget(path, 64), ctx=64, progress=False)
    assert big.plan.n_slots == big.plan.n_experts and small.plan.n_slots < small.plan.n_experts
    assert np.array_equal(big.logits(ids), small.logits(ids))
    assert small.experts.evictions > 0


@pytest.mark.parametrize("fx", MOE)
def test_file_is_laid_out_as_llama_cpp_writes_it(arch_file, fx):
    from lazymoe.quantize.safetensors_file import SafetensorsFile
    c = ARCH_CONFIGS[fx]
    arch = ARCH_OF[fx]
    st = SafetensorsFile(os.path.join(arch_file(fx, "hf"), "model.safetensors"))
    with GGUFFile(arch_file(fx, "f32")) as g:
        md = g.metadata
        assert md["general.architecture"] == arch
        assert md[f"{arch}.expert_count"] == c["experts"] and md[f"{arch}.expert_used_count"] == c["used"]
        if "moe_ffn" in c:                        # Qwen: the experts' size apart from the (dense) intermediate_size
            assert md[f"{arch}.expert_feed_forward_length"] == c["moe_ffn"]
            assert md[f"{arch}.feed_forward_length"] == c["ffn"]
        else:
            assert md[f"{arch}.feed_forward_length"] == c["ffn"] and f"{arch}.expert_feed_forward_length" not in md
        if "head_dim" in c:
            assert md[f"{arch}.attention.key_length"] == md[f"{arch}.attention.value_length"] == c["head_dim"]
        assert md.get(f"{arch}.expert_shared_feed_forward_length") == c.get("shared_ffn")
        tokens = md["tokenizer.ggml.tokens"]      # padded to the embedding's rows, as llama.cpp pads
        assert len(tokens) == ARCH_VOCAB and tokens[-1] == f"[PAD{ARCH_VOCAB - 1}]"
        # NeoX RoPE: Q and K rows stay in Hugging Face's order (llama.cpp permutes them only for "llama")
        for gname, hname in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
            want = st.get(f"model.layers.1.self_attn.{hname}.weight").astype(np.float32)
            assert np.array_equal(np.asarray(g.tensor(f"blk.1.{gname}.weight")), want)
        names = set(g.tensors)
        assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2moe")
        assert ("blk.0.attn_q_norm.weight" in names) == (arch != "qwen2moe")
        if arch == "qwen2moe":
            assert g.tensors["blk.0.ffn_gate_inp_shexp.weight"].shape == (c["hidden"],)
            assert {"blk.0.ffn_gate_shexp.weight", "blk.0.ffn_up_shexp.weight", "blk.0.ffn_down_shexp.weight"} <= names
    st.close()


@pytest.mark.parametrize("fx", list(ARCH_CONFIGS))
def test_tokenizer_ids_are_hugging_face_ones(arch_file, fx):
    """The converted file's byte-level BPE (tokenizer.ggml.*, runtime/bpe_tokenizer.py) gives the ids the golden
    was made with, which Hugging Face's `tokenizers` gave on the checkpoint's tokenizer.json."""
    path = arch_file(fx, "f32")
    ids, _ = golden(fx, "f32", path)
    text_ids = [int(i) for i in ids[:-len(make_golden.ARCH_PADDED_IDS)]]
    model = load_model(path, ctx=64, progress=False)
    with GGUFFile(path) as g:
        md = g.metadata
    assert md["tokenizer.ggml.model"] == "gpt2"
    assert md["tokenizer.ggml.pre"] == {"tiny-olmoe": "olmo", "tiny-llama3-tied": "llama-bpe"}.get(fx, "qwen2")
    got = model.tokenizer.encode(make_golden.ARCH_TEXT, bos=bool(md.get("tokenizer.ggml.add_bos_token")), special=True)
    assert got[:len(text_ids)] == text_ids


@pytest.mark.parametrize("fx", [fx for fx, c in ARCH_CONFIGS.items() if not c["experts"]])
def test_dense_files_are_laid_out_as_llama_cpp_writes_them(arch_file, fx):
    arch, c = ARCH_OF[fx], ARCH_CONFIGS[fx]
    with GGUFFile(arch_file(fx, "f32")) as g:
        assert g.metadata["general.architecture"] == arch and f"{arch}.expert_count" not in g.metadata
        assert ("output.weight" in g.tensors) == (not c.get("tied"))
        assert ("blk.0.attn_q.bias" in g.tensors) == (arch == "qwen2")
        assert ("blk.0.attn_q_norm.weight" in g.tensors) == (arch == "qwen3")
        assert g.metadata.get(f"{arch}.attention.key_length") == c.get("head_dim")


def test_tied_output_head(arch_file, tmp_path):
    """A checkpoint with tie_word_embeddings converts without output.weight (as llama.cpp's converter writes it),
    llama.cpp's quantizer gives its token_embd the output head's type, and requantizing keeps it tied."""
    from lazymoe.format.config import config_from_metadata
    from lazymoe.quantize.mixes import tensor_types
    km = arch_file("tiny-llama3-tied", make_golden.ARCH_KQUANT)
    for path in (arch_file("tiny-llama3-tied", "f32"), km):
        with GGUFFile(path) as g:
            assert "output.weight" not in g.tensors and "token_embd.weight" in g.tensors
    with GGUFFile(km) as g:
        cfg = config_from_metadata(g.metadata, km)
        shapes = {n: t.shape for n, t in g.tensors.items()}
        assert g.tensors["token_embd.weight"].type_name == tensor_types(cfg, "q4_k_m", shapes)["token_embd.weight"] == "Q6_K"
    out = str(tmp_path / "re.gguf")
    convert(km, out, "q8_0", progress=False)
    with GGUFFile(out) as g:
        assert "output.weight" not in g.tensors


def test_chat_on_a_qwen3moe_file(arch_file):
    """`lazymoe chat` on the converted Qwen3-MoE file: its ChatML template (from tokenizer_config.json) renders and
    a reply streams."""
    from tests.helpers import run_cli
    path = arch_file("tiny-qwen3moe", "q8_0")
    with GGUFFile(path) as g:
        assert "<|im_start|>" in g.metadata["tokenizer.chat_template"]
    rc, out, err = run_cli(["chat", path, "-n", "4", "--ctx", "256"], stdin="Hello 東京\n")
    assert rc == 0, err


def test_requantize_llama_cpp_k_quant_file(arch_file, tmp_path):
    """lazymoe quantize reads llama.cpp's Q4_K_M qwen3moe file and writes a Q8_0 one that runs like it."""
    km = arch_file("tiny-qwen3moe", make_golden.ARCH_KQUANT)
    out = str(tmp_path / "q8_0.gguf")
    convert(km, out, "q8_0", progress=False)
    ids, ref = golden("tiny-qwen3moe", make_golden.ARCH_KQUANT, km)
    with GGUFFile(out) as g:
        assert g.metadata["general.architecture"] == "qwen3moe" and g.metadata["qwen3moe.attention.key_length"] == 128
    check(load_model(out, ctx=64, progress=False).logits(ids), ref, "q8_0")


def _edited(arch_file, tmp_path, fx, **changes) -> str:
    d = tmp_path / fx
    shutil.copytree(arch_file(fx, "hf"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.mark.parametrize("fx, changes, msg", [
    ("tiny-qwen3moe", {"architectures": ["GptOssForCausalLM"]}, "gpt-oss .* is not supported"),
    ("tiny-qwen3moe", {"architectures": ["DeepseekV2ForCausalLM"]}, "deepseek2 .* is not supported"),
    ("tiny-qwen3moe", {"architectures": ["Qwen3NextForCausalLM"]}, "architecture .* is not supported"),
    ("tiny-qwen3moe", {"moe_intermediate_size": 512}, "has shape .*expected .* from the config"),
    ("tiny-qwen3moe", {"head_dim": 64}, "has shape"),
    ("tiny-qwen2moe", {"shared_expert_intermediate_size": 128}, "has shape"),
    ("tiny-olmoe", {"num_experts": 16}, "mlp.gate.weight has shape \\[8, 256\\], expected \\[16, 256\\]"),
    ("tiny-qwen3moe", {"norm_topk_prob": False}, "norm_topk_prob = false is not supported for qwen3moe"),
    ("tiny-qwen2moe", {"qkv_bias": False}, "qkv_bias = false is not supported for qwen2moe"),
    ("tiny-olmoe", {"clip_qkv": 8.0}, "clip_qkv = 8.0 is not supported for olmoe"),
    ("tiny-qwen3moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
])
def test_bad_checkpoints_refused_in_one_line(arch_file, tmp_path, fx, changes, msg):
    src = _edited(arch_file, tmp_path, fx, **changes)
    out = tmp_path / "out.gguf"
    rc, _, err = cli("quantize", src, "-o", str(out), "-t", "f32", "-q")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and re.search(msg, err), err
    assert not out.exists()


def test_unsupported_gguf_architecture_refused(tmp_path):
    from tests.helpers import synth_gguf
    for arch, msg in (("gpt-oss", "gpt-oss .*MXFP4"), ("deepseek2", "deepseek2 .*latent attention"), ("mamba", "expected one of")):
        path = synth_gguf(tmp_path / f"{arch}.gguf", arch=arch)
        with pytest.raises(ValueError, match=msg):
            load_model(path, progress=False)


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe", "olmoe"])
@pytest.mark.parametrize("ft", ["q3_k_m", "q4_k_m"])
def test_mixes_are_llama_cpps(tmp_path, arch, ft):
    """quantize/mixes.py's per-tensor types for these architectures (8 layers, so the layer-dependent rules
    differ between layers; the shared expert's ffn_down_shexp among them) equal llama.cpp's quantizer's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes

    from lazymoe.format.config import ModelConfig
    from lazymoe.kernels.qtypes import qtype
    from lazymoe.quantize.convert import write_gguf
    from lazymoe.quantize.mixes import FTYPES, tensor_types
    from lazymoe.quantize.synth import synth_source
    cfg = ModelConfig(n_layer=8, n_embd=256, n_ff=256, n_head=4, n_head_kv=2, n_vocab=320, n_ctx_train=256,
                      rms_eps=1e-6, rope_theta=1e6, n_expert=4, n_expert_used=2, arch=arch,
                      n_embd_head=128 if arch == "qwen3moe" else 0, n_ff_shexp=512 if arch == "qwen2moe" else 0)
    src, out = str(tmp_path / "f16.gguf"), str(tmp_path / f"{ft}.gguf")
    write_gguf(synth_source(cfg, type_name="f16"), src, qtype("f16"), progress=False)
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread = int(FTYPES[ft][0]), 2
    assert llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(p)) == 0
    with GGUFFile(out) as g:
        got = {n: t.type_name.upper() for n, t in g.tensors.items()}
    want = tensor_types(cfg, ft)
    assert {n: got[n] for n in want} == want
    assert all(got[n] in ("F32", "F16") for n in got if n not in want)


@pytest.mark.parametrize("fx, key, value, msg", [
    ("tiny-qwen3moe", "qwen3moe.attention.head_count", 2, r"blk.0.attn_q.weight has shape \(512, 256\), expected \(256, 256\)"),
    ("tiny-qwen3moe", "qwen3moe.expert_feed_forward_length", 512, r"ffn_gate_exps.weight has shape .*expected \(8, 512, 256\)"),
    ("tiny-qwen2moe", "qwen2moe.expert_shared_feed_forward_length", 128, r"ffn_gate_shexp.weight has shape"),
    ("tiny-olmoe", "olmoe.expert_shared_feed_forward_length", 256, r"olmoe has no shared expert"),
    ("tiny-olmoe", "olmoe.expert_count", 0, r"a olmoe model needs expert_count > 0"),
    ("tiny-qwen3moe", "qwen3moe.attention.value_length", 64, r"value_length differs from attention.key_length 128"),
    ("tiny-qwen3moe", "qwen3moe.attention.key_length", 64, r"value_length differs from attention.key_length 64"),
])
def test_file_that_disagrees_with_its_tensors_refused(arch_file, tmp_path, fx, key, value, msg):
    """A file whose {arch}.* keys disagree with its tensors is refused in one line naming the tensor or key."""
    from lazymoe.benchmarks.fuzz import enc
    from tests.helpers import rewrite
    path = rewrite(tmp_path, lambda p: p.set(key, 4, enc(4, value)), src=arch_file(fx, "q8_0"))    # 4: UINT32
    with pytest.raises(ValueError, match=msg):
        load_model(path, progress=False)
    rc, _, err = cli("info", path)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and re.search(msg, err), err


@pytest.mark.parametrize("fx", list(ARCH_CONFIGS))
def test_network_alone_matches_hf_on_quantized_weights(arch_file, fx, monkeypatch):
    """With float32 reference kernels (tests/test_runtime.ReferenceKernels: gguf-py's dequantized weights) the
    network on the Q8_0 file matches HF on the same weights to float32 accuracy, batch and decode alike."""
    import lazymoe.runtime.network
    from tests.test_runtime import ReferenceKernels
    path = arch_file(fx, "q8_0")
    ids, ref = golden(fx, "q8_0", path)
    monkeypatch.setattr(lazymoe.runtime.network, "kernels", ReferenceKernels)
    monkeypatch.setattr(lazymoe.runtime.network.Network, "grouped", False)                  # experts through kernels.*
    model = load_model(path, ctx=64, progress=False)
    assert rel(model.logits(ids), ref)[0] <= F32_RTOL
    model.rewind(0)
    assert rel(np.stack([model.eval([i]) for i in ids[:6]]), ref[:6])[0] <= F32_RTOL
