"""The platform choices that cannot run here, simulated: macOS reads (no O_DIRECT: F_NOCACHE, no read-ahead),
memory figures without /proc or cgroups, and Linux-only benchmark helpers degrading cleanly."""
from __future__ import annotations

import builtins
import os
import types

import pytest

import lazymoe.runtime.memory as mem
from lazymoe.benchmarks import machine
from lazymoe.runtime import DEMO_MODEL
from lazymoe.runtime.expert_cache import F_NOCACHE, F_RDAHEAD, open_for_reads


def test_macos_direct_reads_use_f_nocache_and_no_read_ahead(monkeypatch):
    import fcntl
    calls = []
    monkeypatch.setattr(fcntl, "fcntl", lambda fd, cmd, arg: calls.append((cmd, arg)) or 0)
    fd, mode = open_for_reads(DEMO_MODEL, "direct", platform="darwin")
    os.close(fd)
    assert mode == "direct" and calls == [(F_NOCACHE, 1), (F_RDAHEAD, 0)]
    calls.clear()
    fd, mode = open_for_reads(DEMO_MODEL, "buffered", platform="darwin")
    os.close(fd)
    assert mode == "buffered" and calls == []


def test_macos_refusing_f_nocache_falls_back_to_buffered(monkeypatch):
    import fcntl

    def refuse(fd, cmd, arg):
        raise OSError(22, "Invalid argument")
    monkeypatch.setattr(fcntl, "fcntl", refuse)
    fd, mode = open_for_reads(DEMO_MODEL, "direct", platform="darwin")
    os.close(fd)
    assert mode == "buffered"


def test_linux_direct_reads(tmp_path):
    fd, mode = open_for_reads(DEMO_MODEL, "direct", platform="linux")
    os.close(fd)
    assert mode in ("direct", "buffered")            # buffered where the filesystem refuses O_DIRECT


def _no_proc(monkeypatch):
    real = builtins.open

    def fake(path, *a, **k):
        if str(path).startswith(("/proc", "/sys")):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(builtins, "open", fake)


def test_memory_figures_without_proc_or_cgroups(monkeypatch):
    _no_proc(monkeypatch)
    monkeypatch.setattr(mem.sys, "platform", "darwin")
    monkeypatch.setattr(mem.resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=123_456_789))
    assert mem.peak_rss() == 123_456_789              # macOS reports bytes, Linux KiB
    monkeypatch.setattr(mem.sys, "platform", "linux")
    assert mem.peak_rss() == 123_456_789 * 1024
    assert mem._cgroup_room() is None
    vm = types.SimpleNamespace(total=32 << 30, available=20 << 30)     # psutil's view on macOS (compressed counts)
    monkeypatch.setattr(mem.psutil, "virtual_memory", lambda: vm)
    assert mem.default_budget(1 << 30) == (1 << 30) + (20 << 30) - max(mem.RESERVE_MIN, int(mem.RESERVE_SHARE * (32 << 30)))


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_linux_only_benchmark_helpers_degrade(monkeypatch, platform):
    monkeypatch.setattr(machine.sys, "platform", platform)
    assert machine.drop_page_cache() is False
    assert machine.disk_read_speed(DEMO_MODEL) is None
    assert machine.machine_info()["cores"] >= 1
