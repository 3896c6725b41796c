"""The perplexity / KL / top-1 arithmetic of benchmarks/quality.py against a direct computation."""
import math

import numpy as np

from lazymoe.benchmarks.quality import summarize, window_stats


def test_window_stats_match_direct_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 11)).astype(np.float32) * 3
    ref = logits + rng.standard_normal((6, 11)).astype(np.float32)
    ids = rng.integers(0, 11, 6)
    p = np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum(1, keepdims=True)
    r = np.exp(ref.astype(np.float64)) / np.exp(ref.astype(np.float64)).sum(1, keepdims=True)
    nll = -sum(math.log(p[t, ids[t + 1]]) for t in range(5))
    kl = sum(float(np.sum(r[t] * np.log(r[t] / p[t]))) for t in range(5))
    top1 = sum(int(r[t].argmax() == p[t].argmax()) for t in range(5))
    s = window_stats(logits, ids, ref)
    assert s["n"] == 5 and s["top1"] == top1
    assert abs(s["nll"] - nll) < 1e-9 and abs(s["kl"] - kl) < 1e-9
    same = window_stats(ref, ids, ref)
    assert abs(same["kl"]) < 1e-12 and same["top1"] == 5
    total = summarize([s, same])
    assert abs(total["ppl"] - math.exp((s["nll"] + same["nll"]) / 10)) < 1e-9


def test_uniform_model_has_vocab_perplexity():
    ids = np.array([0, 3, 2, 1, 4])
    s = summarize([window_stats(np.zeros((5, 8), np.float32), ids)])
    assert abs(s["ppl"] - 8.0) < 1e-9
