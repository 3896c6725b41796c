"""The hostile-input fuzzer (benchmarks/fuzz.py): its GGUF rewriter, and its CI share, a fixed-seed campaign
of a few thousand cases that must end with no traceback, crash, hang or case over 1 GB."""
from __future__ import annotations

import hashlib
import random

import pytest

from lazymoe.benchmarks import fuzz
from lazymoe.runtime import DEMO_MODEL

CI_CASES = 2500
CI_SEED = 12


def test_gguf_parts_lay_the_file_out_again():
    with open(DEMO_MODEL, "rb") as f:
        b = f.read()
    assert fuzz.Gguf(b).bytes() == b


def test_mutations_are_reproducible():
    with open(DEMO_MODEL, "rb") as f:
        b = f.read()
    parts = fuzz.Gguf(b)

    def digests():                  # hashes, not 30 copies of a 9 MB file
        return [hashlib.sha1(fuzz.mutate_gguf(b, parts, random.Random(f"demo:{i}"))).digest() for i in range(30)]
    one = digests()
    assert one == digests()
    assert sum(m != hashlib.sha1(b).digest() for m in one) >= 25
    assert fuzz.mutate_template(random.Random(1)) == fuzz.mutate_template(random.Random(1))


def test_a_refusal_caused_by_memory_counts_as_over_1gb():
    try:
        try:
            raise MemoryError()
        except MemoryError:
            raise ValueError("refused") from None
    except ValueError as e:
        with pytest.raises(fuzz._OutOfMemory):
            fuzz._refused(e)
    fuzz._refused(ValueError("plain"))


def test_ci_share_of_the_fuzzer():
    r = fuzz.campaign(CI_CASES, seed=CI_SEED, workers=2)
    bad = [f"{f['target']}:{f['seed']} {f['outcome']}\n{f['detail']}" for f in r["findings"]]
    assert not bad, "\n".join(bad[:5]) + "\n(replay one with python -m lazymoe.benchmarks.fuzz --replay TARGET:SEED)"
    counts = r["counts"]
    assert sum(sum(c.values()) for c in counts.values()) == CI_CASES
    assert set(counts) == set(fuzz.TARGETS)
    assert all(counts[t]["ok"] > 0 for t in ("demo", "mixtral", "template", "hf"))   # mutations that still load
