"""Quantizer benchmarks: error against llama.cpp's quantizer, and streaming memory.

    python -m lazymoe.benchmarks.quantize error [--types q4_k,q6_k] [--json]
    python -m lazymoe.benchmarks.quantize stream [--layers 1] [--dir DIR] [--type q4_0] [--expert-type T] [--json]
    python -m lazymoe.benchmarks.quantize part [--type q4_k] [--json]
    python -m lazymoe.benchmarks.quantize speed [--types q4_k,q6_k] [--threads N] [--json]
    python -m lazymoe.benchmarks.quantize compile [--types q2_k,q3_k] [--json]

`error`: for each block type, RMSE of ours and of llama.cpp's quantizer (llama-cpp-python's libggml,
`ggml_quantize_chunk`: what `llama_model_quantize` runs per chunk of rows) on gaussian and Student-t(3)
weights of a Mixtral row length (256 x 4096) and on every matrix of the shipped demo model; the same with a
random importance vector (lognormal, one per column, given to both: importance-weighted RMSE), bytes
(identical for both), and the weights/s of each, measured interleaved on the same threads. Needs the
`llama` extra.

`stream`: writes a Hugging Face checkpoint with Mixtral-8x7B's exact shapes (hidden 4096,
FFN 14336, 8 experts, vocab 32000; `--layers` of its 32 layers, bf16, sharded as the hub
does) and converts it with `lazymoe quantize` in a child process, reporting the child's
peak RSS (psutil, sampled every 50 ms) (the target: under 1.5 GB whatever the model's size) and the time.

`speed`: the quick loop of `error` for one weight set (512 x 4096 gaussian): weights/s of ours, of our port
alone and of llama.cpp's quantizer, without and with an importance vector, interleaved trials on the same
threads (median), and the RMSE (importance-weighted RMSE) of ours below llama.cpp's on the same rows.

`compile`: the cold Numba compile of the quantizers: a child process with an empty NUMBA_CACHE_DIR times the
first quantizations (with and without an importance vector, and the port alone) of each type, in order (a
type whose driver an earlier type compiled shows only its own share).

`part`: the memory one part of that stream costs in a quantizer: a child process makes one Mixtral 8x7B expert
matrix (14336 x 4096 float32, 224 MiB), then quantizes it with an importance vector; its peak RSS before and
after the quantization (psutil, sampled every 50 ms), for each type given.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np


def llama_cpp_quantize(x: np.ndarray, name: str, importance: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """llama.cpp's quantizer on x [R, C] float32 -> uint8 [R, row_bytes]: `ggml_quantize_chunk` from llama-cpp-python's
    libggml, the function `llama_model_quantize` runs on each chunk of rows (with the tensor's imatrix entry as
    importance), split over `threads` threads as it does. Needs the `llama` extra."""
    import ctypes
    from concurrent.futures import ThreadPoolExecutor

    import gguf
    from llama_cpp import _ggml

    fn = _ggml.libggml.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    t = gguf.GGMLQuantizationType[name.upper()]
    bs, ts = gguf.GGML_QUANT_SIZES[t]
    x = np.ascontiguousarray(x, dtype=np.float32)
    R, C = x.shape
    out = np.zeros((R, C // bs * ts), np.uint8)
    imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    n = max(1, min(R, threads or os.cpu_count() or 1))
    step = (R + n - 1) // n

    def part(r0: int) -> None:        # ctypes releases the GIL: the parts run in parallel
        r1 = min(R, r0 + step)
        fn(int(t), x[r0:r1].ctypes.data, out[r0:r1].ctypes.data, 0, r1 - r0, C, None if imp is None else imp.ctypes.data)
    with ThreadPoolExecutor(n) as ex:
        list(ex.map(part, range(0, R, step)))
    return out


ERROR_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "q4_1", "q5_0", "q5_1")


def demo_matrices(path: str | None = None) -> list[np.ndarray]:
    """Every 2-D weight matrix (and expert slice) of a GGUF (default: the shipped demo model), dequantized to
    float32, grouped by row length: [rows, 256] and [rows, 512] (llama.cpp's K-quants need rows that are
    multiples of 256)."""
    import gguf

    path = path or os.path.join(os.path.dirname(__file__), "..", "runtime", "data", "lazymoe-demo-q4_0.gguf")
    by_cols: dict[int, list[np.ndarray]] = {}
    for t in gguf.GGUFReader(path).tensors:
        cols = int(t.shape[0])
        if len(t.shape) >= 2 and cols % 256 == 0 and not t.name.endswith("ffn_gate_inp.weight"):
            x = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(-1, cols)
            by_cols.setdefault(cols, []).append(x.astype(np.float32))
    return [np.ascontiguousarray(np.concatenate(v)) for _, v in sorted(by_cols.items())]


def bench_error(rows: int = 256, cols: int = 4096, seed: int = 0, trials: int = 3, types=ERROR_TYPES,
                float_model: str | None = None) -> list[dict]:
    """Per type and weight set: RMSE ours vs llama.cpp's quantizer (ggml_quantize_chunk, what llama_model_quantize
    runs), plain and weighted by a random importance vector (the same for both), the shrink along the weights
    (-sum e·x / sum x², e = x̂ - x: how much every output of the matrix shrinks), bytes, and weights/s of each
    (interleaved trials, median; both on os.cpu_count() threads), and of our port of llama.cpp's quantizer alone
(the guard every block runs). float_model: a float GGUF whose matrices are
    one more weight set ("float_model"; the shipped demo model's are dequantized Q4_0)."""
    import gguf

    from lazymoe.kernels.quantizers import quantize

    rng = np.random.default_rng(seed)
    sets = {"gaussian": [rng.standard_normal((rows, cols)).astype(np.float32)],
            "student_t3": [rng.standard_t(3, (rows, cols)).astype(np.float32)],
            "demo_model": demo_matrices()}
    if float_model:
        sets["float_model"] = demo_matrices(float_model)
    out = []
    for name in types:
        t = gguf.GGMLQuantizationType[name.upper()]
        quantize(np.ones((2, 256), np.float32), name)                            # JIT warm-up
        quantize(np.ones((2, 256), np.float32), name, np.ones(256, np.float32))
        for dist, mats in sets.items():
            err = {"ours": 0.0, "llama": 0.0, "ours_w": 0.0, "llama_w": 0.0}
            shrink = {"ours": 0.0, "llama": 0.0, "xx": 0.0}
            t_ours, t_llama, t_port, nbytes, n = 0.0, 0.0, 0.0, 0, 0
            for x in mats:
                imp = rng.lognormal(0.0, 1.0, x.shape[1]).astype(np.float32)
                to, tl, tp = [], [], []
                for _ in range(trials):
                    t0 = time.perf_counter()
                    ours = quantize(x, name)
                    to.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    ref = llama_cpp_quantize(x, name)
                    tl.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    quantize(x, name, search=False)                           # the port alone: our guard's cost
                    tp.append(time.perf_counter() - t0)
                t_ours += float(np.median(to))
                t_llama += float(np.median(tl))
                t_port += float(np.median(tp))
                dx = lambda q, t=t, x=x: gguf.quants.dequantize(q, t).astype(np.float64) - x
                sq = lambda q, dx=dx: dx(q) ** 2
                err["ours"] += float(sq(ours).sum())
                err["llama"] += float(sq(ref).sum())
                shrink["ours"] -= float((dx(ours) * x).sum())
                shrink["llama"] -= float((dx(ref) * x).sum())
                shrink["xx"] += float((x.astype(np.float64) ** 2).sum())
                err["ours_w"] += float((sq(quantize(x, name, imp)) * imp).sum())
                err["llama_w"] += float((sq(llama_cpp_quantize(x, name, imp)) * imp).sum())
                nbytes += ours.nbytes
                n += x.size
                assert ours.nbytes == ref.nbytes
            r = {k: float(np.sqrt(v / n)) for k, v in err.items()}
            out.append({"type": name, "weights": dist, "n_weights": n, "bytes": nbytes,
                        "rmse_ours": r["ours"], "rmse_llama_cpp": r["llama"], "rmse_reduction": 1 - r["ours"] / r["llama"],
                        "wrmse_ours": r["ours_w"], "wrmse_llama_cpp": r["llama_w"],
                        "wrmse_reduction": 1 - r["ours_w"] / r["llama_w"],
                        "shrink_ours": shrink["ours"] / shrink["xx"], "shrink_llama_cpp": shrink["llama"] / shrink["xx"],
                        "ours_mweights_per_s": n / t_ours / 1e6, "llama_cpp_mweights_per_s": n / t_llama / 1e6,
                        "port_mweights_per_s": n / t_port / 1e6})
    return out


def bench_speed(types=ERROR_TYPES, rows: int = 512, cols: int = 4096, trials: int = 5, seed: int = 0,
                threads: int | None = None) -> list[dict]:
    """Per type: Mw/s of ours, the port alone and llama.cpp's quantizer (trials interleaved, median; all on
    `threads` threads, default os.cpu_count()), without and with a lognormal importance vector, and the RMSE
    reductions."""
    import gguf
    import numba

    threads = threads or os.cpu_count() or 1
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))

    from lazymoe.kernels.quantizers import quantize

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    imp = rng.lognormal(0.0, 1.0, cols).astype(np.float32)
    out = []
    for name in types:
        t = gguf.GGMLQuantizationType[name.upper()]
        runs = {"ours": lambda n=name: quantize(x, n), "port": lambda n=name: quantize(x, n, search=False),
                "llama_cpp": lambda n=name: llama_cpp_quantize(x, n, threads=threads),
                "ours_imatrix": lambda n=name: quantize(x, n, imp),
                "llama_cpp_imatrix": lambda n=name: llama_cpp_quantize(x, n, imp, threads=threads)}
        for f in runs.values():                                                   # JIT warm-up
            f()
        secs: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(trials):
            for k, f in runs.items():
                t0 = time.perf_counter()
                f()
                secs[k].append(time.perf_counter() - t0)
        r = {"type": name, **{f"{k}_mweights_per_s": x.size / float(np.median(v)) / 1e6 for k, v in secs.items()}}
        err = lambda q, w, t=t: float(((gguf.quants.dequantize(q, t).astype(np.float64) - x) ** 2 * w).sum())
        r["rmse_reduction"] = 1 - np.sqrt(err(quantize(x, name), 1.0) / err(llama_cpp_quantize(x, name), 1.0))
        r["wrmse_reduction"] = 1 - np.sqrt(err(quantize(x, name, imp), imp) / err(llama_cpp_quantize(x, name, imp), imp))
        out.append(r)
    return out


_COMPILE_CHILD = """
import json, sys, time
import numpy as np
from lazymoe.kernels.quantizers import quantize
x = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
imp = np.ones(512, np.float32)
out = []
for name in sys.argv[1].split(","):
    t0 = time.perf_counter()
    quantize(x, name), quantize(x, name, imp), quantize(x, name, search=False)
    out.append({"type": name, "seconds": time.perf_counter() - t0})
print(json.dumps(out))
"""


def bench_compile(types=("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")) -> list[dict]:
    """Per type: seconds of its first quantizations in a child process with an empty Numba cache (the JIT
    compile, once per fresh cache), in the order given."""
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        res = subprocess.run([sys.executable, "-c", _COMPILE_CHILD, ",".join(types)], env=env, check=True,
                             capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


MIXTRAL_8X7B = dict(hidden=4096, ffn=14336, heads=32, kv=8, experts=8, used=2, vocab=32000)


def write_checkpoint(folder: str, layers: int) -> int:
    """An HF Mixtral-8x7B-shaped checkpoint of `layers` layers (bf16, one shard per layer); returns bytes."""
    from lazymoe.quantize.safetensors_file import write_safetensors

    c = MIXTRAL_8X7B
    D, F, V, kvd = c["hidden"], c["ffn"], c["vocab"], c["hidden"] // c["heads"] * c["kv"]
    rng = np.random.default_rng(0)
    g = lambda *s: (lambda: (rng.standard_normal(s, dtype=np.float32) * 0.02))
    os.makedirs(folder, exist_ok=True)
    weight_map = {}
    shards = [{"model.embed_tokens.weight": ((V, D), g(V, D)), "model.norm.weight": ((D,), lambda: np.ones(D, np.float32)),
               "lm_head.weight": ((V, D), g(V, D))}]
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": ((D,), lambda: np.ones(D, np.float32)),
             p + "post_attention_layernorm.weight": ((D,), lambda: np.ones(D, np.float32)),
             p + "self_attn.q_proj.weight": ((D, D), g(D, D)), p + "self_attn.k_proj.weight": ((kvd, D), g(kvd, D)),
             p + "self_attn.v_proj.weight": ((kvd, D), g(kvd, D)), p + "self_attn.o_proj.weight": ((D, D), g(D, D)),
             p + "block_sparse_moe.gate.weight": ((c["experts"], D), g(c["experts"], D))}
        for e in range(c["experts"]):
            q = p + f"block_sparse_moe.experts.{e}."
            t[q + "w1.weight"], t[q + "w3.weight"], t[q + "w2.weight"] = ((F, D), g(F, D)), ((F, D), g(F, D)), ((D, F), g(D, F))
        shards.append(t)
    total = 0
    for k, t in enumerate(shards):
        fn = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(folder, fn), t, "BF16")
        total += os.path.getsize(os.path.join(folder, fn))
        weight_map.update({n: fn for n in t})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    cfg = {"architectures": ["MixtralForCausalLM"], "hidden_size": D, "intermediate_size": F, "num_hidden_layers": layers,
           "num_attention_heads": c["heads"], "num_key_value_heads": c["kv"], "vocab_size": V,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
           "num_local_experts": c["experts"], "num_experts_per_tok": c["used"]}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    import mistral_common  # the real Mixtral 8x7B tokenizer (32000 pieces); a test/bench dependency
    shutil.copy(os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1"),
                os.path.join(folder, "tokenizer.model"))
    return total


def bench_stream(folder: str, layers: int, qtype: str = "q4_0", expert_type: str | None = None) -> dict:
    marker = os.path.join(folder, f".complete-{layers}")
    if not os.path.exists(marker):
        shutil.rmtree(folder, ignore_errors=True)
        # in a child: generating the weights leaves this process large, and a converter forked from a
        # large parent would report the parent's pages as its own peak RSS
        subprocess.run([sys.executable, "-c", f"from lazymoe.benchmarks.quantize import write_checkpoint; "
                        f"write_checkpoint({folder!r}, {layers})"], check=True)
        open(marker, "w").close()
    src_bytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    out = os.path.join(folder, f"out-{qtype}.gguf")
    cmd = [sys.executable, "-m", "lazymoe.cli", "quantize", folder, "-o", out, "-t", qtype, "--force", "-q"]
    cmd += ["--expert-type", expert_type] if expert_type else []
    t0 = time.perf_counter()
    proc, peak = _peak_rss(cmd)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"conversion failed with exit code {proc.returncode}")
    res = {"layers": layers, "type": qtype, "source_bytes": src_bytes, "output_bytes": os.path.getsize(out),
           "seconds": dt, "peak_rss_bytes": peak, "command": " ".join(cmd[2:])}
    os.unlink(out)
    return res


def _peak_rss(cmd):
    """Run cmd; (the finished process, its peak RSS sampled by psutil every 50 ms)."""
    import psutil
    proc = psutil.Popen(cmd)
    return proc, _sample_peak(proc, 0)


def _sample_peak(proc, peak: int) -> int:
    """The peak RSS of a running psutil process (at least peak), sampled every 50 ms until it exits."""
    import psutil
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    return peak


_PART = """
import sys, time, numpy as np
from lazymoe.kernels.quantizers import quantize
qt = sys.argv[1]
quantize(np.ones((256, 256), np.float32), qt, importance=np.ones(256, np.float32))       # JIT before the part
x = np.random.default_rng(0).standard_normal((14336, 4096), dtype=np.float32) * 0.02      # one expert matrix
imp = np.random.default_rng(1).random(4096, dtype=np.float32)
print("ready", flush=True)
time.sleep(1.0)
t0 = time.perf_counter()
quantize(x, qt, importance=imp)
print(time.perf_counter() - t0, flush=True)
time.sleep(0.5)
"""


def bench_part(qtype: str) -> dict:
    """Peak RSS of a child holding one 14336x4096 float32 part, before (sampled while it sleeps) and during
    its quantization to qtype."""
    import psutil
    proc = psutil.Popen([sys.executable, "-c", _PART, qtype], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    before = proc.memory_info().rss
    peak = _sample_peak(proc, before)
    secs = float(proc.stdout.readline())
    return {"type": qtype, "rss_with_part_bytes": before, "peak_rss_bytes": peak, "quantize_seconds": secs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["error", "stream", "part", "speed", "compile"])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--type", default=None, help="stream: the file type (default q4_0); part: block types, comma-separated")
    ap.add_argument("--expert-type", default=None, help="stream: the experts' block type")
    ap.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "lazymoe-bench", "mixtral-8x7b-shaped"))
    ap.add_argument("--types", default=None, help="comma-separated block types for `error`, `speed` and `compile`")
    ap.add_argument("--float-model", default=None, metavar="GGUF",
                    help="error: also every matrix of this float GGUF (e.g. the F32 demo model train_demo re-makes)")
    ap.add_argument("--threads", type=int, default=None, help="speed: threads of ours and llama.cpp's (default: all)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    types = [t.strip().lower() for t in (a.types or ",".join(ERROR_TYPES)).split(",") if t.strip()]
    if a.what == "compile":
        rows = bench_compile(types if a.types else ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k"))
        if a.json:
            print(json.dumps({"machine": machine, "compile": rows}))
            return 0
        for r in rows:
            print(f"{r['type']:5} {r['seconds']:6.1f} s")
        print(f"total {sum(r['seconds'] for r in rows):6.1f} s")
        return 0
    if a.what == "error":
        rows = bench_error(types=types, float_model=a.float_model)
        if a.json:
            print(json.dumps({"machine": machine, "error": rows}))
            return 0
        print(f"{'type':5} {'weights':11} {'bits/w':>6} {'RMSE ours':>10} {'llama.cpp':>10} {'lower':>7} "
              f"{'imatrix: ours':>13} {'llama.cpp':>10} {'lower':>7} {'shrink ours':>11} {'llama.cpp':>9} "
              f"{'Mw/s ours':>9} {'llama.cpp':>9} {'ratio':>5} {'port alone':>10}")
        for r in rows:
            print(f"{r['type']:5} {r['weights']:11} {8 * r['bytes'] / r['n_weights']:6.3f} {r['rmse_ours']:10.5f} "
                  f"{r['rmse_llama_cpp']:10.5f} {100 * r['rmse_reduction']:6.2f}% {r['wrmse_ours']:13.5f} "
                  f"{r['wrmse_llama_cpp']:10.5f} {100 * r['wrmse_reduction']:6.2f}% {100 * r['shrink_ours']:10.3f}% "
                  f"{100 * r['shrink_llama_cpp']:8.3f}% {r['ours_mweights_per_s']:9.2f} "
                  f"{r['llama_cpp_mweights_per_s']:9.2f} {r['ours_mweights_per_s'] / r['llama_cpp_mweights_per_s']:5.2f} "
                  f"{r['port_mweights_per_s'] / r['llama_cpp_mweights_per_s']:10.2f}")
        return 0
    if a.what == "speed":
        rows = bench_speed(types, threads=a.threads)
        if a.json:
            print(json.dumps({"machine": machine, "speed": rows}))
            return 0
        print(f"{'type':5} {'Mw/s ours':>9} {'port':>7} {'llama.cpp':>9} {'ratio':>6} {'RMSE lower':>10} | imatrix: "
              f"{'ours':>7} {'llama.cpp':>9} {'ratio':>6} {'lower':>7}")
        for r in rows:
            print(f"{r['type']:5} {r['ours_mweights_per_s']:9.1f} {r['port_mweights_per_s']:7.1f} "
                  f"{r['llama_cpp_mweights_per_s']:9.1f} {r['ours_mweights_per_s'] / r['llama_cpp_mweights_per_s']:6.2f} "
                  f"{100 * r['rmse_reduction']:9.2f}% | {r['ours_imatrix_mweights_per_s']:16.1f} "
                  f"{r['llama_cpp_imatrix_mweights_per_s']:9.1f} "
                  f"{r['ours_imatrix_mweights_per_s'] / r['llama_cpp_imatrix_mweights_per_s']:6.2f} "
                  f"{100 * r['wrmse_reduction']:6.2f}%")
        return 0
    if a.what == "part":
        rows = [bench_part(t) for t in (a.type or "q4_0,q2_k,q3_k,q4_k,q5_k,q6_k").split(",")]
        if a.json:
            print(json.dumps({"machine": machine, "part": rows}))
            return 0
        print(f"{'type':6} {'RSS with the part':>18} {'peak quantizing':>16} {'increase':>9} {'seconds':>8}")
        for r in rows:
            print(f"{r['type']:6} {r['rss_with_part_bytes'] / 2**20:14.0f} MiB {r['peak_rss_bytes'] / 2**20:12.0f} MiB "
                  f"{(r['peak_rss_bytes'] - r['rss_with_part_bytes']) / 2**20:5.0f} MiB {r['quantize_seconds']:8.1f}")
        return 0
    r = bench_stream(a.dir, a.layers, a.type or "q4_0", a.expert_type)
    if a.json:
        print(json.dumps({"machine": machine, "stream": r}))
        return 0
    print(f"Mixtral-8x7B shapes, {r['layers']} layer(s): source {r['source_bytes'] / 2**30:.2f} GiB bf16 -> "
          f"{r['output_bytes'] / 2**30:.2f} GiB {r['type']} in {r['seconds']:.0f} s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
