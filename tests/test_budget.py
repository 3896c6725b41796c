"""Peak RSS stays under the RAM budget when the budget holds only a few of the experts.

A synthetic model whose experts dominate (D=512, F=1536, 8 experts, 4 layers at Q8_0:
2.5 MiB an expert, 80 MiB in all) runs in fresh processes: once with the smallest
budget load_model accepts plus two experts (4 of 32 slots), once with room for all.
The child's own high-water mark (getrusage ru_maxrss, which counts mapped file pages
too) must be within SLACK of the budget, and what the run adds after load (VmHWM reset
through /proc/self/clear_refs) within the plan's KV + buffers + expert slots; the
generated tokens must be the same.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import synth_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLACK = 4 << 20     # bytes over budget tolerated: allocator and page granularity

CHILD = r"""
import json, sys
from lazymoe.runtime.model import load_model
path, budget = sys.argv[1], int(sys.argv[2])
try:
    m = load_model(path, ram_budget=budget, ctx=256, progress=False)
except ValueError as e:
    print(json.dumps({"error": str(e)}))
    sys.exit(0)
at_load = m.experts.counters()
import psutil
rss0 = psutil.Process().memory_info().rss
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                      # reset VmHWM: the peak from here on is the run's
from lazymoe.runtime.generate import collect
text, last = collect(m.stream_generate(list(range(3, 43)), max_tokens=24, temperature=0))
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"plan": m.plan.as_dict(), "stats": last.stats, "cache": m.experts.counters(), "at_load": at_load,
                  "ids": list(last.token_ids), "run_growth": hwm - rss0}))
"""


def child(path, budget) -> dict:
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, path, str(budget)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def big_experts(tmp_path_factory):
    return synth_gguf(tmp_path_factory.mktemp("budget") / "moe.gguf", D=512, F=1536, L=4, H=8, G=4, E=8, A=2,
                      V=320, qt="q8_0")


def test_peak_rss_under_budget(big_experts):
    refusal = child(big_experts, 1)["error"]
    assert "too small" in refusal
    minimum = int(re.search(r"\((\d+) bytes\)", refusal).group(1))

    small = child(big_experts, minimum + 2 * 2_506_752)
    plan, stats, cache = small["plan"], small["stats"], small["cache"]
    assert small["at_load"]["bytes_read"] == 0                         # no expert read before the router asks
    assert plan["n_slots"] <= 5 and plan["n_experts"] == 32
    reads = cache["misses"] + cache["prefetch_issued"]                 # demand reads and speculative ones
    assert cache["evictions"] > 0 and reads * plan["slot_bytes"] >= cache["bytes_read"] > 0
    assert stats["generated_tokens"] == 24
    assert stats["peak_rss_bytes"] <= plan["budget"] + SLACK, (stats["peak_rss_bytes"], plan)
    # What the run adds after load is bounded by the dynamic part of the plan: if experts were read
    # through the mapping, all 80 MiB of them would show up here.
    dynamic = plan["kv"] + plan["work"] + plan["n_slots"] * plan["slot_bytes"]
    assert small["run_growth"] <= dynamic + SLACK, (small["run_growth"], plan)

    roomy = child(big_experts, plan["budget"] + (200 << 20))
    assert roomy["plan"]["n_slots"] == 32 and roomy["cache"]["evictions"] == 0
    assert roomy["stats"]["peak_rss_bytes"] <= roomy["plan"]["budget"]
    assert roomy["ids"] == small["ids"]


def test_default_budget(monkeypatch):
    """No --ram: what the process holds + available memory (lowered by a cgroup limit) - the reserve."""
    import lazymoe.runtime.memory as mem
    GiB = mem.GiB

    class VM:
        total, available = 32 * GiB, 20 * GiB
    monkeypatch.setattr(mem.psutil, "virtual_memory", lambda: VM)
    monkeypatch.setattr(mem, "_cgroup_room", lambda: None)
    reserve = max(mem.RESERVE_MIN, int(mem.RESERVE_SHARE * 32 * GiB))
    assert mem.default_budget(GiB // 4) == GiB // 4 + 20 * GiB - reserve
    monkeypatch.setattr(mem, "_cgroup_room", lambda: 6 * GiB)            # a container capped tighter than RAM
    assert mem.default_budget(0) == 6 * GiB - reserve
    monkeypatch.setattr(mem, "_cgroup_room", lambda: GiB // 2)            # less room than the reserve
    assert mem.default_budget(123) == 123


def test_cgroup_room_under_a_cap():
    """A child in a 3 GiB memory cgroup sees at most 3 GiB of room and plans at most that by default."""
    from lazymoe.benchmarks.cgroup import MemCap, available
    if available() is None:
        pytest.skip("no writable cgroup memory controller")
    code = "from lazymoe.runtime.memory import _cgroup_room, default_budget; print(_cgroup_room(), default_budget(0))"
    with MemCap(3 << 30, f"lazymoe-test-room-{os.getpid()}") as cap:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, preexec_fn=cap.join, capture_output=True,
                             text=True, check=True).stdout.split()
    room, budget = int(out[0]), int(out[1])
    assert 2 << 30 < room <= 3 << 30 and budget < room


def test_info_min_ram_is_the_runtime_threshold(capsys):
    """`info --json` names the smallest budget; `run` accepts exactly that and refuses 32 MiB less in one line."""
    from lazymoe.cli import main
    from lazymoe.runtime import DEMO_MODEL
    assert main(["info", DEMO_MODEL, "--ctx", "64", "--json"]) == 0
    need = json.loads(capsys.readouterr().out)["min_ram_bytes"]
    run = ["run", DEMO_MODEL, "--ctx", "64", "-p", "def f(x):", "-n", "2", "--temp", "0"]
    assert main(run + ["--ram", str(need)]) == 0
    capsys.readouterr()
    assert main(run + ["--ram", str(need - (32 << 20))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "too small" in err[0] and f"({need} bytes)" in err[0], err
