"""The demo model shipped in the package: it runs offline, and it is the Hugging Face model it came from."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lazymoe.cli import main
from lazymoe.runtime import DEMO_MODEL

GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "demo_golden.json")


def test_demo_model_is_packaged_and_small():
    assert os.path.isfile(DEMO_MODEL)
    assert os.path.getsize(DEMO_MODEL) < 10 * 2**20


def test_greedy_ids_equal_hugging_face():
    """benchmarks/train_demo.py ran transformers' MixtralForCausalLM on this GGUF's dequantized weights
    and recorded its greedy continuation; lazymoe must produce the same ids (up to EOS)."""
    from lazymoe import load_model
    from lazymoe.runtime.generate import collect

    gold = json.load(open(GOLDEN))
    model = load_model(DEMO_MODEL, progress=False, ctx=256)
    try:
        assert model.tokenizer.encode(gold["prompt"], bos=True) == gold["prompt_ids"]
        _, last = collect(model.stream_generate(gold["prompt"], max_tokens=len(gold["greedy_ids"])))
        ours = list(last.token_ids)
    finally:
        model.close()
    want = gold["greedy_ids"]
    if model.tokenizer.eos_id in want:
        want = want[: want.index(model.tokenizer.eos_id) + 1]
    assert ours[: len(want)] == want


def test_demo_command_runs_in_a_small_budget():
    # its own process: peak RSS is the process's high-water mark, which in this one includes earlier tests
    p = subprocess.run([sys.executable, "-c", "from lazymoe.cli import main; raise SystemExit(main())",
                        "demo", "-n", "16", "--ram", "400M", "--json"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["generated_tokens"] >= 1 and out["text"]
    assert out["peak_rss_bytes"] <= out["ram_budget_bytes"]


def test_demo_bad_budget(capsys):
    assert main(["demo", "--ram", "1M"]) == 2
    err = capsys.readouterr().err
    assert "too small" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["demo", "-n", "0"], ["demo", "--temp", "-1"]])
def test_demo_bad_flags(argv, capsys):
    assert main(argv) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
