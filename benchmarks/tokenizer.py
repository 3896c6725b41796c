"""Byte-level BPE speed and memory: lazymoe's tokenizer (runtime/bpe_tokenizer.py) against Hugging Face
`tokenizers` (Rust) in the same run, on the same vocabulary and text, checking the ids agree.

    python -m lazymoe.benchmarks.tokenizer [--trials 5] [--chars 200000] [--json]

- encode: Python standard-library source (code, the kind of long prompt a context fills with) through the
  committed Qwen2-style fixture (tests/fixtures/bpe-qwen2, 2,000 tokens): tokens/s with a cold word cache
  (the first prompt) and a warm one (text seen before), and `tokenizers`' tokens/s;
- load: a synthetic vocabulary of Qwen's size (151,000 tokens and as many merges, seeded): seconds to build each
  tokenizer from the tokens and merges, and lazymoe's RSS growth (psutil).
Medians of --trials; the ratio to `tokenizers` is the figure to compare across machines.
Needs `tokenizers` (the test extra).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import statistics
import sysconfig
import time

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "bpe-qwen2")


def _text(n_chars: int) -> str:
    paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    out, size = [], 0
    for p in paths:
        with open(p, encoding="utf-8", errors="ignore") as f:
            out.append(f.read())
        size += len(out[-1])
        if size >= n_chars:
            break
    return "".join(out)[:n_chars]


def encode_speed(trials: int, n_chars: int) -> dict:
    from tokenizers import Tokenizer as HF

    from lazymoe.quantize.hf_tokenizer import bpe_metadata
    from lazymoe.runtime.tokenizer import load_tokenizer
    hf = HF.from_file(os.path.join(FIXTURE, "tokenizer.json"))
    tok = load_tokenizer(bpe_metadata(FIXTURE, 2048))
    text = _text(n_chars)
    cold, warm, ref = [], [], []
    for _ in range(trials):
        tok._cache.clear()
        t0 = time.perf_counter()
        ids = tok.encode(text, bos=False)
        t1 = time.perf_counter()
        tok.encode(text, bos=False)
        t2 = time.perf_counter()
        want = hf.encode(text, add_special_tokens=False).ids
        t3 = time.perf_counter()
        if ids != want:
            raise SystemExit("tokenizer.py: lazymoe's ids differ from tokenizers' on the benchmark text")
        cold.append(t1 - t0)
        warm.append(t2 - t1)
        ref.append(t3 - t2)
    n = len(ids)
    m = statistics.median
    return {"chars": len(text), "tokens": n, "cold_tok_s": n / m(cold), "warm_tok_s": n / m(warm),
            "tokenizers_tok_s": n / m(ref), "cold_vs_tokenizers": m(ref) / m(cold)}


def load_cost(trials: int, n_tokens: int = 151_000) -> dict:
    import psutil
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    from lazymoe.format.tokens import NORMAL
    from lazymoe.runtime.bpe_tokenizer import _BYTE_CHAR, BPETokenizer
    rng = random.Random(0)
    tokens = [_BYTE_CHAR[b] for b in range(256)]
    seen, merges = set(tokens), []
    while len(tokens) < n_tokens:
        a, b = rng.choice(tokens), rng.choice(tokens[:5000])
        if a + b not in seen and len(a + b) < 16:
            seen.add(a + b)
            tokens.append(a + b)
            merges.append((a, b))
    joined = [f"{a} {b}" for a, b in merges]
    vocab = {t: i for i, t in enumerate(tokens)}
    ours, ref, rss = [], [], []
    for _ in range(trials):
        r0 = psutil.Process().memory_info().rss
        t0 = time.perf_counter()
        tok = BPETokenizer(tokens, [NORMAL] * len(tokens), joined, "qwen2", None, 0)
        t1 = time.perf_counter()
        rss.append(psutil.Process().memory_info().rss - r0)
        HF(models.BPE(vocab, merges))
        t2 = time.perf_counter()
        ours.append(t1 - t0)
        ref.append(t2 - t1)
        del tok
    m = statistics.median
    return {"tokens": len(tokens), "merges": len(merges), "load_s": m(ours), "tokenizers_load_s": m(ref),
            "rss_mib": max(rss) / 2**20}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--chars", type=int, default=200_000)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    a = ap.parse_args(argv)
    enc, load = encode_speed(a.trials, a.chars), load_cost(a.trials)
    if a.json:
        print(json.dumps({"encode": enc, "load": load}))
        return 0
    print(f"encode {enc['chars']} chars -> {enc['tokens']} tokens: lazymoe {enc['cold_tok_s']:,.0f} tok/s cold cache, "
          f"{enc['warm_tok_s']:,.0f} warm; tokenizers {enc['tokenizers_tok_s']:,.0f} tok/s "
          f"(lazymoe cold / tokenizers = {enc['cold_vs_tokenizers']:.2f})")
    print(f"load {load['tokens']} tokens + {load['merges']} merges: lazymoe {load['load_s']:.2f} s "
          f"(+{load['rss_mib']:.0f} MiB RSS), tokenizers {load['tokenizers_load_s']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
