"""Value checks shared by every layer above the kernels: API arguments and metadata values.

Each raises ValueError with one sentence that names the value, what was found and what was expected.
"""
from __future__ import annotations

import json
import math
import os
import stat

import numpy as np


def whole_number(v, name: str, lo: int | None = None, hi: int | None = None, hint: str = "") -> int:
    """v as an int if it is a whole number (not a bool, not a float) in [lo, hi]; else ValueError."""
    ok = not isinstance(v, bool) and isinstance(v, (int, np.integer))
    if ok:
        v = int(v)
        ok = (lo is None or v >= lo) and (hi is None or v <= hi)
    if not ok:
        rng = (f" from {lo} to {hi}" if lo is not None and hi is not None else f" >= {lo}" if lo is not None
               else f" <= {hi}" if hi is not None else "")
        raise ValueError(f"{name} must be a whole number{rng}{hint}, got {v!r}")
    return v


def number(v, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
    """v as a finite float in [lo, hi] (or (lo, hi] with lo_open); else ValueError."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo:g} and <= {hi:g}, got {v:g}")
    return v


def open_regular(path: str) -> int:
    """A read-only descriptor of `path` if it is a regular file; OSError otherwise, at once (opened without
    blocking, so a FIFO or a device never waits for a writer)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
            raise OSError(0, f"{kind}; expected a regular file", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str) -> bytes:
    """The bytes of a regular file (open_regular's checks)."""
    with os.fdopen(open_regular(path), "rb") as f:
        return f.read()


def read_json_object(path: str) -> dict:
    """The JSON object in a regular file (config.json, tokenizer.json, ...); ValueError naming path otherwise."""
    try:
        d = json.loads(read_regular(path).decode("utf-8"))
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d
