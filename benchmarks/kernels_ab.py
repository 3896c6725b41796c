"""A/B of two kernel trees in one process: this checkout's lazymoe.kernels against another kernels/ folder.

    mkdir -p OLD && git archive main kernels | tar -x -C OLD     # the tree to compare against
    python -m lazymoe.benchmarks.kernels_ab OLD/kernels -n 15

The other folder (A) is imported as a second package next to this checkout's (B), and every trial
times A then B on the same inputs, so the per-trial time ratio A/B cancels the drift of a shared
machine; the table (stderr) prints its median and quartiles: above 1, B is faster. Weights cycle
through a pool of distinct matrices (--pool-mib; larger than the last-level cache, so from DRAM).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import numpy as np

from lazymoe.benchmarks.kernels import make_pool, matrices

SHAPES = [(14336, 4096), (4096, 14336)]                 # Mixtral-8x7B w1/w3 and w2: [rows, cols]
FLOAT_SHAPE = (4096, 4096)
TOKENS = [2, 5, 16, 64, 256]                            # int tiles and their edges, and dequantize + sgemm


def load_other(folder: str):
    """Import the kernels package in folder under the name lazymoe_kernels_other."""
    name = "lazymoe_kernels_other"
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _time(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def ab(fa, fb, args, trials: int) -> dict:
    """Per-trial time ratio a / b (> 1: b is faster) of fa(*args) and fb(*args), called alternately."""
    fa(*args), fb(*args)
    ra, ta, tb = [], [], []
    for _ in range(trials):
        a, b = _time(fa, *args), _time(fb, *args)
        ta.append(a), tb.append(b), ra.append(a / b)
    q = statistics.quantiles(ra, n=4) if trials > 1 else [ra[0]] * 3
    return {"a_ms": statistics.median(ta) * 1e3, "b_ms": statistics.median(tb) * 1e3,
            "speedup": statistics.median(ra), "q1": q[0], "q3": q[2]}


# weight types go by name (each package has its own QType class)

def _matvecs(K, qt, ws, x, y):
    for w in ws:
        K.matvec(qt, w, x, y)


def _ffns(K, qt, experts, x):
    for w1, w3, w2 in experts:
        K.expert_ffn(qt, w1, qt, w3, qt, w2, x)


def run(A, B, pool_mib: int, trials: int, types: list[str]) -> list[dict]:
    rng = np.random.default_rng(1)
    pool = make_pool(pool_mib << 20)
    rows_out = []

    def add(what, name, shape, r):
        rows_out.append({"what": what, "type": name, "shape": shape} | r)
        print(f"  {what:<22} {name:<5} {shape:<18} {r['a_ms']:9.3f} {r['b_ms']:9.3f}  {r['speedup']:6.3f}"
              f"  [{r['q1']:.3f}, {r['q3']:.3f}]", file=sys.stderr)

    print(f"  {'':<22} {'type':<5} {'shape':<18} {'A ms':>9} {'B ms':>9}  {'A/B':>6}  quartiles", file=sys.stderr)
    for name in types:
        qt = A.qtype(name)
        if qt.is_block:
            cases = [(r, c, matrices(pool, qt, r, c)) for r, c in SHAPES]
        else:                                     # finite floats: random bytes would hold NaNs and denormals
            r, c = FLOAT_SHAPE
            ws = np.empty((max(1, (pool_mib << 20) // (r * c * qt.dtype.itemsize)), r, c), qt.dtype)
            for w in ws:
                w[...] = rng.standard_normal((r, c), np.float32)
            cases = [(r, c, ws)]
        for r, c, ws in cases:
            shape = f"{r}x{c}"
            x, y = rng.standard_normal(c).astype(np.float32), np.empty(r, np.float32)
            add("matvec (all matrices)", name, shape, ab(lambda *a: _matvecs(A, *a), lambda *a: _matvecs(B, *a),
                                                         (name, ws, x, y), trials))
            for t in TOKENS:
                X = rng.standard_normal((t, c)).astype(np.float32)
                Y = np.empty((t, r), np.float32)
                add(f"matmul {t} tokens", name, shape, ab(A.matmul, B.matmul, (name, ws[0], X, Y), trials))
        if qt.is_block:
            d, f = 4096, 14336
            up = matrices(pool, qt, f, d)
            experts = [(up[3 * i], up[3 * i + 1], up[3 * i + 2].reshape(-1)[: d * qt.row_bytes(f)].reshape(d, -1))
                       for i in range(up.shape[0] // 3)]
            x = rng.standard_normal(d).astype(np.float32)
            add("expert_ffn (all)", name, f"{d}/{f} x{len(experts)}",
                ab(lambda *a: _ffns(A, *a), lambda *a: _ffns(B, *a), (name, experts, x), trials))
    return rows_out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lazymoe.benchmarks.kernels_ab", description=__doc__.split("\n")[0])
    p.add_argument("other", help="a kernels/ folder (A) to time against this checkout's lazymoe.kernels (B)")
    p.add_argument("-n", "--trials", type=int, default=11, help="alternating A, B trials per measurement")
    p.add_argument("--pool-mib", type=int, default=1088, help="MiB of distinct weights to cycle through")
    p.add_argument("-t", "--types", default="q4_0,q8_0,f16,f32", help="comma-separated weight types")
    p.add_argument("--json", action="store_true", help="also print the rows as one JSON object on stdout")
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join(a.other, "__init__.py")):
        print(f"{a.other}: not a kernels folder (no __init__.py)", file=sys.stderr)
        return 2
    from lazymoe import kernels as B
    A = load_other(os.path.abspath(a.other))
    print(f"A = {A.__file__}\nB = {B.__file__}\nA/B > 1: B is faster; load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    res = run(A, B, a.pool_mib, a.trials, a.types.split(","))
    if a.json:
        print(json.dumps({"other": a.other, "trials": a.trials, "pool_mib": a.pool_mib, "rows": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
