"""Mixtral 8x22B on a 32 GB laptop (a 24 GiB --ram), per expert type, extrapolated from out_of_ram runs on files
with a few of its 56 layers.

    python -m lazymoe.benchmarks.laptop_8x22b --layers 10 TYPE[:EXPERT_TYPE]=DIR ... [--ram 24G]
                                              [--ssd-gbps 5] [--json]

Each DIR is the --out folder of one `benchmarks.out_of_ram` run (configuration `all`) on
`lazymoe synth --shape mixtral-8x22b --layers L -t TYPE [--expert-type EXPERT_TYPE]`, run with the --ram that
`benchmarks.finegrained - --laptop mixtral-8x22b:L:24G:TYPE[:EXPERT_TYPE]` prints: the L layers get the share of
their experts in the cache that the 24 GiB budget gives all 56 (finegrained.share_budget; the whole model's slot
count is printed here as "experts cached").

Per type, from the run's medians: MB read per token, compute s/token (decode time not spent waiting for reads) and
s/token, each divided by L and multiplied by 56 ("here": this machine's cores and disk). Routing of random-weight
synth files is nearly uniform, so a layer's cost does not depend on where it sits: the cost is linear in layers.
For the laptop (an Apple M1 Max, see FACTS): the same bytes read per token at an assumed SSD speed (--ssd-gbps, not
measured), and compute from the arm64 kernels' estimated speed (benchmarks.kquant_dots.arm64_report: llvm-mca
cycles of each type's row dot on 8 P-cores at 3.2 GHz) over the bytes of every matrix a token multiplies
(attention, the output head, 2 of 8 experts per layer, in this file's per-tensor types); s/token is given as the
range from perfect overlap of reads and compute (the larger of the two) to none (their sum).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

N_LAYER = 56                       # Mixtral 8x22B
MB = 1e6


def laptop_compute_s(type_name: str, expert_type: str | None, gbps_per_core: dict, cores: int) -> float:
    """Seconds of one decode step's matrix products on `cores` cores at the arm64 estimate's GB/s per core, over the
    tensors of the full 56-layer synth file of these types (nothing is written: synth_source is lazy)."""
    from lazymoe.quantize.synth import synth_source
    src = synth_source("mixtral-8x22b", type_name=type_name, expert_type=expert_type)
    A, E = src.config.n_expert_used, src.config.n_expert
    sec = 0.0
    for t in src.tensors:
        if len(t.shape) == 1 or t.name == "token_embd.weight" or "ffn_gate_inp" in t.name:  # norms, a lookup, the F32 router
            continue
        per_token = t.stored.nbytes(t.shape) * (A / E if len(t.shape) == 3 else 1)           # 2 of 8 experts
        sec += per_token / (gbps_per_core[t.stored.name] * 1e9 * cores)
    return sec


def row(spec: str, folder: str, layers: int, ram: str, ssd_gbps: float, gbps_per_core: dict, cores: int) -> dict:
    from lazymoe.benchmarks.finegrained import share_budget
    type_name, _, expert_type = spec.partition(":")
    expert_type = expert_type or None
    with open(os.path.join(folder, "out_of_ram.json")) as f:
        res = json.load(f)
    c = next(r for r in res["configs"] if r["config"] == "all")
    if not c["ok"]:
        raise ValueError(f"{folder}: the `all` configuration has no run that finished")
    share = share_budget("mixtral-8x22b", layers, ram, type_name=type_name, expert_type=expert_type)
    k = N_LAYER / layers
    read_gb = c["mb_read_per_token"] * MB * k / 1e9
    compute_here = c["own_compute_s_per_token"] * k
    s_here = c["s_per_token"] * k
    read_s = read_gb / ssd_gbps
    comp = laptop_compute_s(type_name, expert_type, gbps_per_core, cores)
    return {"type": type_name, "expert_type": expert_type, "slot_mib": [b / 2 ** 20 for b in share["full_slot_bytes"]],
            "experts_cached": share["full_slots"], "experts": share["full_experts"], "share": share["share"],
            "layers_measured": layers, "slots_measured": c["n_slots"], "runs": c["ok"],
            "mb_read_per_layer": c["mb_read_per_token"] / layers, "gen_hit_rate": c["gen_hit_rate"],
            "reader_busy": c.get("reader_busy"), "disk_mb_per_s": (c["disk_read_bytes_per_s"] or 0) / MB,
            "peak_rss_gib": (c["peak_rss_bytes"] or 0) / 2 ** 30, "ram_gib": share["ram_bytes"] / 2 ** 30,
            "here_read_gb_per_token": read_gb, "here_compute_s": compute_here, "here_s_per_token": s_here,
            "here_tok_per_s": 1 / s_here, "laptop_read_s": read_s, "laptop_compute_s": comp,
            "laptop_s_per_token": [max(read_s, comp), read_s + comp],
            "laptop_tok_per_s": [1 / (read_s + comp), 1 / max(read_s, comp)]}


def table(rows: list[dict], ssd_gbps: float) -> str:
    lines = [f"| experts | expert MiB | experts cached of 448 (24 GiB) | measured layers (slots), peak RSS / --ram GiB | "
             f"MB read / layer / token | gen hit | disk MB/s | 56 layers here: GB read, compute s, s/token (tok/s) | "
             f"laptop: read s at {ssd_gbps:g} GB/s, compute s (arm64 est.), tok/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = (r["expert_type"] or r["type"]).upper() + (" (Q4_K; Q6_K ffn_down in half the layers)"
                                                          if r["type"] == "q4_k_m" and not r["expert_type"] else "")
        mib = " / ".join(f"{m:.0f}" for m in r["slot_mib"])
        lo, hi = r["laptop_tok_per_s"]
        lines.append(f"| {name} | {mib} | {r['experts_cached']} ({100 * r['share']:.1f} %) | "
                     f"{r['layers_measured']} ({r['slots_measured']:.0f}), {r['peak_rss_gib']:.2f} / {r['ram_gib']:.2f} | "
                     f"{r['mb_read_per_layer']:.0f} | "
                     f"{100 * r['gen_hit_rate']:.0f} % | {r['disk_mb_per_s']:.0f} | {r['here_read_gb_per_token']:.1f}, "
                     f"{r['here_compute_s']:.2f}, {r['here_s_per_token']:.2f} ({r['here_tok_per_s']:.3f}) | "
                     f"{r['laptop_read_s']:.2f}, {r['laptop_compute_s']:.2f}, {lo:.2f}-{hi:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="TYPE[:EXPERT_TYPE]=DIR")
    ap.add_argument("--layers", type=int, required=True, help="layers of the measured files")
    ap.add_argument("--ram", default="24G", help="the laptop's --ram (default 24G)")
    ap.add_argument("--ssd-gbps", type=float, default=5.0, help="the laptop SSD's read speed, GB/s (assumed; default 5)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from lazymoe.benchmarks.kquant_dots import M1, arm64_report
    rep = arm64_report("apple-m1")
    gbps = {t: r["bytes_per_cycle"] * M1["ghz"] for t, r in rep.items() if "bytes_per_cycle" in r}
    try:
        rows = [row(spec, folder, a.layers, a.ram, a.ssd_gbps, gbps, M1["cores"])
                for spec, _, folder in (r.partition("=") for r in a.runs)]
    except (OSError, ValueError, KeyError, StopIteration) as e:
        print(f"laptop_8x22b: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"assumptions": {**M1, "ssd_gbps": a.ssd_gbps, "ram": a.ram}, "gbps_per_core": gbps, "rows": rows},
                     indent=1) if a.json else table(rows, a.ssd_gbps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
