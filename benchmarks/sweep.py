"""`lazymoe bench`: the memory/speed tradeoff of one model across RAM budgets.

One `lazymoe run --json` process per budget, so each row's peak RSS is that process's
own; the same prompt of exactly P tokens (built from the model's own vocabulary) and
greedy generation of G tokens in every run. Prints a table, writes CSV + JSON and a PNG
(matplotlib, the `bench` extra) to --out.

load s is the process's wall time minus its prompt and generation time: interpreter
start, imports, the Numba cache, the RAM plan and faulting in the resident weights.
reads: experts read from disk in the whole run (cache misses, prompt included), which shows
the working set; with prefetch on, a prefetched expert counts as a hit, so MB read per token,
not the hit rate, is the cost.
"""
from __future__ import annotations

import argparse
import csv
import json
import mmap
import os
import subprocess
import sys
import time

from lazymoe.runtime.memory import GiB, MiB, parse_size

WORD_STRIDE = 7919        # a prime: visits every id of any vocabulary it does not divide
THREAD_VARS = ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
RANDOM_NOTE = ("random weights: routing is not a trained model's, so these hit rates do not predict one "
               "(see benchmarks/RESULTS.md)")
COLUMNS = ["budget", "budget_bytes", "status", "cold", "n_slots", "n_experts", "load_s", "prompt_tokens",
           "prompt_tok_per_s", "generated_tokens", "gen_tok_per_s", "time_to_first_token_s", "hit_rate",
           "gen_hit_rate", "expert_misses", "mb_read_per_token", "mb_read_prompt", "peak_rss_bytes", "wall_s", "note"]


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="tokens/s, hit rate and peak RSS across RAM budgets (one run per budget)",
                              description="Run the model once per RAM budget, each in its own `lazymoe run --json` "
                                          "process, on the same fixed prompt with greedy generation; print a table "
                                          "and write CSV, JSON and a PNG plot.")
    p.add_argument("model", help="a GGUF model file")
    p.add_argument("--ram", required=True, metavar="SIZES", help="comma-separated budgets, e.g. 2G,4G,8G")
    p.add_argument("-P", "--prompt-tokens", type=int, default=128, metavar="P",
                   help="prompt length in tokens, BOS included (default 128)")
    p.add_argument("-n", "--gen", type=int, default=32, metavar="G", help="tokens to generate, greedy (default 32)")
    p.add_argument("--ctx", type=int, default=None, metavar="N", help="KV cache length (default P + G)")
    p.add_argument("-o", "--out", default=None, metavar="DIR", help="where to write bench.csv, bench.json, bench.png "
                                                                   "(default bench-<model name>)")
    p.add_argument("--cold", action="store_true", help="drop the OS page cache before each run (Linux, as root)")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N", help="compute threads (default: all cores)")
    p.add_argument("--run-args", default="", metavar="ARGS",
                   help="extra flags for every `lazymoe run`, e.g. \"--policy lru\"")
    p.set_defaults(func=cmd_bench)
    return p


# --- the prompt ---------------------------------------------------------------

def bench_prompt(tok, n_tokens: int) -> tuple[str, list[int]]:
    """(text, ids): text that encodes to exactly n_tokens ids, BOS first, made of whole-word pieces of the
    tokenizer's own vocabulary taken in a fixed order. Deterministic for a given vocabulary."""
    from lazymoe.runtime.tokenizer import NORMAL, SPACE
    if n_tokens < 2:
        raise ValueError(f"the prompt needs at least 2 tokens (BOS and one word), got {n_tokens}")
    V = tok.vocab_size
    order = range(V) if V % WORD_STRIDE == 0 else ((k * WORD_STRIDE + 1) % V for k in range(V))
    words = []
    for i in order:
        p = tok.pieces[i]
        w = p[1:]
        if tok.types[i] == NORMAL and p.startswith(SPACE) and w.isascii() and w.isalpha() and tok.encode(w, bos=False) == [i]:
            words.append(w)
            if len(words) == n_tokens - 1:
                break
    if not words:
        raise ValueError("the vocabulary has no whole-word pieces to build a benchmark prompt from")
    text = " ".join(words[k % len(words)] for k in range(n_tokens - 1))
    ids = tok.encode(text, bos=True)
    if len(ids) != n_tokens:
        raise ValueError(f"could not build a prompt of exactly {n_tokens} tokens from this vocabulary (got {len(ids)})")
    return text, ids


def model_facts(path: str, ctx: int) -> dict:
    """What the parent needs without loading the model: tokenizer, name, smallest budget, whether synthetic."""
    from lazymoe.runtime.weights import model_sizes
    from lazymoe.format.config import config_from_metadata
    from lazymoe.format.gguf_file import GGUFFile
    from lazymoe.runtime.memory import min_budget
    from lazymoe.runtime.tokenizer import Tokenizer
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such model file")
    with GGUFFile(path) as f:           # closed before any run: a live mapping would pin pages in the cache
        cfg = config_from_metadata(f.metadata, path)
        tok = Tokenizer.from_gguf_metadata(f.metadata)
        name = str(f.get("general.name", "") or "")
        sizes = model_sizes(f, cfg)
    return {"cfg": cfg, "tokenizer": tok, "name": name, "synthetic": "random weights" in name,
            "file_bytes": os.path.getsize(path), **sizes,
            "min_budget_bytes": min_budget(cfg, sizes["resident_bytes"], sizes["expert_slot_sizes"], ctx)}


# --- the machine ----------------------------------------------------------------

def machine_info() -> dict:
    import platform

    import psutil
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), model)
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def drop_page_cache() -> bool:
    """Write back and drop the OS page cache; True if it was done (Linux, root)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def disk_read_speed(path: str, nbytes: int = 2 * GiB, block: int = 32 * MiB) -> float | None:
    """Cold sequential read speed of `path` in bytes/s, read the way the expert cache reads (O_DIRECT, 32 MiB
    requests; buffered where the filesystem refuses O_DIRECT) after dropping the page cache; None when the
    cache cannot be dropped (the figure would be the cache's) or the file is under 1 GiB."""
    size = os.path.getsize(path)
    if size < GiB or not drop_page_cache():
        return None
    nbytes = min(nbytes, size - size % 4096)
    from lazymoe.runtime.expert_cache import open_for_reads
    fd, _ = open_for_reads(path, "direct")
    buf = mmap.mmap(-1, block)                         # page-aligned, as O_DIRECT needs
    try:
        done, t0 = 0, time.perf_counter()
        while done < nbytes:
            n = os.preadv(fd, [memoryview(buf)[:min(block, nbytes - done)]], done)
            if n <= 0:
                break
            done += n
        return done / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        buf.close()
        drop_page_cache()


# --- one run --------------------------------------------------------------------

def lazymoe_cmd() -> list[str]:
    """How to start `lazymoe` with this interpreter (the console script if installed, so the process list
    reads `lazymoe run`)."""
    script = os.path.join(os.path.dirname(sys.executable), "lazymoe")
    return [sys.executable, script] if os.path.isfile(script) else [sys.executable, "-m", "lazymoe.cli"]


def thread_env(threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env.update({k: str(threads) for k in THREAD_VARS})
    return env


def run_lazymoe(model: str, text: str, gen: int, ram=None, ctx: int | None = None, threads: int | None = None,
                extra=(), preexec_fn=None, timeout: float | None = None) -> dict:
    """One `lazymoe run --json --temp 0` process. Returns its JSON plus wall_s and load_s, or
    {"status": "too small" | "OOM" | "failed", "error": ...}."""
    cmd = lazymoe_cmd() + ["run", model, "--json", "--temp", "0", "-n", str(gen), "-p", text]
    if ram is not None:
        cmd += ["--ram", str(ram)]
    if ctx is not None:
        cmd += ["--ctx", str(ctx)]
    cmd += list(extra)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads), preexec_fn=preexec_fn,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    err = (r.stderr.strip().splitlines() or [""])[-1]
    if r.returncode != 0:
        status = "too small" if "too small" in err else "OOM" if r.returncode == -9 else "failed"
        return {"status": status, "error": err or f"exit code {r.returncode}", "wall_s": wall}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall_s"] = wall
    out.setdefault("load_s", wall - out["prompt_s"] - out["gen_s"])
    out["status"] = "ok"
    return out


def bench_row(label: str, budget: int, res: dict, cold) -> dict:
    row = {c: None for c in COLUMNS}
    row.update(budget=label, budget_bytes=budget, status=res["status"], cold=cold, wall_s=res.get("wall_s"),
               note=res.get("error", ""))
    if res["status"] == "ok":
        for k in ("load_s", "prompt_tokens", "prompt_tok_per_s", "generated_tokens", "gen_tok_per_s",
                  "time_to_first_token_s", "hit_rate", "gen_hit_rate", "expert_misses", "mb_read_per_token", "mb_read_prompt",
                  "peak_rss_bytes"):
            row[k] = res.get(k)
        row["n_slots"], row["n_experts"] = res["plan"]["n_slots"], res["plan"]["n_experts"]
    return row


# --- output ---------------------------------------------------------------------

def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(rows: list[dict], synthetic: bool) -> str:
    head = (f"{'budget':>8} {'slots':>9} {'load s':>7} {'prompt tok/s':>12} {'gen tok/s':>9} {'TTFT s':>7} "
            f"{'hit %':>6} {'gen hit %':>9} {'reads':>6} {'MB read/tok':>11} {'peak RSS':>9}  status")
    lines = [head]
    for r in rows:
        slots = f"{r['n_slots']}/{r['n_experts']}" if r["n_slots"] is not None else "-"
        rss = f"{r['peak_rss_bytes'] / GiB:.2f}G" if r["peak_rss_bytes"] else "-"
        hit = None if r["hit_rate"] is None else 100 * r["hit_rate"]
        ghit = None if r["gen_hit_rate"] is None else 100 * r["gen_hit_rate"]
        status = r["status"] + (" (cold)" if r["cold"] else "")
        lines.append(f"{r['budget']:>8} {slots:>9} {_f(r['load_s'], '.1f'):>7} {_f(r['prompt_tok_per_s'], '.2f'):>12} "
                     f"{_f(r['gen_tok_per_s'], '.3f'):>9} {_f(r['time_to_first_token_s'], '.2f'):>7} {_f(hit, '.0f'):>6} "
                     f"{_f(ghit, '.0f'):>9} {_f(r['expert_misses'], 'd'):>6} {_f(r['mb_read_per_token'], '.0f'):>11} {rss:>9}  {status}")
    if synthetic:
        lines.append(f"note: {RANDOM_NOTE}")
    return "\n".join(lines)


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def plot(path: str, rows: list[dict], title: str, synthetic: bool) -> str | None:
    """The PNG of tokens/s and hit rate against budget; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'lazymoe[bench]')"
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return "plot skipped: no budget ran"
    x = [r["budget_bytes"] / GiB for r in ok]
    fig, (a1, a2) = plt.subplots(2, 1, sharex=True, figsize=(6, 5), dpi=90)
    a1.plot(x, [r["gen_tok_per_s"] for r in ok], "o-", label="generation")
    a1.plot(x, [r["prompt_tok_per_s"] for r in ok], "s--", label="prompt")
    a1.set_ylabel("tokens/s")
    a1.set_yscale("log")
    a1.legend()
    a1.grid(alpha=0.3)
    a1.set_title(title, fontsize=9)
    a2.plot(x, [100 * r["gen_hit_rate"] for r in ok], "o-", color="C2", label="generation")
    a2.plot(x, [100 * r["hit_rate"] for r in ok], "s--", color="C3", label="whole run")
    a2.set_ylabel("expert hit rate %" + (" (random weights)" if synthetic else ""))
    a2.set_xlabel("RAM budget (GiB)")
    a2.set_ylim(0, 100)
    a2.legend()
    a2.grid(alpha=0.3)
    if synthetic:
        fig.text(0.01, 0.005, RANDOM_NOTE, fontsize=7)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return None


# --- the command ------------------------------------------------------------------

def parse_budgets(spec: str) -> list[tuple[str, int]]:
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError("--ram needs at least one budget, e.g. 2G,4G")
    return [(s, parse_size(s)) for s in items]


def cmd_bench(args) -> int:
    import shlex
    budgets = parse_budgets(args.ram)
    if args.prompt_tokens < 2:
        raise ValueError(f"--prompt-tokens must be at least 2, got {args.prompt_tokens}")
    if args.gen < 1:
        raise ValueError(f"--gen must be at least 1, got {args.gen}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    ctx = args.ctx if args.ctx is not None else args.prompt_tokens + args.gen
    if ctx < args.prompt_tokens + args.gen:
        raise ValueError(f"--ctx {ctx} is shorter than the prompt plus generated tokens ({args.prompt_tokens + args.gen})")
    extra = shlex.split(args.run_args)
    facts = model_facts(args.model, ctx)
    text, ids = bench_prompt(facts["tokenizer"], args.prompt_tokens)
    out_dir = args.out or f"bench-{os.path.splitext(os.path.basename(args.model))[0]}"
    os.makedirs(out_dir, exist_ok=True)

    machine = machine_info()
    print(f"{args.model}: {facts['name'] or '(no name)'}, {facts['file_bytes'] / GiB:.2f} GiB; prompt {len(ids)} tokens, "
          f"{args.gen} generated (greedy), ctx {ctx}, threads {args.threads or machine['cores']}; smallest budget "
          f"{facts['min_budget_bytes'] / GiB:.2f} GiB; {machine['cpu']}, {machine['cores']} cores, "
          f"{machine['ram_bytes'] / GiB:.0f} GiB RAM", file=sys.stderr)
    rows = []
    cold_note = None
    for label, budget in budgets:
        if budget < facts["min_budget_bytes"]:
            res = {"status": "too small", "error": f"below the smallest budget {facts['min_budget_bytes'] / GiB:.2f} GiB"}
            rows.append(bench_row(label, budget, res, None))
            continue
        cold = drop_page_cache() if args.cold else None
        if args.cold and not cold:
            cold_note = "--cold: the page cache could not be dropped (needs Linux and root); runs are warm"
        res = run_lazymoe(args.model, text, args.gen, ram=budget, ctx=ctx, threads=args.threads, extra=extra)
        rows.append(bench_row(label, budget, res, cold))
        print(f"  {label}: {res['status']}" + (f", {res['gen_tok_per_s']:.3f} gen tok/s" if res["status"] == "ok" else
                                               f" ({res.get('error', '')})"), file=sys.stderr)

    print(format_table(rows, facts["synthetic"]))
    if cold_note:
        print(cold_note)
    base = os.path.join(out_dir, "bench")
    write_csv(base + ".csv", rows)
    with open(base + ".json", "w") as f:
        json.dump({"model": args.model, "name": facts["name"], "synthetic": facts["synthetic"],
                   "file_bytes": facts["file_bytes"], "min_budget_bytes": facts["min_budget_bytes"],
                   "prompt_tokens": len(ids), "prompt_ids": ids, "gen": args.gen, "ctx": ctx, "threads": args.threads,
                   "cold_requested": args.cold, "run_args": extra, "machine": machine, "rows": rows,
                   "note": RANDOM_NOTE if facts["synthetic"] else None}, f, indent=1)
    title = (f"{os.path.basename(args.model)}: prompt {len(ids)}, gen {args.gen}, "
             f"{args.threads or machine['cores']} threads" + (", cold" if args.cold else ""))
    note = plot(base + ".png", rows, title, facts["synthetic"])
    print(note or f"wrote {base}.csv, {base}.json, {base}.png")
    return 0 if any(r["status"] in ("ok", "too small") for r in rows) and all(r["status"] != "failed" for r in rows) else 1
