"""The budget sweep behind `lazymoe bench`: one model, one `lazymoe run --json` process per RAM budget,
the same prompt and greedy generation in every run; its rows as a table, CSV and a PNG plot.

load s is the process's wall time minus its prompt and generation time: interpreter
start, imports, the Numba cache, the RAM plan and faulting in the resident weights.
reads: experts read from disk in the whole run (cache misses, prompt included), which shows
the working set; with prefetch on, a prefetched expert counts as a hit, so MB read per token,
not the hit rate, is the cost.
"""
from __future__ import annotations

import csv
from collections.abc import Iterator

from lazymoe.benchmarks.machine import drop_page_cache
from lazymoe.benchmarks.runner import run_lazymoe
from lazymoe.benchmarks.workload import RANDOM_NOTE
from lazymoe.runtime.memory import GiB, parse_size

COLUMNS = ["budget", "budget_bytes", "status", "cold", "n_slots", "n_experts", "load_s", "prompt_tokens",
           "prompt_tok_per_s", "generated_tokens", "gen_tok_per_s", "time_to_first_token_s", "hit_rate",
           "gen_hit_rate", "expert_misses", "mb_read_per_token", "mb_read_prompt", "peak_rss_bytes", "wall_s", "note"]


def parse_budgets(spec: str) -> list[tuple[str, int]]:
    """"2G,4G" -> [("2G", bytes), ("4G", bytes)]."""
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ValueError("--ram needs at least one budget, e.g. 2G,4G")
    return [(s, parse_size(s)) for s in items]


def bench_row(label: str, budget: int, res: dict, cold) -> dict:
    """One row of COLUMNS from a run_lazymoe result (None where the run did not finish)."""
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


def sweep(model: str, budgets: list[tuple[str, int]], text: str, gen: int, ctx: int, min_budget_bytes: int,
          threads: int | None = None, extra=(), cold: bool = False) -> Iterator[tuple[dict, bool]]:
    """(row, ran) per budget, in order. A budget below min_budget_bytes is a "too small" row that never ran;
    with cold, the page cache is dropped before each run and the row's `cold` says whether it was."""
    for label, budget in budgets:
        if budget < min_budget_bytes:
            res = {"status": "too small", "error": f"below the smallest budget {min_budget_bytes / GiB:.2f} GiB"}
            yield bench_row(label, budget, res, None), False
            continue
        dropped = drop_page_cache() if cold else None
        res = run_lazymoe(model, text, gen, ram=budget, ctx=ctx, threads=threads, extra=extra)
        yield bench_row(label, budget, res, dropped), True


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
