"""Quantization quality of the demo model, measured with lazymoe's own runtime.

    python -m lazymoe.benchmarks.train_demo --out DIR          # once: writes DIR/hf (the float checkpoint)
    python -m lazymoe.benchmarks.quality DIR/hf [--tokens 16384] [--json]

Converts the float checkpoint to F32, Q8_0, our Q4_0 (error-minimising scales) and the
reference Q4_0 (gguf.quants.quantize, i.e. llama.cpp's quantize_row_q4_0_ref), runs each
over the held-out text (the standard-library files train_demo.py held out) in windows of
WINDOW tokens, and reports what llama.cpp's `perplexity --kl-divergence` reports:
perplexity, mean KL divergence from F32's next-token distribution, and top-1 agreement
with F32.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

WINDOW = 256


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[T, V] float -> float64 log-probabilities."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def window_stats(logits: np.ndarray, ids: np.ndarray, ref_logits: np.ndarray | None = None) -> dict:
    """Sums over one window: logits [T, V] predict ids[1:]; ref_logits are F32's for the same window.

    Returns nll (sum of -log p(next)), n (predictions), kl (sum of KL(ref || this)), top1 (agreements)."""
    lp = log_softmax(logits[:-1])                                       # [T-1, V]
    out = {"nll": float(-lp[np.arange(len(ids) - 1), ids[1:]].sum()), "n": len(ids) - 1, "kl": 0.0, "top1": 0}
    if ref_logits is not None:
        rp = log_softmax(ref_logits[:-1])
        out["kl"] = float((np.exp(rp) * (rp - lp)).sum())
        out["top1"] = int((rp.argmax(-1) == lp.argmax(-1)).sum())
    return out


def summarize(stats: list[dict]) -> dict:
    n = sum(s["n"] for s in stats)
    return {"ppl": float(np.exp(sum(s["nll"] for s in stats) / n)), "kl": sum(s["kl"] for s in stats) / n,
            "top1": sum(s["top1"] for s in stats) / n, "predictions": n}


def held_out_ids(tokenizer, n_tokens: int) -> np.ndarray:
    from lazymoe.benchmarks.train_demo import read, source_files

    _, held = source_files()
    ids: list[int] = []
    for p in held:
        ids.extend(tokenizer.encode(read(p), bos=True))
        if len(ids) >= n_tokens:
            break
    return np.asarray(ids[:n_tokens], dtype=np.int64)


def reference_q4_0(rows: np.ndarray, qt) -> np.ndarray:
    """llama.cpp's reference quantizer for Q4_0 rows; lazymoe's for every other type."""
    import gguf

    from lazymoe.kernels.quantizers import quantize
    if qt.name == "q4_0":
        return gguf.quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), gguf.GGMLQuantizationType.Q4_0)
    return quantize(rows, qt)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="the demo model's Hugging Face folder (train_demo.py --out DIR writes DIR/hf)")
    ap.add_argument("--tokens", type=int, default=16384, help="held-out tokens to evaluate (default 16384)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from lazymoe import load_model
    from lazymoe.quantize.convert import convert

    variants = {"F32": ("f32", None), "Q8_0": ("q8_0", None), "Q4_0 (lazymoe)": ("q4_0", None),
                "Q4_0 (llama.cpp reference)": ("q4_0", reference_q4_0)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, (t, fn) in variants.items():
            paths[name] = os.path.join(tmp, f"{len(paths)}.gguf")
            convert(a.checkpoint, paths[name], t, progress=False, quantize_fn=fn)
        ref_logits: list[np.ndarray] = []
        for name, path in paths.items():
            model = load_model(path, progress=False, ctx=WINDOW)
            try:
                ids = held_out_ids(model.tokenizer, a.tokens)
                stats = []
                for k, s in enumerate(range(0, len(ids) - 1, WINDOW)):
                    w = ids[s:s + WINDOW]
                    if len(w) < 2:
                        break
                    logits = model.logits(w)
                    if name == "F32":
                        ref_logits.append(logits)
                    stats.append(window_stats(logits, w, ref_logits[k]))
            finally:
                model.close()
            results[name] = {**summarize(stats), "bytes": os.path.getsize(path)}
    if a.json:
        print(json.dumps(results))
        return 0
    print(f"{'weights':28} {'MiB':>6} {'perplexity':>11} {'KL vs F32':>10} {'top-1 = F32':>12}")
    for name, r in results.items():
        print(f"{name:28} {r['bytes'] / 2**20:6.1f} {r['ppl']:11.4f} {r['kl']:10.5f} {100 * r['top1']:11.2f}%")
    print(f"({results['F32']['predictions']} held-out predictions in windows of {WINDOW} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
