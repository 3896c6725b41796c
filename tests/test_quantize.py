"""`lazymoe quantize`: block formats against gguf.quants, every source kind, bad input."""
from __future__ import annotations

import json
import os
import shutil

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from lazymoe.cli import main
from lazymoe.format.gguf_file import GGUFFile
from lazymoe.kernels.quantizers import quantize
from lazymoe.quantize.convert import convert
from lazymoe.quantize.safetensors_file import SafetensorsFile, write_safetensors
from lazymoe.quantize.sources import llama_permute

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(FIX, "tiny-mixtral")

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "block_sparse_moe.gate": "ffn_gate_inp", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def hf_tensors(folder: str) -> dict[str, np.ndarray]:
    f = SafetensorsFile(os.path.join(folder, "model.safetensors"))
    return {n: f.get(n) for n in f.names}


def expected_gguf(folder: str) -> dict[str, np.ndarray]:
    """The float tensors a correct converter must store, by GGUF name, built independently of quantize/."""
    cfg = json.load(open(os.path.join(folder, "config.json")))
    src = hf_tensors(folder)
    out = {}
    for name, a in src.items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            if ".experts." in rest:
                continue
            key = rest.rsplit(".weight", 1)[0]
            g = f"blk.{i}.{HF_TO_GGUF[key]}.weight"
            if key == "self_attn.q_proj":
                a = llama_permute(a, cfg["num_attention_heads"])
            elif key == "self_attn.k_proj":
                a = llama_permute(a, cfg["num_key_value_heads"])
            out[g] = a
        else:
            out[HF_TO_GGUF[name]] = a
    for i in range(cfg["num_hidden_layers"]):
        for w, g in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
            n = cfg.get("num_local_experts", 0)
            if n:
                out[f"blk.{i}.{g}.weight"] = np.stack([src[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"] for e in range(n)])
    return out


def dequant(f: GGUFFile, name: str) -> np.ndarray:
    t = f.tensors[name]
    return gguf.quants.dequantize(f.tensor(name), T(t.ggml_type)).astype(np.float32).reshape(t.shape)


def tensor_bytes(path: str) -> dict[str, bytes]:
    with GGUFFile(path) as f:
        return {n: bytes(f.raw(n)) for n in f.tensors}


# --- block formats ------------------------------------------------------------------

@pytest.mark.parametrize("dist", ["gauss", "student_t3"])
def test_q4_0_never_worse_than_llama_cpp(dist):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((64, 1024)) if dist == "gauss" else rng.standard_t(3, (64, 1024))).astype(np.float32)
    ours = gguf.quants.dequantize(quantize(x, "q4_0"), T.Q4_0)
    ref = gguf.quants.dequantize(gguf.quants.quantize(x, T.Q4_0), T.Q4_0)
    e_ours = ((ours - x) ** 2).reshape(-1, 32).sum(1)
    e_ref = ((ref - x) ** 2).reshape(-1, 32).sum(1)
    assert np.all(e_ours <= e_ref * (1 + 1e-9) + 1e-12)          # block by block
    assert e_ours.sum() < 0.97 * e_ref.sum()                       # and clearly better overall


def test_q4_0_layout_and_edge_blocks():
    x = np.zeros((3, 64), np.float32)
    x[1, :32] = np.linspace(-1, 1, 32)
    x[2] = 1e-30                                                    # tiny but non-zero
    q = quantize(x, "q4_0")
    assert q.shape == (3, 36) and q.dtype == np.uint8
    y = gguf.quants.dequantize(q, T.Q4_0)
    ref = gguf.quants.dequantize(gguf.quants.quantize(x, T.Q4_0), T.Q4_0)
    assert np.all(y[0] == 0) and np.abs(y[1] - x[1]).max() < 0.1     # an error-optimal scale may clip the extreme a little
    assert np.sum((y[1] - x[1]) ** 2) <= np.sum((ref[1] - x[1]) ** 2)
    assert np.array_equal(q[1, 2:18] & 15, q[1, 2:18] & 15) and int(q[1, 2] & 15) < 8 < int(q[1, 17] >> 4)  # j low, j+16 high
    assert np.all(np.isfinite(y))


def test_q8_0_is_llama_cpp_bytes():
    x = np.random.default_rng(1).standard_t(4, (16, 256)).astype(np.float32)
    assert np.array_equal(quantize(x, "q8_0"), gguf.quants.quantize(x, T.Q8_0))


def test_block_type_refuses_ragged_rows():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(np.zeros((2, 48), np.float32), "q4_0")


# --- Hugging Face source ------------------------------------------------------------

@pytest.mark.parametrize("qt", ["f32", "f16", "q8_0", "q4_0"])
def test_hf_checkpoint_converts_to_llama_cpp_layout(tmp_path, qt):
    out = str(tmp_path / "m.gguf")
    convert(TINY, out, qt, progress=False)
    want = expected_gguf(TINY)
    with GGUFFile(out) as f:
        md = f.metadata
        assert md["general.architecture"] == "llama"
        assert md["llama.expert_count"] == 8 and md["llama.expert_used_count"] == 2
        assert md["llama.attention.head_count_kv"] == 2 and md["llama.rope.freq_base"] == 1e6
        assert set(f.tensors) == set(want)
        assert f.tensors["blk.0.ffn_gate_exps.weight"].shape == (8, 96, 64)
        assert f.tensors["blk.0.ffn_down_exps.weight"].shape == (8, 64, 96)
        for name, a in want.items():
            t = f.tensors[name]
            y = dequant(f, name)
            if a.ndim == 1 or name.endswith("ffn_gate_inp.weight") or qt == "f32":
                assert T(t.ggml_type) == T.F32 and np.array_equal(y, a), name
            elif qt == "f16":
                assert T(t.ggml_type) == T.F16 and np.allclose(y, a, rtol=0, atol=1e-7), name
            elif qt == "q8_0":
                ref = gguf.quants.quantize(a.reshape(-1, a.shape[-1]), T.Q8_0)
                assert np.array_equal(f.raw(name), ref.reshape(-1)), name
            else:
                ref = gguf.quants.dequantize(gguf.quants.quantize(a.reshape(-1, a.shape[-1]), T.Q4_0), T.Q4_0)
                assert np.sum((y.reshape(ref.shape) - a.reshape(ref.shape)) ** 2) <= \
                    np.sum((ref - a.reshape(ref.shape)) ** 2) * (1 + 1e-6), name
        assert "[INST]" in md["tokenizer.chat_template"]


def test_tokenizer_keys_match_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    out = str(tmp_path / "m.gguf")
    convert(TINY, out, "q8_0", progress=False)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(TINY, "tokenizer.model"))
    with GGUFFile(out) as f:
        md = f.metadata
    assert md["tokenizer.ggml.model"] == "llama"
    assert md["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert np.array_equal(md["tokenizer.ggml.scores"], np.array([sp.get_score(i) for i in range(sp.get_piece_size())], np.float32))
    types = md["tokenizer.ggml.token_type"]
    for i in range(sp.get_piece_size()):
        want = 3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else None
        assert want is None and types[i] in (1, 4) or types[i] == want, i
    assert (md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"], md["tokenizer.ggml.unknown_token_id"]) == \
        (sp.bos_id(), sp.eos_id(), sp.unk_id())


@pytest.mark.parametrize("dtype", ["F32", "F16"])
def test_source_dtypes_and_shards_give_identical_files(tmp_path, dtype):
    """The fixture is bf16; its values are exact in f32 and f16, so every variant must convert to the same bytes."""
    base = str(tmp_path / "base.gguf")
    convert(TINY, base, "q4_0", progress=False)
    d = tmp_path / "variant"
    shutil.copytree(TINY, d)
    os.unlink(d / "model.safetensors")
    tensors = hf_tensors(TINY)
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fn, ns in shards.items():
        write_safetensors(str(d / fn), {n: tensors[n] for n in ns}, dtype)
    json.dump({"metadata": {}, "weight_map": {n: fn for fn, ns in shards.items() for n in ns}},
              open(d / "model.safetensors.index.json", "w"))
    out = str(tmp_path / "variant.gguf")
    convert(str(d), out, "q4_0", progress=False)
    assert tensor_bytes(out) == tensor_bytes(base)


def test_dense_checkpoint(tmp_path):
    d = os.path.join(FIX, "tiny-dense")
    out = str(tmp_path / "d.gguf")
    convert(d, out, "q8_0", progress=False)
    with GGUFFile(out) as f:
        assert "llama.expert_count" not in f.metadata
        assert f.tensors["blk.1.ffn_down.weight"].shape == (64, 128)
        want = expected_gguf(d)
        assert set(f.tensors) == set(want)
        assert np.array_equal(dequant(f, "blk.0.attn_q.weight"),
                              gguf.quants.dequantize(gguf.quants.quantize(want["blk.0.attn_q.weight"], T.Q8_0), T.Q8_0))


# --- Mistral native and GGUF sources ------------------------------------------------

def make_mistral_native(dst) -> None:
    """The tiny Mixtral in Mistral's torrent layout: params.json, consolidated.safetensors (Q/K interleaved)."""
    cfg = json.load(open(os.path.join(TINY, "config.json")))
    src = hf_tensors(TINY)
    ren = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attention.wq",
             "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "block_sparse_moe.gate": "feed_forward.gate"}
    out = {}
    for n, a in src.items():
        if n in ren:
            out[ren[n]] = a
            continue
        i, rest = n[len("model.layers."):].split(".", 1)
        key = rest.rsplit(".weight", 1)[0]
        if key.startswith("block_sparse_moe.experts."):
            out[f"layers.{i}.feed_forward.experts.{key.split('.', 2)[2]}.weight"] = a
            continue
        if key == "self_attn.q_proj":
            a = llama_permute(a, cfg["num_attention_heads"])
        elif key == "self_attn.k_proj":
            a = llama_permute(a, cfg["num_key_value_heads"])
        out[f"layers.{i}.{layer[key]}.weight"] = a
    os.makedirs(dst)
    write_safetensors(os.path.join(dst, "consolidated.safetensors"), out, "BF16")
    json.dump({"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 96, "n_heads": 4, "n_kv_heads": 2, "norm_eps": 1e-5,
               "vocab_size": 512, "rope_theta": 1e6, "moe": {"num_experts": 8, "num_experts_per_tok": 2}},
              open(os.path.join(dst, "params.json"), "w"))
    shutil.copy(os.path.join(TINY, "tokenizer.model"), os.path.join(dst, "tokenizer.model"))


@pytest.mark.parametrize("qt", ["q4_0", "q8_0", "f16"])
def test_mistral_native_equals_hf(tmp_path, qt):
    make_mistral_native(str(tmp_path / "native"))
    a, b = str(tmp_path / "hf.gguf"), str(tmp_path / "native.gguf")
    convert(TINY, a, qt, progress=False)
    convert(str(tmp_path / "native"), b, qt, progress=False)
    assert tensor_bytes(a) == tensor_bytes(b)


def test_gguf_requantize_and_old_expert_layout(tmp_path):
    f32, q4 = str(tmp_path / "f32.gguf"), str(tmp_path / "q4.gguf")
    convert(TINY, f32, "f32", progress=False)
    convert(TINY, q4, "q4_0", progress=False)
    re_q4 = str(tmp_path / "re.gguf")
    convert(f32, re_q4, "q4_0", progress=False)
    assert tensor_bytes(re_q4) == tensor_bytes(q4)
    # The pre-2024 layout: one tensor per expert and an F16 router, as many downloads still have.
    old = str(tmp_path / "old.gguf")
    with GGUFFile(f32) as f:
        w = gguf.GGUFWriter(old, "llama")
        for k, v in f.metadata.items():
            if k in ("general.architecture", "general.alignment"):
                continue
            if isinstance(v, str):
                w.add_string(k, v)
            elif isinstance(v, bool):
                w.add_bool(k, v)
            elif isinstance(v, int):
                w.add_uint32(k, v)
            elif isinstance(v, float):
                w.add_float32(k, v)
            elif isinstance(v, list):
                w.add_array(k, v)
            else:
                w.add_array(k, v.tolist())
        for n in f.tensors:
            a = np.array(f.tensor(n))
            if "_exps" in n:
                kind = n.split(".")[2].split("_")[1]
                for e in range(a.shape[0]):
                    w.add_tensor(n.replace(f"ffn_{kind}_exps", f"ffn_{kind}.{e}"), a[e])
            elif n.endswith("ffn_gate_inp.weight"):
                w.add_tensor(n, a.astype(np.float16))
            else:
                w.add_tensor(n, a)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    re_old = str(tmp_path / "re_old.gguf")
    convert(old, re_old, "q4_0", progress=False)
    got, want = tensor_bytes(re_old), tensor_bytes(q4)
    assert set(got) == set(want)
    for n in want:
        if n.endswith("ffn_gate_inp.weight"):      # went through f16: compare values loosely
            assert np.allclose(np.frombuffer(got[n], np.float32), np.frombuffer(want[n], np.float32), atol=1e-3)
        else:
            assert got[n] == want[n], n
    # ... and the runtime runs it unconverted: the same logits as the merged F32 file (the F16 router aside)
    from lazymoe.runtime.model import load_model
    ids = list(range(1, 25))
    a = load_model(old, ram_budget="1G", ctx=32, progress=False)
    b = load_model(f32, ram_budget="1G", ctx=32, progress=False)
    assert a.weights.layers[0].ffn_gate_inp[0].name == "f16" and a.experts is not None
    la, lb = a.logits(ids), b.logits(ids)
    assert np.abs(la - lb).max() <= 1e-2 * np.abs(lb).max() and (la.argmax(1) == lb.argmax(1)).mean() >= 0.95
    a.close()
    b.close()


# --- bad input through the CLI -------------------------------------------------------

def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def assert_clean_failure(code, err, *words):
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_bad_inputs(tmp_path, capsys):
    out = str(tmp_path / "out.gguf")
    code, err = run_cli(capsys, "quantize", str(tmp_path / "nope"), "-o", out)
    assert_clean_failure(code, err, "no such file")
    (tmp_path / "empty").mkdir()
    code, err = run_cli(capsys, "quantize", str(tmp_path / "empty"), "-o", out)
    assert_clean_failure(code, err, "not a checkpoint folder")
    # unsupported architecture
    d = tmp_path / "arch"
    shutil.copytree(TINY, d)
    cfg = json.load(open(d / "config.json"))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    json.dump(cfg, open(d / "config.json", "w"))
    code, err = run_cli(capsys, "quantize", str(d), "-o", out)
    assert_clean_failure(code, err, "GPT2LMHeadModel", "not supported")
    # a missing shard
    d = tmp_path / "shard"
    shutil.copytree(TINY, d)
    json.dump({"weight_map": {"model.norm.weight": "model-00002.safetensors"}}, open(d / "model.safetensors.index.json", "w"))
    code, err = run_cli(capsys, "quantize", str(d), "-o", out)
    assert_clean_failure(code, err, "model-00002.safetensors", "missing")
    # a missing tensor, and a misshaped one
    t = hf_tensors(TINY)
    d = tmp_path / "missing"
    shutil.copytree(TINY, d)
    write_safetensors(str(d / "model.safetensors"), {n: a for n, a in t.items() if n != "model.layers.1.self_attn.v_proj.weight"})
    code, err = run_cli(capsys, "quantize", str(d), "-o", out)
    assert_clean_failure(code, err, "model.layers.1.self_attn.v_proj.weight", "missing")
    t2 = dict(t)
    t2["model.layers.0.block_sparse_moe.experts.3.w2.weight"] = np.zeros((64, 64), np.float32)
    write_safetensors(str(d / "model.safetensors"), t2)
    code, err = run_cli(capsys, "quantize", str(d), "-o", out)
    assert_clean_failure(code, err, "experts.3.w2", "shape", "[64, 96]")
    # rows that are not whole Q4_0 blocks: FFN 80 makes the down projection's rows 80 long
    d = tmp_path / "ragged"
    shutil.copytree(TINY, d)
    cfg = json.load(open(d / "config.json"))
    cfg["intermediate_size"] = 80
    json.dump(cfg, open(d / "config.json", "w"))
    t3 = {n: (a[:80] if ".w1." in n or ".w3." in n else a[:, :80] if ".w2." in n else a) for n, a in t.items()}
    write_safetensors(str(d / "model.safetensors"), t3)
    code, err = run_cli(capsys, "quantize", str(d), "-o", out)
    assert_clean_failure(code, err, "ffn_down_exps", "not a multiple of", "block of 32")
    assert os.listdir(tmp_path).count("out.gguf") == 0
    # truncated or non-GGUF input files
    good = str(tmp_path / "good.gguf")
    convert(TINY, good, "q8_0", progress=False)
    data = open(good, "rb").read()
    for name, blob in (("trunc.gguf", data[: len(data) // 2]), ("head.gguf", data[:100]), ("junk.gguf", b"GGUF" + os.urandom(200))):
        p = tmp_path / name
        p.write_bytes(blob)
        code, err = run_cli(capsys, "quantize", str(p), "-o", out)
        assert_clean_failure(code, err, name)
    (tmp_path / "text.txt").write_text("hello")
    code, err = run_cli(capsys, "quantize", str(tmp_path / "text.txt"), "-o", out)
    assert_clean_failure(code, err, "not a GGUF")
    code, err = run_cli(capsys, "info", str(tmp_path / "trunc.gguf"))
    assert_clean_failure(code, err, "trunc.gguf", "truncated")
    # unwritable output folder, and an output that exists
    code, err = run_cli(capsys, "quantize", TINY, "-o", str(tmp_path / "no" / "dir" / "x.gguf"))
    assert_clean_failure(code, err, "does not exist")
    keep = tmp_path / "keep.gguf"
    keep.write_bytes(b"precious")
    code, err = run_cli(capsys, "quantize", TINY, "-o", str(keep))
    assert_clean_failure(code, err, "already exists", "--force")
    assert keep.read_bytes() == b"precious"
    code, err = run_cli(capsys, "quantize", good, "-o", good, "--force")
    assert_clean_failure(code, err, "overwrite the input")
    # nothing half-written anywhere
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    import lazymoe.quantize.convert as qc

    calls = {"n": 0}
    real = qc.quantize

    def boom(a, t):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(a, t)
    monkeypatch.setattr(qc, "quantize", boom)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        convert(TINY, str(out), "q4_0", force=True, progress=False)
    assert out.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["m.gguf"]


def test_cli_quantize_and_info(tmp_path, capsys):
    out = str(tmp_path / "m.gguf")
    assert main(["quantize", TINY, "-o", out, "-t", "q4_0", "-q"]) == 0
    line = capsys.readouterr().out
    assert "23 tensors" in line and "bits per weight" in line
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask        # a normal file, not mkstemp's 0600
    assert main(["info", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_expert"] == 8 and info["n_expert_used"] == 2
    total, active = info["params_total"], info["params_active"]
    expert_params = 2 * 8 * 3 * 64 * 96
    assert total - active == expert_params * 6 // 8
    assert info["bytes_per_expert"] * 16 == info["expert_bytes"] == 2 * 3 * 8 * 64 * 96 // 32 * 18
    assert info["min_ram_bytes"] == (info["process_estimate_bytes"] + info["resident_bytes"] + info["kv_cache_bytes"]
                                        + info["work_bytes"] + 2 * info["expert_slot_bytes"])


# --- llama.cpp's mixes, --expert-type and --imatrix: llama.cpp runs what we write --------------------------

TINY256 = os.path.join(FIX, "tiny-mixtral-256")


@pytest.fixture(scope="module")
def f32_256(tmp_path_factory):
    d = tmp_path_factory.mktemp("k")
    f32 = str(d / "f32.gguf")
    convert(TINY256, f32, "f32", progress=False)
    text = d / "calib.txt"
    import sysconfig
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "functools.py"), encoding="utf-8") as f:
        text.write_text(f.read())
    im = str(d / "imatrix.gguf")
    assert main(["imatrix", f32, "--text", str(text), "-o", im, "--ctx", "64", "--chunks", "4", "-q"]) == 0
    return f32, im


# Both runtimes multiply K-quant weights by activations rounded to Q8_K blocks (and Q8_0 for the 32-weight
# types), in different orders of summation: a token's logits agree to under 1 % of the logit range (measured
# 0.4-0.9 %), except where a near tie between two experts makes the routers pick differently (one token of 38
# at 5.8 % seen on this random model): 90 % of tokens within 2 %, every token within 15 %, top-1 on 95 %.
K_TOL = (0.02, 0.9, 0.15, 0.95)


@pytest.mark.parametrize("args", [dict(type_name="q4_k_m"), dict(type_name="q2_k"), dict(type_name="q5_k_s"),
                                  dict(type_name="q4_k_m", expert_type="q2_k"),
                                  dict(type_name="q4_k_m", expert_type="q3_k", imatrix=True)],
                         ids=["q4_k_m", "q2_k", "q5_k_s", "q4_k_m+q2_k-experts", "q4_k_m+q3_k-experts+imatrix"])
def test_llama_cpp_runs_our_mixes_like_lazymoe(f32_256, tmp_path, args):
    pytest.importorskip("llama_cpp")
    from tests.helpers import llama_logits
    f32, im = f32_256
    out = str(tmp_path / "m.gguf")
    convert(f32, out, progress=False, **{**args, "imatrix": im if args.get("imatrix") else None})
    ids = [1] + list(range(3, 40))
    from lazymoe import load_model
    model = load_model(out, progress=False)
    try:
        ours = model.logits(ids)
    finally:
        model.close()
    theirs = llama_logits(out, ids)
    rel, share, worst, top1 = K_TOL
    per_token = np.abs(ours - theirs).max(axis=1) / np.abs(theirs).max()                 # [T]
    assert (per_token < rel).mean() >= share and per_token.max() < worst, per_token
    assert (ours.argmax(1) == theirs.argmax(1)).mean() >= top1


def test_imatrix_changes_the_k_quant_bytes_only_where_it_should(f32_256, tmp_path):
    f32, im = f32_256
    a, b = str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf")
    convert(f32, a, "q4_k_m", progress=False, imatrix=im)
    convert(f32, b, "q4_k_m", progress=False)
    with GGUFFile(a) as ga, GGUFFile(b) as gb:
        changed = {n for n in ga.tensors if bytes(ga.raw(n)) != bytes(gb.raw(n))}
        assert ga.metadata["quantize.imatrix.file"] == im and "quantize.imatrix.file" not in gb.metadata
    # not token_embd and output (no entries, as llama-imatrix writes none) nor the F32 norms and routers
    assert changed and all(n.startswith("blk.") and "norm" not in n and "gate_inp" not in n for n in changed)


@pytest.mark.parametrize("type_name", ["q4_0", "q4_k_m"])
def test_interrupted_k_quant_conversion_leaves_nothing(f32_256, tmp_path, monkeypatch, type_name):
    import lazymoe.quantize.convert as qc

    calls = {"n": 0}
    real = qc.quantize

    def boom(a, t, importance=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(a, t, importance=importance)
    monkeypatch.setattr(qc, "quantize", boom)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        convert(f32_256[0], str(out), type_name, force=True, progress=False, imatrix=f32_256[1])
    assert out.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["m.gguf"]
