"""The expert cache: a fixed pool of slots holding the experts the router asked for.

An expert is its three matrices (ffn_gate, ffn_up, ffn_down) of one layer. The pool is
allocated once (n_slots x slot_bytes of anonymous memory). A miss reads the expert
with os.preadv straight into a slot, never through the file mapping, so the file's
pages never count in the process's RSS. Which slot to give up is a small policy
object (`touch`, `victim`, `forget`); LRU to start.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from kernels.qtypes import QType

ALIGN = 64      # each matrix in a slot starts on a cache line (float views need >= 4)


@dataclass(frozen=True)
class ExpertPart:
    """One matrix of an expert: its type, logical shape (rows, cols) and bytes."""
    qt: QType
    shape: tuple[int, int]
    nbytes: int


class LRU:
    """Least recently used: the victim is the key touched longest ago."""

    def __init__(self):
        self.order: OrderedDict = OrderedDict()

    def touch(self, key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def victim(self):
        return next(iter(self.order))

    def forget(self, key) -> None:
        self.order.pop(key, None)


class ExpertCache:
    """Experts of every layer, read on demand into `n_slots` slots.

    parts: the 3 ExpertParts (gate, up, down), the same for every layer.
    offsets[layer][expert] -> 3 absolute file offsets of that expert's matrices.
    """

    def __init__(self, path: str, parts: tuple[ExpertPart, ...], offsets, n_slots: int, policy=None):
        if n_slots < 1:
            raise ValueError("the expert cache needs at least one slot")
        self.path = path
        self.parts = parts
        self.offsets = offsets
        self.starts = []                      # byte offset of each part inside a slot
        pos = 0
        for p in parts:
            self.starts.append(pos)
            pos += -(-p.nbytes // ALIGN) * ALIGN
        self.slot_bytes = pos
        self.n_slots = n_slots
        self.policy = policy if policy is not None else LRU()
        self.pool = np.empty(n_slots * self.slot_bytes, dtype=np.uint8)   # [n_slots * slot_bytes], pages appear as filled
        self.views = [self._slot_views(i) for i in range(n_slots)]        # per slot: (gate, up, down) stored arrays
        self.slot_of: dict[tuple[int, int], int] = {}                     # (layer, expert) -> slot
        self.free = list(range(n_slots - 1, -1, -1))
        self.fd = os.open(path, os.O_RDONLY)
        self.hits = self.misses = self.evictions = self.bytes_read = 0

    def _slot_views(self, i: int):
        out = []
        for p, s in zip(self.parts, self.starts):
            raw = self.pool[i * self.slot_bytes + s:i * self.slot_bytes + s + p.nbytes]
            out.append(raw.view(p.qt.dtype).reshape(p.qt.storage_shape(p.shape)))
        return tuple(out)

    @property
    def resident_bytes(self) -> int:
        return len(self.slot_of) * self.slot_bytes

    def get(self, layer: int, expert: int):
        """(gate [F, D], up [F, D], down [D, F]) stored arrays of one expert, read on a miss."""
        key = (layer, expert)
        slot = self.slot_of.get(key)
        if slot is not None:
            self.hits += 1
            self.policy.touch(key)
            return self.views[slot]
        self.misses += 1
        if self.free:
            slot = self.free.pop()
        else:
            old = self.policy.victim()
            self.policy.forget(old)
            slot = self.slot_of.pop(old)
            self.evictions += 1
        base = slot * self.slot_bytes
        for p, s, off in zip(self.parts, self.starts, self.offsets[layer][expert]):
            self._read_into(self.pool[base + s:base + s + p.nbytes], off)
        self.slot_of[key] = slot
        self.policy.touch(key)
        return self.views[slot]

    def _read_into(self, buf: np.ndarray, offset: int) -> None:
        mv = memoryview(buf)
        done = 0
        while done < len(mv):
            n = os.preadv(self.fd, [mv[done:]], offset + done)
            if n <= 0:
                raise ValueError(f"{self.path}: truncated: expert data at offset {offset + done} could not be read")
            done += n
        self.bytes_read += done

    def counters(self) -> dict:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "bytes_read": self.bytes_read, "hit_rate": self.hits / total if total else 0.0,
                "resident_bytes": self.resident_bytes, "n_slots": self.n_slots, "slot_bytes": self.slot_bytes}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
