"""The machine a benchmark runs on: CPU and RAM, the OS page cache, the disk's cold read speed."""
from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time

from lazymoe.runtime.memory import GiB, MiB


def machine_info() -> dict:
    """CPU model (lscpu's "Model name" where there is one), core count, RAM bytes and load average."""
    import platform

    import psutil
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), model)
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def drop_page_cache() -> bool:
    """Write back and drop the OS page cache; True if it was done (Linux, root)."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def disk_read_speed(path: str, nbytes: int = 2 * GiB, block: int = 32 * MiB) -> float | None:
    """Cold sequential read speed of `path` in bytes/s, read the way the expert cache reads (O_DIRECT, 32 MiB
    requests; buffered where the filesystem refuses O_DIRECT) after dropping the page cache; None when the
    cache cannot be dropped (the figure would be the cache's) or the file is under 1 GiB."""
    size = os.path.getsize(path)
    if size < GiB or not drop_page_cache():
        return None
    nbytes = min(nbytes, size - size % 4096)
    from lazymoe.runtime.expert_cache import open_for_reads
    fd, _ = open_for_reads(path, "direct")
    buf = mmap.mmap(-1, block)                         # page-aligned, as O_DIRECT needs
    try:
        done, t0 = 0, time.perf_counter()
        while done < nbytes:
            n = os.preadv(fd, [memoryview(buf)[:min(block, nbytes - done)]], done)
            if n <= 0:
                break
            done += n
        return done / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        buf.close()
        drop_page_cache()
