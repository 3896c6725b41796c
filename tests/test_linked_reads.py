"""read_linked (runtime/expert_cache.py): ranges adjacent in the file in one preadv, scattered into their own
buffers, the page two ranges share copied; short files, interruption and resumption as read_ranges."""
import os

import numpy as np
import pytest

from lazymoe.runtime.expert_cache import IO_ALIGN, read_linked

RNG = np.random.default_rng(5)


def plan(data_len, starts, nbytes):
    """Aligned ranges (offs, sizes, need) of the matrices at byte starts, each nbytes long, and their links."""
    lo = np.array([s // IO_ALIGN * IO_ALIGN for s in starts], np.int64)
    hi = np.array([-(-(s + nbytes) // IO_ALIGN) * IO_ALIGN for s in starts], np.int64)
    need = np.array([s + nbytes for s in starts], np.int64) - lo
    link = np.zeros(len(starts), np.int8)
    link[1:] = (lo[1:] <= hi[:-1]) & (lo[1:] >= hi[:-1] - IO_ALIGN)
    return lo, hi - lo, need, link


@pytest.mark.parametrize("base,nbytes", [(96, 10_000), (4096, 8192), (0, 4096 * 3 + 32)])
@pytest.mark.parametrize("chunk", [1 << 20, 3 * 4096])
def test_linked_ranges_land_where_single_reads_would(tmp_path, base, nbytes, chunk):
    E = 5
    starts = [base + e * nbytes for e in range(E)]
    data = RNG.integers(0, 256, base + E * nbytes + 100, dtype=np.uint8)
    p = tmp_path / "f.bin"
    p.write_bytes(data.tobytes())
    offs, sizes, need, link = plan(len(data), starts, nbytes)
    assert link[1:].all()
    bufs = [np.zeros(int(s) + IO_ALIGN, np.uint8) for s in sizes]
    addrs = np.array([b.ctypes.data for b in bufs], np.int64)
    done = np.zeros(E, np.int64)
    fd = os.open(p, os.O_RDONLY)
    try:
        assert read_linked(fd, addrs, sizes, need, offs, done, link, np.zeros(1, np.int32), chunk) == 0
    finally:
        os.close(fd)
    for e, (b, s, o) in enumerate(zip(bufs, starts, offs)):
        assert np.array_equal(b[s - o:s - o + nbytes], data[s:s + nbytes]), e


def test_interrupted_and_short(tmp_path):
    data = RNG.integers(0, 256, 3 * 5000, dtype=np.uint8)
    p = tmp_path / "f.bin"
    p.write_bytes(data.tobytes())
    offs, sizes, need, link = plan(len(data), [0, 5000, 10000], 5000)
    bufs = [np.zeros(int(s), np.uint8) for s in sizes]
    addrs = np.array([b.ctypes.data for b in bufs], np.int64)
    fd = os.open(p, os.O_RDONLY)
    try:
        done = np.zeros(3, np.int64)
        assert read_linked(fd, addrs, sizes, need, offs, done, link, np.ones(1, np.int32), 1 << 20) == 1
        assert (done == 0).all()
        assert read_linked(fd, addrs, sizes, need, offs, done, link, np.zeros(1, np.int32), 1 << 20) == 0
        assert (done >= need).all()                   # the last range ends at end of file, past need
        for b, s, o in zip(bufs, (0, 5000, 10000), offs):
            assert np.array_equal(b[s - o:s - o + 5000], data[s:s + 5000])
        done = np.zeros(3, np.int64)
        longer = need.copy()
        longer[-1] += 1                               # the file is one byte short of the last range
        assert read_linked(fd, addrs, sizes, longer, offs, done, link, np.zeros(1, np.int32), 1 << 20) == -1
    finally:
        os.close(fd)


def test_cache_links_adjacent_experts(tmp_path, monkeypatch):
    """A model with experts 0..E-1 all wanted at once reads adjacent ones in linked requests, and the logits are
    those of a run that holds every expert."""
    import lazymoe.runtime.model
    from lazymoe import load_model
    from tests.helpers import min_budget, synth_gguf
    from tests.test_runtime import PROCESS_ESTIMATE
    monkeypatch.setattr(lazymoe.runtime.model, "process_baseline", lambda: PROCESS_ESTIMATE)
    p = synth_gguf(tmp_path / "fine.gguf", D=256, F=256, E=16, A=8)
    ids = list(range(1, 40))
    a = load_model(p, ram_budget="2G", ctx=64, progress=False, read="buffered")
    b = load_model(p, ram_budget=min_budget(p, 64), ctx=64, progress=False, read="buffered")
    assert np.array_equal(a.logits(ids), b.logits(ids))
    assert a.experts.counters()["linked_reads"] > 0 and b.experts.evictions > 0
