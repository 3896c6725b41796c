"""The cost of an expert call on a fine-grained MoE (Qwen3-30B-A3B: 8 of 128 experts of 2048 x 768 per layer).

With every expert resident (no reads), for one decoding token, each layer's routed experts are timed three ways,
interleaved, on the same hidden states:
  * per-expert: the loop before grouping (cache.get, kernels.expert_ffn, unpin per expert: Network.grouped False);
  * grouped: one grouped kernel call per layer (cache.acquire, kernels/grouped.py, combine, release);
  * floor: the same bytes in one call, no routing or cache: expert_ffn on one expert A times as wide.
The overhead per expert call is (path - floor) / A; its share of a token is that times A x L over the token's time
(a whole decode step, measured too). The cache's bookkeeping alone (acquire/release and get/unpin on resident
experts, want, the policy) is timed separately.

    python -m lazymoe.benchmarks.finegrained MODEL.gguf [--trials 7] [--json out.json]

MODEL: e.g. `lazymoe synth --shape qwen3-30b-a3b --layers 4 -t q4_k_m -o q3-4L.gguf`.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--trials", type=int, default=7, help="timed rounds (median reported)")
    ap.add_argument("--tokens", type=int, default=8, help="decode steps timed per round for the whole-token figure")
    ap.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)

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
    res = {k: [] for k in ("grouped", "per_expert", "floor", "book_grouped", "book_per_expert", "token_grouped",
                           "token_per_expert")}
    for _ in range(args.trials):                                        # interleaved rounds
        res["grouped"].append(_median_us(lambda: layers(True), 3) / L)
        res["per_expert"].append(_median_us(lambda: layers(False), 3) / L)
        res["floor"].append(_median_us(floor, 3) / L)
        res["book_grouped"].append(_median_us(book_grouped, 3) / L)
        res["book_per_expert"].append(_median_us(book_per_expert, 3) / L)
        res["token_grouped"].append(_median_us(lambda: token(True), 1) / args.tokens)
        res["token_per_expert"].append(_median_us(lambda: token(False), 1) / args.tokens)
    Network.grouped = True
    med = {k: float(np.median(v)) for k, v in res.items()}
    out = {"model": args.model, "layers": L, "experts": E, "used": A, "machine": machine_info(), "trials": args.trials,
           "us_per_layer": med,
           "overhead_us_per_expert_call": {k: (med[k] - med["floor"]) / A for k in ("grouped", "per_expert")},
           "bookkeeping_us_per_expert_call": {"grouped": med["book_grouped"] / A,
                                              "per_expert": med["book_per_expert"] / A},
           "overhead_share_of_token": {k: (med[k] - med["floor"]) * L / med["token_" + k] for k in ("grouped", "per_expert")},
           "hit_rate": cache.counters()["hit_rate"]}
    print(f"{args.model}: {L} layers, {A} of {E} experts, median of {args.trials} interleaved rounds")
    print(f"{'':16}{'us/layer':>10}{'overhead us/expert':>20}{'bookkeeping us/expert':>23}{'token ms':>10}{'overhead share':>16}")
    for k in ("per_expert", "grouped"):
        print(f"{k:16}{med[k]:10.0f}{out['overhead_us_per_expert_call'][k]:20.1f}"
              f"{out['bookkeeping_us_per_expert_call'][k]:23.1f}{med['token_' + k] / 1e3:10.1f}"
              f"{out['overhead_share_of_token'][k]:16.1%}")
    print(f"{'floor':16}{med['floor']:10.0f}   (the same bytes in one expert_ffn call)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
