"""A/B of the integer token tiles (int_matmul) of two kernel trees, beside dequantize + sgemm, in one process.

    mkdir -p OLD && git archive main kernels | tar -x -C OLD
    python -m lazymoe.benchmarks.tiles_ab OLD/kernels -t q4_k,q6_k -T 64,128 --threads 2 --rows 14336

Unlike kernels_ab (the public matmul, whose path depends on each tree's token limits), this times the tile
driver itself at any token count: A's int_matmul_parallel, B's (this checkout's), and B's dequantize + sgemm on
the same weights and activations, in turn every trial. It prints G MACs/s (best trial) and the median per-trial
time ratios old/new and sgemm/new (above 1: the new tiles are faster), and the largest difference between the two
trees' outputs relative to the product's scale. Shapes: [rows, 4096] and [4096 * rows / 14336, 14336] (Mixtral's
w1/w3 and w2 at --rows 14336); random bytes 0x10..0x2f as in benchmarks/kernels.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from lazymoe.benchmarks.kernels_ab import load_other


def _case(IA, IB, QB, ka, kb, qxa, qxb, w, X, nt, trials):
    """Per-trial seconds of A's tiles, B's tiles and B's dequantize + sgemm on w and X, and A's and B's outputs."""
    t, rows = X.shape[0], w.shape[0]
    ya, yb, ys = (np.empty((t, rows), np.float32) for _ in range(3))
    fns = (lambda: IA.int_matmul_parallel(ka.code, ka.tile is not None, w, X, *qxa, ya, nt),
           lambda: IB.int_matmul_parallel(kb.code, kb.tile is not None, w, X, *qxb, yb, nt),
           lambda: QB.tiled_matmul(kb.code, kb.as_stored, w, X, rows, X.shape[1], ys, nt))
    times = [[] for _ in fns]
    for f in fns:
        f()
    for _ in range(trials):
        for f, ts in zip(fns, times):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return times, np.abs(ya - yb).max() / max(np.abs(ys).max(), 1e-30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lazymoe.benchmarks.tiles_ab", description=__doc__.split("\n")[0])
    p.add_argument("other", help="a kernels/ folder (A, old) to time against this checkout's (B, new)")
    p.add_argument("-t", "--types", default="q4_k,q6_k,q2_k")
    p.add_argument("-T", "--tokens", default="16,64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=512, help="rows of the [rows, 4096] matrix (512: in cache)")
    p.add_argument("-n", "--trials", type=int, default=9)
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join(a.other, "__init__.py")):
        print(f"{a.other}: not a kernels folder (no __init__.py)", file=sys.stderr)
        return 2
    load_other(os.path.abspath(a.other))
    DA, IA = sys.modules["lazymoe_kernels_other.dispatch"], sys.modules["lazymoe_kernels_other.int_matmul"]
    from lazymoe.kernels import dequant_matmul as QB
    from lazymoe.kernels import dispatch as DB
    from lazymoe.kernels import int_matmul as IB
    rng = np.random.default_rng(0)
    for name in a.types.split(","):
        (qa, ka), (_, kb) = DA.resolve(name), DB.resolve(name)
        for rows, cols in [(a.rows, 4096), (max(1, a.rows * 4096 // 14336), 14336)]:
            w = rng.integers(0x10, 0x30, size=(rows, cols // qa.block_size * qa.type_size), dtype=np.uint8)
            for t in (int(v) for v in a.tokens.split(",")):
                X = rng.standard_normal((t, cols)).astype(np.float32)
                qxa, qxb = DA.quantize_act_rows(ka, X), DB.quantize_act_rows(kb, X)
                (ta, tb, tsg), diff = _case(IA, IB, QB, ka, kb, qxa, qxb, w, X, a.threads, a.trials)
                g = rows * cols * t / 1e9
                old_new = statistics.median(x / y for x, y in zip(ta, tb))
                sg_new = statistics.median(x / y for x, y in zip(tsg, tb))
                print(f"{name} {rows}x{cols} T={t} threads={a.threads}: G MACs/s old {g / min(ta):.1f} "
                      f"new {g / min(tb):.1f} sgemm {g / min(tsg):.1f}; old/new {old_new:.2f}, "
                      f"sgemm/new {sg_new:.2f}; max diff / scale {diff:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
