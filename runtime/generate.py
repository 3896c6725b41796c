"""The generation loop: prompt in one pass, then one token at a time, yielding a Step per token.

Results are values: each Step carries the token, its text and the running stats; the last one carries
finish_reason ("eos", "stop" or "length") and the final stats. Nothing is written into the model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import psutil

from lazymoe.format.checks import whole_number
from lazymoe.runtime.memory import peak_rss
from lazymoe.runtime.sampling import Sampler, StopStrings

MB = 1e6


@dataclass(frozen=True)
class Step:
    """One decoded token. text: what it completes (may be empty: part of a character, or text held back in
    case it starts a stop string). On the last step finish_reason is set, text includes everything held back
    and stats are final; with finish_reason "eos" the token is the end-of-sequence id, not part of the output."""
    token: int
    text: str
    stats: dict
    finish_reason: str | None = None
    token_ids: tuple[int, ...] = ()      # on the last step: every generated id (eos excluded); else empty


def _counters(model) -> dict:
    c = {"hits": 0, "misses": 0, "evictions": 0, "bytes_read": 0, "resident_bytes": 0, "prefetch_issued": 0,
         "prefetch_useful": 0, "prefetch_bytes": 0, "wait_s": 0.0,
         "read_s": 0.0}
    if model.experts is not None:
        c.update(model.experts.counters())
    c["predicted"], c["predicted_right"] = model.net.predicted, model.net.predicted_right
    return c


def stream_generate(model, ids: list[int], sampler: Sampler, max_tokens: int, stop=(), reuse: bool = False):
    """Check the request, then return a generator of Steps continuing ids.

    reuse: keep the longest prefix of ids already in the KV cache and evaluate only the rest.
    """
    max_tokens = whole_number(max_tokens, "max_tokens", 1)
    stops = StopStrings(stop)
    ids = [int(t) for t in model.check_ids(ids)]
    if len(ids) + max_tokens > model.ctx:
        raise ValueError(f"the prompt ({len(ids)} tokens) plus {max_tokens} new tokens do not fit the context "
                         f"of {model.ctx} tokens; raise ctx or lower max_tokens")
    common = model.state.common_prefix(ids) if reuse else 0
    return _run(model, ids, common, sampler, max_tokens, stops)


class _Clock:
    """Counters and times of one generation, turned into its stats."""

    def __init__(self, model, n_prompt: int, common: int):
        self.model, self.n_prompt, self.common = model, n_prompt, common
        self.c0 = self.c1 = _counters(model)
        self.t0 = time.perf_counter()
        self.t_prompt = self.t_dec = self.ttft = 0.0
        self.n_gen = self.n_dec = 0

    def stats(self, reason: str | None) -> dict:
        c0, c1, c2 = self.c0, self.c1, _counters(self.model)
        n_dec = self.n_dec
        acc_dec = (c2["hits"] - c1["hits"]) + (c2["misses"] - c1["misses"])
        acc_all = (c2["hits"] - c0["hits"]) + (c2["misses"] - c0["misses"])
        return {
            "prompt_tokens": self.n_prompt,
            "prompt_tokens_cached": self.common,
            "generated_tokens": self.n_gen,
            "stop_reason": reason,
            "prompt_tok_per_s": self.n_prompt / self.t_prompt if self.t_prompt else 0.0,
            "gen_tok_per_s": n_dec / self.t_dec if self.t_dec else 0.0,
            "time_to_first_token_s": self.ttft,
            "prompt_s": self.t_prompt,
            "gen_s": self.t_dec,
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
            "prefetch_depth": self.model.net.prefetch_depth,
            "rss_bytes": psutil.Process().memory_info().rss,
            "peak_rss_bytes": peak_rss(),
            "ram_budget_bytes": self.model.plan.budget,
        }


def _run(model, ids, common, sampler, max_tokens, stops):
    eog = model.tokenizer.eog_ids          # eos and the end-of-turn tokens (<|im_end|>, <|eot_id|>)
    dec = model.tokenizer.stream()
    clock = _Clock(model, len(ids) - common, common)
    model.rewind(common)
    hist = list(ids)
    logits = model.eval(ids[common:])
    clock.t_prompt = time.perf_counter() - clock.t0
    clock.c1 = _counters(model)
    while True:
        tok = sampler.sample(logits, hist)
        if clock.n_gen == 0:
            clock.ttft = time.perf_counter() - clock.t0
        if tok in eog:
            text, _ = stops.push(dec.flush())
            yield Step(tok, text + stops.flush(), clock.stats("eos"), "eos", tuple(hist[len(ids):]))
            return
        clock.n_gen += 1
        hist.append(tok)
        text, stopped = stops.push(dec.feed(tok))
        reason = "stop" if stopped else "length" if clock.n_gen >= max_tokens else None
        if reason == "length":
            tail, _ = stops.push(dec.flush())
            text += tail + stops.flush()
        yield Step(tok, text, clock.stats(reason), reason, tuple(hist[len(ids):]) if reason else ())
        if reason:
            return
        t1 = time.perf_counter()
        logits = model.eval([tok])
        clock.t_dec += time.perf_counter() - t1
        clock.n_dec += 1


def collect(steps, on_text=None) -> tuple[str, Step]:
    """Run a stream of Steps to its end: (the whole text, the last Step with the final stats and token ids).
    on_text(piece) is called with each non-empty piece as it comes."""
    text, last = [], None
    for step in steps:
        last = step
        if step.text:
            text.append(step.text)
            if on_text is not None:
                on_text(step.text)
    return "".join(text), last
