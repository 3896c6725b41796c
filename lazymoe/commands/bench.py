"""`lazymoe bench`: the memory/speed tradeoff of one model across RAM budgets.

One `lazymoe run --json` process per budget, so each row's peak RSS is that process's
own; the same prompt of exactly P tokens (built from the model's own vocabulary) and
greedy generation of G tokens in every run. Prints a table, writes CSV + JSON and a PNG
(matplotlib, the `bench` extra) to --out. The sweep and its columns: lazymoe.benchmarks.sweep.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


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


def cmd_bench(args) -> int:
    import shlex

    from lazymoe.benchmarks.machine import machine_info
    from lazymoe.benchmarks.sweep import format_table, parse_budgets, plot, sweep, write_csv
    from lazymoe.benchmarks.workload import RANDOM_NOTE, bench_prompt, model_facts
    from lazymoe.runtime.memory import GiB

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
    for row, ran in sweep(args.model, budgets, text, args.gen, ctx, facts["min_budget_bytes"], threads=args.threads,
                          extra=extra, cold=args.cold):
        rows.append(row)
        if not ran:
            continue
        if args.cold and not row["cold"]:
            cold_note = "--cold: the page cache could not be dropped (needs Linux and root); runs are warm"
        print(f"  {row['budget']}: {row['status']}" + (f", {row['gen_tok_per_s']:.3f} gen tok/s" if row["status"] == "ok" else
                                                       f" ({row['note']})"), file=sys.stderr)

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
