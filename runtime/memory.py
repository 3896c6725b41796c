"""The RAM budget: what one process running a model holds, planned before anything is loaded.

budget = process (Python, numpy, numba after JIT) + resident weights (embeddings, attention,
norms, router, output head) + KV cache for ctx tokens + working buffers + expert cache slots.
`lazymoe info` and the runtime's load message print the same plan.
"""
from __future__ import annotations

import re
import resource
import sys
from dataclasses import asdict, dataclass

import numpy as np
import psutil

from lazymoe.format.config import ModelConfig

N_BATCH = 256             # prompt tokens per forward chunk; bounds the working buffers
ATTN_CHUNK_FLOATS = 1 << 20  # attention scores per batched product: KV heads are taken in chunks under this
MiB = 1 << 20
GiB = 1 << 30
# The default budget is what the process holds now plus the memory still available (to it: a cgroup limit
# counts) minus a reserve for everything else of max(RESERVE_MIN, RESERVE_SHARE of RAM). Expert slots are
# the only large share and they are what buys speed when the model does not fit: on the 24.5 GiB 8x7B
# file here, 75 % of available RAM (the old default) left 175 of 256 experts cached and read ~2.1 GB per
# generated token. A model that fits takes only what it needs whatever the budget.
RESERVE_MIN = 1 * GiB
RESERVE_SHARE = 0.05
# What the process itself holds after importing numpy/numba and compiling the kernels, measured
# here (180-190 MiB); `info` uses it because it plans without loading anything.
PROCESS_ESTIMATE = 200 * MiB


def parse_size(v) -> int:
    """Bytes from an int or a string like "8G", "512M", "1.5GiB", "2000000"."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        n = int(v)
    elif isinstance(v, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", v)
        if not m:
            raise ValueError(f"RAM budget {v!r} is not a size like 8G, 512M or a number of bytes")
        n = int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))
    else:
        raise ValueError(f"RAM budget {v!r} is not a size like 8G, 512M or a number of bytes")
    if n <= 0:
        raise ValueError(f"RAM budget {v!r} must be positive")
    return n


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def peak_rss() -> int:
    """This process's high-water RSS in bytes. Linux: VmHWM, because ru_maxrss survives execve, so a process
    started by a large one (a test runner, a server) would report its parent's peak; elsewhere ru_maxrss
    (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 memory.max or v1 limit_in_bytes), None if none."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, ctrl, path = line.split(":", 2)
        if ctrl == "":                                           # v2 unified hierarchy
            base, lim_f, use_f = "/sys/fs/cgroup", "memory.max", "memory.current"
        elif "memory" in ctrl.split(","):
            base, lim_f, use_f = "/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        try:
            with open(f"{base}{path}/{lim_f}") as f:
                lim = f.read().strip()
            with open(f"{base}{path}/{use_f}") as f:
                use = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if lim.isdigit() and int(lim) < psutil.virtual_memory().total:   # "max" or a huge v1 number: no limit
            return max(0, int(lim) - use)
    return None


def default_budget(baseline: int) -> int:
    """The budget when none is given: baseline + available memory (cgroup-aware) - the reserve."""
    avail = psutil.virtual_memory().available
    room = _cgroup_room()
    if room is not None:
        avail = min(avail, room)
    reserve = max(RESERVE_MIN, int(RESERVE_SHARE * psutil.virtual_memory().total))
    return baseline + max(0, avail - reserve)


def process_baseline() -> int:
    """What the process holds before the model's own memory: its peak RSS so far (imports, numba JIT)."""
    return max(peak_rss(), psutil.Process().memory_info().rss)


@dataclass(frozen=True)
class MemoryPlan:
    """How the RAM budget is spent. Everything in bytes."""
    budget: int
    baseline: int            # the Python/numba process itself: measured after kernel warm-up, at least PROCESS_ESTIMATE
    resident: int            # embeddings, attention, norms, router, output head (mapped, touched at load)
    kv: int                  # K and V for ctx tokens
    work: int                # activation buffers and temporaries for one chunk of N_BATCH tokens
    slots: tuple             # per slot size (expert_cache.slot_classes): (bytes of one slot, its layers, slots)
    n_experts: int           # experts in the file (layers x E)
    ctx: int

    @property
    def n_slots(self) -> int:
        return sum(n for _, _, n in self.slots)

    @property
    def slot_bytes(self) -> int:
        """The largest slot (all of them, for a model whose layers share one expert layout)."""
        return max((b for b, _, _ in self.slots), default=0)

    @property
    def expert_cache(self) -> int:
        return sum(b * n for b, _, n in self.slots)

    @property
    def fixed(self) -> int:
        return self.baseline + self.resident + self.kv + self.work

    @property
    def planned(self) -> int:
        return self.fixed + self.expert_cache

    def as_dict(self) -> dict:
        return {**asdict(self), "n_slots": self.n_slots, "slot_bytes": self.slot_bytes,
                "expert_cache": self.expert_cache, "planned": self.planned}

    def describe(self) -> str:
        s = (f"RAM plan: budget {fmt_bytes(self.budget)}: process {fmt_bytes(self.baseline)} + resident weights "
             f"{fmt_bytes(self.resident)} + KV cache {fmt_bytes(self.kv)} (ctx {self.ctx}) + buffers {fmt_bytes(self.work)}")
        if self.n_experts:
            each = " or ".join(fmt_bytes(b) for b, _, _ in self.slots)
            s += (f" + expert cache {fmt_bytes(self.expert_cache)} ({self.n_slots} of {self.n_experts} "
                  f"experts, {each} each)")
        return s + f" = {fmt_bytes(self.planned)}"


def work_bytes(cfg: ModelConfig, ctx: int) -> int:
    """Activation buffers and temporaries for one chunk of N_BATCH prompt tokens (at most ctx: a chunk never holds
    more tokens than the KV cache)."""
    # the widest of the hidden size and the query projection (Qwen3: 32 heads of 128 on a hidden size of 2048), and
    # of the experts' and the shared expert's FFN
    D, F, V, E = max(cfg.n_embd, cfg.q_dim), max(cfg.n_ff, cfg.n_ff_shexp), cfg.n_vocab, max(cfg.n_expert, 1)
    R = cfg.n_head // cfg.n_head_kv
    # Per chunk token: ~24 [D] activations and temporaries, K/V, 4 [F] (gate, up, product, copy), router, logits;
    # attention scores and their exponentials for one chunk of KV heads (runtime/model.py); RoPE tables.
    T = min(N_BATCH, ctx)
    return 4 * (T * (24 * D + 4 * cfg.kv_dim + 4 * F + 2 * E + 2 * V) + 2 * max(R * T * ctx, ATTN_CHUNK_FLOATS)
                + ctx * cfg.head_dim) + 16 * MiB


def fixed_bytes(cfg: ModelConfig, resident: int, ctx: int, baseline: int) -> int:
    """Everything but the expert slots: the process, resident weights, KV cache and working buffers."""
    return baseline + resident + cfg.kv_bytes(ctx) + work_bytes(cfg, ctx)


def min_budget(cfg: ModelConfig, resident: int, slots, ctx: int) -> int:
    """The smallest budget the model runs in, and exactly where the runtime refuses: the fixed parts with the
    process counted as PROCESS_ESTIMATE, plus one layer's active experts in each slot size. `slots` is
    [(bytes of one slot, layers of that size)]. `lazymoe info` prints it without loading anything, so it cannot
    depend on what a loaded process measures."""
    return fixed_bytes(cfg, resident, ctx, PROCESS_ESTIMATE) + cfg.n_expert_used * sum(b for b, _ in slots)


def split_slots(slots, room: int, n_expert: int, n_used: int) -> list[int]:
    """Slots per size class in `room` bytes: n_used each first (a layer needs its active experts at once), the
    rest in proportion to the class's layers (an equal share per layer), none beyond the class's experts."""
    cap = [layers * n_expert for _, layers in slots]
    n = [min(c, n_used) for c in cap]
    left = room - sum(b * k for (b, _), k in zip(slots, n))
    per_layer = sum(b * layers for b, layers in slots)
    if per_layer and left > 0:
        share = left / per_layer
        n = [min(c, k + int(share * layers)) for c, k, (_, layers) in zip(cap, n, slots)]
        left = room - sum(b * k for (b, _), k in zip(slots, n))
        for i, (b, _) in enumerate(slots):                   # what rounding and full classes left over
            more = min(cap[i] - n[i], max(0, left) // b)
            n[i] += more
            left -= more * b
    return n


def plan_memory(cfg: ModelConfig, resident: int, slots, ctx: int, ram_budget, baseline: int, where: str) -> MemoryPlan:
    """Split `ram_budget` (None: `default_budget`) between the fixed parts and the expert slots (`slots`:
    [(bytes of one slot, layers of that size)]); ValueError naming `where` and the minimum (`min_budget`)
    below it. The process counts as what it measures (`baseline`) or PROCESS_ESTIMATE, whichever is larger."""
    budget = default_budget(baseline) if ram_budget is None else parse_size(ram_budget)
    need = min_budget(cfg, resident, slots, ctx)
    if budget < need:
        raise ValueError(f"{where}: a RAM budget of {fmt_bytes(budget)} is too small; this model with ctx "
                         f"{ctx} needs at least {need / MiB:.0f}M ({need} bytes)")
    baseline = max(baseline, PROCESS_ESTIMATE)
    room = budget - fixed_bytes(cfg, resident, ctx, baseline)
    counts = split_slots(slots, room, cfg.n_expert, cfg.n_expert_used)
    return MemoryPlan(budget, baseline, resident, cfg.kv_bytes(ctx), work_bytes(cfg, ctx),
                      tuple((b, layers, k) for (b, layers), k in zip(slots, counts)), cfg.n_layer * cfg.n_expert, ctx)
