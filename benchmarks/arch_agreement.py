"""lazymoe against llama.cpp on the real shapes of each architecture: a few layers of random weights in one of
llama.cpp's file types (quantize/synth.py, the types llama.cpp's quantizer would choose), the logits of both engines
on the same ids. Needs llama-cpp-python (the `bench` extra).

    python -m lazymoe.benchmarks.arch_agreement [--layers 2] [-t q4_k_m] [--dir DIR] [ARCH ...]

Prints, per architecture, max and mean |lazymoe - llama.cpp| relative to llama.cpp's largest |logit| and the top-1
agreement. Random weights: the routers choose almost uniformly, so this checks the shapes, names and arithmetic,
not a trained model's quality.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from lazymoe.format.config import ModelConfig

# The models' own config.json values (Qwen3-30B-A3B, Qwen1.5-MoE-A2.7B, OLMoE-1B-7B-0924) with their full layer counts.
SHAPES = {
    "qwen3moe": ModelConfig(n_layer=48, n_embd=2048, n_ff=768, n_head=32, n_head_kv=4, n_vocab=151936,
                            n_ctx_train=40960, rms_eps=1e-6, rope_theta=1e6, n_expert=128, n_expert_used=8,
                            arch="qwen3moe", n_embd_head=128),
    "qwen2moe": ModelConfig(n_layer=24, n_embd=2048, n_ff=1408, n_head=16, n_head_kv=16, n_vocab=151936,
                            n_ctx_train=8192, rms_eps=1e-6, rope_theta=1e6, n_expert=60, n_expert_used=4,
                            arch="qwen2moe", n_ff_shexp=5632),
    "olmoe": ModelConfig(n_layer=16, n_embd=2048, n_ff=1024, n_head=16, n_head_kv=16, n_vocab=50304, n_ctx_train=4096,
                         rms_eps=1e-5, rope_theta=1e4, n_expert=64, n_expert_used=8, arch="olmoe"),
}
IDS = (1, 500, 7000, 151000, 42, 9, 123, 88)


def agreement(arch: str, layers: int, ftype: str, folder: str) -> dict:
    """Write `layers` layers of SHAPES[arch] in `ftype` under folder, run both engines, remove the file."""
    import llama_cpp

    from lazymoe.kernels.qtypes import qtype
    from lazymoe.quantize.convert import write_gguf
    from lazymoe.quantize.synth import synth_source
    from lazymoe.runtime.model import load_model
    cfg = SHAPES[arch]
    path = os.path.join(folder, f"{arch}-{layers}l-{ftype}.gguf")
    src = synth_source(cfg, layers=layers, type_name=ftype, seed=3)
    write_gguf(src, path, qtype("f32") if "_k" in ftype else qtype(ftype), force=True, progress=False, file_type=ftype)
    ids = [i % cfg.n_vocab for i in IDS]
    try:
        m = llama_cpp.Llama(path, n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2)
        try:
            m.eval(ids)
            ref = np.array(m.scores[:len(ids)], dtype=np.float32)           # [T, V]
        finally:
            m.close()
        model = load_model(path, ctx=64, progress=False)
        try:
            got = model.logits(ids)                                         # [T, V]
        finally:
            model.close()
    finally:
        os.unlink(path)
    scale = float(np.abs(ref).max())
    d = np.abs(got - ref)
    return {"arch": arch, "layers": layers, "ftype": ftype, "max_rel": float(d.max()) / scale,
            "mean_rel": float(d.mean()) / scale, "top1": float((got.argmax(1) == ref.argmax(1)).mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("archs", nargs="*", default=list(SHAPES), help=f"of {', '.join(SHAPES)} (default all)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("-t", "--type", default="q4_k_m", help="a type or llama.cpp file type (default q4_k_m)")
    ap.add_argument("--dir", default=None, help="where the temporary files go (default: the system's temp folder)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    for arch in a.archs:
        if arch not in SHAPES:
            ap.error(f"unknown architecture {arch!r}; expected one of {', '.join(SHAPES)}")
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        for arch in a.archs:
            r = agreement(arch, a.layers, a.type, tmp)
            print(json.dumps(r) if a.json else f"{arch:9} {a.layers} layers {a.type}: max {r['max_rel']:.1e}, "
                  f"mean {r['mean_rel']:.1e} of llama.cpp's scale, top-1 {r['top1']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
