"""What the first generation of a fresh process pays: several generations in a row in one process, timed step by step.

    python -m lazymoe.benchmarks.first_gen MODEL.gguf [-P 256] [-n 64] [--runs 3] [--ctx N] [--json]

vs_llamacpp times one generation per fresh process, so anything a process does once (Numba loading a kernel's
cached machine code on its first call with a new signature, expert reads into slots, first touches of buffers)
lands in its figures unless the load did it. This loads the model (timed: wall, CPU, page faults), then runs
--runs generations of the same P-token prompt and n-1 greedy decode steps (the KV cache rewound between them)
and prints for each: prompt wall and CPU time, decode tok/s, the first steps' and the median step's wall and CPU
time, page faults, expert bytes read, and the Numba functions that were first called (loaded or compiled)
during it. CPU times are less sensitive to other processes than wall times; read the two together.

--file-views (an A/B experiment, a model whose experts all fit): the experts are computed where they lie in the
file mapping (page-cache pages) instead of in their cache slots (anonymous memory the load copied them into),
the kernels that zero-copy expert views would run. The first generation pays the mapping's page faults.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

FIRST = 5        # decode steps shown one by one


def _usage() -> tuple[int, int, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_majflt, r.ru_utime + r.ru_stime


class _FirstCalls:
    """Records each Numba dispatcher compile (a new signature: loaded from the cache or compiled) while on."""

    def __init__(self):
        from numba.core.dispatcher import Dispatcher
        self.names: list[str] = []
        self.on = False
        orig = Dispatcher.compile

        def compile(disp, sig):
            if self.on and sig not in disp.overloads:
                self.names.append(disp.py_func.__qualname__)
            return orig(disp, sig)
        Dispatcher.compile = compile

    def take(self) -> list[str]:
        out, self.names = self.names, []
        return out


def _span(fn):
    f0, j0, c0 = _usage()
    t0 = time.perf_counter()
    out = fn()
    f1, j1, c1 = _usage()
    return out, {"wall_s": time.perf_counter() - t0, "cpu_s": c1 - c0, "minflt": f1 - f0, "majflt": j1 - j0}


def _file_views(m) -> None:
    """Make the network compute every expert on the file mapping: the cache's arena is the mapping and the offsets
    it hands out are the experts' file offsets."""
    import numpy as np
    cache, data = m.experts, m.file.data
    if cache is None or not cache.holds_all():
        raise ValueError("--file-views needs a model whose experts all fit the budget")
    acquire = cache.acquire

    def file_acquire(layer, experts, wait_all=False):
        got, _ = acquire(layer, experts, wait_all)
        return got, np.array([cache.offsets[layer][experts[i]] for i in got], np.int64).reshape(-1, 3)
    cache.acquire, cache.arena = file_acquire, lambda layer: data


def measure(path: str, prompt_tokens: int, gen: int, runs: int, ctx: int | None = None,
            file_views: bool = False) -> dict:
    import numpy as np

    from lazymoe.benchmarks.workload import bench_prompt, model_facts
    from lazymoe.runtime.model import load_model
    _, ids = bench_prompt(model_facts(path, prompt_tokens + gen)["tokenizer"], prompt_tokens)
    calls = _FirstCalls()
    m, load = _span(lambda: load_model(path, ctx=ctx or prompt_tokens + gen, progress=False))
    if file_views:
        _file_views(m)
    calls.on = True
    out = {"model": path, "prompt_tokens": prompt_tokens, "gen": gen, "file_views": file_views, "load": load, "runs": []}
    read = (lambda: m.experts.counters()["bytes_read"]) if m.experts is not None else (lambda: 0)
    for _ in range(runs):
        m.rewind(0)
        r0 = read()
        logits, prompt = _span(lambda: m.eval(ids))
        prompt["numba_first_calls"] = calls.take()
        tok, steps = int(np.argmax(logits)), []
        for _ in range(gen - 1):
            logits, s = _span(lambda t=tok: m.eval([t]))
            tok = int(np.argmax(logits))
            steps.append(s)
        wall = [s["wall_s"] for s in steps]
        out["runs"].append({
            "prompt": prompt, "gen_tok_per_s": len(wall) / sum(wall),
            "first_steps_ms": [round(1e3 * w, 1) for w in wall[:FIRST]],
            "first_steps_cpu_ms": [round(1e3 * s["cpu_s"], 1) for s in steps[:FIRST]],
            "median_step_ms": 1e3 * statistics.median(wall),
            "median_step_cpu_ms": 1e3 * statistics.median(s["cpu_s"] for s in steps),
            "decode_minflt": sum(s["minflt"] for s in steps), "decode_majflt": sum(s["majflt"] for s in steps),
            "expert_mb_read": (read() - r0) / 1e6, "decode_numba_first_calls": calls.take()})
    m.close()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lazymoe.benchmarks.first_gen", description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("-P", "--prompt-tokens", type=int, default=256, metavar="P")
    p.add_argument("-n", "--gen", type=int, default=64, metavar="G")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--ctx", type=int, default=None, help="KV cache positions (default P + G)")
    p.add_argument("--file-views", action="store_true", help="compute the experts on the file mapping (see above)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.prompt_tokens < 2 or a.gen < 2 or a.runs < 1:
            raise ValueError("-P and -n must be at least 2 and --runs at least 1")
        res = measure(a.model, a.prompt_tokens, a.gen, a.runs, a.ctx, a.file_views)
    except (ValueError, OSError) as e:
        print(f"first_gen: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(res))
        return 0
    ld = res["load"]
    print(f"{a.model}: load {ld['wall_s']:.2f} s (CPU {ld['cpu_s']:.2f} s, {ld['minflt']} minor / {ld['majflt']} major faults)")
    for i, r in enumerate(res["runs"]):
        pr = r["prompt"]
        print(f"generation {i + 1}: prompt {pr['wall_s']:.2f} s (CPU {pr['cpu_s']:.2f} s, {a.prompt_tokens / pr['wall_s']:.1f} tok/s), "
              f"decode {r['gen_tok_per_s']:.2f} tok/s; steps ms {r['first_steps_ms']} (CPU {r['first_steps_cpu_ms']}), "
              f"median {r['median_step_ms']:.1f} (CPU {r['median_step_cpu_ms']:.1f}); experts read {r['expert_mb_read']:.0f} MB; "
              f"faults prompt {pr['minflt']} decode {r['decode_minflt']}")
        for what, names in (("prompt", pr["numba_first_calls"]), ("decode", r["decode_numba_first_calls"])):
            if names:
                print(f"  Numba first calls in the {what}: {len(names)}: {', '.join(sorted(set(names)))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
