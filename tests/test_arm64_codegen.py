"""The arm64 machine code of every weight type's row dot, cross-compiled on any machine.

Each KERNELS row's arm64 dot (blocks.arm64_dot: what an arm64 host runs) is lowered through llvmlite for
arm64-apple-darwin (apple-m1, with the dot-product instructions) and for a plain-NEON Cortex-A72, exactly
as benchmarks/kquant_dots.py's M1 estimate does, and its loops are read back:
- integer types (Q8 and Q8_K activations) on the M1: every loop runs on sdot, each sdot 16 weights of
  whole blocks per iteration, under 1.5 instructions per weight and no scalar integer multiply: no
  scalar per-weight loop anywhere. On the A72: the same loops without sdot (it has none), on vector multiplies.
- the K-quants' token tiles on the M1: sdot for 4 tokens per 16 weights.
- float types (f32, f16, bf16): the hot loop multiplies on 4-lane vectors (fmla), 32 weights an iteration
  (the scalar remainder loop takes the last cols % 8 weights only).
tests/arm64/run.sh runs these kernels under emulation, on both kinds of CPU, against gguf's reference.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as G
from numba import njit

from lazymoe.benchmarks.kquant_dots import arm64_asm, asm_loops, block_loop, loop_weights, mnemonic_counts
from lazymoe.kernels import arm64
from lazymoe.kernels.activations import Q8_K
from lazymoe.kernels.blocks import KERNELS, row_dot

INT = [n for n, k in KERNELS.items() if k.act.quantize is not None]
FLOAT = [n for n, k in KERNELS.items() if k.act.quantize is None]
SCALAR_INT_MUL = re.compile(r"^(mul|madd|msub|smull|umull|smaddl|umaddl)\s+[wx]\d")
VECTOR_INT_MUL = re.compile(r"^(smull2?|smlal2?|umull2?|umlal2?|mul|mla)(\.\w+)?\s+v\d")


def block(name):
    return GGML_QUANT_SIZES[G[name.upper()]][0]


def test_every_integer_type_names_an_arm64_dot():
    assert INT and FLOAT
    assert [n for n in INT if KERNELS[n].neon is None] == []


@pytest.mark.parametrize("name", INT)
def test_integer_dots_run_on_sdot_on_apple_m1(name):
    loops = asm_loops(arm64_asm(name, "apple-m1"))
    assert loops, name
    for body in loops:
        n = loop_weights(body)
        assert n >= block(name) and n % block(name) == 0, (name, mnemonic_counts(body))
        assert len(body) < 1.5 * n, (name, len(body), n)      # a scalar loop takes several per weight
        assert not [ln for ln in body if SCALAR_INT_MUL.match(ln)], name


@pytest.mark.parametrize("name", INT)
def test_integer_dots_on_plain_neon_have_no_sdot(name):
    asm = arm64_asm(name, "cortex-a72", "aarch64-unknown-linux-gnu")
    assert "sdot" not in asm
    for body in asm_loops(asm):
        assert len([ln for ln in body if VECTOR_INT_MUL.match(ln)]) >= block(name) // 16, name
        assert not [ln for ln in body if SCALAR_INT_MUL.match(ln)], name


@pytest.mark.parametrize("name", [n for n in INT if KERNELS[n].act is Q8_K and n.endswith("_k")])   # iq4_xs: no tile
def test_k_quant_tiles_run_on_sdot_on_apple_m1(name):
    """The K-quants' 1 row x 4 token tiles (an arm64 host's int_matmul): 4 tokens' sdot per 16 weights."""
    asm = arm64_asm(name, "apple-m1", tile=True)
    body = max(asm_loops(asm), key=lambda b: mnemonic_counts(b).get("sdot", 0))
    assert mnemonic_counts(body).get("sdot", 0) == 4 * block(name) // 16, name
    assert not [ln for ln in body if SCALAR_INT_MUL.match(ln)], name


@pytest.mark.parametrize("name", FLOAT)
def test_float_dots_run_on_fmla(name):
    body = block_loop(name, "apple-m1")
    c = mnemonic_counts(body)
    assert c.get("fmla", 0) >= 8 and "sdot" not in c, c
    assert len([ln for ln in body if ln.startswith("fmla") and ".4s" in ln]) == c["fmla"]
    assert loop_weights(body) == 32


def _one(code):
    @njit
    def one(w, xq, xd, xc):
        return row_dot(code, w, 0, xd, xq, xd, xc)
    return one


@pytest.mark.skipif(not arm64.ARM64, reason="needs an arm64 host (tests/arm64/run.sh)")
def test_host_compiles_sdot_where_its_cpu_has_it():
    """On an arm64 host the registry's dots are arm64.py's, with sdot exactly where Numba's target CPU has it."""
    f = _one(KERNELS["q4_k"].code)
    w = np.zeros(144, np.uint8)
    f(w, np.zeros(256, np.int8), np.zeros(1, np.float32), np.zeros(16, np.float32))
    asm = "\n".join(f.inspect_asm().values())
    assert ("sdot" in asm) == arm64.DOTPROD, (arm64.DOTPROD, arm64.target_has_sdot())
