"""Single-thread row-dot speed of kernels/kquant.py from DRAM, beside simd.py's Q4_0 and Q8_0 dots.

    python -m lazymoe.benchmarks.kquant_dots                 # table (~1.3 GiB RAM, about a minute)
    python -m lazymoe.benchmarks.kquant_dots --json          # one JSON object on stdout
    python -m lazymoe.benchmarks.kquant_dots --cache-check   # first-call time, fresh process, cold vs warm cache
    python -m lazymoe.benchmarks.kquant_dots --arm64         # each type's arm64 loop, llvm-mca cycles (no arm64 needed)

Form "dequant" is the dequantizer, row by row into one float32 row buffer (the dequantize + sgemm path's
inner step), in stored bytes read per second.

Each type's 4096 x 14336 matrices (Mixtral w2's shape) tile one pool of >= 1 GiB, so every byte comes from
DRAM; a trial times one pass over the pool per (type, form), all types side by side in each trial (the
machine is shared), and the table shows the median. Pool bytes are drawn from 0x10..0x2f, so every f16 or
bf16 field anywhere is a normal positive number: no type needs its own pool and none hits denormals.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as G
from numba import njit

from lazymoe.kernels import kquant as K
from lazymoe.kernels import kquant_plain as P
from lazymoe.kernels import simd
from lazymoe.kernels.activations import quantize_q8
from lazymoe.kernels.blocks import dequant_row, row_dot

ROWS, COLS = 4096, 14336
KQ = ["q4_k", "q5_k", "q6_k", "q3_k", "q2_k"]
B32 = ["q4_1", "q5_0", "q5_1"]
SIZES = {t: tuple(GGML_QUANT_SIZES[G[t.upper()]]) for t in KQ + B32 + ["q4_0", "q8_0", "bf16"]}
FORMS = {"fast": 0, "ir": 1, "x86": 2, "plain": 3}
KIND = {t: i for i, t in enumerate(KQ + B32 + ["q4_0", "q8_0", "bf16"])}
REG_CODE = (0,) * 7 + (int(G.Q5_1), int(G.Q4_0), int(G.Q8_0))    # by KIND: the registry's type codes


@njit(cache=True)
def rows_k(kind, form, w, base, rb, xq, xd, xbs, y):
    """y[r] = row dot of the K-quant matrix at byte base of w (kind: index in KQ; form: index in FORMS)."""
    for r in range(y.shape[0]):
        o = base + r * rb
        if kind == 0:
            y[r] = (K.dot_q4_k(w, o, xq, xd, xbs) if form == 0 else K.dot_q4_k_ir(w, o, xq, xd, xbs) if form == 1
                    else K.dot_q4_k_x86(w, o, xq, xd, xbs) if form == 2 else P.dot_q4_k_plain(w, o, xq, xd, xbs))
        elif kind == 1:
            y[r] = (K.dot_q5_k(w, o, xq, xd, xbs) if form == 0 else K.dot_q5_k_ir(w, o, xq, xd, xbs) if form == 1
                    else K.dot_q5_k_x86(w, o, xq, xd, xbs) if form == 2 else P.dot_q5_k_plain(w, o, xq, xd, xbs))
        elif kind == 2:
            y[r] = (K.dot_q6_k(w, o, xq, xd, xbs) if form == 0 else K.dot_q6_k_ir(w, o, xq, xd, xbs) if form == 1
                    else K.dot_q6_k_x86(w, o, xq, xd, xbs) if form == 2 else P.dot_q6_k_plain(w, o, xq, xd, xbs))
        elif kind == 3:
            y[r] = (K.dot_q3_k(w, o, xq, xd, xbs) if form == 0 else K.dot_q3_k_ir(w, o, xq, xd, xbs) if form == 1
                    else K.dot_q3_k_x86(w, o, xq, xd, xbs) if form == 2 else P.dot_q3_k_plain(w, o, xq, xd, xbs))
        else:
            y[r] = (K.dot_q2_k(w, o, xq, xd, xbs) if form == 0 else K.dot_q2_k_ir(w, o, xq, xd, xbs) if form == 1
                    else K.dot_q2_k_x86(w, o, xq, xd, xbs) if form == 2 else P.dot_q2_k_plain(w, o, xq, xd, xbs))


@njit(cache=True)
def rows_32(kind, form, w, base, rb, xq, xd, xc, y):
    """The same for Q4_1, Q5_0 (kind 5, 6) and simd.py's Q5_1, Q4_0, Q8_0 (kind 7, 8, 9: the registry's dot as the
    fast form; Q5_1's portable twin as its plain form)."""
    for r in range(y.shape[0]):
        o = base + r * rb
        if kind == 5:
            y[r] = (K.dot_q4_1(w, o, xq, xd, xc) if form == 0 else K.dot_q4_1_ir(w, o, xq, xd, xc) if form == 1
                    else K.dot_q4_1_x86(w, o, xq, xd, xc) if form == 2 else P.dot_q4_1_plain(w, o, xq, xd, xc))
        elif kind == 6:
            y[r] = (K.dot_q5_0(w, o, xq, xd, xc) if form == 0 else K.dot_q5_0_ir(w, o, xq, xd, xc) if form == 1
                    else K.dot_q5_0_x86(w, o, xq, xd, xc) if form == 2 else P.dot_q5_0_plain(w, o, xq, xd, xc))
        elif kind == 7 and form == 3:
            y[r] = simd.dot_q5_1_portable(w, o, xq, xd, xc)
        else:                              # simd.py's dots through the registry (x is not read: xd stands in)
            y[r] = row_dot(REG_CODE[kind], w, o, xd, xq, xd, xc)


@njit(cache=True)
def rows_bf16(form, w, base, cols, x, y):
    """BF16 rows: w uint16, base and cols in elements."""
    for r in range(y.shape[0]):
        o = base + r * cols
        y[r] = K.dot_bf16(w, o, x, cols // 8) if form != 3 else P.dot_bf16_plain(w, o, x, cols // 8)


@njit(cache=True)
def dequant_rows(kind, w, base, rb, nrows, out):
    """Dequantize nrows rows at byte base of w, each into out (one row of floats, stays in L1/L2)."""
    for r in range(nrows):
        o = base + r * rb
        if kind == 0:
            K.dequant_q4_k(w, o, out, 0, out.shape[0] // 256)
        elif kind == 1:
            K.dequant_q5_k(w, o, out, 0, out.shape[0] // 256)
        elif kind == 2:
            K.dequant_q6_k(w, o, out, 0, out.shape[0] // 256)
        elif kind == 3:
            K.dequant_q3_k(w, o, out, 0, out.shape[0] // 256)
        elif kind == 4:
            K.dequant_q2_k(w, o, out, 0, out.shape[0] // 256)
        elif kind == 5:
            K.dequant_q4_1(w, o, out, 0, out.shape[0] // 32)
        elif kind == 6:
            K.dequant_q5_0(w, o, out, 0, out.shape[0] // 32)
        else:
            dequant_row(REG_CODE[kind], w, o, out, 0, out.shape[0])


def activations(t, x):
    c = x.shape[0]
    if t in KQ:
        xq, xd, xc = np.empty(c, np.int8), np.empty(c // 256, np.float32), np.empty(c // 16, np.int16)
        K.quantize_q8_k(x, xq, xd, xc)
    else:
        xq, xd, xc = np.empty(c, np.int8), np.empty(c // 32, np.float32), np.empty(c // 32, np.float32)
        quantize_q8(x, xq, xd, xc)
    return xq, xd, xc


def dequant_pass(t, pool, out):
    bs, ts = SIZES[t]
    rb = COLS // bs * ts
    n = pool.size // (ROWS * rb)
    k = KIND[t]
    return (lambda: [dequant_rows(k, pool, m * ROWS * rb, rb, ROWS, out) for m in range(n)]), n * ROWS * rb


def pass_fn(t, form, pool, x, y):
    """() -> None: one pass of row dots over every whole matrix of type t in the pool; and its bytes."""
    bs, ts = SIZES[t]
    rb = COLS // bs * ts
    n = pool.size // (ROWS * rb)
    f = FORMS[form]
    if t == "bf16":
        w16 = pool[: n * ROWS * rb].view(np.uint16)
        return (lambda: [rows_bf16(f, w16, m * ROWS * COLS, COLS, x, y) for m in range(n)]), n * ROWS * rb
    xq, xd, xc = activations(t, x)
    rows = rows_k if t in KQ else rows_32
    k = KIND[t]
    return (lambda: [rows(k, f, pool, m * ROWS * rb, rb, xq, xd, xc, y) for m in range(n)]), n * ROWS * rb


def bench(trials: int, pool_mib: int, forms: list[str], types: list[str], dequant: bool = True) -> dict:
    rng = np.random.default_rng(0)
    pool = rng.integers(0x10, 0x30, pool_mib << 20, dtype=np.uint8)
    x = rng.standard_normal(COLS).astype(np.float32)
    y = np.empty(ROWS, np.float32)
    runs = []
    for t in types:
        for form in (["fast"] if t in ("q4_0", "q8_0") else ["fast", "plain"] if t in ("bf16", "q5_1") else forms):
            if form == "x86" and not simd.HAVE_AVX2 or (t == "bf16" and form not in ("fast", "plain")):
                continue
            if t == "bf16" and form not in forms:
                continue
            fn, nbytes = pass_fn(t, form, pool, x, y)
            if form == "plain":               # ~1 GB/s: one matrix's worth keeps the run short
                bs, ts = SIZES[t]
                fn1, nbytes = pass_fn(t, form, pool[: 4 * ROWS * (COLS // bs * ts)], x, y)
                fn = fn1
            fn()                               # compile or load from cache, outside the timings
            runs.append({"type": t, "form": form, "bytes": nbytes, "fn": fn, "s": []})
        if dequant and t not in ("q8_0", "bf16"):
            fn, nbytes = dequant_pass(t, pool, np.empty(COLS, np.float32))
            fn()
            runs.append({"type": t, "form": "dequant", "bytes": nbytes, "fn": fn, "s": []})
    for _ in range(trials):
        for r in runs:
            t0 = time.perf_counter()
            r["fn"]()
            r["s"].append(time.perf_counter() - t0)
    out = []
    for r in runs:
        s = statistics.median(r["s"])
        bs, ts = SIZES[r["type"]]
        out.append({"type": r["type"], "form": r["form"], "GBps": r["bytes"] / s / 1e9,
                    "best_GBps": r["bytes"] / min(r["s"]) / 1e9,
                    "Gweights_per_s": r["bytes"] / ts * bs / s / 1e9, "bits_per_weight": 8 * ts / bs,
                    "trials_GBps": [round(r["bytes"] / v / 1e9, 2) for v in r["s"]]})
    return {"shape": [ROWS, COLS], "pool_mib": pool_mib, "trials": trials, "threads": 1,
            "have_avx2": simd.HAVE_AVX2, "date": time.strftime("%Y-%m-%d %H:%M"), "dots": out}


def first_call() -> dict:
    """Seconds to import the kernels and make the first call of each row loop in this process."""
    t0 = time.perf_counter()
    w = np.full(2 * 210 * 56, 0x20, np.uint8)
    x = np.ones(COLS, np.float32)
    y = np.empty(1, np.float32)
    res = {}
    t = time.perf_counter()
    xq, xd, xc = activations("q4_k", x)
    rows_k(0, 0, w, 0, 0, xq, xd, xc, y)
    res["rows_k (5 K-quants x 4 forms)"] = time.perf_counter() - t
    t = time.perf_counter()
    xq, xd, xc = activations("q4_1", x)
    rows_32(5, 0, w, 0, 0, xq, xd, xc, y)
    res["rows_32 (3 types x 4 forms + Q4_0, Q8_0)"] = time.perf_counter() - t
    t = time.perf_counter()
    rows_bf16(0, w.view(np.uint16), 0, 0, x, y)
    res["rows_bf16"] = time.perf_counter() - t
    res["total"] = time.perf_counter() - t0
    fns = (rows_k, rows_32, rows_bf16, K.quantize_q8_k)
    res["cache_hits"] = sum(sum(f.stats.cache_hits.values()) for f in fns)
    res["cache_misses"] = sum(sum(f.stats.cache_misses.values()) for f in fns)
    return res


def cache_check() -> dict:
    """Run first_call in two fresh processes sharing a new, empty NUMBA_CACHE_DIR: cold, then warm."""
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, NUMBA_CACHE_DIR=d)
        out = {}
        for label in ("cold", "warm"):
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "lazymoe.benchmarks.kquant_dots", "--first-call"], env=env,
                               capture_output=True, text=True, check=True)
            out[label] = {"process_s": time.perf_counter() - t, **json.loads(p.stdout)}
        out["cache_files"] = sum(len(f) for _, _, f in os.walk(d))
    return out


# ---- arm64 machine code, cross-compiled here: no arm64 needed --------------------------------------------

ARM64_TRIPLE = "arm64-apple-darwin"


def arm64_module(codegen, tile: bool = False) -> str:
    """LLVM IR of `float row_dot(w, wo, x, xq, xd, xc)` around one registry codegen (tile: `4 floats
    row_tile(w, wo, xq, xd, xc, xct, k0, kk)`), arrays by value as Numba passes them (built with Numba's CPU
    context, no compilation: the target is chosen afterwards)."""
    from llvmlite import ir
    from numba import types
    from numba.core import typing
    from numba.core.registry import cpu_target
    ctx = cpu_target.target_context
    arr = lambda dt, nd=1: types.Array(dt, nd, "C")                      # noqa: E731
    if tile:
        sig = typing.signature(types.UniTuple(types.float32, 4), arr(types.uint8), types.int64, arr(types.int8, 2),
                               arr(types.float32, 2), arr(types.float32, 2), arr(types.float32, 2), types.int64,
                               types.int64)
    else:
        sig = typing.signature(types.float32, arr(types.uint8), types.int64, arr(types.float32), arr(types.int8),
                               arr(types.float32), arr(types.float32))
    m = ir.Module("row_dot")
    fnty = ir.FunctionType(ctx.get_value_type(sig.return_type), [ctx.get_value_type(t) for t in sig.args])
    f = ir.Function(m, fnty, "row_dot")
    b = ir.IRBuilder(f.append_basic_block("entry"))
    b.ret(codegen(ctx, b, sig, list(f.args)))
    return str(m)


def arm64_asm(name: str, cpu: str = "apple-m1", triple: str = ARM64_TRIPLE, tile: bool = False) -> str:
    """Assembly of type name's row dot (tile: its 1 x 4 token tile, K-quants) as an arm64 host with this CPU runs
    it (blocks.arm64_dot, kquant.NEON_TILES; arm64.DOTPROD set as arm64.py sets it for that CPU while the IR is
    generated), optimized at -O3 for that CPU."""
    import llvmlite.binding as llvm

    from lazymoe.kernels import arm64, kquant
    from lazymoe.kernels.blocks import KERNELS, arm64_dot
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    saved, arm64.DOTPROD = arm64.DOTPROD, arm64.target_has_sdot(triple, cpu)
    try:
        text = arm64_module(kquant.NEON_TILES[name] if tile else arm64_dot(KERNELS[name]), tile)
    finally:
        arm64.DOTPROD = saved
    tm = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, opt=3)
    m = llvm.parse_assembly(text)
    m.triple, m.data_layout = triple, str(tm.target_data)
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(3))
    pb.getModulePassManager().run(m, pb)
    return tm.emit_assembly(m)


def asm_loops(asm: str) -> list[list[str]]:
    """The instructions of each loop in asm: from a label to the last branch back to it (inner loops nest;
    a stretch holding a `ret` is a jump back to the exit, not a loop)."""
    import re
    lines, labels, loops = [], {}, {}
    for raw in asm.splitlines():
        ln = re.split(r"\s(;|//)", raw)[0].rstrip()
        if re.match(r"^\.?L\w+:$", ln):
            labels[ln[:-1]] = len(lines)
        elif raw.startswith("\t") and not ln.strip().startswith(".") and ln.strip():
            lines.append(ln.strip())
            target = re.split(r"[\s,]+", ln.strip())[-1]
            if target in labels:
                loops[target] = (labels[target], len(lines))
    return [lines[a:z] for a, z in loops.values() if "ret" not in (ln.split()[0] for ln in lines[a:z])]


def mnemonic_counts(body: list[str]) -> dict[str, int]:
    """Instructions of body by mnemonic, Apple's `sdot.4s` and LLVM's `sdot v0.4s` alike as `sdot`."""
    out: dict[str, int] = {}
    for ln in body:
        op = ln.split()[0].split(".")[0]
        out[op] = out.get(op, 0) + 1
    return out


_MULTIPLIES = ("sdot", "fmla", "smull", "smull2", "smlal", "smlal2", "mla")


def block_loop(name: str, cpu: str = "apple-m1", triple: str = ARM64_TRIPLE) -> list[str]:
    """The hot loop of type name's arm64 row dot: the loop with the most vector multiplies (LLVM also
    vectorizes the float dots' remainder loop, which never runs more than 7 times)."""
    def key(body):
        c = mnemonic_counts(body)
        return sum(c.get(m, 0) for m in _MULTIPLIES), len(body)
    return max(asm_loops(arm64_asm(name, cpu, triple)), key=key)


# Weights per iteration of each hot loop: the loop's multiply instructions times the weights each covers
# (sdot: 16 int8 products; fmla on 4 float lanes: 4). tests/test_arm64_codegen.py checks that these cover
# whole blocks.
def loop_weights(body: list[str]) -> int:
    c = mnemonic_counts(body)
    return 16 * c.get("sdot", 0) or 4 * c.get("fmla", 0)


def mca_cycles(body: list[str], cpu: str = "apple-m1", mca: str = "llvm-mca") -> float:
    """llvm-mca's steady-state cycles per iteration of body on cpu (Linux-syntax assembly)."""
    import re
    with tempfile.NamedTemporaryFile("w", suffix=".s") as f:
        f.write("\n".join(body) + "\n")
        f.flush()
        q = subprocess.run([mca, "-mtriple=aarch64", f"-mcpu={cpu}", "-iterations=200", f.name],
                           capture_output=True, text=True, check=True)
    tot, it = re.search(r"Total Cycles:\s+(\d+)", q.stdout), re.search(r"Iterations:\s+(\d+)", q.stdout)
    return int(tot.group(1)) / int(it.group(1))


def arm64_report(cpu: str) -> dict:
    """Each type's arm64 hot loop for cpu: instructions, weights and llvm-mca cycles per iteration (if found)."""
    import shutil

    from lazymoe.kernels.blocks import KERNELS
    mca = shutil.which("llvm-mca")
    out = {}
    for name in KERNELS:
        body = block_loop(name, cpu, "aarch64-unknown-linux-gnu")     # LLVM's syntax: llvm-mca 14 reads it
        c = mnemonic_counts(body)
        n = loop_weights(body)
        bs, ts = GGML_QUANT_SIZES[G[name.upper()]]
        r = {"weights_per_iter": n, "bytes_per_iter": n // bs * ts, "instructions_per_iter": len(body),
             "top": sorted(c.items(), key=lambda kv: -kv[1])[:6]}
        if mca:
            cyc = mca_cycles(body, cpu, mca)
            r |= {"mca_cycles_per_iter": round(cyc, 2), "weights_per_cycle": round(n / cyc, 2),
                  "bytes_per_cycle": round(n / bs * ts / cyc, 2)}
        out[name] = r
    return out


# The M1 Max estimate's assumptions (benchmarks/RESULTS.md states them with its figures): P-core clock, the
# cores the kernels run on, the --ram budget on a 32 GB laptop, what besides the weights that budget holds
# (KV cache, activations, buffers), and the internal SSD's read speed (not measured).
M1 = {"ghz": 3.2, "cores": 8, "budget_gib": 24.0, "other_gib": 1.5, "ssd_gbps": 5.0}


def m1_estimate(report: dict, ftypes=("q4_0", "q4_k_m", "q3_k_m", "q2_k"), m1=M1) -> dict:
    """Per-token compute and expert reads of Mixtral 8x22B on an M1 Max from the llvm-mca cycles of report
    (arm64_report for apple-m1), per llama.cpp's tensor mix of each ftype (quantize/mixes.py).

    Compute: each matrix a token multiplies (attention, the output head, 2 of 8 experts per layer; token_embd
    is a lookup, norms and the F32 router are left out: < 0.1 %) takes bytes / (mca bytes per cycle * clock *
    cores): the kernels' own loop, all cores busy, data in cache (DRAM, ~200 GB/s for the CPU cores, is not
    the limit at these rates). Reads: uniform routing, so an expert is in the cache with probability f = the
    expert slots the budget holds beyond the resident tensors and `other_gib`, over all experts."""
    from lazymoe.quantize.mixes import tensor_types
    from lazymoe.quantize.synth import SHAPES
    cfg = SHAPES["mixtral-8x22b"]
    shapes = cfg.tensor_shapes()
    out = {"assumptions": dict(m1), "gbps_per_core": {t: round(r["bytes_per_cycle"] * m1["ghz"], 2)
                                                      for t, r in report.items() if "bytes_per_cycle" in r}}
    for ft in ftypes:
        types = tensor_types(cfg, ft, shapes)
        sec = used = experts = resident = 0.0
        for name, t in types.items():
            bs, ts = GGML_QUANT_SIZES[G[t]]
            shape = shapes[name]
            nbytes = shape[-2] * shape[-1] // bs * ts                    # one matrix (one expert's)
            if "_exps" in name:
                experts += shape[0] * nbytes
                per_token = cfg.n_expert_used * nbytes
                used += per_token
            else:
                resident += nbytes
                per_token = 0 if name == "token_embd.weight" else nbytes
            if per_token:
                sec += per_token / (report[t.lower()]["bytes_per_cycle"] * m1["ghz"] * 1e9 * m1["cores"])
        room = (m1["budget_gib"] - m1["other_gib"]) * 2 ** 30 - resident
        f = max(0.0, min(1.0, room / experts))
        read = (1 - f) * used
        out[ft] = {"compute_s": round(sec, 3), "expert_gb_per_token": round(used / 1e9, 2),
                   "resident_gib": round(resident / 2 ** 30, 2), "experts_gib": round(experts / 2 ** 30, 1),
                   "cached_share": round(f, 3), "read_gb_per_token": round(read / 1e9, 2),
                   "read_s": round(read / 1e9 / m1["ssd_gbps"], 2)}
    return out


def arm64_table(report: dict, est: dict) -> str:
    lines = [f"{'type':5} {'weights/it':>10} {'instr/it':>8} {'cycles/it':>9} {'weights/cyc':>11} "
             f"{'GB/s/core @' + str(M1['ghz']) + 'GHz':>17}"]
    for t, r in report.items():
        lines.append(f"{t:5} {r['weights_per_iter']:10} {r['instructions_per_iter']:8} {r.get('mca_cycles_per_iter', 0):9.1f}"
                     f" {r.get('weights_per_cycle', 0):11.2f} {est['gbps_per_core'].get(t, 0):17.2f}")
    lines.append(f"Mixtral 8x22B per token, {M1['cores']} P-cores, --ram {M1['budget_gib']:g}G, SSD {M1['ssd_gbps']:g} GB/s:")
    for ft, e in est.items():
        if ft in ("assumptions", "gbps_per_core"):
            continue
        lines.append(f"  {ft}: compute {e['compute_s']} s; experts {e['expert_gb_per_token']} GB used, {e['experts_gib']} GiB"
                     f" in all, {100 * e['cached_share']:.0f} % cached, read {e['read_gb_per_token']} GB = {e['read_s']} s")
    return "\n".join(lines)


def table(res: dict) -> str:
    lines = [f"single thread, {res['shape'][0]} x {res['shape'][1]} per matrix, {res['pool_mib']} MiB pool, "
             f"median of {res['trials']} ({res['date']}, AVX2 {res['have_avx2']})",
             f"{'type':6} {'form':7} {'bits/w':>6} {'GB/s':>7} {'Gweights/s':>11} {'best GB/s':>10}"]
    for r in res["dots"]:
        lines.append(f"{r['type']:6} {r['form']:7} {r['bits_per_weight']:6.3f} {r['GBps']:7.2f} {r['Gweights_per_s']:11.2f}"
                     f" {r['best_GBps']:10.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-t", "--trials", type=int, default=5)
    ap.add_argument("--pool-mib", type=int, default=1280)
    ap.add_argument("--forms", default="fast,ir,x86,plain", help="comma list of fast, ir, x86, plain")
    ap.add_argument("--types", default=",".join(["q4_0", "q8_0"] + KQ + B32 + ["bf16"]))
    ap.add_argument("--no-dequant", action="store_true", help="skip the dequantizers (row by row into one buffer)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cache-check", action="store_true")
    ap.add_argument("--arm64", metavar="CPU", nargs="?", const="apple-m1",
                    help="cross-compile every type's arm64 row dot (default cpu apple-m1): its hot loop and llvm-mca cycles")
    ap.add_argument("--first-call", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.first_call:
        print(json.dumps(first_call()))
        return 0
    if a.arm64:
        rep = arm64_report(a.arm64)
        est = m1_estimate(rep) if all("bytes_per_cycle" in r for r in rep.values()) else {"gbps_per_core": {}}
        print(json.dumps({"cpu": a.arm64, "loops": rep, "m1_max": est}, indent=1) if a.json else arm64_table(rep, est))
        return 0
    if a.cache_check:
        print(json.dumps(cache_check(), indent=1))
        return 0
    res = bench(a.trials, a.pool_mib, a.forms.split(","), a.types.split(","), not a.no_dequant)
    for r in res["dots"]:
        r.pop("fn", None)
    print(json.dumps(res) if a.json else table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
