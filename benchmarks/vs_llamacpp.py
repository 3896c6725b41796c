"""lazymoe against llama.cpp (llama-cpp-python) on the same GGUF file, side by side.

    python -m lazymoe.benchmarks.vs_llamacpp MODEL.gguf [--mem-limit 12G] [--prompt-tokens 256] [--gen 64]
                                     [--threads 2] [--trials 3] [--ram SIZE] [--json]

Each run is its own process; the two engines alternate (which goes first flips every trial) and
the medians of the trials are reported with the ratios lazymoe / llama.cpp. Both get the same
prompt token ids (BOS first, built from the model's vocabulary by benchmarks.workload.bench_prompt),
greedy decoding, the same thread count. lazymoe is `lazymoe run --json`; llama.cpp runs in a
worker process of this script.

What is timed, for both: load s = process wall time minus prompt and generation time
(interpreter start, imports, model load); prompt tok/s = one pass over the P prompt ids;
generation tok/s = the G-1 decode steps after the first token (which comes from the prompt's
logits). llama.cpp decodes all G tokens; lazymoe stops early only at EOS (reported).

Same work: after the last layer's attention, llama.cpp keeps only the rows it must output
(`ggml_get_rows(cur, inp_out_ids)` in its llama graph), so with one output (the default) the last
layer's FFN (router and experts) runs for the last prompt token only; lazymoe does the same
(runtime/network.py), so the default prompt rates compare the same work. The worker also times a
second prompt pass that outputs logits for every token (every layer's FFN for every token, plus the
output head for every token): a rate for the work lazymoe does with all logits.

--mem-limit puts each run in a fresh cgroup with that memory limit (v1 memory.limit_in_bytes or
v2 memory.max), which counts the page cache: the fair test of "fits in N GB". The page cache
is dropped before each capped run (it would otherwise be charged to whoever read it first). An
OOM kill is recorded as OOM. llama.cpp's CPU repack (`use_extra_bufts`) builds a second full-size
copy of the weights in anonymous memory; --repack auto turns it off when the file is over half
the memory available (the cap, or RAM).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from lazymoe.benchmarks.machine import disk_read_speed, drop_page_cache, machine_info
from lazymoe.benchmarks.runner import run_lazymoe, thread_env
from lazymoe.benchmarks.workload import bench_prompt, model_facts
from lazymoe.runtime.memory import GiB, MiB, parse_size

METRICS = ("load_s", "prompt_tok_per_s", "prompt_all_logits_tok_per_s", "gen_tok_per_s", "time_to_first_token_s",
           "peak_rss_bytes", "cgroup_peak_bytes")


# --- the llama.cpp worker (runs in its own process) -------------------------------

def llama_worker(model: str, ids: list[int], gen: int, threads: int, repack: bool, all_logits: bool,
                 text: str) -> dict:
    import resource

    import llama_cpp
    import numpy as np
    if not repack:
        default = llama_cpp.llama_cpp.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False        # no repacked second copy of the weights
            return p
        llama_cpp.llama_cpp.llama_model_default_params = params
    llm = llama_cpp.Llama(model_path=model, n_ctx=len(ids) + gen, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()

    def last_token() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))

    t0 = time.perf_counter()
    llm.eval(ids)
    t_prompt = time.perf_counter() - t0
    out = [last_token()]
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(gen - 1):
        llm.eval([out[-1]])
        out.append(last_token())
    t_gen = time.perf_counter() - t1
    res = {"prompt_tokens": len(ids), "prompt_s": t_prompt, "prompt_tok_per_s": len(ids) / t_prompt,
           "generated_tokens": len(out), "gen_s": t_gen, "gen_tok_per_s": (gen - 1) / t_gen if gen > 1 else 0.0,
           "time_to_first_token_s": ttft, "tokens": out,
           "tokenizer_agrees": llm.tokenize(text.encode(), add_bos=True, special=False) == list(ids)}
    if all_logits:
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        llm._batch.set_batch(batch=ids, n_past=0, logits_all=True)
        t2 = time.perf_counter()
        llm._ctx.decode(llm._batch)
        res["prompt_all_logits_tok_per_s"] = len(ids) / (time.perf_counter() - t2)
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return res


def run_llama(model: str, ids, text: str, gen: int, threads: int, repack: bool, all_logits: bool,
              preexec_fn=None, timeout=None) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"model": model, "ids": list(ids), "gen": gen, "threads": threads, "repack": repack,
                   "all_logits": all_logits, "text": text}, f)
    cmd = [sys.executable, "-m", "lazymoe.benchmarks.vs_llamacpp", "--worker", f.name]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads), preexec_fn=preexec_fn,
                           timeout=timeout, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    finally:
        os.unlink(f.name)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        err = (r.stderr.strip().splitlines() or [""])[-1]
        return {"status": "OOM" if r.returncode == -9 else "failed", "error": err or f"exit code {r.returncode}",
                "wall_s": wall}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out.update(status="ok", wall_s=wall, load_s=wall - out["prompt_s"] - out["gen_s"] -
               (len(ids) / out["prompt_all_logits_tok_per_s"] if "prompt_all_logits_tok_per_s" in out else 0.0))
    return out


# --- where lazymoe's time goes (runs in its own process) ------------------------------

def profile_worker(model: str, ids: list[int], gen: int, ram, top: int = 14) -> dict:
    """cProfile of one prompt pass and gen-1 greedy decode steps. Numba kernels do not appear as calls of
    their own: their time is the tottime of the Python function that calls them (kernels.dispatch, ffn)."""
    import cProfile
    import pstats

    import numpy as np

    from lazymoe.runtime.model import load_model
    m = load_model(model, ram_budget=ram, ctx=len(ids) + gen, progress=False)

    def table(pr) -> list:
        st = pstats.Stats(pr)
        rows = sorted(((k, v) for k, v in st.stats.items()), key=lambda kv: -kv[1][2])[:top]
        return [{"function": f"{os.path.relpath(k[0]) if k[0].startswith('/') else k[0]}:{k[1]}({k[2]})",
                 "calls": v[1], "tottime_s": v[2], "cumtime_s": v[3]} for k, v in rows]

    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    logits = m.eval(ids)
    pr.disable()
    t_prompt = time.perf_counter() - t0
    prompt_top = table(pr)
    pr = cProfile.Profile()
    t_gen = 0.0
    tok = int(np.argmax(logits))
    for _ in range(gen - 1):
        t1 = time.perf_counter()
        pr.enable()
        logits = m.eval([tok])
        pr.disable()
        t_gen += time.perf_counter() - t1
        tok = int(np.argmax(logits))
    cfg, f = m.cfg, m.file
    experts = sum(p.nbytes for lp in m.weights.expert_parts for p in lp)        # one expert of every layer
    per_token = (sum(f.tensors[n].nbytes for n in m.weights.resident_names if n != "token_embd.weight")
                 + cfg.n_expert_used * experts)
    out = {"prompt_tokens": len(ids), "prompt_s": t_prompt, "gen_steps": gen - 1, "gen_s": t_gen,
           "weight_bytes_per_token": per_token, "gen_weight_gb_per_s": per_token * (gen - 1) / t_gen / 1e9 if t_gen else None,
           "cache": m.experts.counters() if m.experts else None, "prompt_top": prompt_top, "gen_top": table(pr)}
    m.close()
    return out


def run_profile(args, ids) -> int:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"model": args.model, "ids": list(ids), "gen": args.gen, "ram": args.ram}, f)
    try:
        r = subprocess.run([sys.executable, "-m", "lazymoe.benchmarks.vs_llamacpp", "--profile-worker", f.name],
                           capture_output=True, text=True, env=thread_env(args.threads))
    finally:
        os.unlink(f.name)
    if r.returncode != 0:
        raise ValueError(f"the profile run failed: {(r.stderr.strip().splitlines() or [''])[-1]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"lazymoe profile, {args.threads} threads: prompt {res['prompt_tokens']} tokens in {res['prompt_s']:.2f} s "
          f"({res['prompt_tokens'] / res['prompt_s']:.2f} tok/s); {res['gen_steps']} decode steps in {res['gen_s']:.2f} s "
          f"({res['gen_steps'] / res['gen_s']:.3f} tok/s, {res['weight_bytes_per_token'] / 1e9:.2f} GB of weights per "
          f"token = {res['gen_weight_gb_per_s']:.1f} GB/s)")
    for phase, total in (("prompt", res["prompt_s"]), ("gen", res["gen_s"])):
        print(f"\n{phase}: top functions by own time (numba kernel time counts in its Python caller)")
        print(f"{'own s':>8} {'share':>6} {'cum s':>8} {'calls':>7}  function")
        for e in res[f"{phase}_top"]:
            print(f"{e['tottime_s']:8.2f} {100 * e['tottime_s'] / total:5.1f}% {e['cumtime_s']:8.2f} {e['calls']:7d}  {e['function']}")
    return 0


# --- the comparison ------------------------------------------------------------------

def one_run(engine: str, args, ids, text, repack: bool, cap_name: str | None) -> dict:
    """One run of one engine, under a fresh memory cap if asked; cgroup figures merged in."""
    from lazymoe.benchmarks.cgroup import MemCap
    cold = drop_page_cache() if (args.cold or args.mem_limit) else None

    def go(preexec_fn):
        if engine == "llama.cpp":
            return run_llama(args.model, ids, text, args.gen, args.threads, repack, not args.no_all_logits,
                             preexec_fn, args.timeout)
        return run_lazymoe(args.model, text, args.gen, ram=args.ram, ctx=len(ids) + args.gen, threads=args.threads,
                           extra=shlex.split(args.lazymoe_args), preexec_fn=preexec_fn, timeout=args.timeout)

    if args.mem_limit is None:
        res = go(None)
    else:
        with MemCap(parse_size(args.mem_limit), cap_name) as cap:
            res = go(cap.join)
            cg = cap.stats()
        res["cgroup_peak_bytes"], res["cgroup_limit_hits"], res["oom_kills"] = cg["peak_bytes"], cg["limit_hits"], cg["oom_kills"]
        if res["status"] != "ok" and cg["oom_kills"]:
            res["status"] = "OOM"
    res["engine"], res["cold"] = engine, cold
    return res


def medians(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["status"] == "ok"]
    m = {"ok": len(ok), "runs": len(runs), "statuses": [r["status"] for r in runs],
         "generated_tokens": [r.get("generated_tokens") for r in ok]}
    for k in METRICS:
        vals = [r[k] for r in ok if r.get(k) is not None]
        m[k] = statistics.median(vals) if vals else None
    return m


def ratios(lazy: dict, llama: dict) -> dict:
    def r(a, b):
        return a / b if a is not None and b else None
    return {"load_s": r(lazy["load_s"], llama["load_s"]),
            "prompt_tok_per_s": r(lazy["prompt_tok_per_s"], llama["prompt_tok_per_s"]),
            "prompt_tok_per_s_vs_all_logits": r(lazy["prompt_tok_per_s"], llama["prompt_all_logits_tok_per_s"]),
            "gen_tok_per_s": r(lazy["gen_tok_per_s"], llama["gen_tok_per_s"]),
            "peak_rss_bytes": r(lazy["peak_rss_bytes"], llama["peak_rss_bytes"]),
            "cgroup_peak_bytes": r(lazy["cgroup_peak_bytes"], llama["cgroup_peak_bytes"])}


def format_table(res: dict) -> str:
    lm, ll, ra = res["median"]["lazymoe"], res["median"]["llama.cpp"], res["ratio"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    def g(v):
        return "-" if v is None else f"{v / GiB:.2f}G"
    rows = [("load s (process)", f(ll["load_s"], ".2f"), f(lm["load_s"], ".2f"), f(ra["load_s"], ".2f")),
            ("prompt tok/s", f(ll["prompt_tok_per_s"], ".2f"), f(lm["prompt_tok_per_s"], ".2f"),
             f(ra["prompt_tok_per_s"], ".2f")),
            ("  llama.cpp all logits", f(ll["prompt_all_logits_tok_per_s"], ".2f"), "", f(ra["prompt_tok_per_s_vs_all_logits"], ".2f")),
            ("generation tok/s", f(ll["gen_tok_per_s"], ".3f"), f(lm["gen_tok_per_s"], ".3f"), f(ra["gen_tok_per_s"], ".2f")),
            ("time to first token s", f(ll["time_to_first_token_s"], ".2f"), f(lm["time_to_first_token_s"], ".2f"), ""),
            ("peak RSS", g(ll["peak_rss_bytes"]), g(lm["peak_rss_bytes"]), f(ra["peak_rss_bytes"], ".2f"))]
    if res["args"]["mem_limit"]:
        rows.append(("cgroup peak (+page cache)", g(ll["cgroup_peak_bytes"]), g(lm["cgroup_peak_bytes"]),
                     f(ra["cgroup_peak_bytes"], ".2f")))
    rows.append(("runs ok / OOM", f"{ll['ok']}/{ll['statuses'].count('OOM')}", f"{lm['ok']}/{lm['statuses'].count('OOM')}", ""))
    w = max(len(r[0]) for r in rows)
    lines = [f"{'median of ' + str(res['args']['trials']) + ' trials':<{w}} {'llama.cpp':>10} {'lazymoe':>10} {'lazymoe/llama.cpp':>18}"]
    lines += [f"{a:<{w}} {b:>10} {c:>10} {d:>18}" for a, b, c, d in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lazymoe.benchmarks.vs_llamacpp", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a GGUF file both engines load")
    p.add_argument("--mem-limit", default=None, metavar="SIZE", help="run each process in a cgroup capped at SIZE")
    p.add_argument("--ram", default=None, metavar="SIZE",
                   help="lazymoe's RAM budget (default: --mem-limit minus 1G, or lazymoe's own default)")
    p.add_argument("-P", "--prompt-tokens", type=int, default=256, metavar="P")
    p.add_argument("-n", "--gen", type=int, default=64, metavar="G")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--repack", choices=("auto", "on", "off"), default="auto",
                   help="llama.cpp's CPU weight repack (default auto: off when the file is over half the memory)")
    p.add_argument("--cold", action="store_true", help="drop the page cache before every run (always with --mem-limit)")
    p.add_argument("--lazymoe-args", default="", metavar="ARGS",
                   help="extra flags for `lazymoe run`, e.g. \"--read buffered\"")
    p.add_argument("--no-all-logits", action="store_true", help="skip llama.cpp's second, all-logits prompt pass")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="give up on a run after S seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--profile", action="store_true",
                   help="instead: profile one lazymoe run (prompt pass and decode steps) and print where the time goes")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--worker"], ["--profile-worker"]):
        spec = json.load(open(argv[1]))
        print(json.dumps((llama_worker if argv[0] == "--worker" else profile_worker)(**spec)))
        return 0
    args = build_parser().parse_args(argv)
    try:
        return compare(args)
    except (ValueError, OSError) as e:
        print(f"vs_llamacpp: error: {e}", file=sys.stderr)
        return 2


def compare(args) -> int:
    import psutil
    for k in ("prompt_tokens", "gen", "threads", "trials"):
        if getattr(args, k) < (2 if k in ("prompt_tokens", "gen") else 1):
            raise ValueError(f"--{k.replace('_', '-')} is too small: {getattr(args, k)}")
    if args.mem_limit:
        from lazymoe.benchmarks.cgroup import available
        if available() is None:
            raise ValueError("--mem-limit needs a writable cgroup memory controller (root, cgroup v1 or v2)")
        if args.ram is None:
            args.ram = str(parse_size(args.mem_limit) - GiB)
    facts = model_facts(args.model, args.prompt_tokens + args.gen)
    text, ids = bench_prompt(facts["tokenizer"], args.prompt_tokens)
    if args.profile:
        return run_profile(args, ids)
    memory = parse_size(args.mem_limit) if args.mem_limit else psutil.virtual_memory().total
    repack = args.repack == "on" or (args.repack == "auto" and 2 * facts["file_bytes"] <= memory)

    machine = machine_info()
    machine["disk_read_bytes_per_s"] = disk_read_speed(args.model)
    if not (args.cold or args.mem_limit) and facts["file_bytes"] < 0.8 * psutil.virtual_memory().available:
        with open(args.model, "rb") as f:            # warm the page cache once, so the first run is not the cold one
            while f.read(64 * MiB):
                pass
    runs = {"llama.cpp": [], "lazymoe": []}
    for t in range(args.trials):
        order = ("llama.cpp", "lazymoe") if t % 2 == 0 else ("lazymoe", "llama.cpp")
        for engine in order:
            r = one_run(engine, args, ids, text, repack, f"vs_llamacpp-{os.getpid()}-{t}-{engine.replace('.', '')}")
            runs[engine].append(r)
            brief = (f"prompt {r['prompt_tok_per_s']:.2f} tok/s, gen {r['gen_tok_per_s']:.3f} tok/s, "
                     f"peak RSS {r['peak_rss_bytes'] / GiB:.2f}G" if r["status"] == "ok" else r.get("error", ""))
            print(f"trial {t + 1} {engine}: {r['status']}: {brief}", file=sys.stderr)
    med = {e: medians(rs) for e, rs in runs.items()}
    agree = None
    ok_l = [r for r in runs["llama.cpp"] if r["status"] == "ok"]
    ok_m = [r for r in runs["lazymoe"] if r["status"] == "ok"]
    if ok_l and ok_m:
        a, b = ok_l[0]["tokens"], ok_m[0]["tokens"]
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    res = {"model": args.model, "name": facts["name"], "synthetic": facts["synthetic"], "file_bytes": facts["file_bytes"],
           "args": {**vars(args), "prompt_tokens": len(ids)}, "llama_repack": repack, "machine": machine,
           "same_first_generated_tokens": agree,
           "llama_tokenizer_agrees": ok_l[0].get("tokenizer_agrees") if ok_l else None,
           "median": med, "ratio": ratios(med["lazymoe"], med["llama.cpp"]), "runs": runs}
    if args.json:
        print(json.dumps(res))
        return 0
    d = machine["disk_read_bytes_per_s"]
    print(f"{args.model}: {facts['name']}, {facts['file_bytes'] / GiB:.2f} GiB; prompt {len(ids)} tokens, {args.gen} generated "
          f"(greedy), {args.threads} threads; llama.cpp repack {'on' if repack else 'off'}; lazymoe --ram {args.ram or 'default'}"
          + (f"; cgroup cap {args.mem_limit}, page cache dropped before each run" if args.mem_limit else
             "; cold runs" if args.cold else "; warm page cache"))
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_bytes'] / GiB:.1f} GiB RAM, cold disk read "
          + (f"{d / 1e9:.2f} GB/s" if d else "not measured (needs root)") + f", load {machine['load_avg']}")
    print(format_table(res))
    print(f"greedy tokens agree for the first {agree} generated" if agree is not None else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
