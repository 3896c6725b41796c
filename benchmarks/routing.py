"""Real routing: the demo model's expert choices on held-out text, and what they mean for a cache.

    python -m lazymoe.benchmarks.routing [--tokens 4096] [--trace-out FILE] [--slots 4,8,12,16,24] [--json]

Runs the packaged demo model (runtime/data, trained on Python source) over the held-out
standard-library files that benchmarks/train_demo.py kept out of training, records which
experts the router picks per token and layer (the same trace `lazymoe run --trace` writes),
and reports per layer:
- repeated assignment: how often a token's first-choice expert equals the previous token's
  (the Mixtral paper's figure; chance is 1/E = 12.5 % for 8 experts), and how often the two
  tokens share at least one of their top-2 experts (chance 1 - C(6,2)/C(8,2) = 46.4 %);
- expert load: the share of routed slots each expert takes (uniform is 12.5 %);
- hit rates of each cache policy at several cache sizes, replaying the trace as decoding
  (one token at a time), through benchmarks/policies.py's replay.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np


def repeated_assignment(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ids [T, L, A] -> (first choice equal to the previous token's [L], any shared expert [L])."""
    first = (ids[1:, :, 0] == ids[:-1, :, 0]).mean(axis=0)                                     # [L]
    shared = (ids[1:, :, :, None] == ids[:-1, :, None, :]).any(axis=(2, 3)).mean(axis=0)       # [L]
    return first, shared


def expert_load(ids: np.ndarray, n_expert: int) -> np.ndarray:
    """ids [T, L, A] -> share of routed slots per expert [L, E]."""
    L = ids.shape[1]
    load = np.zeros((L, n_expert))
    for layer in range(L):
        load[layer] = np.bincount(ids[:, layer].reshape(-1), minlength=n_expert) / ids[:, layer].size
    return load


def record(tokens: int) -> tuple[dict, np.ndarray]:
    """Route `tokens` held-out tokens through the demo model; (header, ids [T, L, A])."""
    from lazymoe import load_model
    from lazymoe.benchmarks.quality import WINDOW, held_out_ids
    from lazymoe.runtime import DEMO_MODEL

    model = load_model(DEMO_MODEL, progress=False, ctx=WINDOW)
    try:
        ids = held_out_ids(model.tokenizer, tokens)
        model.net.trace = []
        for s in range(0, len(ids), WINDOW):
            model.logits(ids[s:s + WINDOW])
        routes = np.concatenate(model.net.trace)                                                 # [T, L, A]
        cfg = model.cfg
        head = {"model": DEMO_MODEL, "n_layer": cfg.n_layer, "n_expert": cfg.n_expert, "n_expert_used": cfg.n_expert_used,
                "tokens": int(len(routes))}
    finally:
        model.close()
    return head, routes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens to route (default 4096)")
    ap.add_argument("--slots", default="4,8,12,16,24", help="cache sizes in experts for the policy replay")
    ap.add_argument("--trace-out", default=None, help="also write the trace (lazymoe trace format) here")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from lazymoe.benchmarks.policies import replay
    from lazymoe.runtime.expert_cache import POLICIES

    head, ids = record(a.tokens)
    if a.trace_out:
        from types import SimpleNamespace

        from lazymoe.runtime.trace import write_trace
        model = SimpleNamespace(path=head["model"], cfg=SimpleNamespace(**{k: head[k] for k in ("n_layer", "n_expert", "n_expert_used")}))
        write_trace(a.trace_out, model, [ids], 0)
    E, A = head["n_expert"], head["n_expert_used"]
    first, shared = repeated_assignment(ids)
    load = expert_load(ids, E)
    chance_shared = 1 - math.comb(E - A, A) / math.comb(E, A)
    decode = np.zeros(len(ids), bool)                    # replay as decoding: one token at a time
    slots = [int(s) for s in a.slots.split(",")]
    hits = {p: {n: replay(ids, decode, p, n) for n in slots} for p in POLICIES}
    out = {"tokens": int(len(ids)), "layers": head["n_layer"], "experts": E, "used": A,
           "first_choice_repeat": first.tolist(), "any_shared": shared.tolist(), "chance_first": 1 / E,
           "chance_shared": chance_shared, "load": load.tolist(),
           "hit_rate": {p: {n: r["gen_hits"] / r["gen_accesses"] for n, r in v.items()} for p, v in hits.items()}}
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"demo model, {len(ids)} held-out tokens, {head['n_layer']} layers, top-{A} of {E} experts")
    print(f"{'layer':>5} {'1st repeats':>12} {'shares one':>11}   expert load (% of routed slots; uniform {100 / E:.1f})")
    for layer in range(head["n_layer"]):
        print(f"{layer:>5} {100 * first[layer]:11.1f}% {100 * shared[layer]:10.1f}%   "
              + " ".join(f"{100 * x:4.1f}" for x in load[layer]))
    print(f"chance: {100 / E:.1f}% and {100 * chance_shared:.1f}%")
    print(f"decoding hit rate by cache size (of {head['n_layer'] * E} experts)")
    print(f"{'slots':>6} " + " ".join(f"{p:>7}" for p in POLICIES))
    for n in slots:
        print(f"{n:>6} " + " ".join(f"{100 * out['hit_rate'][p][n]:6.1f}%" for p in POLICIES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
