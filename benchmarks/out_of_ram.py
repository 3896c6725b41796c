"""Out-of-RAM decode speed of `lazymoe run`, each speed-up switched on and off.

    sudo python -m lazymoe.benchmarks.out_of_ram MODEL.gguf --ram 2G [--mem-limit 2G] [-n 16] [--rounds 3]
                                         [--configs old,direct,layer,overlap,all,lfu,lru,depth2,depth3,refine] [--inram-ram 12G]
                                         [--extra "FLAGS"] [-P TOKENS|TEXT] [--ctx 1024] [-t THREADS]
                                         [--no-cap] [--no-drop] [--timeout S] [--json] [--out DIR]

Each run is a fresh `lazymoe run MODEL --ram RAM --ctx CTX -n N -p PROMPT --json FLAGS EXTRA` process,
started after the OS page cache is dropped (root; the output says whether it was) and inside a fresh
memory cgroup capped at --mem-limit (default: the same as --ram), which counts the page cache, so a
buffered read cannot quietly use the rest of the machine's RAM. Rounds interleave the configurations
(round 1 runs every configuration once, then round 2, ...); the figures are medians over the rounds.
An OOM kill, a timeout or a failed run is recorded as that run's status (exit code 1 when a configuration
has no run that finished; 2 on bad input).

Configurations (flags of `lazymoe run`; --extra is appended to every run, after them):
  old      --no-prefetch --no-overlap --policy lru --read buffered   (the runtime before the out-of-RAM work)
  direct   --no-prefetch --no-overlap --policy lru --read direct     (O_DIRECT reads)
  layer    --no-prefetch --no-overlap --policy layer --read direct   (+ the per-layer share of slots)
  overlap  --no-prefetch --policy layer --read direct                (+ a layer's misses read while it computes)
  all      (the defaults: prefetch, overlap, layer policy, --read auto: direct on a cold cache)
  lfu      --policy lfu                                              (all, with LFU)
  lru      --policy lru                                              (all, with LRU)
  depth2   --prefetch-depth 2                                        (all, guessing 2 layers ahead)
  depth3   --prefetch-depth 3                                        (all, guessing 3 layers ahead)
  refine   --refine                                                  (all, with a second guess of the next layer's
                                                                      experts from each layer's output)
The default --extra is sampled decoding with a fixed seed, so every configuration generates the same
tokens (logits are bit-identical whatever the flags) and does the same work.

Per configuration: generation s/token (gen_s over the decode steps, i.e. 1 / gen_tok_per_s; the first
generated token comes from the prompt's logits) and tok/s, the speed relative to the first
configuration, MB read per token during generation (and how much of it was speculative prefetch), the
generation hit rate (a prefetched expert counts as a hit), prefetch recall, expert_wait_s (time the model
waited for reads: prompt and generation together, as `lazymoe run --json` gives it), peak RSS and the
cgroup's peak (page cache included).

Disk bound: the cold sequential read speed of the model file is measured right before every run
(benchmarks.machine.disk_read_speed: 1 GiB in O_DIRECT 32 MiB reads, as the expert cache reads, after dropping
the cache; root and a file of at least 1 GiB; on this shared machine it read 0.5-1.0 GB/s on one day and
2.2 GB/s hours earlier, so one figure per invocation misled) and, per configuration, bound = MB read per
token / (median disk MB/s of its runs) + compute s/token. The compute time per token is each run's own
decode time not spent waiting for expert reads ((gen_s - gen_expert_wait_s) / decode steps, from `lazymoe
run --json`), or with --inram-ram SIZE the s/token of an in-RAM reference run (`all` with a budget that
holds every expert, no cap), which still reads each expert once, so it is slightly high. s/token / bound
below 1 means reads overlap compute. Each run also reports its reader thread's busy time (gen_read_s), so
the table shows the reader's busy share of decoding, the speed it read at, and the bound at that speed.

Routing: random-weight `lazymoe synth` files (since 72ed619) route nearly uniformly, with none of the
locality of a trained model, so hit rates, recall and bytes per token are a lower bound for a real
model. Synth files made before 72ed619 (2026-11-27 04:22) route almost every token to the same two experts
per layer: on those they are an upper bound.

Examples:
    lazymoe synth --shape mixtral-8x7b --layers 8 -o mixtral-8x7b-8L-q4_0.gguf
    sudo python -m lazymoe.benchmarks.out_of_ram mixtral-8x7b-8L-q4_0.gguf --ram 2G -n 16 \\
        --rounds 3 --inram-ram 12G --out oor-8L
    sudo python -m lazymoe.benchmarks.out_of_ram MODEL.gguf --ram 2G --configs overlap,all --extra "--temp 0" --json
    python -m lazymoe.benchmarks.out_of_ram runtime/data/lazymoe-demo-q4_0.gguf --ram 260M -n 4 --no-cap --no-drop
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile

from lazymoe.benchmarks.machine import disk_read_speed, drop_page_cache, machine_info
from lazymoe.benchmarks.runner import run_lazymoe
from lazymoe.benchmarks.workload import RANDOM_NOTE, bench_prompt, model_facts
from lazymoe.runtime.memory import GiB, parse_size

CONFIGS = {
    "old": "--no-prefetch --no-overlap --policy lru --read buffered",
    "direct": "--no-prefetch --no-overlap --policy lru --read direct",
    "layer": "--no-prefetch --no-overlap --policy layer --read direct",
    "overlap": "--no-prefetch --policy layer --read direct",
    "all": "",
    "lfu": "--policy lfu",
    "lru": "--policy lru",
    "depth2": "--prefetch-depth 2",
    "depth3": "--prefetch-depth 3",
    "refine": "--refine",
}
INRAM = "inram"                      # the in-RAM reference: `all` with --inram-ram, no cap
DEFAULT_EXTRA = "--temp 1 --top-k 0 --top-p 1 --min-p 0 --seed 7"
DEFAULT_PROMPT = "The history of the expert cache is"
MB = 1e6
# what is medianed over a configuration's ok runs: name -> how to get it from one run's result
METRICS = {
    "s_per_token": lambda r: 1 / r["gen_tok_per_s"] if r.get("gen_tok_per_s") else None,
    "mb_read_per_token": lambda r: r.get("mb_read_per_token"),
    "mb_prefetched_per_token": lambda r: r.get("mb_prefetched_per_token"),
    "gen_hit_rate": lambda r: r.get("gen_hit_rate"),
    "prefetch_recall": lambda r: r.get("prefetch_recall"),
    "expert_wait_s": lambda r: r.get("expert_wait_s"),
    # decode time not spent waiting for expert reads, per step: the run's own compute time per token
    "own_compute_s_per_token": lambda r: ((r["gen_s"] - r["gen_expert_wait_s"]) / (r["generated_tokens"] - 1)
                                          if r.get("gen_expert_wait_s") is not None and r.get("generated_tokens", 0) > 1
                                          else None),
    "prompt_s": lambda r: r.get("prompt_s"),
    "gen_s": lambda r: r.get("gen_s"),
    "generated_tokens": lambda r: r.get("generated_tokens"),
    "peak_rss_bytes": lambda r: r.get("peak_rss_bytes"),
    "cgroup_peak_bytes": lambda r: r.get("cgroup_peak_bytes"),
    "n_slots": lambda r: (r.get("plan") or {}).get("n_slots"),
    "disk_read_bytes_per_s": lambda r: r.get("disk_read_bytes_per_s"),
    # the reader's busy share of decoding, and the speed it read at while busy (this run's own disk figure)
    "reader_busy": lambda r: r["gen_read_s"] / r["gen_s"] if r.get("gen_read_s") is not None and r.get("gen_s") else None,
    "own_read_bytes_per_s": lambda r: (r["mb_read_per_token"] * MB * (r["generated_tokens"] - 1) / r["gen_read_s"]
                                       if r.get("gen_read_s") and r.get("generated_tokens", 0) > 1 else None),
}
DISK_PROBE_BYTES = 1 << 30           # cold sequential read measured right before each run


# --- pure pieces -------------------------------------------------------------------

def parse_configs(spec: str) -> list[str]:
    """Names from "a,b,c", in order; ValueError on an unknown or repeated name."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError("--configs needs at least one name")
    for n in names:
        if n not in CONFIGS:
            raise ValueError(f"unknown configuration {n!r} in --configs (known: {', '.join(CONFIGS)})")
    if len(set(names)) != len(names):
        raise ValueError(f"--configs names a configuration twice: {spec}")
    return names


def prefetch_on(flags: list[str]) -> bool:
    """Whether `lazymoe run` with these flags prefetches (the last --prefetch/--no-prefetch wins; default on)."""
    last = [f for f in flags if f in ("--prefetch", "--no-prefetch")]
    return not last or last[-1] == "--prefetch"


def summarize(runs: list[dict], flags: list[str]) -> dict:
    """Medians over the ok runs of one configuration, and how many ran."""
    ok = [r for r in runs if r["status"] == "ok"]
    s = {"runs": len(runs), "ok": len(ok), "statuses": [r["status"] for r in runs]}
    for k, get in METRICS.items():
        vals = [v for v in map(get, ok) if v is not None]
        s[k] = statistics.median(vals) if vals else None
    s["tok_per_s"] = 1 / s["s_per_token"] if s["s_per_token"] else None
    if not prefetch_on(flags):
        s["prefetch_recall"] = None            # the JSON says 0.0 when nothing was predicted
    return s


def disk_bound(s_per_token, mb_per_token, disk_bytes_per_s, compute_s) -> dict:
    """Read time per token at the disk's speed, the additive bound (read + compute) and s/token over each bound;
    None where an input is missing."""
    read_s = mb_per_token * MB / disk_bytes_per_s if mb_per_token is not None and disk_bytes_per_s else None
    bound = read_s + compute_s if read_s is not None and compute_s is not None else None
    tight = max(read_s, compute_s) if bound is not None else None
    return {"read_s_per_token": read_s, "compute_s_per_token": compute_s, "bound_s_per_token": bound,
            "vs_bound": s_per_token / bound if bound and s_per_token is not None else None,
            "vs_max_read_compute": s_per_token / tight if tight and s_per_token is not None else None}


def summarize_all(runs: list[dict], names: list[str], flags: dict, disk_bytes_per_s) -> tuple[list[dict], dict]:
    """Per configuration (the in-RAM reference last, if it ran): medians, speed vs the first, disk bound.
    Also returns where the compute time came from."""
    rows = []
    for name in names + ([INRAM] if any(r["config"] == INRAM for r in runs) else []):
        s = summarize([r for r in runs if r["config"] == name], flags[name])
        rows.append({"config": name, "flags": flags[name], **s})
    ref = next((r for r in rows if r["config"] == INRAM), None)
    compute_s = ref["s_per_token"] if ref else None
    compute = {"source": "inram" if compute_s is not None else "own", "s_per_token": compute_s,
               "mb_read_per_token": ref["mb_read_per_token"] if ref else None}
    first = rows[0]["s_per_token"] if rows else None
    for r in rows:
        r["speed_vs_first"] = first / r["s_per_token"] if first and r["s_per_token"] else None
        own = r.get("own_compute_s_per_token")
        disk = r["disk_read_bytes_per_s"] or disk_bytes_per_s     # measured next to this config's runs, else once
        comp = compute_s if compute_s is not None else own
        r.update(disk_bound(r["s_per_token"], r["mb_read_per_token"], disk, comp))
        r["vs_own_bound"] = disk_bound(r["s_per_token"], r["mb_read_per_token"], r["own_read_bytes_per_s"], comp)["vs_bound"]
    return rows, compute


def _f(v, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    return "-" if v is None else format(v * scale, fmt) + unit


def _status(s: dict) -> str:
    if s["ok"] == s["runs"]:
        return f"ok {s['ok']}/{s['runs']}"
    bad = [x for x in s["statuses"] if x != "ok"]
    return f"ok {s['ok']}/{s['runs']}, " + ", ".join(f"{x} {bad.count(x)}" for x in dict.fromkeys(bad))


def _disk_note(res: dict, disk) -> str:
    per_run = [r["disk_read_bytes_per_s"] for r in res["runs"] if r.get("disk_read_bytes_per_s")]
    if per_run:
        return (f"{min(per_run) / MB:.0f}-{max(per_run) / MB:.0f} MB/s, 1 GiB in O_DIRECT 32 MiB reads right before "
                f"each run (benchmarks.machine.disk_read_speed); each config's bound uses the median of its runs' figures")
    if disk:
        return f"{disk / MB:.0f} MB/s (benchmarks.machine.disk_read_speed)"
    return "not measured (needs root and a file of at least 1 GiB)"


def format_table(res: dict) -> str:
    """The header lines, the per-configuration table and the disk-bound table."""
    m, cap, disk, comp = res["machine"], res["cap"], res["disk_read_bytes_per_s"], res["compute"]
    cold = {True: "yes", False: "no (needs Linux and root: runs are warm)", None: "no (--no-drop: runs are warm)"}
    lines = [f"command: {res['command']}",
             (f"model: {res['model']} ({res['name'] or 'no name'}, {res['file_bytes'] / GiB:.2f} GiB); "
              f"--ram {res['args']['ram']}, ctx {res['args']['ctx']}, prompt {res['prompt_tokens']} tokens, "
              f"-n {res['args']['gen']}, {res['args']['rounds']} round(s), extra: {res['args']['extra'] or '(none)'}"),
             f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / GiB:.1f} GiB RAM, load "
             + (" ".join(f"{x:.2f}" for x in m["load_avg"]) if m["load_avg"] else "-"),
             f"cap: {cap['note']}; page cache dropped before each run: {cold[res['cache_dropped']]}",
             "disk: cold sequential read " + _disk_note(res, disk),
             "compute s/token: " + (f"{comp['s_per_token']:.3f}, the in-RAM reference run (`all`, --ram "
                                    f"{res['args']['inram_ram']}, no cap; it read {comp['mb_read_per_token']:.0f} MB/token)"
                                    if comp["source"] == "inram" else "each run's own: (gen_s - gen_expert_wait_s) / "
                                    "decode steps, the decode time not spent waiting for expert reads"),
             ""]
    head = (f"{'config':<8} {'s/token':>8} {'tok/s':>6} {'x first':>7} {'MB/tok':>7} {'(spec)':>7} {'gen hit':>7} "
            f"{'recall':>6} {'waited s':>14} {'slots':>5} {'peak RSS':>8} {'cg peak':>8}  status")
    lines.append(head)
    for r in res["configs"]:
        waited = "-" if r["expert_wait_s"] is None else f"{r['expert_wait_s']:.1f}/{r['prompt_s'] + r['gen_s']:.1f}"
        lines.append(f"{r['config']:<8} {_f(r['s_per_token'], '.3f'):>8} {_f(r['tok_per_s'], '.2f'):>6} "
                     f"{_f(r['speed_vs_first'], '.2f'):>7} {_f(r['mb_read_per_token'], '.0f'):>7} "
                     f"{'(' + _f(r['mb_prefetched_per_token'], '.0f') + ')':>7} {_f(r['gen_hit_rate'], '.0f', 100, '%'):>7} "
                     f"{_f(r['prefetch_recall'], '.0f', 100, '%'):>6} {waited:>14} {_f(r['n_slots'], '.0f'):>5} "
                     f"{_f(r['peak_rss_bytes'], '.2f', 1 / GiB, 'G'):>8} {_f(r['cgroup_peak_bytes'], '.2f', 1 / GiB, 'G'):>8}  "
                     f"{_status(r)}")
    lines += [("(medians over ok runs; s/token = gen_s / decode steps; x first = speed relative to the first row; "
               "MB/tok read during generation, (spec) of it prefetched; waited = expert_wait_s / (prompt_s + gen_s))"),
              ""]
    lines.append(f"{'config':<8} {'s/token':>8} {'MB/tok':>7} {'disk MB/s':>9} {'read s/tok':>10} {'compute':>8} "
                 f"{'bound':>8} {'÷ bound':>8} {'÷ max(read, compute)':>21}  {'reader busy':>11} {'at MB/s':>8} "
                 f"{'÷ own bound':>11}")
    for r in res["configs"]:
        lines.append(f"{r['config']:<8} {_f(r['s_per_token'], '.3f'):>8} {_f(r['mb_read_per_token'], '.0f'):>7} "
                     f"{_f(r['disk_read_bytes_per_s'], '.0f', 1 / MB):>9} "
                     f"{_f(r['read_s_per_token'], '.3f'):>10} {_f(r['compute_s_per_token'], '.3f'):>8} "
                     f"{_f(r['bound_s_per_token'], '.3f'):>8} {_f(r['vs_bound'], '.2f'):>8} "
                     f"{_f(r['vs_max_read_compute'], '.2f'):>21}  {_f(r.get('reader_busy'), '.0f', 100, '%'):>11} "
                     f"{_f(r.get('own_read_bytes_per_s'), '.0f', 1 / MB):>8} {_f(r.get('vs_own_bound'), '.2f'):>11}")
    lines.append("(reader busy: share of decoding the reader thread spent in reads; at MB/s: its speed while busy; "
                 "own bound: the bound with that speed instead of the cold sequential probe)")
    fast = [r["config"] for r in res["configs"] if r["read_s_per_token"] and r["s_per_token"] < r["read_s_per_token"]]
    if fast:
        lines.append(f"check: {', '.join(fast)} decoded faster than its reads take at the measured disk speed: "
                     "that figure is low for these runs (a noisy or shared disk); the bound columns are not reliable")
    errors = [f"  {r['config']} round {r['round']}: {r['status']}: {r.get('error', '')}" for r in res["runs"]
              if r["status"] != "ok"]
    if errors:
        lines += ["", "runs that did not finish:"] + errors
    if res["synthetic"]:
        lines += ["", (f"note: {RANDOM_NOTE}; synth files made since 72ed619 route nearly uniformly (hit rates are "
                       "a lower bound), older ones route to ~2 experts per layer (an upper bound)")]
    return "\n".join(lines)


# --- running ---------------------------------------------------------------------

def last_line(path: str) -> str:
    with open(path, errors="replace") as f:
        return (f.read().strip().splitlines() or [""])[-1]


def run_one(args, name: str, flags: list[str], rnd: int, text: str, err_path: str) -> dict:
    """One `lazymoe run` of one configuration: page cache dropped, in a fresh cgroup unless uncapped; the child's
    whole stderr goes to err_path."""
    from lazymoe.benchmarks.cgroup import MemCap
    # the disk's speed drifts several-fold within minutes on a shared machine: measure it next to every run
    disk = None if args.no_drop else disk_read_speed(args.model, DISK_PROBE_BYTES)
    cold = None if args.no_drop else drop_page_cache()
    capped = args.cap_bytes is not None and name != INRAM
    ram = args.inram_ram if name == INRAM else args.ram
    with open(err_path, "w") as err, (MemCap(args.cap_bytes, f"out_of_ram-{os.getpid()}-{rnd}-{name}") if capped
                                      else _NoCap()) as cap:
        def child():                     # run_lazymoe captures stderr; send it to the file instead, keep it all
            cap.join()
            os.dup2(err.fileno(), 2)
        res = run_lazymoe(args.model, text, args.gen, ram=ram, ctx=args.ctx, threads=args.threads,
                          extra=flags + shlex.split(args.extra), preexec_fn=child, timeout=args.timeout)
        cg = cap.stats()
    res.update(config=name, round=rnd, cold=cold, flags=flags, disk_read_bytes_per_s=disk, cgroup_peak_bytes=cg["peak_bytes"],
               cgroup_limit_hits=cg["limit_hits"], oom_kills=cg["oom_kills"])
    if res["status"] != "ok":
        line = last_line(err_path)
        if res.get("error", "").startswith("timed out"):
            res["status"] = "timeout"
        else:
            res["error"] = line or res.get("error", "")
            res["status"] = ("OOM" if res["status"] == "OOM" or cg["oom_kills"] else
                             "too small" if "too small" in line else "failed")
    return res


class _NoCap:
    """MemCap's interface for an uncapped run."""
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def join(self) -> None:
        pass

    def stats(self) -> dict:
        return {"peak_bytes": None, "limit_hits": None, "oom_kills": 0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lazymoe.benchmarks.out_of_ram", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="configurations:\n" + "\n".join(f"  {k:<8} {v or '(defaults)'}"
                                                                       for k, v in CONFIGS.items()))
    p.add_argument("model", help="a GGUF model file")
    p.add_argument("--ram", required=True, metavar="SIZE", help="lazymoe's RAM budget for every configuration")
    p.add_argument("--mem-limit", default=None, metavar="SIZE", help="cgroup memory cap per run (default: --ram)")
    p.add_argument("--no-cap", action="store_true", help="run without a cgroup cap")
    p.add_argument("--no-drop", action="store_true", help="do not drop the page cache before runs (warm runs)")
    p.add_argument("-n", "--gen", type=int, default=16, metavar="N", help="tokens to generate (default 16)")
    p.add_argument("-P", "--prompt", default=DEFAULT_PROMPT, metavar="TOKENS|TEXT",
                   help=f"a number: a prompt of exactly that many tokens built from the vocabulary; else the prompt "
                        f"text (default {DEFAULT_PROMPT!r})")
    p.add_argument("--ctx", type=int, default=1024, metavar="N", help="KV cache length (default 1024)")
    p.add_argument("--rounds", type=int, default=1, help="runs per configuration, interleaved (default 1)")
    p.add_argument("--configs", default=",".join(CONFIGS), metavar="NAMES",
                   help=f"comma-separated configurations, in order (default {','.join(CONFIGS)})")
    p.add_argument("--extra", default=DEFAULT_EXTRA, metavar="FLAGS",
                   help=f"flags appended to every `lazymoe run`, after the configuration's (default {DEFAULT_EXTRA!r}; "
                        "a single flag needs the = form: --extra=--no-prefetch)")
    p.add_argument("--inram-ram", default=None, metavar="SIZE",
                   help="also run `all` uncapped with this budget each round: its s/token is the compute time")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N", help="compute threads (default: all)")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="give up on a run after S seconds")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument("--out", default=None, metavar="DIR", help="also write each run's JSON and stderr, and the summary")
    return p


def check_args(args) -> None:
    """ValueError on bad input; sets args.names, args.cap_bytes (None: uncapped) and args.cap (for the output)."""
    args.names = parse_configs(args.configs)
    for flag in ("ram", "mem_limit", "inram_ram"):
        if getattr(args, flag) is not None:
            try:
                parse_size(getattr(args, flag))
            except ValueError as e:
                raise ValueError(f"--{flag.replace('_', '-')}: {e}") from None
    for k, lo in (("gen", 2), ("rounds", 1), ("ctx", 2)):
        if getattr(args, k) < lo:
            raise ValueError(f"--{k} must be at least {lo}, got {getattr(args, k)}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.timeout is not None and args.timeout <= 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout}")
    shlex.split(args.extra)
    from lazymoe.benchmarks.cgroup import available
    version = available()
    limit = parse_size(args.mem_limit if args.mem_limit is not None else args.ram)
    args.cap_bytes = None if args.no_cap or version is None else limit
    args.cap = {"bytes": args.cap_bytes, "cgroup": version if args.cap_bytes else None,
                "note": "none (--no-cap)" if args.no_cap else
                        "none (no writable cgroup memory controller: needs root, cgroup v1 or v2)" if version is None else
                        f"{args.mem_limit or args.ram} ({limit} bytes, cgroup {version}, a fresh cgroup per run"
                        + ("; the in-RAM reference is uncapped)" if args.inram_ram else ")")}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        facts = model_facts(args.model, args.ctx)
        if args.prompt.strip().isdigit():
            text, ids = bench_prompt(facts["tokenizer"], int(args.prompt))
        else:
            text, ids = args.prompt, facts["tokenizer"].encode(args.prompt, bos=True)
        if len(ids) + args.gen > args.ctx:
            raise ValueError(f"--ctx {args.ctx} is shorter than the prompt ({len(ids)} tokens) plus -n {args.gen}")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
    except (ValueError, OSError) as e:
        print(f"out_of_ram: error: {e}", file=sys.stderr)
        return 2
    return measure(args, argv, facts, text, ids)


def measure(args, argv, facts, text, ids) -> int:
    machine = machine_info()
    disk = None                            # measured before every run instead (run_one)
    flags = {n: shlex.split(CONFIGS[n]) for n in args.names}
    flags[INRAM] = []
    order = args.names + ([INRAM] if args.inram_ram else [])
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(1, args.rounds + 1):
            for name in order:
                err = os.path.join(args.out or tmp, f"{name}.r{rnd}.err")
                r = run_one(args, name, flags[name], rnd, text, err)
                runs.append(r)
                if args.out:
                    with open(os.path.join(args.out, f"{name}.r{rnd}.json"), "w") as f:
                        json.dump(r, f, indent=1)
                brief = (f"{r['gen_tok_per_s']:.3f} tok/s, {r['mb_read_per_token']:.0f} MB/token"
                         if r["status"] == "ok" else r.get("error", ""))
                print(f"round {rnd} {name}: {r['status']}: {brief}", file=sys.stderr, flush=True)
    rows, compute = summarize_all(runs, args.names, {n: flags[n] + shlex.split(args.extra) for n in flags}, disk)
    dropped = [r["cold"] for r in runs]
    res = {"command": shlex.join(["python", "-m", "lazymoe.benchmarks.out_of_ram"] + argv), "model": args.model,
           "name": facts["name"], "synthetic": facts["synthetic"], "file_bytes": facts["file_bytes"],
           "prompt_text": text, "prompt_tokens": len(ids),
           "args": {k: v for k, v in vars(args).items() if k not in ("cap", "cap_bytes", "names")},
           "machine": machine, "cap": args.cap, "cache_dropped": None if args.no_drop else all(dropped),
           "disk_read_bytes_per_s": disk, "compute": compute, "configs": rows, "runs": runs}
    if args.out:
        with open(os.path.join(args.out, "out_of_ram.json"), "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res) if args.json else format_table(res))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
