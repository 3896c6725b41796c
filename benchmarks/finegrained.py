"""The cost of an expert call on a fine-grained MoE (Qwen3-30B-A3B: 8 of 128 experts of 2048 x 768 per layer).

With every expert resident (no reads), for one decoding token, each layer's routed experts are timed three ways,
interleaved, on the same hidden states:
  * per-expert: the loop before grouping (cache.get, kernels.expert_ffn, unpin per expert: Network.grouped False);
  * grouped: one grouped kernel call per layer (cache.acquire, kernels/grouped.py, combine, release);
  * floor: the same bytes in one call, no routing or cache: expert_ffn on one expert A times as wide.
The overhead per expert call is (path - router - floor) / A (the router's matvec and top-k are timed alone);
its share of a token is that times A x L over the token's time (a whole decode step, measured too). The cache's
bookkeeping alone (acquire/release and get/unpin on resident experts, want, the policy) is timed separately.

    python -m lazymoe.benchmarks.finegrained MODEL.gguf [--trials 7] [--json out.json]

MODEL: e.g. `lazymoe synth --shape qwen3-30b-a3b --layers 4 -t q4_k_m -o q3-4L.gguf`.

    python -m lazymoe.benchmarks.finegrained - --laptop qwen3-235b-a22b:10:24G

prints the --ram that gives a 10-layer file the share of its experts that a 24G budget gives all 94 layers.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _median_us(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e6


def wide_expert(parts, arena, at, A):
    """One expert A times as wide as a layer's experts, from A experts' bytes (gate and up rows stacked, down's
    columns side by side): the floor, the same bytes through one expert_ffn call. Values differ; the time is what counts."""
    (p1, p3, p2) = parts
    F, D = p1.shape
    g = np.concatenate([arena[o[0]:o[0] + p1.nbytes] for o in at]).view(p1.qt.dtype).reshape(p1.qt.storage_shape((A * F, D)))
    u = np.concatenate([arena[o[1]:o[1] + p3.nbytes] for o in at]).view(p3.qt.dtype).reshape(p3.qt.storage_shape((A * F, D)))
    rb = p2.qt.row_bytes(F)
    d = np.concatenate([arena[o[2]:o[2] + p2.nbytes].reshape(D, rb) for o in at], axis=1)
    return g, u, np.ascontiguousarray(d).view(p2.qt.dtype)


def share_budget(shape: str, layers: int, laptop_ram: str, ctx: int = 1024, type_name: str = "q4_k_m",
                 expert_type: str | None = None) -> dict:
    """The --ram that gives a `layers`-layer synth file of `shape` (`lazymoe synth -t type_name --expert-type
    expert_type`) the share of its experts in the cache that a `laptop_ram` budget gives the whole model
    (RESULTS.md's method for files the disk cannot hold whole)."""
    from lazymoe.kernels.qtypes import qtype
    from lazymoe.quantize.synth import synth_source
    from lazymoe.runtime.expert_cache import ExpertPart, slot_classes, slot_size
    from lazymoe.runtime.memory import PROCESS_ESTIMATE, fixed_bytes, parse_size, split_slots

    def plan(n: int):
        src = synth_source(shape, layers=n, type_name=type_name, expert_type=expert_type)
        cfg = src.config
        by = {t.name: t for t in src.tensors}
        parts = []
        for i in range(n):
            ts = [by[f"blk.{i}.ffn_{m}_exps.weight"] for m in ("gate", "up", "down")]
            parts.append(tuple(ExpertPart(t.stored, t.shape[1:], t.stored.nbytes(t.shape) // cfg.n_expert) for t in ts))
        resident = sum((t.stored or qtype("f32")).nbytes(t.shape) for t in src.tensors if "_exps" not in t.name)
        slots = [(slot_size(cp), len(ls)) for cp, ls in slot_classes(parts)]
        fixed = fixed_bytes(cfg, resident, ctx, PROCESS_ESTIMATE)
        return cfg, slots, fixed

    full_cfg, full_slots, full_fixed = plan(synth_source(shape).config.n_layer)
    room = parse_size(laptop_ram) - full_fixed
    n_full = split_slots(full_slots, room, full_cfg.n_expert, full_cfg.n_expert_used)
    share = sum(n_full) / (full_cfg.n_layer * full_cfg.n_expert)
    cfg, slots, fixed = plan(layers)
    want = round(share * layers * cfg.n_expert)
    avg = sum(b * n for b, n in slots) / layers                      # bytes of one slot, averaged over layers
    ram = fixed + int(want * avg) + (1 << 20)
    got = sum(split_slots(slots, ram - fixed, cfg.n_expert, cfg.n_expert_used))
    return {"shape": shape, "laptop_ram": laptop_ram, "full_slots": sum(n_full), "full_experts": full_cfg.n_layer * full_cfg.n_expert,
            "share": share, "layers": layers, "ram_bytes": ram, "slots": got, "experts": layers * cfg.n_expert,
            "full_fixed_bytes": full_fixed, "full_slot_bytes": [b for b, _ in full_slots],
            "type": type_name, "expert_type": expert_type}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--trials", type=int, default=7, help="timed rounds (median reported)")
    ap.add_argument("--tokens", type=int, default=8, help="decode steps timed per round for the whole-token figure")
    ap.add_argument("--json", default=None, help="also write the figures as JSON here")
    ap.add_argument("--laptop", default=None, metavar="SHAPE:LAYERS:RAM[:TYPE[:EXPERT_TYPE]]",
                    help="only print the --ram giving a LAYERS-layer synth file of SHAPE (-t TYPE, default q4_k_m; "
                         "--expert-type EXPERT_TYPE) the expert share that RAM gives the whole model (e.g. "
                         "qwen3-235b-a22b:10:24G, mixtral-8x22b:8:24G:q4_k_m:q2_k); MODEL is then ignored")
    args = ap.parse_args(argv)
    if args.laptop:
        shape, layers, ram, *types = args.laptop.split(":")
        print(json.dumps(share_budget(shape, int(layers), ram, type_name=(types or ["q4_k_m"])[0],
                                      expert_type=types[1] if len(types) > 1 else None)))
        return 0

    from lazymoe import kernels, load_model
    from lazymoe.benchmarks.machine import machine_info
    from lazymoe.runtime.network import Network, rmsnorm

    m = load_model(args.model, ram_budget=None, ctx=256, progress=False)
    net, cache, cfg = m.net, m.experts, m.cfg
    L, E, A = cfg.n_layer, cfg.n_expert, cfg.n_expert_used
    if cache.n_slots < L * E:
        raise SystemExit(f"{args.model}: {cache.n_slots} slots for {L * E} experts; this benchmark needs every expert "
                         f"resident (use a model with fewer layers: --layers of lazymoe synth)")
    for il in range(L):                                                 # every expert resident
        got, _ = cache.acquire(il, list(range(E)), wait_all=True)
        cache.release(il, list(range(E)))
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1, cfg.n_embd)).astype(np.float32) for _ in range(L)]
    hs = [rmsnorm(x, net.w.layers[il].ffn_norm, cfg.rms_eps) for il, x in enumerate(xs)]
    opts = net.options
    net.options = type(opts)(**{**opts.__dict__, "prefetch": False})   # reads none: every expert is resident

    def layers(grouped):
        Network.grouped = grouped
        for il in range(L):
            net._moe(il, net.w.layers[il], hs[il], xs[il], [])

    floors = []
    for il in range(L):
        top, _ = net._route(net.w.layers[il], hs[il])
        got, at = cache.acquire(il, sorted(top[0].tolist()), wait_all=True)
        cache.release(il, sorted(top[0].tolist()))
        p = net.w.expert_parts[il]
        g, u, d = wide_expert(p, cache.arena(il), at, A)
        floors.append((p, g, u, d))

    def route():
        for il in range(L):
            net._route(net.w.layers[il], hs[il])

    def floor():
        for il, (p, g, u, d) in enumerate(floors):
            kernels.expert_ffn(p[0].qt, g, p[1].qt, u, p[2].qt, d, hs[il][0])

    keys = [sorted(net._route(net.w.layers[il], hs[il])[0][0].tolist()) for il in range(L)]

    def book_grouped():
        for il in range(L):
            cache.want(il, keys[il])
            cache.acquire(il, keys[il])
            cache.release(il, keys[il])

    def book_per_expert():
        for il in range(L):
            cache.want(il, keys[il])
            for i, e in enumerate(keys[il]):
                if i:
                    cache.want(il, keys[il][i:])
                cache.get(il, e)
                cache.unpin(il, e)

    def token(grouped):
        Network.grouped = grouped
        m.rewind(0)
        for i in range(args.tokens):
            m.eval([10 + i])

    for f in (lambda: layers(True), lambda: layers(False), floor, lambda: token(True), lambda: token(False)):
        f()                                                             # compile, warm
    res = {k: [] for k in ("grouped", "per_expert", "floor", "route", "book_grouped", "book_per_expert", "token_grouped",
                           "token_per_expert")}
    for _ in range(args.trials):                                        # interleaved rounds
        res["grouped"].append(_median_us(lambda: layers(True), 3) / L)
        res["per_expert"].append(_median_us(lambda: layers(False), 3) / L)
        res["floor"].append(_median_us(floor, 3) / L)
        res["route"].append(_median_us(route, 3) / L)
        res["book_grouped"].append(_median_us(book_grouped, 3) / L)
        res["book_per_expert"].append(_median_us(book_per_expert, 3) / L)
        res["token_grouped"].append(_median_us(lambda: token(True), 1) / args.tokens)
        res["token_per_expert"].append(_median_us(lambda: token(False), 1) / args.tokens)
    Network.grouped = True
    med = {k: float(np.median(v)) for k, v in res.items()}
    out = {"model": args.model, "layers": L, "experts": E, "used": A, "machine": machine_info(), "trials": args.trials,
           "us_per_layer": med,
           "overhead_us_per_expert_call": {k: (med[k] - med["route"] - med["floor"]) / A for k in ("grouped", "per_expert")},
           "bookkeeping_us_per_expert_call": {"grouped": med["book_grouped"] / A,
                                              "per_expert": med["book_per_expert"] / A},
           "overhead_share_of_token": {k: (med[k] - med["route"] - med["floor"]) * L / med["token_" + k]
                                       for k in ("grouped", "per_expert")},
           "hit_rate": cache.counters()["hit_rate"]}
    print(f"{args.model}: {L} layers, {A} of {E} experts, median of {args.trials} interleaved rounds")
    print(f"{'':16}{'us/layer':>10}{'overhead us/expert':>20}{'bookkeeping us/expert':>23}{'token ms':>10}{'overhead share':>16}")
    for k in ("per_expert", "grouped"):
        print(f"{k:16}{med[k]:10.0f}{out['overhead_us_per_expert_call'][k]:20.1f}"
              f"{out['bookkeeping_us_per_expert_call'][k]:23.1f}{med['token_' + k] / 1e3:10.1f}"
              f"{out['overhead_share_of_token'][k]:16.1%}")
    print(f"{'floor':16}{med['floor']:10.0f}   (the same bytes in one expert_ffn call)")
    print(f"{'router':16}{med['route']:10.0f}   (in both paths' us/layer, not in their overhead)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
