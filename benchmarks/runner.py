"""One `lazymoe run --json` in its own process, so each run's peak RSS and page-cache state are its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

THREAD_VARS = ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def lazymoe_cmd() -> list[str]:
    """How to start `lazymoe` with this interpreter (the console script if installed, so the process list
    reads `lazymoe run`)."""
    script = os.path.join(os.path.dirname(sys.executable), "lazymoe")
    return [sys.executable, script] if os.path.isfile(script) else [sys.executable, "-m", "lazymoe.cli"]


def thread_env(threads: int | None) -> dict:
    """This process's environment with every thread pool's size set to `threads` (unchanged when None)."""
    env = dict(os.environ)
    if threads:
        env.update({k: str(threads) for k in THREAD_VARS})
    return env


def run_lazymoe(model: str, text: str, gen: int, ram=None, ctx: int | None = None, threads: int | None = None,
                extra=(), preexec_fn=None, timeout: float | None = None) -> dict:
    """One `lazymoe run --json --temp 0` process. Returns its JSON plus wall_s and load_s, or
    {"status": "too small" | "OOM" | "failed", "error": ...}."""
    cmd = lazymoe_cmd() + ["run", model, "--json", "--temp", "0", "-n", str(gen), "-p", text]
    if ram is not None:
        cmd += ["--ram", str(ram)]
    if ctx is not None:
        cmd += ["--ctx", str(ctx)]
    cmd += list(extra)
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads), preexec_fn=preexec_fn,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    err = (r.stderr.strip().splitlines() or [""])[-1]
    if r.returncode != 0:
        status = "too small" if "too small" in err else "OOM" if r.returncode == -9 else "failed"
        return {"status": status, "error": err or f"exit code {r.returncode}", "wall_s": wall}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall_s"] = wall
    out.setdefault("load_s", wall - out["prompt_s"] - out["gen_s"])
    out["status"] = "ok"
    return out
