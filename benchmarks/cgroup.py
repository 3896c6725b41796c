"""A memory cap for one child process: a fresh cgroup whose limit counts the child's page cache too.

cgroup v1 (`/sys/fs/cgroup/memory/<name>/memory.limit_in_bytes`) or v2 (`/sys/fs/cgroup/<name>/memory.max`).
The child joins the cgroup before it execs (preexec_fn), so everything it maps or reads is charged there.
Pages already in the page cache stay charged to whoever read them first: drop the cache before a
capped run, or the capped process reads part of the file for free.
"""
from __future__ import annotations

import os

ROOT_V1 = "/sys/fs/cgroup/memory"
ROOT_V2 = "/sys/fs/cgroup"


def available() -> str | None:
    """"v1", "v2" or None (no writable memory controller)."""
    if os.path.isfile(os.path.join(ROOT_V1, "memory.limit_in_bytes")) and os.access(ROOT_V1, os.W_OK):
        return "v1"
    ctl = os.path.join(ROOT_V2, "cgroup.controllers")
    if os.path.isfile(ctl) and "memory" in open(ctl).read().split() and os.access(ROOT_V2, os.W_OK):
        return "v2"
    return None


class MemCap:
    """`with MemCap(limit_bytes, name) as cap: subprocess.run(..., preexec_fn=cap.join)`; then `cap.stats()`."""

    def __init__(self, limit: int, name: str):
        self.version = available()
        if self.version is None:
            raise ValueError("no writable cgroup memory controller here (needs root and cgroup v1 or v2 with memory)")
        self.limit = int(limit)
        self.path = os.path.join(ROOT_V1 if self.version == "v1" else ROOT_V2, name)

    def __enter__(self) -> MemCap:
        os.makedirs(self.path, exist_ok=True)
        if self.version == "v1":
            self._write("memory.limit_in_bytes", self.limit)
        else:
            self._write("memory.max", self.limit)
            self._write("memory.swap.max", 0, missing_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        try:
            os.rmdir(self.path)             # charges move to the parent
        except OSError:
            pass

    def _write(self, f: str, v, missing_ok: bool = False) -> None:
        try:
            with open(os.path.join(self.path, f), "w") as fh:
                fh.write(f"{v}\n")
        except FileNotFoundError:
            if not missing_ok:
                raise

    def _read(self, f: str) -> str:
        try:
            with open(os.path.join(self.path, f)) as fh:
                return fh.read()
        except OSError:
            return ""

    def join(self) -> None:
        """preexec_fn: move the calling (child) process into the cgroup."""
        with open(os.path.join(self.path, "cgroup.procs"), "w") as fh:
            fh.write(f"{os.getpid()}\n")

    def stats(self) -> dict:
        """Peak usage (page cache included), how often the limit was hit, OOM kills."""
        if self.version == "v1":
            kv = dict(l.split() for l in self._read("memory.oom_control").splitlines() if len(l.split()) == 2)
            peak = self._read("memory.max_usage_in_bytes").strip()
            return {"peak_bytes": int(peak) if peak else None, "limit_hits": int(self._read("memory.failcnt") or 0),
                    "oom_kills": int(kv.get("oom_kill", 0))}
        ev = dict(l.split() for l in self._read("memory.events").splitlines() if len(l.split()) == 2)
        peak = self._read("memory.peak").strip()
        return {"peak_bytes": int(peak) if peak else None, "limit_hits": int(ev.get("max", 0)),
                "oom_kills": int(ev.get("oom_kill", 0))}
