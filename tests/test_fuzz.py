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


def test_seed_files_cover_every_computed_type(tmp_path):
    """The GGUF targets' seeds hold every type kernels.qtypes computes on, each "types" seed one type in every weight
    matrix, and each seed runs ("ok") unmutated: mutations of it reach that type's kernels."""
    from lazymoe.cli import main
    from lazymoe.format.gguf_file import GGUFFile
    from lazymoe.kernels.qtypes import QTYPES
    seeds = fuzz.make_seeds(str(tmp_path))
    seen = set()
    for name, path in seeds.items():
        if name.split("-")[0] not in fuzz.GGUF_TARGETS:
            continue
        with GGUFFile(path) as g:
            types = {t.type_name for t in g.tensors.values()}
        seen |= types
        if name.startswith("types-"):
            assert types == {name[6:].upper(), "F32"}, name
            assert fuzz.run_gguf(path, main) == "ok", name
    assert seen == {q.name.upper() for q in QTYPES.values()}


_NEW_COMPILES = """
import os, sys
from numba.core.registry import CPUDispatcher
from lazymoe.benchmarks import fuzz
from lazymoe.cli import main

def compiled():
    return {f"{m.__name__}.{k}": len(v.overloads) for m in list(sys.modules.values())
            if getattr(m, "__name__", "").startswith("lazymoe") for k, v in vars(m).items() if isinstance(v, CPUDispatcher)}

hf, scratch = sys.argv[1], sys.argv[2]
fuzz.warm_up({"hf": hf}, scratch, main)
before = compiled()
out = os.path.join(scratch, "case.gguf")
assert fuzz._cli(main, ["quantize", hf, "-o", out, "-q", "--force"])[0] == 0
assert fuzz._cli(main, ["run", out, "-p", "Hi there", "-n", "2", "--temp", "0", "--ram", "900M"])[0] == 0
print(sorted(k for k, n in compiled().items() if n != before.get(k, 0)))
"""


def test_warm_up_leaves_nothing_to_compile_in_a_case(tmp_path):
    """A worker's warm-up compiles (or loads from Numba's cache) every kernel an hf case and a run use, so no JIT
    compile lands inside a case's 10 s alarm: on a cold cache the quantizers' did (hf:12000083, a false hang)."""
    import os
    import subprocess
    import sys
    hf = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tiny-mixtral")
    out = subprocess.run([sys.executable, "-c", _NEW_COMPILES, hf, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:]


def test_ci_share_of_the_fuzzer():
    r = fuzz.campaign(CI_CASES, seed=CI_SEED, workers=2)
    bad = [f"{f['target']}:{f['seed']} {f['outcome']}\n{f['detail']}" for f in r["findings"]]
    assert not bad, "\n".join(bad[:5]) + "\n(replay one with python -m lazymoe.benchmarks.fuzz --replay TARGET:SEED)"
    counts = r["counts"]
    assert sum(sum(c.values()) for c in counts.values()) == CI_CASES
    assert set(counts) == set(fuzz.TARGETS)
    assert all(counts[t]["ok"] > 0 for t in ("demo", "mixtral", "kquant", "types", "template", "hf"))   # still loads
