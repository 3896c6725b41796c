"""`lazymoe bench` on the tiny Mixtral: the prompt, the table, CSV and JSON, bad input."""
from __future__ import annotations

import csv
import json
import sys

import pytest

from lazymoe.benchmarks.runner import run_lazymoe
from lazymoe.benchmarks.sweep import format_table, plot
from lazymoe.benchmarks.workload import bench_prompt, model_facts
from lazymoe.cli import main


@pytest.fixture(scope="module")
def tiny(converted):
    return converted("tiny-mixtral", "q8_0")


@pytest.fixture(scope="module")
def bench_run(tiny, tmp_path_factory):
    """One bench over a budget below the model's minimum and one that holds every expert."""
    out = tmp_path_factory.mktemp("bench-out")
    code = main(["bench", tiny, "--ram", "1K,600M", "-P", "20", "-n", "4", "-t", "1", "-o", str(out)])
    return code, out


def test_prompt_is_exact_and_deterministic(tiny):
    tok = model_facts(tiny, 64)["tokenizer"]
    for n in (2, 17, 300):
        text, ids = bench_prompt(tok, n)
        assert len(ids) == n and ids[0] == tok.bos_id and tok.encode(text, bos=True) == ids
    assert bench_prompt(tok, 40) == bench_prompt(tok, 40)
    with pytest.raises(ValueError, match="at least 2"):
        bench_prompt(tok, 1)


def test_table_csv_json(bench_run, capsys):
    code, out = bench_run
    assert code == 0
    rows = list(csv.DictReader(open(out / "bench.csv")))
    assert [r["budget"] for r in rows] == ["1K", "600M"]
    assert rows[0]["status"] == "too small" and rows[0]["gen_tok_per_s"] == ""
    ok = rows[1]
    assert ok["status"] == "ok" and int(ok["prompt_tokens"]) == 20 and int(ok["generated_tokens"]) <= 4
    assert float(ok["gen_tok_per_s"]) > 0 and float(ok["prompt_tok_per_s"]) > 0 and float(ok["load_s"]) > 0
    assert 0 <= float(ok["hit_rate"]) <= 1 and int(ok["n_slots"]) == int(ok["n_experts"]) == 16
    assert int(ok["expert_misses"]) == 0 and float(ok["hit_rate"]) == 1   # every expert fits: all are read at load
    assert 0 < int(ok["peak_rss_bytes"]) <= 600 << 20

    doc = json.load(open(out / "bench.json"))
    assert doc["prompt_tokens"] == 20 and len(doc["prompt_ids"]) == 20 and doc["gen"] == 4 and doc["ctx"] == 24
    assert [r["status"] for r in doc["rows"]] == ["too small", "ok"]
    assert doc["rows"][1]["peak_rss_bytes"] == int(ok["peak_rss_bytes"])
    assert doc["machine"]["cores"] >= 1 and doc["synthetic"] is False


def test_table_text():
    rows = [{"budget": "2G", "budget_bytes": 2 << 30, "status": "ok", "cold": True, "n_slots": 10, "n_experts": 256,
             "load_s": 3.21, "prompt_tokens": 32, "prompt_tok_per_s": 4.5, "generated_tokens": 16, "gen_tok_per_s": 0.25,
             "time_to_first_token_s": 7.1, "hit_rate": 0.1, "gen_hit_rate": 0.05, "expert_misses": 700, "mb_read_per_token": 5900.0,
             "mb_read_prompt": 1.0, "peak_rss_bytes": 2 << 30, "wall_s": 80.0, "note": ""},
            {"budget": "1G", "budget_bytes": 1 << 30, "status": "too small", "cold": None, "n_slots": None,
             "n_experts": None, "load_s": None, "prompt_tokens": None, "prompt_tok_per_s": None, "generated_tokens": None,
             "gen_tok_per_s": None, "time_to_first_token_s": None, "hit_rate": None, "gen_hit_rate": None,
             "expert_misses": None, "mb_read_per_token": None, "mb_read_prompt": None, "peak_rss_bytes": None, "wall_s": None, "note": ""}]
    text = format_table(rows, synthetic=True)
    lines = text.splitlines()
    assert "gen tok/s" in lines[0]
    assert lines[1].split() == ["2G", "10/256", "3.2", "4.50", "0.250", "7.10", "10", "5", "700", "5900", "2.00G", "ok", "(cold)"]
    assert lines[2].split()[0] == "1G" and lines[2].endswith("too small")
    assert "random weights" in lines[-1]


def test_plot_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    note = plot(str(tmp_path / "x.png"), [], "t", False)
    assert note.startswith("plot skipped") and not (tmp_path / "x.png").exists()


def test_runtime_refusal_is_a_row(tiny):
    res = run_lazymoe(tiny, "hello", 2, ram=1, ctx=16, threads=1)
    assert res["status"] == "too small" and "too small" in res["error"]


@pytest.mark.parametrize("argv, msg", [
    (["--ram", "2X"], "not a size"),
    (["--ram", ","], "at least one budget"),
    (["--ram", "1G", "-P", "1"], "--prompt-tokens"),
    (["--ram", "1G", "-n", "0"], "--gen"),
    (["--ram", "1G", "--ctx", "3"], "--ctx"),
])
def test_bad_flags(tiny, tmp_path, capsys, argv, msg):
    assert main(["bench", tiny, "-o", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lazymoe bench: error:") and msg in err[0]


def test_missing_file(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope.gguf"), "--ram", "1G", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such model file" in err[0]


def test_vs_llamacpp_tiny(tiny, capsys):
    pytest.importorskip("llama_cpp")
    from lazymoe.benchmarks.vs_llamacpp import main as vs_main
    assert vs_main([tiny, "-P", "12", "-n", "3", "-t", "1", "--trials", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for engine in ("llama.cpp", "lazymoe"):
        m = res["median"][engine]
        assert m["ok"] == 1 and m["gen_tok_per_s"] > 0 and m["prompt_tok_per_s"] > 0 and m["peak_rss_bytes"] > 0
    assert res["median"]["llama.cpp"]["prompt_all_logits_tok_per_s"] > 0
    assert res["ratio"]["gen_tok_per_s"] > 0 and res["llama_tokenizer_agrees"] is True
    assert res["args"]["prompt_tokens"] == 12 and res["machine"]["disk_read_bytes_per_s"] is None   # file under 1 GiB
    assert vs_main([tiny, "--trials", "0"]) == 2
