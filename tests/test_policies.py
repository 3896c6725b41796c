"""Cache policies on hand-made traces whose hit counts are worked out by hand, and the replay benchmark's CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lazymoe.benchmarks.policies import main, replay
from lazymoe.runtime.expert_cache import LFU, LRU, LayerShare, make_policy


def decode_trace(rows) -> tuple[np.ndarray, np.ndarray]:
    """rows: per token, per layer, the experts -> (ids [T, L, A], is_prompt [T] all False)."""
    ids = np.array(rows, np.int16)
    return ids, np.zeros(len(ids), bool)


def test_one_layer_lru_vs_lfu():
    # 0 0 0 1 2 0 with 2 slots. LRU: m h h m m(evicts 0) m -> 2 hits. LFU: 2 evicts 1 (used once, 0 thrice),
    # so the last 0 hits -> 3. One layer: LayerShare is LRU within it -> 2.
    ids, prompt = decode_trace([[[e]] for e in (0, 0, 0, 1, 2, 0)])
    got = {p: replay(ids, prompt, p, 2)["gen_hits"] for p in ("lru", "lfu", "layer")}
    assert got == {"lru": 2, "lfu": 3, "layer": 2}


def test_layer_share_keeps_a_steady_layer():
    # Two layers, 2 experts each per token, 3 slots (share 1 per layer). Layer 0 always uses {0, 1};
    # layer 1 uses a new pair every token. LRU lets layer 1's misses push out layer 0's experts and hits
    # only (0, 1) from the second token on: 3 hits in 4 tokens. LayerShare evicts within layer 1 once it
    # holds its share, so layer 0 hits both from the second token on: 6 hits.
    ids, prompt = decode_trace([[[0, 1], [2, 3]], [[0, 1], [4, 5]], [[0, 1], [6, 7]], [[0, 1], [2, 3]]])
    assert replay(ids, prompt, "lru", 3)["gen_hits"] == 3
    assert replay(ids, prompt, "layer", 3)["gen_hits"] == 6
    # Room for everything: only the first use of each of the 8 distinct experts misses.
    assert all(replay(ids, prompt, p, 16)["gen_hits"] == 16 - 8 for p in ("lru", "lfu", "layer"))


def test_prompt_chunk_counts_each_expert_once():
    # A prompt of 3 tokens is one chunk: layer 0 asks for {0, 1, 2} once (3 misses), then a generated token
    # using {1, 2} hits both.
    ids = np.array([[[0, 1]], [[1, 2]], [[2, 0]], [[1, 2]]], np.int16)
    prompt = np.array([True, True, True, False])
    c = replay(ids, prompt, "lru", 4)
    assert (c["accesses"], c["hits"], c["gen_accesses"], c["gen_hits"]) == (5, 2, 2, 2)


def test_policy_objects_skip_pinned():
    for pol in (LRU(), LFU(), LayerShare(4, 2)):
        for k in [(0, 0), (0, 1), (1, 0)]:
            pol.touch(k)
        assert pol.victim((1, 1), {(0, 0), (0, 1), (1, 0)}) is None
        v = pol.victim((0, 2), {(0, 0)})
        assert v in {(0, 1), (1, 0)}
    assert make_policy("lfu", 4, 2).name == "lfu"
    with pytest.raises(ValueError, match="policy 'mru'"):
        make_policy("mru", 4, 2)


def test_policies_cli(tmp_path, capsys):
    from lazymoe.runtime.trace import FORMAT
    t = tmp_path / "t.jsonl"
    rows = [{"i": i, "prompt": i < 2, "experts": [[i % 3, 3], [1, 2]]} for i in range(6)]
    t.write_text("\n".join(json.dumps(r) for r in [{"format": FORMAT, "version": 1, "n_layer": 2, "n_expert": 4,
                                                     "n_expert_used": 2, "tokens": 6, "prompt_tokens": 2}] + rows))
    assert main([str(t), "--slots", "2,4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {(r["slots"], r["policy"]) for r in out["rows"]} == {(s, p) for s in (2, 4) for p in ("lru", "lfu", "layer")}
    assert main([str(t), "--slots", "2,4"]) == 0 and "layer" in capsys.readouterr().out
    assert main([str(t), "--slots", "0"]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    assert main([str(bad)]) == 2 and "not a lazymoe trace" in capsys.readouterr().err
