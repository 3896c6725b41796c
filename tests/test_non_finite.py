"""Non-finite and extreme weights (issue #12, finding 2): NaN or Inf anywhere in the network is reported in one
line naming the layer that produced it; never garbage with exit 0, never an exception from a kernel or the
sampler. The check is on the activations (runtime/network.py check_finite)."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from lazymoe.benchmarks.fuzz import Gguf, enc
from lazymoe.runtime.model import load_model
from tests.helpers import rewrite, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

UINT32 = 4


def _set_scales(parts: Gguf, name: str, value: int, every: int = 1) -> None:
    """Set the f16 scale of every `every`-th Q4_0 block (18 bytes) of tensor `name` to the bits `value`."""
    _, dims, gt, off = parts.tensor(name)
    assert gt == 2
    n = int(np.prod(dims)) // 32
    data = bytearray(parts.data)
    for b in range(0, n, every):
        data[off + 18 * b:off + 18 * b + 2] = struct.pack("<H", value)
    parts.data = bytes(data)


NAN, INF, F16_MAX = 0x7E00, 0x7C00, 0x7BFF


@pytest.mark.parametrize("name,value,layer", [
    ("blk.0.attn_q.weight", NAN, "layer 0's attention"),
    ("blk.1.attn_v.weight", INF, "layer 1's attention"),
    ("blk.2.ffn_down_exps.weight", NAN, "layer 2's feed-forward"),
    ("token_embd.weight", INF, "the token embedding"),
    ("output.weight", NAN, "the output head"),
])
def test_non_finite_weights_are_reported_with_the_layer(tmp_path, name, value, layer):
    path = rewrite(tmp_path, lambda p: _set_scales(p, name, value))
    with load_model(path, progress=False) as m:
        with pytest.raises(ValueError, match=f"{layer} produced non-finite values"):
            list(m.generate("Hi there", max_tokens=2))
        with pytest.raises(ValueError, match="non-finite"):
            list(m.generate("Hi there", max_tokens=2, temperature=0.8, seed=1))
    rc, out, err = run_cli(["run", path, "-p", "Hi there", "-n", "2", "--temp", "0"])
    assert rc == 2 and err.strip().endswith("out of range") and "non-finite" in err


def _set_f32(parts: Gguf, name: str, value: float) -> None:
    _, dims, gt, off = parts.tensor(name)
    assert gt == 0
    n = int(np.prod(dims))
    parts.data = parts.data[:off] + struct.pack(f"<{n}f", *[value] * n) + parts.data[off + 4 * n:]


@pytest.mark.parametrize("edit", [
    lambda p: [_set_scales(p, f"blk.{i}.{t}.weight", F16_MAX) for i in range(4) for t in ("attn_q", "attn_k")],
    lambda p: _set_f32(p, "blk.1.attn_norm.weight", 3.4e38),
    lambda p: _set_f32(p, "blk.3.ffn_norm.weight", 1e30),
    lambda p: _set_f32(p, "blk.0.ffn_gate_inp.weight", float("inf")),
], ids=["f16-max-scales", "huge-attn-norm", "huge-ffn-norm", "inf-router"])
def test_extreme_values_give_a_result_or_a_clean_error(tmp_path, edit):
    """Finite but extreme weights overflow somewhere or not; either way no exception but ValueError, and the
    decode steps (the Numba attention kernel) run too."""
    path = rewrite(tmp_path, edit)
    with load_model(path, progress=False) as m:
        try:
            text = "".join(m.generate("Hi there", max_tokens=4))
            assert isinstance(text, str)
        except ValueError as e:
            assert "non-finite" in str(e) and path in str(e)


def test_a_shifted_data_offset_is_clean(tmp_path):
    """general.alignment = 16 moves where the reader looks for the data by a few bytes."""
    path = rewrite(tmp_path, lambda p: p.set("general.alignment", UINT32, enc(UINT32, 16)), align=32)
    rc, _, err = run_cli(["run", path, "-p", "Hi there", "-n", "2", "--temp", "0"])
    assert rc in (0, 2) and (rc == 0 or err.count("\n") == 1 and "error:" in err), err
