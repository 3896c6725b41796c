"""The generation loop: prompt in one pass, then one token at a time, with stats."""
from __future__ import annotations

import time

import numpy as np
import psutil

from lazymoe.runtime.sampling import Sampler, StopStrings

MB = 1e6


def _counters(model) -> dict:
    c = {"hits": 0, "misses": 0, "evictions": 0, "bytes_read": 0, "resident_bytes": 0, "prefetch_issued": 0,
         "prefetch_useful": 0, "prefetch_bytes": 0, "wait_s": 0.0,
         "read_s": 0.0}
    if model.experts is not None:
        c.update(model.experts.counters())
    c["predicted"], c["predicted_right"] = getattr(model, "predicted", 0), getattr(model, "predicted_right", 0)
    return c


def generate(model, ids: list[int], sampler: Sampler, max_tokens: int, stop=(), reuse: bool = False):
    """Check the request, then return a generator of text pieces continuing ids.

    reuse: keep the longest prefix of ids already in the KV cache and process only the rest.
    When the generator ends, model.stats holds the run's figures and model.generated_ids its tokens.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a whole number >= 1, got {max_tokens!r}")
    stops = StopStrings(stop)
    ids = [int(t) for t in model.check_ids(ids)]
    if len(ids) + max_tokens > model.ctx:
        raise ValueError(f"the prompt ({len(ids)} tokens) plus {max_tokens} new tokens do not fit the context "
                         f"of {model.ctx} tokens; raise ctx or lower max_tokens")
    common = 0
    if reuse:
        for a, b in zip(model.tokens, ids[:-1]):     # at least one token must be fed to get logits
            if a != b:
                break
            common += 1
    return _run(model, ids, common, sampler, int(max_tokens), stops)


def _run(model, ids, common, sampler, max_tokens, stops):
    tok_eos = model.tokenizer.eos_id
    dec = model.tokenizer.stream()
    c0 = _counters(model)
    model.rewind(common)
    t0 = time.perf_counter()
    n_gen = n_dec = 0
    t_prompt = t_dec = ttft = 0.0
    c1 = c0
    reason = "length"
    hist = list(ids)
    try:
        logits = model.eval(ids[common:])
        t_prompt = time.perf_counter() - t0
        c1 = _counters(model)
        while True:
            tok = sampler.sample(logits, hist)
            if n_gen == 0:
                ttft = time.perf_counter() - t0
            if tok == tok_eos:
                reason = "eos"
                break
            n_gen += 1
            hist.append(tok)
            text, stopped = stops.push(dec.feed(tok))
            if text:
                yield text
            if stopped:
                reason = "stop"
                break
            if n_gen >= max_tokens:
                break
            t1 = time.perf_counter()
            logits = model.eval([tok])
            t_dec += time.perf_counter() - t1
            n_dec += 1
        if reason != "stop":
            text, _ = stops.push(dec.flush())
            text += stops.flush()
            if text:
                yield text
    finally:
        c2 = _counters(model)
        acc_dec = (c2["hits"] - c1["hits"]) + (c2["misses"] - c1["misses"])
        acc_all = (c2["hits"] - c0["hits"]) + (c2["misses"] - c0["misses"])
        model.generated_ids = hist[len(ids):]
        n_prompt = len(ids) - common
        model.stats = {
            "prompt_tokens": n_prompt,
            "prompt_tokens_cached": common,
            "generated_tokens": n_gen,
            "stop_reason": reason,
            "prompt_tok_per_s": n_prompt / t_prompt if t_prompt else 0.0,
            "gen_tok_per_s": n_dec / t_dec if t_dec else 0.0,
            "time_to_first_token_s": ttft,
            "prompt_s": t_prompt,
            "gen_s": t_dec,
            "hit_rate": (c2["hits"] - c0["hits"]) / acc_all if acc_all else 0.0,
            "gen_hit_rate": (c2["hits"] - c1["hits"]) / acc_dec if acc_dec else 0.0,
            "expert_hits": c2["hits"] - c0["hits"],
            "expert_misses": c2["misses"] - c0["misses"],
            "expert_evictions": c2["evictions"] - c0["evictions"],
            "mb_read_prompt": (c1["bytes_read"] - c0["bytes_read"]) / MB,
            "mb_read_per_token": (c2["bytes_read"] - c1["bytes_read"]) / MB / n_dec if n_dec else 0.0,
            "expert_cache_bytes": c2["resident_bytes"],
            "prefetch_issued": c2["prefetch_issued"] - c0["prefetch_issued"],
            "prefetch_useful": c2["prefetch_useful"] - c0["prefetch_useful"],
            "prefetch_recall": ((c2["predicted_right"] - c0["predicted_right"]) / (c2["predicted"] - c0["predicted"])
                                if c2["predicted"] > c0["predicted"] else 0.0),
            "mb_prefetched_per_token": (c2["prefetch_bytes"] - c1["prefetch_bytes"]) / MB / n_dec if n_dec else 0.0,
            "expert_wait_s": c2["wait_s"] - c0["wait_s"],
            "gen_expert_wait_s": c2["wait_s"] - c1["wait_s"],
            "gen_read_s": c2["read_s"] - c1["read_s"],                    # the reader's busy time while decoding
            "prefetch_depth": getattr(model, "prefetch_depth", None),
            "rss_bytes": psutil.Process().memory_info().rss,
            "peak_rss_bytes": _peak(),
            "ram_budget_bytes": model.plan.budget,
        }


def _peak() -> int:
    from lazymoe.runtime.memory import peak_rss
    return peak_rss()
