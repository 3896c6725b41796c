"""Quantization quality of the demo model: lazymoe's quantizer beside llama.cpp's, measured with lazymoe's runtime.

    python -m lazymoe.benchmarks.train_demo --out DIR          # once: writes DIR/hf (the float checkpoint)
    python -m lazymoe.benchmarks.quality DIR/hf [--tokens 16384] [--types q4_k_m,q2_k] [--no-imatrix] [--json]

Converts the float checkpoint to F32 (the baseline) and, for every type, writes it twice: with `lazymoe quantize`
and with llama.cpp's quantizer (llama_model_quantize from llama-cpp-python on the same F32 file; `--pure` for the
plain types, whose lazymoe files are pure), each without and with an importance matrix; then the mixed files
(q4_k_m with Q3_K and with Q2_K experts: --expert-type, and llama-quantize's --tensor-type _exps=T). The
importance matrix is `lazymoe imatrix` on the F32 file over training text (the files train_demo.py trains on,
never the held-out ones), fed to both quantizers (llama.cpp's through llama-quantize's own loading steps,
benchmarks/llama_imatrix.py). Each file runs over the held-out text (the standard-library files train_demo.py
held out) in windows of WINDOW tokens, and the table is what llama.cpp's `perplexity --kl-divergence` reports:
perplexity, mean KL divergence from F32's next-token distribution, and top-1 agreement with F32.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

WINDOW = 256
TYPES = ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0", "q3_k_l", "q3_k_m",
         "q3_k_s", "q2_k")
MIXED = (("q4_k_m", "q3_k"), ("q4_k_m", "q2_k"))       # (file type, expert type)
CALIB_TOKENS = 16 * 512                                 # importance-matrix text: 16 chunks of llama-imatrix's 512


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


def calibration_text(path: str, tokenizer, n_tokens: int) -> None:
    """Training files (never the held-out ones) up to n_tokens, written to path."""
    from lazymoe.benchmarks.train_demo import read, source_files

    train, _ = source_files()
    parts, n = [], 0
    for p in train[::7]:                                  # spread over the library, not one package
        t = read(p)
        parts.append(t)
        n += len(tokenizer.encode(t, bos=False))
        if n >= n_tokens:
            break
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


def _llama_logits(path: str):
    """logits(ids) -> [T, V] with llama.cpp's runtime (llama-cpp-python), one fresh sequence per call."""
    import llama_cpp
    m = llama_cpp.Llama(path, n_ctx=WINDOW, n_batch=WINDOW, logits_all=True, verbose=False, n_threads=2)

    def logits(w):
        m.reset()
        m.eval([int(t) for t in w])
        return np.array(m.scores[:len(w)], dtype=np.float32)
    return logits, m.close


def evaluate(path: str, ids: np.ndarray, ref: list | None, runtime: str = "lazymoe") -> dict:
    """Perplexity / KL / top-1 of the model file over ids in windows, run by lazymoe's or llama.cpp's runtime;
    ref: F32's logits per window (filled when given empty)."""
    if runtime == "llama.cpp":
        run, close = _llama_logits(path)
    else:
        from lazymoe import load_model
        model = load_model(path, progress=False, ctx=WINDOW)
        run, close = model.logits, model.close
    stats = []
    try:
        for k, s in enumerate(range(0, len(ids) - 1, WINDOW)):
            w = ids[s:s + WINDOW]
            if len(w) < 2:
                break
            logits = run(w)
            if ref is not None and len(ref) <= k:
                ref.append(logits)
            stats.append(window_stats(logits, w, ref[k] if ref is not None else None))
    finally:
        close()
    return {**summarize(stats), "bytes": os.path.getsize(path)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="the demo model's Hugging Face folder (train_demo.py --out DIR writes DIR/hf)")
    ap.add_argument("--tokens", type=int, default=16384, help="held-out tokens to evaluate (default 16384)")
    ap.add_argument("--types", default=",".join(TYPES), help="file types to compare (default: all)")
    ap.add_argument("--no-imatrix", action="store_true", help="only the files without an importance matrix")
    ap.add_argument("--no-mixed", action="store_true", help="leave out the mixed-expert files")
    ap.add_argument("--runtime", choices=["lazymoe", "llama.cpp"], default="lazymoe",
                    help="which runtime computes the logits of every file (default lazymoe)")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    a = ap.parse_args(argv)
    from gguf import GGMLQuantizationType
    from tqdm import tqdm

    from lazymoe.benchmarks.llama_imatrix import llama_quantize, load_imatrix_ggml
    from lazymoe.commands.imatrix import compute_imatrix
    from lazymoe.quantize.convert import convert
    from lazymoe.quantize.mixes import FTYPES, is_mix
    from lazymoe.runtime.tokenizer import Tokenizer

    types = [t.strip().lower() for t in a.types.split(",") if t.strip()]
    for t in types:
        if t not in FTYPES:
            raise SystemExit(f"quality: unknown type {t!r}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        f32 = os.path.join(tmp, "f32.gguf")
        convert(a.checkpoint, f32, "f32", progress=False)
        from lazymoe.format.gguf_file import GGUFFile
        with GGUFFile(f32) as g:
            tok = Tokenizer.from_gguf_metadata(g.metadata, f32)
        ids = held_out_ids(tok, a.tokens)
        ref: list = []
        results["F32"] = evaluate(f32, ids, ref, a.runtime)
        imx, llama_imx = None, None
        if not a.no_imatrix:
            text = os.path.join(tmp, "calibration.txt")
            calibration_text(text, tok, CALIB_TOKENS)
            imx = os.path.join(tmp, "imatrix.gguf")
            print(compute_imatrix(f32, text, imx, ctx=512, progress=False), file=sys.stderr)
            llama_imx = load_imatrix_ggml(imx)[0]
        jobs = []                                          # (row name, writer)
        for t in types:
            jobs.append((f"{t.upper()} lazymoe", lambda o, t=t: convert(f32, o, t, progress=False)))
            jobs.append((f"{t.upper()} llama.cpp", lambda o, t=t: llama_quantize(f32, o, FTYPES[t][0], pure=not is_mix(t))))
            if imx:
                jobs.append((f"{t.upper()} lazymoe +imatrix", lambda o, t=t: convert(f32, o, t, progress=False, imatrix=imx)))
                jobs.append((f"{t.upper()} llama.cpp +imatrix",
                             lambda o, t=t: llama_quantize(f32, o, FTYPES[t][0], llama_imx, pure=not is_mix(t))))
        for ft, et in () if a.no_mixed else MIXED:
            over = [(r"_exps\.weight$", GGMLQuantizationType[et.upper()])]
            name = f"{ft.upper()}, {et.upper()} experts"
            jobs.append((f"{name} lazymoe", lambda o, ft=ft, et=et: convert(f32, o, ft, progress=False, expert_type=et)))
            jobs.append((f"{name} llama.cpp", lambda o, ft=ft, over=over: llama_quantize(f32, o, FTYPES[ft][0], overrides=over)))
            if imx:
                jobs.append((f"{name} lazymoe +imatrix", lambda o, ft=ft, et=et: convert(
                    f32, o, ft, progress=False, expert_type=et, imatrix=imx)))
                jobs.append((f"{name} llama.cpp +imatrix", lambda o, ft=ft, over=over: llama_quantize(
                    f32, o, FTYPES[ft][0], llama_imx, overrides=over)))
        for name, write in tqdm(jobs, unit="file", desc="quality"):
            path = os.path.join(tmp, "q.gguf")
            write(path)
            results[name] = evaluate(path, ids, ref, a.runtime)
            os.unlink(path)
            if a.json:                                     # after every file: a long run's results so far
                with open(a.json, "w") as f:
                    json.dump(results, f, indent=1)
    print(f"{'weights':40} {'MiB':>6} {'perplexity':>11} {'KL vs F32':>10} {'top-1 = F32':>12}")
    for name, r in results.items():
        print(f"{name:40} {r['bytes'] / 2**20:6.2f} {r['ppl']:11.4f} {r['kl']:10.5f} {100 * r['top1']:11.2f}%")
    print(f"({results['F32']['predictions']} held-out predictions in windows of {WINDOW} tokens, {a.runtime}'s runtime)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
