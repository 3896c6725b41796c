"""The 8x22B laptop extrapolation (benchmarks/laptop_8x22b.py): per-layer figures scaled to 56 layers, the expert
share a 24 GiB budget gives the whole model, and the arm64 compute over the file's own tensor types."""
from __future__ import annotations

import json

import pytest

from lazymoe.benchmarks.laptop_8x22b import laptop_compute_s, row

GBPS = {"q4_0": 15.0, "q8_0": 35.0, "q4_k": 8.0, "q5_k": 8.0, "q6_k": 12.0, "q3_k": 5.0, "q2_k": 6.0, "f32": 80.0}


def _run(tmp_path, ok=1):
    c = {"config": "all", "ok": ok, "mb_read_per_token": 2000.0, "own_compute_s_per_token": 0.5, "s_per_token": 1.0,
         "n_slots": 29, "gen_hit_rate": 0.7, "reader_busy": 0.9, "disk_read_bytes_per_s": 1.5e9, "peak_rss_bytes": 2 ** 32}
    (tmp_path / "out_of_ram.json").write_text(json.dumps({"configs": [c]}))
    return str(tmp_path)


def test_row_scales_layers_and_reads(tmp_path):
    r = row("q4_0", _run(tmp_path), 10, "24G", 5.0, GBPS, 8)
    assert r["experts"] == 448 and r["experts_cached"] == 128          # 128 slots of 162 MiB (RESULTS, the 8x22B laptop table)
    assert r["here_read_gb_per_token"] == pytest.approx(2000 * 5.6 / 1000)
    assert r["here_s_per_token"] == pytest.approx(5.6) and r["here_compute_s"] == pytest.approx(2.8)
    assert r["laptop_read_s"] == pytest.approx(11.2 / 5.0)
    lo, hi = r["laptop_s_per_token"]
    assert lo == pytest.approx(max(r["laptop_read_s"], r["laptop_compute_s"])) and hi == pytest.approx(lo + min(
        r["laptop_read_s"], r["laptop_compute_s"]))
    low_bit = row("q4_k_m:q2_k", _run(tmp_path), 10, "24G", 5.0, GBPS, 8)
    assert low_bit["experts_cached"] > r["experts_cached"] and low_bit["expert_type"] == "q2_k"
    with pytest.raises(ValueError, match="no run that finished"):
        row("q4_0", _run(tmp_path, ok=0), 10, "24G", 5.0, GBPS, 8)


def test_compute_follows_the_expert_type():
    # Q2_K experts (2.6 bits) at 6 GB/s per core against Q4_K (4.5 bits) at 8: fewer seconds; Q3_K at 5 GB/s: more
    base = laptop_compute_s("q4_k_m", None, GBPS, 8)
    assert laptop_compute_s("q4_k_m", "q2_k", GBPS, 8) < base < laptop_compute_s("q4_k_m", "q3_k", GBPS, 8)
    # all Q4_0 (lazymoe's q4_0 file): the bytes of 2 experts + attention + output of 56 layers, at 15 GB/s x 8 cores
    want = (56 * (2 * 3 * 6144 * 16384 + 2 * 6144 * 6144 + 2 * 6144 * 1024) + 32768 * 6144) * 18 / 32 / (15e9 * 8)
    assert laptop_compute_s("q4_0", None, GBPS, 8) == pytest.approx(want)
