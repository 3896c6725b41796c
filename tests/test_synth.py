"""`lazymoe synth`: real Mixtral shapes, random blocks, streamed; llama.cpp and lazymoe both run it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from lazymoe.cli import main
from lazymoe.format.gguf_file import GGUFFile
from lazymoe.kernels.qtypes import QTYPES


@pytest.fixture(scope="module")
def one_layer_8x7b(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "s.gguf")
    code = subprocess.run([sys.executable, "-c",
                           "import sys; from lazymoe.cli import main; from lazymoe.runtime.memory import peak_rss; "
                           "rc = main(sys.argv[1:]); print('PEAK', peak_rss() // 1024)",   # VmHWM, not the parent's
                           "synth", "--shape", "mixtral-8x7b", "--layers", "1", "-o", out, "-q"],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert code.returncode == 0, code.stderr
    peak_kib = int(code.stdout.split("PEAK")[1])
    return out, peak_kib


def test_shapes_sizes_and_memory(one_layer_8x7b, capsys):
    path, peak_kib = one_layer_8x7b
    with GGUFFile(path) as f:
        assert f.tensors["blk.0.ffn_gate_exps.weight"].shape == (8, 14336, 4096)
        assert f.tensors["blk.0.ffn_down_exps.weight"].shape == (8, 4096, 14336)
        assert f.tensors["blk.0.attn_k.weight"].shape == (1024, 4096)
        assert f.tensors["token_embd.weight"].shape == (32000, 4096)
        assert f.metadata["llama.expert_count"] == 8 and f.metadata["llama.context_length"] == 32768
        e = np.asarray(f.tensor("blk.0.ffn_up_exps.weight")[3, :64])          # [64, 2304] Q4_0 blocks
        import gguf
        w = gguf.quants.dequantize(e, gguf.GGMLQuantizationType.Q4_0)
        assert np.isfinite(w).all() and 0.01 < w.std() < 0.04                 # numerically sane
    assert main(["info", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes_per_expert"] == 99_090_432                              # FACTS.md: one 8x7B expert at Q4_0
    assert peak_kib * 1024 < 600 * 2**20                                       # 0.9 GiB written with little memory


def test_llama_cpp_and_lazymoe_run_it(one_layer_8x7b):
    llama_cpp = pytest.importorskip("llama_cpp")
    from lazymoe import load_model

    path, _ = one_layer_8x7b
    ids = [1, 300, 4000, 31999]
    m = llama_cpp.Llama(path, n_ctx=32, n_batch=32, logits_all=True, verbose=False, n_threads=2)
    try:
        m.eval(ids)
        ref = np.array(m.scores[: len(ids)], dtype=np.float32)
    finally:
        m.close()
    model = load_model(path, progress=False)
    try:
        ours = model.logits(ids)
    finally:
        model.close()
    assert np.isfinite(ref).all() and ref.std() > 0.1
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 0.02


def test_bad_synth_args(tmp_path, capsys):
    assert main(["synth", "--shape", "mixtral-8x7b", "--layers", "0", "-o", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "--layers must be between 1 and 32" in err and len(err.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)


def test_random_weights_route_almost_uniformly(one_layer_8x7b):
    """Zero-mean random weights: tokens spread over the experts (a biased synth made every token pick the same two)."""
    from lazymoe import load_model
    from lazymoe.benchmarks.routing import expert_load, repeated_assignment

    path, _ = one_layer_8x7b
    model = load_model(path, progress=False, ctx=64)
    try:
        model.net.trace = []
        model.logits([1] + [(97 * i + 13) % 32000 for i in range(47)])
        ids = np.concatenate(model.net.trace)                      # [48, 1, 2]
    finally:
        model.close()
    first, _ = repeated_assignment(ids)
    # random attention averages over the prompt, which still skews routing (seen: one expert at 37 %)
    assert expert_load(ids, 8).max() < 0.5 and (expert_load(ids, 8) > 0).sum() >= 6
    assert first[0] < 0.6


def test_synth_command_writes_a_llama_cpp_mix(tmp_path, capsys):
    from lazymoe.quantize.mixes import FTYPES
    path = str(tmp_path / "q4_k_m.gguf")
    assert main(["synth", "--shape", "mixtral-8x7b", "--layers", "1", "-t", "q4_k_m", "-o", path, "-q"]) == 0
    with GGUFFile(path) as g:
        assert g.get("general.file_type") == int(FTYPES["q4_k_m"][0])
        assert g.tensors["blk.0.ffn_gate_exps.weight"].type_name == "Q4_K"
        assert g.tensors["blk.0.attn_output.weight"].type_name == "Q5_K"
    assert main(["synth", "--shape", "mixtral-8x7b", "-t", "q9_k", "-o", path, "-f"]) == 2
    assert "q9_k" in capsys.readouterr().err


@pytest.mark.parametrize("ft, extra", [("q4_k_m", {}), ("q3_k_m", {}), ("q2_k", {}), ("q6_k", {}),
                                       ("q5_k_m", {"blk.0.attn_q.weight": "q4_1", "blk.1.attn_q.weight": "q5_0"})])
def test_llama_cpp_mixes(tmp_path, ft, extra):
    """synth lays tensors out as llama.cpp's quantizer would (quantize/mixes.py), with sane random blocks of
    every type; llama.cpp runs the file."""
    from lazymoe.format.config import ModelConfig
    from lazymoe.kernels.qtypes import qtype
    from lazymoe.quantize.convert import write_gguf
    from lazymoe.quantize.mixes import tensor_types
    from lazymoe.quantize.synth import synth_source
    cfg = ModelConfig(n_layer=4, n_embd=256, n_ff=512, n_head=4, n_head_kv=1, n_vocab=512, n_ctx_train=64,
                      rms_eps=1e-5, rope_theta=1e4, n_expert=8, n_expert_used=2)
    path = str(tmp_path / f"{ft}.gguf")
    write_gguf(synth_source(cfg, type_name=ft, types=extra), path, qtype("f32"), progress=False, file_type=ft)
    want = {**tensor_types(cfg, ft), **{n: t.upper() for n, t in extra.items()}}
    with GGUFFile(path) as g:
        assert {n: g.tensors[n].type_name.upper() for n in want} == want
        for n in ("blk.0.ffn_down_exps.weight", "blk.1.ffn_down_exps.weight", "blk.0.attn_output.weight", "output.weight",
                  *extra):
            info = g.tensors[n]
            w = gguf.quants.dequantize(g.raw(n), info.ggml_type)
            assert np.isfinite(w).all() and 0.01 < w.std() < 0.04 and abs(w.mean()) < 0.005, n
    llama_cpp = pytest.importorskip("llama_cpp")
    m = llama_cpp.Llama(path, n_ctx=16, n_batch=16, logits_all=True, verbose=False, n_threads=2)
    try:
        m.eval([1, 300, 400])
        assert np.isfinite(np.array(m.scores[:3], dtype=np.float32)).all()
    finally:
        m.close()


@pytest.mark.parametrize("shape,D,F,hd,H,L", [("qwen3-30b-a3b", 2048, 768, 128, 32, 48),
                                               ("qwen3-235b-a22b", 4096, 1536, 128, 64, 94)])
def test_qwen3_shapes(shape, D, F, hd, H, L):
    """The Qwen3-MoE shapes are qwen3moe with the Hugging Face configs' sizes (head_dim 128 != D / H, 128 experts,
    8 used), in llama.cpp's Q4_K_M mix; written without building a file."""
    from lazymoe.quantize.synth import synth_source
    src = synth_source(shape, layers=1, type_name="q4_k_m")
    cfg, md = src.config, src.metadata
    assert (cfg.arch, cfg.n_layer, cfg.n_embd, cfg.n_ff, cfg.head_dim, cfg.n_expert, cfg.n_expert_used) == \
        ("qwen3moe", 1, D, F, hd, 128, 8)
    assert md["general.architecture"] == "qwen3moe" and md["qwen3moe.attention.key_length"] == hd
    assert md["qwen3moe.expert_feed_forward_length"] == F and md["qwen3moe.attention.head_count"] == H
    shapes = {p.name: p.shape for p in src.tensors}
    assert shapes["blk.0.attn_q.weight"] == (H * hd, D) and shapes["blk.0.attn_k_norm.weight"] == (hd,)
    assert shapes["blk.0.ffn_gate_exps.weight"] == (128, F, D) and shapes["token_embd.weight"] == (151936, D)
    types = {p.name: p.stored.name for p in src.tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == "q4_k" and types["blk.0.ffn_down_exps.weight"] == "q6_k"
    from lazymoe.quantize.synth import SHAPES
    assert SHAPES[shape].n_layer == L


@pytest.mark.parametrize("name", sorted(QTYPES))
def test_random_rows_of_every_type_have_the_weight_std(name):
    """Every type the runtime computes on (the fuzzer's seed files use each for every matrix) gets weights of std
    ~WEIGHT_STD and mean ~0, as gguf dequantizes them: BF16's were all 0 (a cast of the floats to its uint16 bits)
    and IQ4_XS had no random blocks."""
    from gguf.quants import dequantize

    from lazymoe.quantize.synth import WEIGHT_STD, _random_rows
    qt = QTYPES[name]
    w = _random_rows(qt, 64, 512, np.random.default_rng(0))
    assert w.dtype == qt.dtype and w.shape == qt.storage_shape((64, 512))
    wd = w.astype(np.float64) if name in ("f32", "f16") else dequantize(w.view(np.uint8), qt.ggml).astype(np.float64)
    assert abs(wd.std() / WEIGHT_STD - 1) < 0.1 and abs(wd.mean()) < 0.1 * WEIGHT_STD


@pytest.mark.parametrize("ft, expert", [("q4_k_m", "q2_k"), ("q4_k_m", "q3_k"), ("q4_0", "q2_k")])
def test_expert_type(tmp_path, ft, expert):
    """synth --expert-type lays tensors out as `quantize --expert-type` plans them (quantize/mixes.choose_types,
    held against llama-quantize --tensor-type _exps=T in test_mixes); the expert blocks are sane."""
    from lazymoe.format.config import ModelConfig
    from lazymoe.kernels.qtypes import qtype
    from lazymoe.quantize.convert import write_gguf
    from lazymoe.quantize.mixes import choose_types, is_expert
    from lazymoe.quantize.synth import synth_source
    cfg = ModelConfig(n_layer=4, n_embd=256, n_ff=512, n_head=4, n_head_kv=1, n_vocab=512, n_ctx_train=64,
                      rms_eps=1e-5, rope_theta=1e4, n_expert=8, n_expert_used=2)
    path = str(tmp_path / f"{ft}-{expert}.gguf")
    write_gguf(synth_source(cfg, type_name=ft, expert_type=expert), path, qtype("f32"), progress=False, file_type=ft)
    with GGUFFile(path) as g:
        got = {n: t.type_name.upper() for n, t in g.tensors.items()}
        assert {t for n, t in got.items() if is_expert(n)} == {expert.upper()}
        if ft == "q4_k_m":
            plan = choose_types(cfg, [(n, s, False) for n, s in cfg.tensor_shapes().items()], ft, expert_type=expert)
            assert got == plan.types
        else:
            assert {t for n, t in got.items() if not is_expert(n) and t != "F32"} == {"Q4_0"}
        w = gguf.quants.dequantize(g.raw("blk.1.ffn_down_exps.weight"), g.tensors["blk.1.ffn_down_exps.weight"].ggml_type)
        assert np.isfinite(w).all() and 0.01 < w.std() < 0.04 and abs(w.mean()) < 0.005


def test_expert_type_refused_in_one_line(tmp_path, capsys):
    out = str(tmp_path / "x.gguf")
    assert main(["synth", "--shape", "mixtral-8x7b", "--layers", "1", "-t", "q4_k_m", "--expert-type", "q4_k_m",
                 "-o", out]) == 2
    err = capsys.readouterr().err
    assert "--expert-type" in err and "not a block type" in err and "Traceback" not in err
    assert not os.path.exists(out)
