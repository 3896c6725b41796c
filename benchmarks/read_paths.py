"""Cold read speed of experts, each way the runtime could read them, side by side.

    sudo python -m lazymoe.benchmarks.read_paths MODEL.gguf [--experts 12] [--trials 3] [--json]

Each trial drops the page cache (root), then reads the same N experts (3 matrices each, from
different layers) into one slot-sized buffer per way, the ways interleaved so each trial compares
them under the same conditions; the median MB/s per way is reported, with the CPU seconds the
process spent (user + sys) per GB, since those are taken from the compute on a 2-core machine.

Ways:
  seq-16M/32M    the disk's sequential speed: as many bytes from the file's start in 16 / 32 MiB O_DIRECT reads
  preadv         os.preadv of each whole matrix into the slot, buffered (the runtime before this change)
  buffered-8M    the runtime's reader (numba pread loop, GIL released) in 8 MiB chunks, buffered
  direct-8M      the same with O_DIRECT: aligned ranges, no page cache, no copy (the runtime's default)
  direct-32M/64M O_DIRECT in 32 / 64 MiB chunks (64 MiB: one pread per matrix)
  direct-2x-8M/32M  O_DIRECT, two threads reading two experts at once, 8 / 32 MiB chunks
  mmap-willneed  mmap the file, madvise(WILLNEED) the expert's ranges, copy them into the slot
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import statistics
import sys
import threading
import time

import numpy as np

from lazymoe.benchmarks.machine import drop_page_cache
from lazymoe.format.config import config_from_metadata
from lazymoe.format.gguf_file import GGUFFile
from lazymoe.runtime.expert_cache import IO_ALIGN, read_ranges
from lazymoe.runtime.weights import check_tensors, expert_layout

MB = 1e6


def expert_ranges(path: str, n: int):
    """[(offset, nbytes) x 3] for n experts spread over the file's layers and expert ids (the runtime's layout)."""
    with GGUFFile(path) as g:
        cfg = config_from_metadata(g.metadata, path)
        check_tensors(g, cfg)
        parts, offsets = expert_layout(g, cfg)
    L, E = cfg.n_layer, cfg.n_expert
    return [[(o, p.nbytes) for o, p in zip(offsets[(i * 5) % L][(i * 3) % E], parts[(i * 5) % L])] for i in range(n)]


def _aligned(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + IO_ALIGN, np.uint8)
    a = -raw.ctypes.data % IO_ALIGN
    return raw[a:a + nbytes]


def read_preadv(path, experts, buf):
    fd = os.open(path, os.O_RDONLY)
    try:
        for parts in experts:
            pos = 0
            for off, nb in parts:
                mv = memoryview(buf[pos:pos + nb])
                done = 0
                while done < nb:
                    done += os.preadv(fd, [mv[done:]], off + done)
                pos += nb + IO_ALIGN
    finally:
        os.close(fd)


def read_numba(path, experts, buf, direct: bool, chunk: int):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    flag = np.zeros(1, np.int32)
    try:
        for parts in experts:
            addrs, sizes, need, offs, pos = [], [], [], [], 0
            for off, nb in parts:
                lo, hi = off // IO_ALIGN * IO_ALIGN, -(-(off + nb) // IO_ALIGN) * IO_ALIGN
                addrs.append(buf.ctypes.data + pos)
                sizes.append(hi - lo)
                need.append(off + nb - lo)
                offs.append(lo)
                pos += hi - lo
            a = [np.array(v, np.int64) for v in (addrs, sizes, need, offs)]
            if read_ranges(fd, *a, np.zeros(3, np.int64), flag, chunk) != 0:
                raise OSError(f"{path}: read failed")
    finally:
        os.close(fd)


def read_direct_2x(path, experts, buf, chunk):
    half = len(buf) // 2 // IO_ALIGN * IO_ALIGN
    bufs = (buf[:half], buf[half:2 * half])
    ts = [threading.Thread(target=read_numba, args=(path, experts[k::2], bufs[k], True, chunk)) for k in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def read_mmap(path, experts, buf):
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        data = np.frombuffer(mm, np.uint8)
        for parts in experts:
            for off, nb in parts:
                lo = off // mmap.PAGESIZE * mmap.PAGESIZE
                mm.madvise(mmap.MADV_WILLNEED, lo, off + nb - lo)
            pos = 0
            for off, nb in parts:
                buf[pos:pos + nb] = data[off:off + nb]
                pos += nb + IO_ALIGN
        del data
    finally:
        mm.close()


def read_seq(path, nbytes, buf, blk):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    flag = np.zeros(1, np.int32)
    try:
        size = min(nbytes, os.fstat(fd).st_size) // blk * blk
        for off in range(0, size, blk):
            a = [np.array([v], np.int64) for v in (buf.ctypes.data, blk, blk, off)]
            read_ranges(fd, *a, np.zeros(1, np.int64), flag, blk)
    finally:
        os.close(fd)
    return size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a GGUF with experts (e.g. lazymoe synth --shape mixtral-8x7b)")
    ap.add_argument("--experts", type=int, default=12, help="experts read per way and trial (default 12)")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    experts = expert_ranges(args.model, args.experts)
    nbytes = sum(nb for parts in experts for _, nb in parts)
    slot = sum(-(-nb // IO_ALIGN) * IO_ALIGN + IO_ALIGN for _, nb in experts[0])
    buf = _aligned(max(2 * slot, 16 << 20))
    ways = {
        "seq-16M": lambda: read_seq(args.model, nbytes, buf, 16 << 20),
        "seq-32M": lambda: read_seq(args.model, nbytes, buf, 32 << 20),
        "preadv": lambda: read_preadv(args.model, experts, buf),
        "buffered-8M": lambda: read_numba(args.model, experts, buf, False, 8 << 20),
        "direct-8M": lambda: read_numba(args.model, experts, buf, True, 8 << 20),
        "direct-32M": lambda: read_numba(args.model, experts, buf, True, 32 << 20),
        "direct-64M": lambda: read_numba(args.model, experts, buf, True, 64 << 20),
        "direct-2x-8M": lambda: read_direct_2x(args.model, experts, buf, 8 << 20),
        "direct-2x-32M": lambda: read_direct_2x(args.model, experts, buf, 32 << 20),
        "mmap-willneed": lambda: read_mmap(args.model, experts, buf),
    }
    read_numba(args.model, experts[:1], buf, True, 8 << 20)          # compile the reader
    cold = True
    res = {w: {"mb_s": [], "cpu_s_per_gb": []} for w in ways}
    for _ in range(args.trials):
        for w, f in ways.items():
            cold &= drop_page_cache()
            c0, t0 = os.times(), time.perf_counter()
            got = f()
            dt, c1 = time.perf_counter() - t0, os.times()
            n = max(1, got if w.startswith("seq") else nbytes)
            res[w]["mb_s"].append(n / MB / dt)
            res[w]["cpu_s_per_gb"].append((c1.user + c1.system - c0.user - c0.system) / (n / 1e9))
    rows = [{"way": w, "mb_s": statistics.median(r["mb_s"]), "cpu_s_per_gb": statistics.median(r["cpu_s_per_gb"]),
             "trials_mb_s": r["mb_s"]} for w, r in res.items()]
    info = {"model": args.model, "experts": args.experts, "bytes": nbytes, "trials": args.trials, "cold": cold,
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps({**info, "rows": rows}))
        return 0
    print(f"{args.experts} experts, {nbytes / MB:.0f} MB per way, {args.trials} trials, "
          f"{'cold (page cache dropped before each)' if cold else 'NOT cold: run as root to drop the page cache'}")
    print(f"{'way':<15}{'MB/s':>8}{'CPU s/GB':>10}   trials MB/s")
    for r in rows:
        print(f"{r['way']:<15}{r['mb_s']:>8.0f}{r['cpu_s_per_gb']:>10.2f}   "
              + " ".join(f"{v:.0f}" for v in r["trials_mb_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
