"""Plain helpers the test modules share (the shared fixtures are in tests/conftest.py)."""
from __future__ import annotations

import argparse
import io
import os
import re
import sys

import numpy as np
import pytest
from numba import njit

from lazymoe.runtime.model import load_model

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def synth_gguf(path, D=64, F=96, L=2, H=4, G=2, E=4, A=2, V=320, qt="q8_0", arch="llama", seed=0,
               drop=(), shapes=None, types=None, ctx=512) -> str:
    """A random Mixtral-layout GGUF (E=0: dense) written by `lazymoe synth`'s synthesizer; drop, shapes, types
    (by tensor name) and arch make hostile files (lazymoe.quantize.synth.synth_source)."""
    from lazymoe.format.config import ModelConfig
    from lazymoe.kernels.qtypes import qtype
    from lazymoe.quantize.convert import write_gguf
    from lazymoe.quantize.synth import synth_source
    cfg = ModelConfig(n_layer=L, n_embd=D, n_ff=F, n_head=H, n_head_kv=G, n_vocab=V, n_ctx_train=ctx, rms_eps=1e-5,
                      rope_theta=1e4, n_expert=E, n_expert_used=A)
    src = synth_source(cfg, type_name=qt, seed=seed, types=types, shapes=shapes, drop=drop, arch=arch)
    write_gguf(src, os.fspath(path), qtype(qt), force=True, progress=False)
    return os.fspath(path)


def min_budget(path, ctx=None) -> int:
    """The smallest budget load_model accepts, read from its refusal."""
    with pytest.raises(ValueError, match="too small") as e:
        load_model(path, ram_budget=1, ctx=ctx, progress=False)
    return int(re.search(r"\((\d+) bytes\)", str(e.value)).group(1))


def run_cli(argv, stdin=""):
    """`lazymoe run` / `lazymoe chat` in this process: (exit code, stdout, stderr); a ValueError is one
    "error:" line and code 2, as the CLI does it."""
    from lazymoe.commands.run import add_chat_parser, add_run_parser
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    add_run_parser(sub)
    add_chat_parser(sub)
    args = p.parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr, sys.stdin
    sys.stdout, sys.stderr, sys.stdin = out, err, io.StringIO(stdin)
    try:
        rc = args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=err)
        rc = 2
    finally:
        sys.stdout, sys.stderr, sys.stdin = old
    return rc, out.getvalue(), err.getvalue()


def rewrite(tmp_path, edit, name="hostile.gguf", align=None, src=None) -> str:
    """A hostile copy of `src` (default: the demo model) with `edit(parts)` applied to its parsed header and
    data (lazymoe.benchmarks.fuzz.Gguf); align: the alignment the data is laid out with."""
    from lazymoe.benchmarks.fuzz import Gguf
    from lazymoe.runtime import DEMO_MODEL
    with open(src or DEMO_MODEL, "rb") as f:
        parts = Gguf(f.read())
    edit(parts)
    path = tmp_path / name
    path.write_bytes(parts.bytes(align))
    return str(path)


def cli(*argv):
    import contextlib
    import io

    from lazymoe import cli as lazymoe_cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = lazymoe_cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def llama_logits(path: str, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits [T, V] for `ids` evaluated as one batch (llama-cpp-python, the `llama` extra)."""
    import llama_cpp
    m = llama_cpp.Llama(path, n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2)
    try:
        m.eval(ids)
        return np.array(m.scores[: len(ids)], dtype=np.float32)
    finally:
        m.close()



def rows_of(dot):
    """A jitted loop calling a row dot dot(w, wo, xq, xd, xc) on every row of y (rows rb bytes apart)."""
    @njit
    def rows(w, rb, xq, xd, xc, y):
        for r in range(y.shape[0]):
            y[r] = dot(w, r * rb, xq, xd, xc)
    return rows


def one_of(dot):
    """A jitted single call of a row dot (to reach it from Python)."""
    @njit
    def one(w, wo, xq, xd, xc):
        return dot(w, wo, xq, xd, xc)
    return one


def deq_of(fn):
    """A jitted single call of a block dequantizer fn(w, wo, out, oo, nb)."""
    @njit
    def deq(w, wo, out, oo, nb):
        fn(w, wo, out, oo, nb)
    return deq


def f16_bytes(v) -> np.ndarray:
    """The f16 bytes of each value, [n, 2] uint8."""
    return np.asarray(v, np.float16).view(np.uint8).reshape(-1, 2)


def check_dequant_bit_exact(deq, w: np.ndarray, ref: np.ndarray, block_bytes: int) -> None:
    """deq(w, wo, out, oo, nb) on stored rows w [rows, row_bytes] equals ref (float32, gguf's dequantize) bit for bit:
    the whole matrix at an output offset (nothing written around it) and one row from its offset."""
    nb = w.size // block_bytes
    out = np.full(ref.size + 64, 7.0, np.float32)
    deq(w.reshape(-1), 0, out, 32, nb)
    np.testing.assert_array_equal(out[32:-32].view(np.uint32), ref.view(np.uint32))
    assert np.all(out[:32] == 7.0) and np.all(out[-32:] == 7.0)
    cols = ref.size // w.shape[0]
    row = np.empty(cols, np.float32)
    deq(w.reshape(-1), 3 * w.shape[1], row, 0, w.shape[1] // block_bytes)
    np.testing.assert_array_equal(row.view(np.uint32), ref[3 * cols:4 * cols].view(np.uint32))
