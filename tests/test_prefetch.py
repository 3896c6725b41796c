"""Speculative prefetch, overlapped reads, read modes and traces: never a change in logits, counters that add up,
wrong guesses cancelled, pinned experts kept, read errors surfaced."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lazymoe.runtime.expert_cache import ExpertCache, ExpertPart, page_cache_share
from lazymoe.runtime.generate import collect
from lazymoe.runtime.memory import PROCESS_ESTIMATE
from lazymoe.runtime.model import load_model
from lazymoe.runtime.trace import read_trace
from tests.helpers import min_budget, run_cli, synth_gguf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """4 layers x 8 experts, top-2, Q8_0 experts of ~30 KiB."""
    return synth_gguf(tmp_path_factory.mktemp("prefetch") / "moe.gguf", D=128, F=192, L=4, H=4, G=2, E=8, A=2,
                      V=300, qt="q8_0")


def decode_logits(m, prompt, n):
    """Logits of the prompt's last token and of n greedy decode steps, [n + 1, V]."""
    m.rewind(0)
    out = [m.eval(prompt)]
    for _ in range(n):
        out.append(m.eval([int(out[-1].argmax())]))
    return np.stack(out)


def test_logits_identical_with_prefetch_overlap_policy_read_and_budget(moe, monkeypatch):
    import lazymoe.runtime.model
    monkeypatch.setattr(lazymoe.runtime.model, "process_baseline", lambda: PROCESS_ESTIMATE)  # slots follow the minimum exactly
    small = min_budget(moe, 64) + 1 * 73728                                    # about A + 1 slots
    prompt = list(range(3, 20))
    ref = None
    for budget, kw in [("4G", dict(prefetch=False, overlap=False)),
                       (small, dict(prefetch=False, overlap=False, policy="lru")),
                       (small, dict(prefetch=True, overlap=True, policy="lru")),
                       (small, dict(prefetch=True, overlap=False, policy="lfu", read="buffered")),
                       (small, dict(prefetch=True, overlap=True, policy="layer")),
                       (small, dict(prefetch=True, overlap=True, refine=True)),
                       (small + 2 * 73728, dict(prefetch=True, overlap=True, prefetch_depth=3)),
                       ("4G", dict(prefetch=True, overlap=True))]:
        m = load_model(moe, ram_budget=budget, ctx=64, progress=False, **kw)
        got = decode_logits(m, prompt, 12)
        batch = m.logits(prompt + [7, 8])
        if budget != "4G":
            assert m.plan.n_slots < m.plan.n_experts and m.experts.evictions > 0
        if ref is None:
            ref, ref_batch = got, batch
        assert np.array_equal(got, ref), kw
        assert np.array_equal(batch, ref_batch), kw
        m.close()


def test_prefetch_counters_and_stats(moe, monkeypatch):
    import lazymoe.runtime.model
    monkeypatch.setattr(lazymoe.runtime.model, "process_baseline", lambda: PROCESS_ESTIMATE)
    m = load_model(moe, ram_budget=min_budget(moe, 64) + 3 * 73728, ctx=64, progress=False)
    m.net.trace = []
    _, last = collect(m.stream_generate(list(range(3, 12)), max_tokens=16))
    s, c = last.stats, m.experts.counters()
    assert 0 < s["prefetch_issued"] and 0 <= s["prefetch_useful"] <= s["prefetch_issued"]
    # every decode step guesses layers 1..3: A experts each
    assert 0.0 <= s["prefetch_recall"] <= 1.0 and m.net.predicted == (len(m.net.trace) - 1) * 3 * 2
    assert c["hits"] + c["misses"] == sum(len(np.unique(r[:, l])) for r in m.net.trace for l in range(4))
    assert c["prefetch_cancelled"] <= c["prefetch_issued"] and c["bytes_read"] > 0
    assert s["expert_wait_s"] >= 0 and "mb_prefetched_per_token" in s
    m.close()
    deep = load_model(moe, ram_budget=min_budget(moe, 64) + 3 * 73728, ctx=64, progress=False, prefetch_depth=3)
    asked, ask = [], deep.experts.prefetch
    monkeypatch.setattr(deep.experts, "prefetch", lambda layer, experts: (asked.append(layer), ask(layer, experts)))
    deep.net.trace = []
    "".join(deep.generate(list(range(3, 12)), max_tokens=16))
    assert deep.net.predicted == m.net.predicted                       # recall still counts the next layer's guess only
    steps = len(deep.net.trace) - 1                                # layers 0, 1, 2 guess (1, 2, 3), (2, 3), (3)
    assert sorted(asked) == sorted([1, 2, 3, 2, 3, 3] * steps)
    deep.close()
    with pytest.raises(ValueError, match="prefetch depth"):
        load_model(moe, ctx=64, progress=False, prefetch_depth=0)
    assert m.net.prefetch_depth == 1                               # auto: a few slots of 32 experts
    roomy = load_model(moe, ram_budget=min_budget(moe, 64) + 30 * 73728, ctx=64, progress=False)
    assert roomy.plan.n_slots >= 24 and roomy.net.prefetch_depth == 2   # auto: >= 3/4 of the experts fit
    roomy.close()
    off = load_model(moe, ram_budget=min_budget(moe, 64) + 3 * 73728, ctx=64, progress=False, prefetch=False)
    _, off_last = collect(off.stream_generate(list(range(3, 12)), max_tokens=16))
    assert off_last.stats["prefetch_issued"] == 0 and off_last.stats["prefetch_recall"] == 0.0
    assert off_last.token_ids == last.token_ids
    off.close()


def _cache(tmp_path, n_experts=4, n_slots=3, nbytes=34 * 150, n_layers=1):
    """An ExpertCache over a file of n_layers x n_experts experts of 3 parts each; part j of expert e of
    layer l holds the byte (64 * l + 16 * e + j) % 256."""
    path = tmp_path / "experts.bin"
    blob = bytearray(b"\1" * 100)
    offsets = []
    for layer in range(n_layers):
        offsets.append([])
        for e in range(n_experts):
            offs = []
            for j in range(3):
                offs.append(len(blob))
                blob += bytes([(64 * layer + 16 * e + j) % 256]) * nbytes
                blob += b"\0" * (-len(blob) % 32)
            offsets[-1].append(offs)
    path.write_bytes(bytes(blob))
    from lazymoe.kernels.qtypes import qtype
    parts = tuple(ExpertPart(qtype("q8_0"), (1, 32 * nbytes // 34), nbytes) for _ in range(3))
    return ExpertCache(str(path), parts, offsets, n_slots, "lru"), nbytes


@pytest.mark.parametrize("read", ["direct", "buffered"])
def test_cache_reads_cancels_and_pins(tmp_path, read):
    cache, nbytes = _cache(tmp_path)
    cache.close()
    cache = ExpertCache(cache.path, cache.parts, cache.offsets, 3, "lru", read=read)
    for e in (0, 1):
        views = cache.get(0, e)
        assert [int(v.view(np.uint8).min()) for v in views] == [16 * e, 16 * e + 1, 16 * e + 2]
        assert [int(v.view(np.uint8).max()) for v in views] == [16 * e, 16 * e + 1, 16 * e + 2]
    # 0 and 1 pinned: a guess may take only the free slot, never theirs
    cache.prefetch(0, [2, 3])
    assert cache.prefetch_issued == 1 and set(cache.slot_of) == {(0, 0), (0, 1), (0, 2)}
    cache.settle(0, [0, 1])                           # the guess was wrong: cancelled, or done and kept
    with cache.cv:
        while cache.loading:
            cache.cv.wait()
    assert (0, 2) not in cache.loading and len(cache.slot_of) + len(cache.pools[0].free) == 3
    cache.unpin(0)
    cache.prefetch(0, [3])
    v = cache.get(0, 3)
    assert int(v[2].view(np.uint8).ravel()[0]) == 16 * 3 + 2 and cache.prefetch_useful == 1
    assert cache.counters()["bytes_read"] >= 3 * nbytes * 3
    cache.close()


def test_auto_read_follows_the_page_cache(tmp_path):
    """auto: buffered when the expert pages are cached (a file just written), direct once they are evicted."""
    cache, nbytes = _cache(tmp_path)
    cache.close()
    with open(cache.path, "rb") as f:
        f.read()                                      # every page cached
    warm = ExpertCache(cache.path, cache.parts, cache.offsets, 3, "lru", read="auto")
    assert warm.read == "buffered" and warm.warm_share == 1.0
    warm.close()
    fd = os.open(cache.path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if page_cache_share(cache.path, 0, os.path.getsize(cache.path)) > 0.1:
        pytest.skip("this filesystem keeps the file cached after POSIX_FADV_DONTNEED")
    direct = ExpertCache(cache.path, cache.parts, cache.offsets, 3, "lru", read="direct")
    direct.close()                                    # (buffered where the filesystem refuses O_DIRECT)
    cold = ExpertCache(cache.path, cache.parts, cache.offsets, 3, "lru", read="auto")
    assert cold.warm_share < 0.5 and cold.read == direct.read
    assert [int(v.view(np.uint8).max()) for v in cold.get(0, 1)] == [16, 17, 18]
    cold.close()


def test_read_error_is_a_value_error(tmp_path):
    cache, nbytes = _cache(tmp_path)
    cache.close()
    broken = ExpertCache(cache.path, cache.parts, [[[o + 10 ** 6 for o in offs] for offs in cache.offsets[0]]], 2)
    with pytest.raises(ValueError, match="truncated"):
        broken.get(0, 1)
    broken.close()


def test_cli_trace_and_flags(moe, tmp_path, monkeypatch):
    t = tmp_path / "trace.jsonl"
    rc, out, err = run_cli(["run", moe, "-p", "abc", "-n", "6", "--temp", "0", "--ctx", "64", "--trace", str(t),
                            "--policy", "lfu", "--no-prefetch", "--read", "buffered", "--json"])
    assert rc == 0, err
    d = json.loads(out)
    head, ids, prompt = read_trace(t)
    assert head["n_layer"] == 4 and ids.shape == (d["prompt_tokens"] + d["generated_tokens"] - 1, 4, 2)
    assert prompt.sum() == d["prompt_tokens"] and d["cache"]["policy"] == "lfu" and d["prefetch_issued"] == 0
    import lazymoe.runtime.model
    monkeypatch.setattr(lazymoe.runtime.model, "process_baseline", lambda: PROCESS_ESTIMATE)
    few = str(min_budget(moe, 64) + 3 * 73728)                       # some of the experts: guesses are made
    rc, out, err = run_cli(["run", moe, "-p", "abc", "-n", "6", "--temp", "0", "--ctx", "64", "--ram", few])
    assert rc == 0 and "recall" in err, err
    with pytest.raises(SystemExit):
        run_cli(["run", moe, "-p", "abc", "--policy", "mru"])


@pytest.mark.parametrize("policy", ["lru", "lfu", "layer"])
def test_cache_contents_under_random_requests(tmp_path, policy):
    """Random routes, guesses right and wrong, small pool: every expert handed out holds its own bytes."""
    cache, nbytes = _cache(tmp_path, n_experts=4, n_layers=3, nbytes=34 * 4000)
    cache.close()
    cache = ExpertCache(cache.path, cache.parts, cache.offsets, 4, policy)
    rng = np.random.default_rng(1)
    for step in range(150):
        layer = step % 3
        order = np.sort(rng.choice(4, 2, replace=False))
        cache.settle(layer, order)
        cache.want(layer, order)
        cache.prefetch((layer + 1) % 3, rng.choice(4, 2, replace=False))
        for e in order:
            v = cache.get(layer, e)
            for j in range(3):
                b = v[j].view(np.uint8).ravel()
                assert b[0] == b[-1] == (64 * layer + 16 * e + j) % 256, (step, layer, e, j)
            cache.unpin(layer, e)
    c = cache.counters()
    assert c["hits"] + c["misses"] == 300 and len(cache.slot_of) <= 4 and not cache.pinned
    cache.close()


def test_a_model_that_fits_is_read_and_warmed_up_at_load_without_a_trace(moe, monkeypatch):
    """Every expert is read at load and one warm-up step runs: the sequence stays empty, no hit or miss is
    counted, the first generation calls no Numba function for the first time, and the logits are bit for bit
    those of a load that did neither."""
    from numba.core.dispatcher import Dispatcher

    import lazymoe.runtime.expert_cache
    prompt = list(range(3, 20))
    m = load_model(moe, ram_budget="4G", ctx=64, progress=False)
    c = m.experts.counters()
    assert m.experts.holds_all() and c["hits"] == c["misses"] == 0 and c["bytes_read"] > 0
    assert m.tokens == [] and m.net.predicted == m.net.predicted_right == 0
    first, compile_ = [], Dispatcher.compile
    monkeypatch.setattr(Dispatcher, "compile", lambda d, sig: (first.append((d.py_func.__qualname__, sig))
                                                                if sig not in d.overloads else None, compile_(d, sig))[1])
    _, last = collect(m.stream_generate(prompt, max_tokens=4))
    assert first == [] and last.stats["hit_rate"] == 1.0 and last.stats["mb_read_prompt"] == 0
    got = decode_logits(m, prompt, 4)
    m.close()
    monkeypatch.setattr(lazymoe.runtime.expert_cache.ExpertCache, "fits_all", lambda self: False)
    lazy = load_model(moe, ram_budget="4G", ctx=64, progress=False)
    assert lazy.experts.counters()["bytes_read"] == 0
    assert np.array_equal(decode_logits(lazy, prompt, 4), got)
    lazy.close()


def test_refine_replaces_the_first_guess(moe, monkeypatch):
    """After layer l's FFN the next layer is guessed again from l's output: guesses it drops are cancelled (settle),
    the ones it adds are read, and recall counts the refined guess; without --refine (the default) one guess per layer."""
    import lazymoe.runtime.model
    monkeypatch.setattr(lazymoe.runtime.model, "process_baseline", lambda: PROCESS_ESTIMATE)
    runs = {}
    for refine in (True, False):
        m = load_model(moe, ram_budget=min_budget(moe, 64) + 3 * 73728, ctx=64, progress=False, refine=refine)
        settled, settle = [], m.experts.settle
        monkeypatch.setattr(m.experts, "settle", lambda layer, experts, s=settle, log=settled: (log.append(layer), s(layer, experts)))
        m.net.trace = []
        _, last = collect(m.stream_generate(list(range(3, 12)), max_tokens=12))
        steps = len(m.net.trace) - 1
        # every layer settles its own route; with refine, layers 1..3 also settle the refined guess (decode only)
        extra = 3 * steps if refine else 0
        assert len(settled) == 4 * (steps + 1) + extra
        runs[refine] = last
        m.close()
    assert runs[True].token_ids == runs[False].token_ids
    assert runs[True].stats["prefetch_issued"] >= runs[False].stats["prefetch_issued"]
