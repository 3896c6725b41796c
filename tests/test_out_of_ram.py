"""benchmarks/out_of_ram.py: configurations, medians and the disk bound on fabricated runs, the table,
bad input, and one end-to-end run on the demo model (uncapped, warm)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lazymoe.benchmarks.out_of_ram import (
    CONFIGS,
    INRAM,
    disk_bound,
    format_table,
    main,
    parse_configs,
    prefetch_on,
    summarize_all,
)
from lazymoe.runtime import DEMO_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = {n: CONFIGS[n].split() for n in ("direct", "all")} | {INRAM: []}


def test_parse_configs():
    assert parse_configs("all, direct,old") == ["all", "direct", "old"]
    assert parse_configs(",".join(CONFIGS)) == ["old", "direct", "layer", "overlap", "all", "lfu", "lru", "depth2", "depth3",
                                                  "refine"]
    with pytest.raises(ValueError, match="unknown configuration 'fast'"):
        parse_configs("all,fast")
    with pytest.raises(ValueError, match="twice"):
        parse_configs("all,all")
    with pytest.raises(ValueError, match="at least one"):
        parse_configs(" , ")


def test_prefetch_flag():
    assert prefetch_on([]) and prefetch_on(["--policy", "lru"])
    assert not prefetch_on(CONFIGS["overlap"].split())
    assert prefetch_on(["--no-prefetch", "--prefetch"]) and not prefetch_on(["--prefetch", "--no-prefetch"])


def _run(config, rnd, tok_s, mb, status="ok"):
    if status != "ok":
        return {"config": config, "round": rnd, "status": status, "error": "exit code -9"}
    return {"config": config, "round": rnd, "status": "ok", "gen_tok_per_s": tok_s, "mb_read_per_token": mb,
            "mb_prefetched_per_token": mb / 2, "gen_hit_rate": 0.5, "prefetch_recall": 0.0 if config == "direct" else 0.9,
            "expert_wait_s": 3.0, "prompt_s": 2.0, "gen_s": 10.0, "generated_tokens": 16, "peak_rss_bytes": 1 << 30,
            "cgroup_peak_bytes": 2 << 30, "plan": {"n_slots": 12}}


@pytest.fixture
def fabricated():
    """direct: 1/0.834 s/token in every ok round (one OOM); all: 0.390 s/token median; inram 0.231 s/token."""
    runs = [_run("direct", 1, 1 / 0.834, 1586), _run("all", 1, 1 / 0.380, 600),
            _run("direct", 2, None, None, "OOM"), _run("all", 2, 1 / 0.390, 641), _run(INRAM, 2, 1 / 0.231, 31),
            _run("direct", 3, 1 / 0.834, 1586), _run("all", 3, 1 / 0.500, 700), _run(INRAM, 3, 1 / 0.231, 31)]
    rows, compute = summarize_all(runs, ["direct", "all"], FLAGS, 2257e6)
    return runs, rows, compute


def test_medians_and_bound(fabricated):
    _, rows, compute = fabricated
    assert [r["config"] for r in rows] == ["direct", "all", INRAM]
    direct, all_, inram = rows
    assert inram["runs"] == 2 and inram["flags"] == [] and inram["s_per_token"] == pytest.approx(0.231)
    assert direct["runs"] == 3 and direct["ok"] == 2 and direct["statuses"] == ["ok", "OOM", "ok"]
    assert direct["s_per_token"] == pytest.approx(0.834) and direct["tok_per_s"] == pytest.approx(1 / 0.834)
    assert all_["s_per_token"] == pytest.approx(0.390) and all_["mb_read_per_token"] == 641
    assert all_["speed_vs_first"] == pytest.approx(0.834 / 0.390) and direct["speed_vs_first"] == pytest.approx(1)
    assert direct["prefetch_recall"] is None and all_["prefetch_recall"] == 0.9      # --no-prefetch: no recall
    assert compute == {"source": "inram", "s_per_token": pytest.approx(0.231), "mb_read_per_token": 31}
    # the additive disk bound of `all`: 641 MB/token at 2257 MB/s + 0.231 s compute
    assert all_["read_s_per_token"] == pytest.approx(641 / 2257)
    assert all_["bound_s_per_token"] == pytest.approx(641 / 2257 + 0.231)
    assert round(all_["vs_bound"], 2) == 0.76 and round(all_["vs_max_read_compute"], 2) == 1.37
    assert round(direct["vs_bound"], 2) == 0.89 and round(direct["vs_max_read_compute"], 2) == 1.19


def test_bound_without_compute_or_disk():
    b = disk_bound(0.4, 641, 2257e6, None)
    assert b["read_s_per_token"] == pytest.approx(641 / 2257) and b["bound_s_per_token"] is None
    assert b["vs_bound"] is None and b["vs_max_read_compute"] is None
    assert disk_bound(0.4, 641, None, 0.2)["read_s_per_token"] is None
    rows, compute = summarize_all([_run("all", 1, 2.0, 10)], ["all"], FLAGS, None)
    assert compute["source"] == "own" and rows[0]["compute_s_per_token"] is None and rows[0]["vs_bound"] is None


def test_disk_speed_measured_per_run():
    """Each config's bound uses the median of the disk speeds measured right before its runs."""
    runs = [_run("all", k, 1 / 0.5, 1000) | {"disk_read_bytes_per_s": v} for k, v in ((1, 1e9), (2, 2e9), (3, 4e9))]
    rows, _ = summarize_all(runs, ["all"], FLAGS, 500e6)
    assert rows[0]["disk_read_bytes_per_s"] == 2e9 and rows[0]["read_s_per_token"] == pytest.approx(0.5)


def test_reader_busy_and_own_bound():
    """The reader's busy share of decoding and its speed while busy give a second bound, per run."""
    r = _run("all", 1, 1 / 0.5, 1000) | {"gen_s": 7.5, "gen_expert_wait_s": 3.0, "gen_read_s": 6.0, "generated_tokens": 16}
    rows, _ = summarize_all([r], ["all"], FLAGS, 500e6)
    assert rows[0]["reader_busy"] == pytest.approx(0.8)
    assert rows[0]["own_read_bytes_per_s"] == pytest.approx(1000e6 * 15 / 6.0)
    assert rows[0]["vs_own_bound"] == pytest.approx(0.5 / (1000 / 2500 + 4.5 / 15))


def test_own_compute_time():
    """No in-RAM reference: each run's decode time not spent waiting for reads, per decode step."""
    r = _run("all", 1, 1 / 0.5, 641) | {"gen_s": 7.5, "gen_expert_wait_s": 3.0, "generated_tokens": 16}
    rows, compute = summarize_all([r], ["all"], FLAGS, 2257e6)
    assert compute["source"] == "own"
    assert rows[0]["compute_s_per_token"] == pytest.approx(4.5 / 15)
    assert rows[0]["bound_s_per_token"] == pytest.approx(641 / 2257 + 0.3)


def test_table(fabricated):
    runs, rows, compute = fabricated
    res = {"command": "python -m lazymoe.benchmarks.out_of_ram m.gguf --ram 2G", "model": "m.gguf", "name": "synthetic x",
           "synthetic": True, "file_bytes": 6 << 30, "prompt_tokens": 9,
           "args": {"ram": "2G", "ctx": 1024, "gen": 16, "rounds": 3, "extra": "--seed 7", "inram_ram": "12G"},
           "machine": {"cpu": "CPU", "cores": 2, "ram_bytes": 24 << 30, "load_avg": (0.5, 0.25, 1.0)},
           "cap": {"note": "2G (cgroup v1)"}, "cache_dropped": True, "disk_read_bytes_per_s": 2257e6,
           "compute": compute, "configs": rows, "runs": runs}
    text = format_table(res)
    assert "python -m lazymoe.benchmarks.out_of_ram m.gguf --ram 2G" in text and "2 cores, 24.0 GiB RAM" in text
    assert "cap: 2G (cgroup v1); page cache dropped before each run: yes" in text and "2257 MB/s" in text
    assert "compute s/token: 0.231, the in-RAM reference run" in text
    lines = text.splitlines()
    first = lines.index(next(l for l in lines if l.startswith("config") and "gen hit" in l))
    assert lines[first + 1].split() == ["direct", "0.834", "1.20", "1.00", "1586", "(793)", "50%", "-", "3.0/12.0",
                                        "12", "1.00G", "2.00G", "ok", "2/3,", "OOM", "1"]
    assert lines[first + 2].split()[:7] == ["all", "0.390", "2.56", "2.14", "641", "(320)", "50%"]
    bound = lines.index(next(l for l in lines if l.startswith("config") and "÷ bound" in l))
    assert lines[bound + 2].split() == ["all", "0.390", "641", "-", "0.284", "0.231", "0.515", "0.76", "1.37", "-", "-", "-"]
    assert "direct round 2: OOM: exit code -9" in text and "random weights" in lines[-1]
    assert "check:" not in text
    res["disk_read_bytes_per_s"] = 1000e6          # 1586 and 641 MB at 1000 MB/s: longer than 0.834 and 0.390 s
    res["configs"], res["compute"] = summarize_all(runs, ["direct", "all"], FLAGS, 1000e6)
    assert "check: direct, all decoded faster than its reads take" in format_table(res)


@pytest.mark.parametrize("argv, msg", [
    (["nope.gguf", "--ram", "2G"], "no such model file"),
    ([DEMO_MODEL, "--ram", "2X"], "--ram: RAM budget '2X' is not a size"),
    ([DEMO_MODEL, "--ram", "2G", "--mem-limit=-1G"], "--mem-limit"),
    ([DEMO_MODEL, "--ram", "2G", "--configs", "all,fast"], "unknown configuration 'fast'"),
    ([DEMO_MODEL, "--ram", "2G", "-n", "1"], "at least 2"),
])
def test_bad_input(argv, msg, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("out_of_ram: error:") and msg in err[0] and captured.out == ""


def test_demo_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lazymoe.benchmarks.out_of_ram", DEMO_MODEL, "--ram", "260M", "-n", "2",
                        "--configs", "direct,all", "--no-cap", "--no-drop", "-t", "1", "--timeout", "120", "--json",
                        "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert [c["config"] for c in res["configs"]] == ["direct", "all"]
    for c in res["configs"]:
        assert c["statuses"] == ["ok"] and c["s_per_token"] > 0 and c["mb_read_per_token"] >= 0
        assert 0 <= c["gen_hit_rate"] <= 1 and c["peak_rss_bytes"] > 0 and c["cgroup_peak_bytes"] is None
    assert res["configs"][0]["prefetch_recall"] is None and res["configs"][1]["prefetch_recall"] is not None
    assert res["configs"][0]["speed_vs_first"] == 1
    assert res["cap"]["bytes"] is None and "--no-cap" in res["cap"]["note"] and res["cache_dropped"] is None
    assert res["compute"]["source"] == "own" and res["disk_read_bytes_per_s"] is None     # demo file under 1 GiB
    assert all(c["compute_s_per_token"] > 0 for c in res["configs"])
    runs = res["runs"]
    assert [(x["config"], x["round"], x["status"]) for x in runs] == [("direct", 1, "ok"), ("all", 1, "ok")]
    assert runs[0]["flags"] == CONFIGS["direct"].split() and runs[0]["tokens"] == runs[1]["tokens"]  # same seed
    assert runs[0]["cache"]["policy"] == "lru" and runs[1]["cache"]["policy"] == "layer"
    assert {p.name for p in tmp_path.iterdir()} == {"direct.r1.json", "direct.r1.err", "all.r1.json", "all.r1.err",
                                                   "out_of_ram.json"}
    assert json.loads((tmp_path / "all.r1.json").read_text())["gen_tok_per_s"] == runs[1]["gen_tok_per_s"]
    assert "round 1 all: ok" in r.stderr
