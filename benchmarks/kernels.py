"""Kernel benchmark: quantized matvec against the machine's streaming bandwidth, matmul
against OpenBLAS on the same shape, the fused expert FFN against three matvecs.

    python -m lazymoe.benchmarks.kernels            # full run (~2 GiB RAM, a few minutes)
    python -m lazymoe.benchmarks.kernels --quick    # smoke run
    python -m lazymoe.benchmarks.kernels --json     # one JSON object on stdout
    python -m lazymoe.benchmarks.kernels --first-call [--cold-jit]   # only import + first calls, then exit

    python -m lazymoe.benchmarks.kernels -t q4_k,q6_k   # some types only (Q8_0 is always measured)

Matvec weights cycle through >= 1 GiB of distinct matrices so every byte comes from DRAM;
each trial times one stream pass and one matvec pass back to back, and the ratio is the
median of per-trial ratios (the machine is shared, so absolute numbers drift). Each type's
matvec GB/s is also shown against Q8_0's on the same shape in the same run (Q8_0 reads memory
fastest here). Random weights: pool bytes drawn from 0x10..0x2f, so every f16 (or bf16) field
of any type is a normal positive number and no type needs its own pool.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SHAPES = [(14336, 4096), (4096, 14336)]                 # Mixtral-8x7B w1/w3 and w2: [rows, cols]
TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs", "bf16"]


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def _matvecs(K, qt, ws, x, y):
    for w in ws:
        K.matvec(qt, w, x, y)


def first_calls(K, types) -> dict:
    """Seconds of the first call of each public entry point per type, on shapes that reach every driver:
    the serial and the parallel matvec, the integer and the dequantize + sgemm matmul, the fused expert FFN.
    In a fresh process that is a JIT compile, or a load from Numba's on-disk cache."""
    from lazymoe.kernels.dispatch import INT_MATMUL_MAX_TOKENS
    jit = {}
    for name in types:
        qt = K.qtype(name)
        small = np.zeros(qt.storage_shape((64, 256)), qt.dtype)       # below PARALLEL_MIN_WEIGHTS: serial
        w = np.zeros(qt.storage_shape((512, 512)), qt.dtype)          # 2^18 weights: parallel
        w1 = np.zeros(qt.storage_shape((1024, 512)), qt.dtype)
        w2 = np.zeros(qt.storage_shape((512, 1024)), qt.dtype)
        x, X4 = np.ones(512, np.float32), np.ones((4, 512), np.float32)
        jit[f"matvec {name} serial"] = _timed(K.matvec, qt, small, np.ones(256, np.float32))
        jit[f"matvec {name}"] = _timed(K.matvec, qt, w, x)
        jit[f"matmul {name} 4 tokens"] = _timed(K.matmul, qt, w, X4)
        jit[f"matmul {name} {INT_MATMUL_MAX_TOKENS + 1} tokens"] = _timed(
            K.matmul, qt, w, np.ones((INT_MATMUL_MAX_TOKENS + 1, 512), np.float32))
        jit[f"expert_ffn {name}"] = _timed(K.expert_ffn, qt, w1, qt, w1, qt, w2, x)
        jit[f"expert_ffn_batch {name}"] = _timed(K.expert_ffn_batch, qt, w1, qt, w1, qt, w2, X4)
    return jit


def make_pool(nbytes: int, seed: int = 0) -> np.ndarray:
    """Random bytes in 0x10..0x2f: any two of them are a normal positive f16 (6e-4 .. 0.11) or bf16, so every
    scale of every block type is finite wherever its blocks start."""
    return np.random.default_rng(seed).integers(0x10, 0x30, nbytes, dtype=np.uint8)


def matrices(pool: np.ndarray, qt, rows: int, cols: int) -> np.ndarray:
    """View the pool as [n, rows, row_bytes] (bf16: [n, rows, cols] uint16) distinct matrices (no copy)."""
    rb = qt.row_bytes(cols) if qt.is_block else cols * qt.dtype.itemsize
    n = pool.size // (rows * rb)
    return pool[: n * rows * rb].view(np.uint8 if qt.is_block else qt.dtype).reshape(n, rows, -1)


def bench(quick: bool, trials: int, types: list[str]) -> dict:
    import numba
    from numba import njit, prange

    from lazymoe import kernels as K
    from lazymoe.kernels.dequant_matmul import dequant_parallel
    from lazymoe.kernels.dispatch import KERNELS

    @njit(fastmath=True, cache=True)
    def sum_range(a, lo, hi):
        s = np.float32(0.0)
        for i in range(lo, hi):
            s += a[i]
        return s

    @njit(parallel=True, cache=True)
    def stream_sum(a, nt):
        # the serial body in its own fastmath function: inlined in the prange body the
        # reduction did not vectorize (5 vs 11 GB/s measured)
        part = np.zeros(nt, np.float32)
        for t in prange(nt):
            part[t] = sum_range(a, a.shape[0] * t // nt, a.shape[0] * (t + 1) // nt)
        return part.sum()

    nt = numba.get_num_threads()
    gib = 1 << 30
    pool_bytes = gib // 4 if quick else gib + (64 << 20)
    res = {"machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "threads": nt,
                       "load_avg": os.getloadavg()[0], "numba": numba.__version__, "numpy": np.__version__,
                       "date": time.strftime("%Y-%m-%d %H:%M")}}

    res["first_call_s"] = first_calls(K, types + ["f16", "f32"])
    rng = np.random.default_rng(1)

    big = np.ones(pool_bytes // 4, np.float32)
    stream_sum(big, nt)
    pool = make_pool(pool_bytes)

    # (1)+(2) matvec from DRAM against streaming reads, side by side per trial
    mv = []
    for name in types:
        qt = K.qtype(name)
        for rows, cols in SHAPES:
            ws = matrices(pool, qt, rows, cols)
            x = rng.standard_normal(cols).astype(np.float32)
            y = np.empty(rows, np.float32)
            K.matvec(qt, ws[0], x, y)
            s_bw, m_bw, ratio = [], [], []
            for _ in range(trials):
                ts = _timed(stream_sum, big, nt)
                tm = _timed(_matvecs, K, qt, ws, x, y)
                s_bw.append(big.nbytes / ts / 1e9)
                m_bw.append(ws.nbytes / tm / 1e9)
                ratio.append(m_bw[-1] / s_bw[-1])
            q8 = next((m for m in mv if m["type"] == "q8_0" and m["rows"] == rows), None)
            mv.append({"type": name, "rows": rows, "cols": cols, "matrices": ws.shape[0],
                       "gib": ws.nbytes / gib, "GBps": statistics.median(m_bw),
                       "Gweights_per_s": statistics.median(m_bw) * 8 / qt.bits_per_weight,
                       "vs_q8_0": statistics.median(m_bw) / q8["GBps"] if q8 else 1.0,
                       "stream_GBps": statistics.median(s_bw), "ratio": statistics.median(ratio),
                       "ms_per_matrix": ws[0].nbytes / statistics.median(m_bw) / 1e6})
    res["stream_GBps"] = statistics.median([m["stream_GBps"] for m in mv])
    res["matvec"] = mv
    del big

    # (3) matmul against OpenBLAS sgemm on the same matrix already dequantized
    mm = []
    for name in types:
        qt = K.qtype(name)
        for rows, cols in SHAPES:
            ws = matrices(pool, qt, rows, cols)
            wf = np.empty((rows, cols), np.float32)
            dequant_parallel(KERNELS[name].code, ws[0], 0, rows, wf, nt)
            for t in ([16, 256] if quick else [16, 64, 256]):
                X = rng.standard_normal((t, cols)).astype(np.float32)
                Y = np.empty((t, rows), np.float32)
                K.matmul(qt, ws[0], X, Y)
                np.matmul(X, wf.T)
                ours = statistics.median(_timed(K.matmul, qt, ws[0], X, Y) for _ in range(trials))
                blas = statistics.median(_timed(np.matmul, X, wf.T) for _ in range(trials))
                fl = 2.0 * t * rows * cols / 1e9
                mm.append({"type": name, "rows": rows, "cols": cols, "tokens": t, "GFLOPs": fl / ours,
                           "blas_GFLOPs": fl / blas, "ratio": blas / ours})
            del wf
    res["matmul"] = mm

    # (4) fused expert FFN for one token against three separate matvecs (+ numpy silu)
    ff = []
    d, f = 4096, 14336
    for name in types:
        qt = K.qtype(name)
        up = matrices(pool, qt, f, d)
        n = up.shape[0] // 3
        experts = [(up[3 * i], up[3 * i + 1], up[3 * i + 2].reshape(-1)[: up[0].size].reshape(d, -1))
                   for i in range(n)]
        x = rng.standard_normal(d).astype(np.float32)

        def separate(qt, experts, x):
            for w1, w3, w2 in experts:
                g, u = K.matvec(qt, w1, x), K.matvec(qt, w3, x)
                with np.errstate(over="ignore"):
                    K.matvec(qt, w2, g / (1 + np.exp(-g)) * u)

        def fused(qt, experts, x):
            for w1, w3, w2 in experts:
                K.expert_ffn(qt, w1, qt, w3, qt, w2, x)

        separate(qt, experts, x), fused(qt, experts, x)
        ts = statistics.median(_timed(separate, qt, experts, x) for _ in range(trials)) / n
        tf = statistics.median(_timed(fused, qt, experts, x) for _ in range(trials)) / n
        nbytes = 3 * up[0].nbytes
        ff.append({"type": name, "experts": n, "fused_ms": tf * 1e3, "separate_ms": ts * 1e3,
                   "fused_GBps": nbytes / tf / 1e9, "speedup": ts / tf})
    res["expert_ffn"] = ff
    return res


def table(res: dict) -> str:
    m = res["machine"]
    out = [f"{m['cpu']}, {m['cores']} cores, {m['threads']} threads, load {m['load_avg']:.1f} at start, {m['date']}",
           f"streaming read (Numba parallel sum, f32): {res['stream_GBps']:.1f} GB/s", "",
           "matvec from DRAM       type   GB/s  stream  ratio  ms/matrix  Gweights/s  x Q8_0 GB/s"]
    for r in res["matvec"]:
        out.append(f"  {r['rows']:>5}x{r['cols']:<5} ({r['gib']:.2f} GiB) {r['type']:<5} {r['GBps']:6.1f}"
                   f"  {r['stream_GBps']:6.1f}  {r['ratio']:5.2f}  {r['ms_per_matrix']:7.2f}  {r['Gweights_per_s']:10.1f}"
                   f"  {r['vs_q8_0']:11.2f}")
    out += ["", "matmul                 type   tokens  GFLOP/s  OpenBLAS f32  ratio"]
    for r in res["matmul"]:
        out.append(f"  {r['rows']:>5}x{r['cols']:<5}          {r['type']:<5} {r['tokens']:>5}  {r['GFLOPs']:7.1f}"
                   f"  {r['blas_GFLOPs']:12.1f}  {r['ratio']:5.2f}")
    out += ["", "expert FFN, 1 token    type   fused ms  separate ms  fused GB/s  speedup"]
    for r in res["expert_ffn"]:
        out.append(f"  4096/14336 x{r['experts']:<2}       {r['type']:<5} {r['fused_ms']:8.2f}  {r['separate_ms']:11.2f}"
                   f"  {r['fused_GBps']:10.1f}  {r['speedup']:7.2f}")
    out += ["", first_call_table(res)]
    return "\n".join(out)


def first_call_table(res: dict) -> str:
    jit = res["first_call_s"]
    head = f"import {res['import_s']:.2f} s, " if "import_s" in res else ""
    return (f"first call (JIT compile or cache load): {head}calls {sum(jit.values()):.2f} s in all; "
            + ", ".join(f"{k} {v:.3f}" for k, v in jit.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lazymoe.benchmarks.kernels", description=__doc__.split("\n")[0])
    p.add_argument("-q", "--quick", action="store_true", help="smoke run: 256 MiB of weights, fewer shapes")
    p.add_argument("-n", "--trials", type=int, default=None, help="timed trials per measurement (default 5, quick 2)")
    p.add_argument("-t", "--types", default=",".join(TYPES),
                   help=f"comma list of weight types (default all: {','.join(TYPES)}); q8_0 is always included")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--cold-jit", action="store_true",
                   help="compile into an empty Numba cache so first-call times are real compile times")
    p.add_argument("--first-call", action="store_true",
                   help="only time importing the kernels and the first call of each entry point per type, then exit "
                        "(run it twice: the second process loads from Numba's cache)")
    a = p.parse_args(argv)
    types = ["q8_0"] + [t.strip().lower() for t in a.types.split(",") if t.strip().lower() not in ("q8_0", "")]
    if a.cold_jit:
        if "numba" in sys.modules:
            print("--cold-jit must be used before numba is imported", file=sys.stderr)
            return 2
        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="lazymoe-numba-")
    if a.first_call:
        if "lazymoe.kernels" in sys.modules:
            print("--first-call must run in a fresh process", file=sys.stderr)
            return 2
        t = time.perf_counter()
        from lazymoe import kernels as K
        res = {"import_s": time.perf_counter() - t}
        res["first_call_s"] = first_calls(K, types + ["f16", "f32"])
        res["first_call_total_s"] = res["import_s"] + sum(res["first_call_s"].values())
        print(json.dumps(res, indent=1) if a.json else first_call_table(res))
        return 0
    res = bench(a.quick, a.trials or (2 if a.quick else 5), types)
    res["machine"]["load_avg_end"] = os.getloadavg()[0]
    print(json.dumps(res, indent=1) if a.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
