"""Replay routing traces through each expert-cache policy and print hit rates per cache size.

    python -m lazymoe.benchmarks.policies TRACE.jsonl [TRACE ...] --slots 8,16,32 [--json]

Traces come from `lazymoe run --trace FILE` (format in runtime/trace.py). Each trace is replayed from an
empty cache in the order the runtime asks for experts: prompt tokens in chunks of N_BATCH, each layer's
experts for the chunk in increasing id; then one generated token at a time, each layer's A experts in
increasing id. While a layer runs, its own remaining experts are pinned, as in the runtime. Hit rates are
reported over generated tokens (what decoding speed depends on) and over all accesses.
Traces from random-weight models route almost uniformly: their hit rates are a lower bound.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from lazymoe.runtime.expert_cache import POLICIES, make_policy
from lazymoe.runtime.memory import N_BATCH
from lazymoe.runtime.trace import read_trace


def accesses(ids: np.ndarray, is_prompt: np.ndarray):
    """Yield (generated, layer, [experts in the order asked]) for a trace ids [T, L, A]."""
    n_prompt = int(is_prompt.sum())
    steps = [ids[c:min(c + N_BATCH, n_prompt)] for c in range(0, n_prompt, N_BATCH)]
    steps += [ids[t:t + 1] for t in range(n_prompt, len(ids))]
    for s, step in enumerate(steps):
        gen = s >= len(steps) - (len(ids) - n_prompt)
        for layer in range(ids.shape[1]):
            yield gen, layer, np.unique(step[:, layer]).tolist()


def replay(ids: np.ndarray, is_prompt: np.ndarray, policy, n_slots: int) -> dict:
    """Hits and accesses of one trace through `policy` (a name or object) with n_slots slots."""
    pol = make_policy(policy, n_slots, ids.shape[1])
    resident: set = set()
    c = {"hits": 0, "accesses": 0, "gen_hits": 0, "gen_accesses": 0}
    for gen, layer, experts in accesses(ids, is_prompt):
        for i, e in enumerate(experts):
            key = (layer, e)
            hit = key in resident
            if not hit:
                if len(resident) >= n_slots:
                    ahead = {(layer, x) for x in experts[i + 1:]} & resident   # pinned: this layer still needs them
                    old = pol.victim(key, ahead)
                    if old is None:
                        old = pol.victim(key, ())
                    pol.forget(old)
                    resident.discard(old)
                resident.add(key)
            pol.touch(key)
            c["hits"] += hit
            c["accesses"] += 1
            if gen:
                c["gen_hits"] += hit
                c["gen_accesses"] += 1
    return c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("traces", nargs="+", metavar="TRACE", help="trace files from lazymoe run --trace")
    ap.add_argument("--slots", default="8,16,32,64", help="cache sizes in experts, comma-separated")
    ap.add_argument("--policies", default=",".join(POLICIES), help="policies to compare (default all)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    try:
        slots = [int(s) for s in args.slots.split(",")]
        if min(slots) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --slots must be positive whole numbers separated by commas, got {args.slots!r}", file=sys.stderr)
        return 2
    names = args.policies.split(",")
    try:
        traces = [read_trace(t) for t in args.traces]
        for n in names:
            make_policy(n, 1, 1)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_experts = max(h["n_layer"] * h["n_expert"] for h, _, _ in traces)
    rows = []
    for n_slots in slots:
        for name in names:
            tot = {"hits": 0, "accesses": 0, "gen_hits": 0, "gen_accesses": 0}
            for _, ids, prompt in traces:
                for k, v in replay(ids, prompt, name, n_slots).items():
                    tot[k] += v
            rows.append({"slots": n_slots, "policy": name, **tot,
                         "hit_rate": tot["hits"] / tot["accesses"] if tot["accesses"] else 0.0,
                         "gen_hit_rate": tot["gen_hits"] / tot["gen_accesses"] if tot["gen_accesses"] else 0.0})
    if args.json:
        print(json.dumps({"traces": args.traces, "n_experts": n_experts, "rows": rows}))
        return 0
    print(f"{len(traces)} trace(s), {sum(len(i) for _, i, _ in traces)} tokens, {n_experts} experts in the model")
    print("generation hit rate (all accesses in brackets)")
    print(f"{'slots':>6} " + " ".join(f"{n:>15}" for n in names))
    for n_slots in slots:
        cells = [r for r in rows if r["slots"] == n_slots]
        print(f"{n_slots:>6} " + " ".join(f"{100 * r['gen_hit_rate']:6.1f}% ({100 * r['hit_rate']:4.1f}%)"
                                          for r in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
