"""Token tiles against one row dot per (row, token), on the same quantized activations, interleaved trials.

    python -m lazymoe.benchmarks.tiles_dots -t iq4_nl,iq4_xs --tokens 16,32

For each type with a tile (blocks.py KERNELS, AVX2 builds) and token count: int_matmul_parallel with and without
its tiles on one 14336x4096 matrix of random bytes (benchmarks.kernels.make_pool: finite scales), all threads,
median over trials of each, alternating. Prints the time ratio dots / tiles (> 1: the tiles are faster).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lazymoe.benchmarks.tiles_dots", description=__doc__.split("\n")[0])
    ap.add_argument("-t", "--types", default="iq4_nl,iq4_xs")
    ap.add_argument("--tokens", default="16,32")
    ap.add_argument("-n", "--trials", type=int, default=9)
    a = ap.parse_args(argv)
    import numba
    import numpy as np

    from lazymoe import kernels as K
    from lazymoe.benchmarks.kernels import make_pool, matrices
    from lazymoe.kernels.int_matmul import int_matmul_parallel
    rows, cols, nt = 14336, 4096, numba.get_num_threads()
    rng = np.random.default_rng(0)
    for name in a.types.split(","):
        qt, k = K.qtype(name), K.KERNELS[name]
        if k.tile is None:
            print(f"{name}: no tile on this build")
            continue
        w = matrices(make_pool(qt.nbytes((rows, cols))), qt, rows, cols)[0]
        for t in (int(v) for v in a.tokens.split(",")):
            X = rng.standard_normal((t, cols)).astype(np.float32)
            qx = k.act.buffers(cols, t)
            k.act.quantize_rows(X, *qx)
            Y = np.empty((t, rows), np.float32)
            times = {True: [], False: []}
            for _ in range(a.trials + 1):                     # the first round compiles / warms, not counted
                for tiles in (True, False):
                    t0 = time.perf_counter()
                    int_matmul_parallel(k.code, tiles, w, X, *qx, Y, nt)
                    times[tiles].append(time.perf_counter() - t0)
            tile, dots = statistics.median(times[True][1:]), statistics.median(times[False][1:])
            print(f"{name} {rows}x{cols} {t} tokens: tiles {tile * 1e3:.1f} ms, dots {dots * 1e3:.1f} ms, "
                  f"dots / tiles {dots / tile:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
