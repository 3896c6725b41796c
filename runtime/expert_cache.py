"""The expert cache: a fixed pool of slots holding the experts the router asked for.

An expert is its three matrices (ffn_gate, ffn_up, ffn_down) of one layer. The pool is
allocated once (n_slots x slot_bytes of anonymous memory). Experts are read with pread
straight into a slot, never through the file mapping, so the file's pages never count in
the process's RSS. Unless most expert pages are already in the page cache (read "auto",
the default, checks with mincore; then reads are buffered copies), the file is opened with
O_DIRECT: reads bypass the page cache (no copy, no CPU, nothing left behind in RAM), which
is what a model larger than RAM gets anyway; each matrix is read as one 4096-aligned range
and its view starts at the matrix's offset inside that range.

One background thread does all reading, through a numba function that calls pread
without the GIL (the kernels hold the GIL while they compute, so a Python read loop
would stall between calls). Requests are either demand (`want`, `get`: this layer needs
the expert) or speculative (`prefetch`: a guess for a later layer); demand goes first,
preempting a speculative read between 32 MiB chunks, and `settle` cancels the guesses
that turned out wrong. Slots of pinned experts (in use by the current layer) and of
experts still being read are never given up. Which slot to give up is a small policy
object (`touch`, `admit`, `victim`, `forget`): LRU, LFU or LayerShare.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, replace

import numpy as np
from numba import njit, types

from lazymoe.format.checks import whole_number
from lazymoe.kernels.qtypes import QType

IO_ALIGN = 4096             # O_DIRECT needs file offset, length and buffer aligned to the device block
CHUNK = 32 << 20            # bytes per pread: cold O_DIRECT reads 8 MiB at ~1.0 GB/s, 32 MiB at ~2.2 GB/s here
IDLE_S = 2.0                # the reader thread exits after this long without work (and restarts on demand)
POLL_S = 0.001              # how often a caller waiting for a job inside that call checks its progress
READ_MODES = ("auto", "direct", "buffered")
DEFAULT_READ = "auto"       # direct, unless most expert bytes are already in the page cache (then buffered)
WARM_SHARE = 0.5            # auto reads buffered from this share of expert pages in the page cache

_libc = ctypes.CDLL(None, use_errno=True)
# libc's reads as Numba external functions: resolved by name in this process (glibc; macOS 11+), so the reader
# below is cached on disk like the kernels (through ctypes pointers it compiled anew in every process, ~2 s).
_pread = types.ExternalFunction("pread", types.intp(types.int32, types.voidptr, types.uintp, types.int64))
_preadv = types.ExternalFunction("preadv", types.intp(types.int32, types.voidptr, types.int32, types.int64))
_memmove = types.ExternalFunction("memmove", types.voidptr(types.voidptr, types.voidptr, types.uintp))
_mincore = getattr(_libc, "mincore", None)


# macOS has no O_DIRECT; fcntl F_NOCACHE keeps a file's reads out of the unified buffer cache and F_RDAHEAD 0
# turns off read-ahead for the random expert reads (sys/fcntl.h; Python's fcntl module lacks the names).
F_RDAHEAD, F_NOCACHE = 45, 48


def open_for_reads(path: str, read: str, platform: str | None = None) -> tuple[int, str]:
    """(fd, mode): read "direct" bypasses the page cache (Linux: O_DIRECT; macOS: F_NOCACHE and no read-ahead),
    falling back to buffered where the filesystem or system refuses it (tmpfs and others); "buffered" opens
    plainly. platform: sys.platform unless given (tests)."""
    platform = sys.platform if platform is None else platform
    if read == "direct" and platform == "darwin":
        fd = os.open(path, os.O_RDONLY)
        try:
            import fcntl
            fcntl.fcntl(fd, F_NOCACHE, 1)
            fcntl.fcntl(fd, F_RDAHEAD, 0)
            return fd, "direct"
        except OSError:
            return fd, "buffered"
    if read == "direct" and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT), "direct"
        except OSError:
            pass
    return os.open(path, os.O_RDONLY), "buffered"


def page_cache_share(path: str, lo: int, hi: int) -> float:
    """Share of the file's pages in [lo, hi) that the OS page cache holds now (mincore); 0.0 if unknown."""
    if _mincore is None or hi <= lo:
        return 0.0
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            page = mmap.PAGESIZE
            lo -= lo % page
            hi = min(hi, len(mm))
            if hi <= lo:
                return 0.0
            view = np.frombuffer(mm, np.uint8)
            addr = view.ctypes.data               # valid while mm is open; the buffer export ends here
            del view
            vec = np.zeros((hi - lo + page - 1) // page, np.uint8)
            r = _mincore(ctypes.c_void_p(addr + lo), ctypes.c_size_t(hi - lo), vec.ctypes.data_as(ctypes.c_void_p))
            return float((vec & 1).mean()) if r == 0 else 0.0
    except (OSError, ValueError):
        return 0.0


@njit(nogil=True, cache=True)
def read_ranges(fd, addrs, sizes, need, offs, done, flag, chunk):
    """Read range i (sizes[i] bytes at file offset offs[i] to address addrs[i]) from done[i] on, GIL released.
    Returns 0 when all are read (a range ending at end of file may stop early once need[i] bytes are in),
    1 if flag[0] was set (interrupted; done[] says where to resume), -1 on a read error or a short file."""
    return read_linked(fd, addrs, sizes, need, offs, done, np.zeros(len(sizes), np.int8), flag, chunk)


@njit(nogil=True, cache=True)
def read_linked(fd, addrs, sizes, need, offs, done, link, flag, chunk):
    """read_ranges, where link[i] = 1 says range i starts where range i - 1 ends in the file, or inside its last
    aligned page (the same matrix of experts e - 1 and e of a merged tensor [E, rows, cols]): unstarted linked
    ranges, up to chunk bytes, are one preadv request scattered into their buffers, and the page two ranges share
    is copied from the first buffer into the second (at most IO_ALIGN bytes)."""
    n = len(sizes)
    iov = np.empty((n, 2), np.int64)                  # struct iovec {void *base; size_t len}
    merged_to = 0                                     # ranges below this were merged once (do not merge again)
    i = 0
    while i < n:
        j = i + 1
        if i >= merged_to and done[i] == 0:
            total = sizes[i]
            while j < n and link[j] != 0 and done[j] == 0 and total + offs[j] + sizes[j] - offs[j - 1] - sizes[j - 1] <= chunk:
                total += offs[j] + sizes[j] - offs[j - 1] - sizes[j - 1]
                j += 1
        if j > i + 1:
            if flag[0] != 0:
                return 1
            merged_to = j
            end = offs[i]
            for k in range(i, j):
                skip = end - offs[k]                  # bytes of range k already in range k - 1's buffer
                iov[k - i, 0] = addrs[k] + skip
                iov[k - i, 1] = sizes[k] - skip
                end = offs[k] + sizes[k]
            r = _preadv(fd, iov.ctypes.data, j - i, offs[i])
            if r < 0:
                return -1
            got = offs[i] + r                         # the file is read up to here
            for k in range(i, j):
                skip = 0 if k == i else offs[k - 1] + sizes[k - 1] - offs[k]
                if skip > 0:
                    if got < offs[k - 1] + sizes[k - 1]:
                        break                         # the shared page is not in: range k starts from 0
                    _memmove(addrs[k], addrs[k - 1] + offs[k] - offs[k - 1], skip)
                done[k] = max(0, min(sizes[k], got - offs[k]))
            continue                                  # short reads finish range by range below
        while done[i] < sizes[i]:
            if flag[0] != 0:
                return 1
            m = min(chunk, sizes[i] - done[i])
            r = _pread(fd, addrs[i] + done[i], m, offs[i] + done[i])
            if r <= 0:
                if r == 0 and done[i] >= need[i]:
                    break
                return -1
            done[i] += r
        i += 1
    return 0


def compile_reader() -> None:
    """Compile (or load from numba's cache) the reader so the first expert read does not wait."""
    z = np.zeros(0, np.int64)
    read_ranges(-1, z, z, z, z, z, np.zeros(1, np.int32), CHUNK)
    read_linked(-1, z, z, z, z, z, np.zeros(0, np.int8), np.zeros(1, np.int32), CHUNK)


@dataclass(frozen=True)
class ExpertPart:
    """One matrix of an expert: its type, logical shape (rows, cols) and bytes."""
    qt: QType
    shape: tuple[int, int]
    nbytes: int


def part_region(p: ExpertPart) -> int:
    """Bytes a part takes in a slot: room for its aligned read range, wherever it starts in a block."""
    return -(-p.nbytes // IO_ALIGN) * IO_ALIGN + IO_ALIGN


def slot_size(parts) -> int:
    """Bytes of one slot (the three matrices of an expert, each in its aligned region)."""
    return sum(part_region(p) for p in parts)


def slot_classes(parts_by_layer) -> list[tuple[tuple[ExpertPart, ...], list[int]]]:
    """Layers whose experts share one layout (the types and sizes of their three matrices), as (parts, layers)
    in order of first appearance. Each class gets slots of its own size: a K-quant mix stores ffn_down in Q6_K
    in some layers and Q4_K in others, and slots of the largest size would waste the difference."""
    out: dict = {}
    for layer, parts in enumerate(parts_by_layer):
        out.setdefault(tuple(parts), []).append(layer)
    return list(out.items())


# --- policies ------------------------------------------------------------------------
# touch(key): the expert was used; admit(key): it was read without being used (a prefetch);
# victim(incoming, skip): a resident key to give up for `incoming`, never one in skip (None: none);
# forget(key): it left the cache. Keys are (layer, expert).

class LRU:
    """Least recently used over all layers."""
    name = "lru"

    def __init__(self, n_slots: int = 0, n_layer: int = 0):
        self.order: OrderedDict = OrderedDict()

    def touch(self, key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    admit = touch

    def victim(self, incoming, skip=()):
        return next((k for k in self.order if k not in skip), None)

    def forget(self, key) -> None:
        self.order.pop(key, None)


class LFU:
    """Least frequently used; use counts outlive eviction, ties go to the least recently used."""
    name = "lfu"

    def __init__(self, n_slots: int = 0, n_layer: int = 0):
        self.count: dict = defaultdict(int)
        self.order: OrderedDict = OrderedDict()

    def touch(self, key) -> None:
        self.count[key] += 1
        self.admit(key)

    def admit(self, key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def victim(self, incoming, skip=()):
        best, low = None, None
        for k in self.order:                      # oldest first, so the first minimum is the LRU among equals
            if k not in skip and (low is None or self.count[k] < low):
                best, low = k, self.count[k]
        return best

    def forget(self, key) -> None:
        self.order.pop(key, None)


class LayerShare:
    """Each layer keeps an equal share of the slots (at least 1), LRU within a layer. A layer at or over its
    share gives up its own least recent expert; one under it takes from the layer holding the most."""
    name = "layer"

    def __init__(self, n_slots: int, n_layer: int):
        self.share = max(1, n_slots // max(1, n_layer))
        self.layers: dict = defaultdict(OrderedDict)     # layer -> keys, least recent first

    def touch(self, key) -> None:
        od = self.layers[key[0]]
        od[key] = None
        od.move_to_end(key)

    admit = touch

    def victim(self, incoming, skip=()):
        own = self.layers[incoming[0]]
        mine = next((k for k in own if k not in skip), None)
        if mine is not None and len(own) >= self.share:
            return mine
        best, most = None, 0
        for layer, od in self.layers.items():
            if layer != incoming[0] and len(od) > most:
                k = next((k for k in od if k not in skip), None)
                if k is not None:
                    best, most = k, len(od)
        return best if best is not None else mine

    def forget(self, key) -> None:
        self.layers[key[0]].pop(key, None)


POLICIES = {"lru": LRU, "lfu": LFU, "layer": LayerShare}
DEFAULT_POLICY = "layer"


def make_policy(policy, n_slots: int, n_layer: int):
    """A policy object from a name in POLICIES, or the object itself."""
    if policy is None:
        policy = DEFAULT_POLICY
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"cache policy {policy!r} is not one of {', '.join(POLICIES)}")
        return POLICIES[policy](n_slots, n_layer)
    return policy


# --- options -----------------------------------------------------------------------

@dataclass(frozen=True)
class CacheOptions:
    """How experts are cached, read and guessed; one value threaded from the CLI to the cache.

    policy: a name in POLICIES (or a policy object); read: "auto" | "direct" | "buffered" (see ExpertCache);
    prefetch: guess the next layers' experts with their routers and read them early; prefetch_depth: how many
    layers ahead (None: automatic, see network.DEEP_PREFETCH_SHARE); overlap: ask for all of a layer's
    experts before computing the first; refine: guess the next layer's experts again from this layer's output
    once its FFN is done (a closer input to that layer's router), dropping the first guesses it does not repeat
    (off by default: under the 12G cap it raised recall from 83 to 93 % but read 2.6 % more, benchmarks/RESULTS.md)."""
    policy: object = DEFAULT_POLICY
    read: str = DEFAULT_READ
    prefetch: bool = True
    prefetch_depth: int | None = None
    overlap: bool = True
    refine: bool = False

    def __post_init__(self):
        if isinstance(self.policy, str) and self.policy not in POLICIES:
            raise ValueError(f"cache policy {self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.read not in READ_MODES:
            raise ValueError(f"read mode {self.read!r} is not one of {', '.join(READ_MODES)}")
        if self.prefetch_depth is not None:
            whole_number(self.prefetch_depth, "prefetch depth", 1, hint=" (layers)")


def cache_options(options: CacheOptions | None = None, **changes) -> CacheOptions:
    """options (default CacheOptions()) with the named fields replaced; ValueError for an unknown name."""
    options = CacheOptions() if options is None else options
    unknown = set(changes) - set(CacheOptions.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown expert-cache option {sorted(unknown)[0]!r}; expected one of "
                         f"{', '.join(CacheOptions.__dataclass_fields__)}")
    return replace(options, **{k: v for k, v in changes.items() if v is not None or k == "prefetch_depth"})


# --- the cache -----------------------------------------------------------------------

class _Pool:
    """Slots of one size, for the layers whose experts share one layout; allocated once (n_slots x slot_bytes
    of anonymous memory, 4096-aligned), with its own free list and policy."""

    def __init__(self, parts: tuple[ExpertPart, ...], layers: list[int], n_slots: int, policy):
        self.parts, self.layers, self.n_slots = parts, layers, n_slots
        self.starts = []                      # byte offset of each part's region inside a slot
        pos = 0
        for p in parts:
            self.starts.append(pos)
            pos += part_region(p)
        self.slot_bytes = pos
        self.policy = make_policy(policy, n_slots, len(layers))
        raw = np.empty(n_slots * self.slot_bytes + IO_ALIGN, dtype=np.uint8)   # pages appear as filled
        a = -raw.ctypes.data % IO_ALIGN
        self.pool = raw[a:a + n_slots * self.slot_bytes]                        # [n_slots * slot_bytes], aligned
        self.free = list(range(n_slots - 1, -1, -1))


class _Job:
    """One expert being read into a slot."""
    __slots__ = ("key", "slot", "kind", "seq", "addrs", "sizes", "need", "offs", "done", "views", "at", "cancelled")

    def __init__(self, key, slot, kind, seq):
        self.key, self.slot, self.kind, self.seq = key, slot, kind, seq
        self.cancelled = False


class ExpertCache:
    """Experts of every layer, read on demand into slots.

    parts: the 3 ExpertParts (gate, up, down) of every layer's experts, or one tuple for all layers; layers
    with the same parts share a pool of slots of their size (see slot_classes), n_slots[c] slots for class c
    (an int for a model with one class). offsets[layer][expert] -> 3 absolute file offsets of its matrices.
    policy: a name in POLICIES or a policy object; read: "direct" (O_DIRECT; F_NOCACHE on macOS), "buffered" or "auto": buffered
    when at least WARM_SHARE of the expert pages are in the page cache already (a model that fits in RAM and
    was just used: O_DIRECT would read from disk what RAM holds), direct otherwise.
    """

    def __init__(self, path: str, parts, offsets, n_slots, policy=None, read: str | None = None):
        read = DEFAULT_READ if read is None else read
        if read not in READ_MODES:
            raise ValueError(f"read mode {read!r} is not one of {', '.join(READ_MODES)}")
        self.path = path
        self.offsets = offsets
        self.n_experts = sum(len(o) for o in offsets)     # of every layer
        by_layer = [tuple(parts)] * len(offsets) if parts and isinstance(parts[0], ExpertPart) else list(parts)
        self.parts = by_layer                             # [L] (gate, up, down) ExpertParts
        classes = slot_classes(by_layer)
        counts = [n_slots] if isinstance(n_slots, (int, np.integer)) else list(n_slots)
        if len(counts) != len(classes) or min(counts) < 1:
            raise ValueError(f"the expert cache needs at least one slot for each of its {len(classes)} slot sizes, "
                             f"got {counts}")
        if len(classes) > 1 and not (policy is None or isinstance(policy, str)):
            raise ValueError("a policy object serves one slot size; pass a policy name for a model with several")
        self.pools = [_Pool(cp, layers, n, policy) for (cp, layers), n in zip(classes, counts)]
        self.pool_of = [None] * len(by_layer)             # layer -> its _Pool
        for pool in self.pools:
            for layer in pool.layers:
                self.pool_of[layer] = pool
        self.n_slots = sum(counts)
        self.policy = self.pools[0].policy                # the first pool's, for a model with one slot size
        self.warm_share = None                            # auto: the share of expert pages found cached
        if read == "auto":
            o = np.asarray(offsets, dtype=np.int64)       # [L, E, 3]
            top = max(p.nbytes for cp, _ in classes for p in cp)
            self.warm_share = page_cache_share(path, int(o.min()), int(o.max()) + top)
            read = "buffered" if self.warm_share >= WARM_SHARE else "direct"
        self.fd, self.read = open_for_reads(path, read)

        self.slot_of: dict[tuple[int, int], int] = {}     # (layer, expert) -> slot, resident or being read
        self.views: dict = {}                             # resident key -> (gate, up, down) stored arrays
        self.at: dict = {}                                # resident key -> byte offsets of those arrays in its pool
        self.loading: dict = {}                           # key -> _Job being read
        self.source: dict = {}                            # key -> "demand" | "spec" until its first use
        self.pinned: set = set()                          # keys the current layer uses: never evicted
        self.queue: list[_Job] = []
        self.running: list[_Job] = []                     # the jobs of the reader's current call, in order
        self.flag = np.zeros(1, np.int32)                 # set to interrupt the reader's current job
        self.cv = threading.Condition()
        self.error: Exception | None = None
        self.closing = False
        self.seq = 0
        self.worker: threading.Thread | None = None
        self.hits = self.misses = self.evictions = self.bytes_read = 0
        self.linked_reads = 0                             # ranges read in the request of the range before them
        self.prefetch_issued = self.prefetch_useful = self.prefetch_cancelled = self.prefetch_bytes = 0
        self.wait_s = 0.0                                 # time the caller spent waiting for reads
        self.read_s = 0.0                                 # time the reader spent inside its reads (disk busy)

    @property
    def resident_bytes(self) -> int:
        return sum(self.pool_of[layer].slot_bytes for layer, _ in self.views)

    # --- requests (caller's thread) -------------------------------------------------
    def want(self, layer: int, experts) -> None:
        """Demand reads, in order, for experts this layer is about to use, as far as slots allow; pins them."""
        keys = [(layer, int(e)) for e in experts]
        with self.cv:
            for key in keys:                              # pin what is already here first: misses must not evict it
                if key in self.slot_of:
                    self._promote(key)
                    self.pinned.add(key)
            for key in keys:
                if key not in self.slot_of:
                    if not self._issue(key, "demand"):
                        break
                    self.pinned.add(key)

    def prefetch(self, layer: int, experts) -> None:
        """Speculative reads for a later layer into free or evictable slots (never pinned or loading ones)."""
        with self.cv:
            keys = [(layer, int(e)) for e in experts]
            for key in keys:
                if key not in self.slot_of and self._issue(key, "spec", skip=set(keys)):
                    self.prefetch_issued += 1

    def settle(self, layer: int, experts) -> None:
        """The router chose `experts` for `layer`: cancel guesses for this or earlier layers that are not among them."""
        keep = {(layer, int(e)) for e in experts}
        with self.cv:
            for key, job in list(self.loading.items()):
                if job.kind == "spec" and key[0] <= layer and key not in keep:
                    self._cancel(job)

    def _nudge(self, key, job):
        """A key whose read is under way (lock held): finish its job if its bytes are all in, though the reader has
        not returned yet (-> True, None); else promote it to a demand read and pin it (-> False, the wait timeout:
        POLL_S while the reader is on it, the reader notifying after every call otherwise)."""
        if job in self.running:
            if (job.done >= job.need).all():
                self._finish(job)
                return True, None
            timeout = POLL_S
        else:
            timeout = None
        self._promote(key)
        self.pinned.add(key)
        return False, timeout

    def _count_use(self, key) -> None:
        """A resident expert handed out (lock held): a miss if a demand read brought it, else a hit (a useful
        guess if a speculative one did)."""
        src = self.source.pop(key, None)
        if src == "demand":
            self.misses += 1
        else:
            self.hits += 1
            self.prefetch_useful += src == "spec"

    def get(self, layer: int, expert: int):
        """(gate [F, D], up [F, D], down [D, F]) stored arrays of one expert, read first if needed; pins it."""
        key = (layer, int(expert))
        t0 = time.perf_counter()
        with self.cv:
            while True:
                if self.error is not None:
                    raise self.error
                timeout = None                            # the reader notifies after every call
                if key in self.slot_of:
                    job = self.loading.get(key)
                    if job is None:
                        break
                    finished, timeout = self._nudge(key, job)
                    if finished:
                        continue
                elif self._issue(key, "demand"):
                    self.pinned.add(key)
                self.cv.wait(timeout)
            self._count_use(key)
            self.pinned.add(key)
            self.pool_of[layer].policy.touch(key)
            views = self.views[key]
        self.wait_s += time.perf_counter() - t0
        return views

    def acquire(self, layer: int, experts, wait_all: bool = False):
        """Of a layer's experts (ints, none of them acquired before in this layer), those resident now, waiting until
        at least one is (all, with wait_all): (indices into experts, their offsets [n, 3] in the layer's pool arena).
        Issues demand reads for the others as slots allow; pins the ones it returns (release them with unpin).
        One lock and one pass for the lot: the bookkeeping of get() without its per-call costs."""
        keys = [(layer, e) for e in experts]
        touch = self.pool_of[layer].policy.touch
        t0 = time.perf_counter()
        got, at, have = [], [], set()
        with self.cv:
            while True:
                if self.error is not None:
                    raise self.error
                timeout = None
                for key in keys:
                    if key in self.at:
                        continue
                    job = self.loading.get(key)
                    if job is None:
                        if key not in self.slot_of and self._issue(key, "demand"):
                            self.pinned.add(key)
                        continue
                    _, wait = self._nudge(key, job)
                    timeout = timeout or wait
                for i, key in enumerate(keys):
                    if i not in have and key in self.at:
                        have.add(i)
                        got.append(i)
                        self._count_use(key)
                        self.pinned.add(key)
                        touch(key)
                        at.append(self.at[key])
                if got and (not wait_all or len(got) == len(keys)):
                    break
                self.cv.wait(timeout)
        self.wait_s += time.perf_counter() - t0
        return got, np.array(at, np.int64).reshape(-1, 3)

    def fits_all(self) -> bool:
        """Whether the slots can hold every expert of the model at once (a model that fits its budget)."""
        return all(pool.n_slots >= sum(len(self.offsets[layer]) for layer in pool.layers) for pool in self.pools)

    def preload(self, on_layer=None) -> bool:
        """When the slots hold every expert (fits_all), read them all now and wait, so that the first tokens do
        not wait for reads (in RAM the prompt read about 3/4 of the experts and the first decode steps the last
        layer's rest: RESULTS.md, "In RAM: llama.cpp's own files"). on_layer(layer) is called as each layer is
        in. Counts no hits or misses (bytes_read and read_s do count the reads). Returns whether it read."""
        if not self.fits_all():
            return False
        hits, misses = self.hits, self.misses
        for layer, offs in enumerate(self.offsets):
            self.want(layer, range(len(offs)))        # demand reads for every layer, in order, before waiting
        for layer, offs in enumerate(self.offsets):
            self.acquire(layer, list(range(len(offs))), wait_all=True)
            if on_layer is not None:
                on_layer(layer)
        self.unpin(0)
        self.hits, self.misses = hits, misses
        return True

    def holds_all(self) -> bool:
        """Whether every expert of the model is resident (then guessing and reading ahead has nothing to do)."""
        return len(self.at) == self.n_experts

    def arena(self, layer: int) -> np.ndarray:
        """The uint8 pool that the offsets acquire() returns for this layer point into."""
        return self.pool_of[layer].pool

    def release(self, layer: int, experts) -> None:
        """unpin for several experts of a layer under one lock."""
        with self.cv:
            for e in experts:
                self.pinned.discard((layer, e))

    def unpin(self, layer: int, expert: int | None = None) -> None:
        """The caller is done with an expert (None: with every expert)."""
        with self.cv:
            if expert is None:
                self.pinned.clear()
            else:
                self.pinned.discard((layer, int(expert)))

    # --- bookkeeping (lock held) --------------------------------------------------------
    def _issue(self, key, kind, skip=()) -> bool:
        pool = self.pool_of[key[0]]
        if pool.free:
            slot = pool.free.pop()
        else:
            old = pool.policy.victim(key, self.pinned | self.loading.keys() | set(skip))
            if old is None:
                return False
            pool.policy.forget(old)
            slot = self.slot_of.pop(old)
            del self.views[old], self.at[old]
            self.source.pop(old, None)
            self.evictions += 1
        job = _Job(key, slot, kind, self.seq)
        self.seq += 1
        self._plan_reads(job)
        self.slot_of[key] = slot
        self.loading[key] = job
        self.source[key] = kind
        pool.policy.admit(key)
        self.queue.append(job)
        self._preempt_for(job)
        if self.worker is None:
            self.worker = threading.Thread(target=self._work, name="lazymoe-reader", daemon=True)
            self.worker.start()
        self.cv.notify_all()
        return True

    def _plan_reads(self, job: _Job) -> None:
        layer, expert = job.key
        pool = self.pool_of[layer]
        base = job.slot * pool.slot_bytes
        addr0 = pool.pool.ctypes.data + base
        addrs, sizes, need, offs, views, at = [], [], [], [], [], []
        for p, s, off in zip(pool.parts, pool.starts, self.offsets[layer][expert]):
            lo = off // IO_ALIGN * IO_ALIGN
            hi = -(-(off + p.nbytes) // IO_ALIGN) * IO_ALIGN
            addrs.append(addr0 + s)
            sizes.append(hi - lo)
            need.append(off + p.nbytes - lo)
            offs.append(lo)
            at.append(base + s + off - lo)
            raw = pool.pool[at[-1]:at[-1] + p.nbytes]
            views.append(raw.view(p.qt.dtype).reshape(p.qt.storage_shape(p.shape)))
        job.addrs, job.sizes = np.array(addrs, np.int64), np.array(sizes, np.int64)
        job.need, job.offs = np.array(need, np.int64), np.array(offs, np.int64)
        job.done = np.zeros(len(sizes), np.int64)
        job.views = tuple(views)
        job.at = tuple(at)

    def _promote(self, key) -> None:
        job = self.loading.get(key)
        if job is not None and job.kind == "spec":
            job.kind = "demand"
            self._preempt_for(job)

    def _preempt_for(self, job: _Job) -> None:
        """Interrupt the reader if a speculative job of its current call comes before this demand."""
        if job.kind != "demand":
            return
        end = self.running.index(job) if job in self.running else len(self.running)
        if any(r.kind == "spec" for r in self.running[:end]):
            self.flag[0] = 1

    def _finish(self, job: _Job) -> None:
        self.queue.remove(job)
        del self.loading[job.key]
        self.views[job.key] = job.views
        self.at[job.key] = job.at

    def _cancel(self, job: _Job) -> None:
        job.cancelled = True
        self.prefetch_cancelled += 1
        if job in self.running:
            self.flag[0] = 1                              # the reader drops it when it stops
        else:
            self.queue.remove(job)
            self._drop(job)

    def _drop(self, job: _Job) -> None:
        del self.loading[job.key]
        del self.slot_of[job.key]
        self.source.pop(job.key, None)
        pool = self.pool_of[job.key[0]]
        pool.policy.forget(job.key)
        pool.free.append(job.slot)

    # --- the reader thread -----------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self.cv:
                while not self.queue and not self.closing:
                    if not self.cv.wait(timeout=IDLE_S) and not self.queue:
                        self.worker = None                # idle: exit, so a dropped cache is not kept alive
                        return
                if self.closing:
                    return
                batch = self._next_batch()
                self.running = batch
                self.flag[0] = 0
                before = [int(j.done.sum()) for j in batch]
                # ranges part-major ([part, job]), so the same matrix of adjacent experts is adjacent in the call
                arrays = [np.stack([getattr(j, a) for j in batch], axis=1) for a in ("addrs", "sizes", "need", "offs", "done")]
                done = arrays[-1]
                for k, j in enumerate(batch):                # the jobs' progress becomes views of the shared array
                    j.done = done[:, k]
                offs, sizes = arrays[3], arrays[1]
                link = np.zeros(offs.shape, np.int8)         # [part, job]: starts where the previous job's range ends
                end = offs[:, :-1] + sizes[:, :-1]
                link[:, 1:] = (offs[:, 1:] <= end) & (offs[:, 1:] >= end - IO_ALIGN) & (done[:, 1:] == 0)
                self.linked_reads += int(link.sum())
                arrays = [a.reshape(-1) for a in arrays]
            t_read = time.perf_counter()
            rc = read_linked(self.fd, *arrays, link.reshape(-1), self.flag, CHUNK)
            t_read = time.perf_counter() - t_read
            with self.cv:
                self.read_s += t_read
                self.running = []
                failed = False
                for j, b in zip(batch, before):
                    n = int(j.done.sum()) - b
                    self.bytes_read += n
                    if j.cancelled or self.source.get(j.key) == "spec":
                        self.prefetch_bytes += n
                    if self.loading.get(j.key) is not j:      # finished by a waiting caller
                        continue
                    if j.cancelled:
                        self.queue.remove(j)
                        self._drop(j)
                    elif (j.done >= j.need).all():
                        self._finish(j)
                    elif rc < 0 and not failed:
                        failed = True
                        self.queue.remove(j)
                        self._drop(j)
                        self.error = ValueError(f"{self.path}: truncated or unreadable: expert {j.key[1]} of layer "
                                                f"{j.key[0]} could not be read")
                self.cv.notify_all()

    def _next_batch(self) -> list:
        """The first job by priority (demand first, then oldest), with the queued jobs of its layer whose experts
        are adjacent to it (e - 1, e + 1, ...) up to CHUNK bytes, in expert order: in a merged tensor their
        matrices are adjacent in the file, so each matrix of the run is one read request (read_linked)."""
        first = min(self.queue, key=lambda j: (j.kind != "demand", j.seq))
        batch = [first]
        if len(self.queue) > 1:
            queued = {j.key: j for j in self.queue if not j.cancelled and not int(j.done.sum())}
            total = int(first.sizes.sum())
            layer, e = first.key
            for step in (1, -1):
                k = e + step
                while (layer, k) in queued and total + int(queued[(layer, k)].sizes.sum()) <= CHUNK:
                    batch.append(queued[(layer, k)])
                    total += int(batch[-1].sizes.sum())
                    k += step
        return sorted(batch, key=lambda j: j.key[1])

    def counters(self) -> dict:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "bytes_read": self.bytes_read, "hit_rate": self.hits / total if total else 0.0,
                "resident_bytes": self.resident_bytes, "n_slots": self.n_slots,
                "slot_bytes": max(p.slot_bytes for p in self.pools),
                "slot_classes": [[p.slot_bytes, len(p.layers), p.n_slots] for p in self.pools],
                "prefetch_issued": self.prefetch_issued, "prefetch_useful": self.prefetch_useful,
                "prefetch_cancelled": self.prefetch_cancelled, "prefetch_bytes": self.prefetch_bytes,
                "linked_reads": self.linked_reads,
                "wait_s": self.wait_s, "read_s": self.read_s, "policy": getattr(self.policy, "name", type(self.policy).__name__),
                "read": self.read, "warm_share": self.warm_share}

    def close(self) -> None:
        with self.cv:
            self.closing = True
            self.flag[0] = 1
            self.cv.notify_all()
            worker, self.worker = self.worker, None
        if worker is not None:
            worker.join()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
