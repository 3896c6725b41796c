"""The model's weights, by GGUF name, as views into the file mapping: nothing is copied at load.

Resident weights (embeddings, attention, norms, router, output head) are numpy views; experts are
described by where their matrices start in the file (the expert cache reads them on demand).
"""
from __future__ import annotations

import numpy as np

from lazymoe.format.config import EXPERT_MATRICES, ModelConfig, expert_tensors, is_expert_tensor
from lazymoe.format.gguf_file import GGUFFile
from lazymoe.kernels.qtypes import QType
from lazymoe.runtime.expert_cache import ExpertPart, slot_size

Weight = tuple[QType, np.ndarray]          # (storage type, stored array [rows, row_bytes] or [rows, cols])


def weight(g: GGUFFile, name: str) -> Weight:
    return g.qtype(name), g.tensor(name)


def norm_weight(g: GGUFFile, name: str) -> np.ndarray:
    qt = g.qtype(name)
    if qt.is_block:
        raise ValueError(f"{g.path}: tensor {name} is {qt.name}; norm weights must be F32 or F16")
    return np.asarray(g.tensor(name), dtype=np.float32)


class Layer:
    """One block's resident weights: stored arrays and their types, by GGUF name."""

    def __init__(self, g: GGUFFile, i: int, moe: bool):
        b = f"blk.{i}."
        self.attn_norm = norm_weight(g, b + "attn_norm.weight")     # [D]
        self.attn_q = weight(g, b + "attn_q.weight")                # [D, D]  rows permuted for adjacent-pair RoPE
        self.attn_k = weight(g, b + "attn_k.weight")                # [G*hd, D]  ditto
        self.attn_v = weight(g, b + "attn_v.weight")                # [G*hd, D]
        self.attn_output = weight(g, b + "attn_output.weight")      # [D, D]
        self.ffn_norm = norm_weight(g, b + "ffn_norm.weight")       # [D]
        if moe:
            self.ffn_gate_inp = weight(g, b + "ffn_gate_inp.weight")  # [E, D] router
        else:
            self.ffn_gate = weight(g, b + "ffn_gate.weight")        # [F, D]
            self.ffn_up = weight(g, b + "ffn_up.weight")            # [F, D]
            self.ffn_down = weight(g, b + "ffn_down.weight")        # [D, F]


def check_tensors(g: GGUFFile, cfg: ModelConfig) -> None:
    """Every tensor the network needs is present, of the expected shape and a supported type."""
    for name, shape in cfg.tensor_shapes().items():
        if name not in g.tensors:
            old = name.replace("_exps.weight", ".0.weight")
            if is_expert_tensor(name) and old in g.tensors:
                raise ValueError(f"{g.path}: experts are stored one tensor each ({old}), the pre-2024 layout; "
                                 f"re-convert the model with lazymoe quantize or a recent llama.cpp")
            raise ValueError(f"{g.path}: tensor {name} is missing")
        got = g.tensors[name].shape
        if got != shape:
            raise ValueError(f"{g.path}: tensor {name} has shape {got}, expected {shape}")
        g.qtype(name)


def expert_layout(g: GGUFFile, cfg: ModelConfig) -> tuple[tuple[ExpertPart, ...], list]:
    """(parts, offsets): the gate/up/down ExpertParts (type, [rows, cols], bytes of one expert's matrix), the
    same in every layer, and offsets[layer][expert] = the 3 absolute file offsets of that expert's matrices.
    ((), []) for a dense model."""
    if not cfg.is_moe:
        return (), []
    first = [g.tensors[n] for n in expert_tensors(0)]
    parts = tuple(ExpertPart(g.qtype(t.name), t.shape[1:], t.nbytes // cfg.n_expert) for t in first)
    offsets = []
    for i in range(cfg.n_layer):
        infos = [g.tensors[n] for n in expert_tensors(i)]
        for m, inf, p in zip(EXPERT_MATRICES, infos, parts):
            if g.qtype(inf.name) != p.qt:
                raise ValueError(f"{g.path}: tensor {inf.name} is {g.qtype(inf.name).name} but blk.0.{m} is "
                                 f"{p.qt.name}; experts of one kind must share a type")
        offsets.append([[inf.offset + e * p.nbytes for inf, p in zip(infos, parts)] for e in range(cfg.n_expert)])
    return parts, offsets


class Weights:
    """Every weight of the network: resident views by GGUF name, and the experts' layout in the file."""

    def __init__(self, g: GGUFFile, cfg: ModelConfig):
        check_tensors(g, cfg)
        self.token_embd = weight(g, "token_embd.weight")                # [V, D]
        self.output_norm = norm_weight(g, "output_norm.weight")         # [D]
        self.output = weight(g, "output.weight")                        # [V, D]
        self.layers = [Layer(g, i, cfg.is_moe) for i in range(cfg.n_layer)]
        self.expert_parts, self.expert_offsets = expert_layout(g, cfg)
        self.resident_names = [n for n in cfg.tensor_shapes() if not is_expert_tensor(n)]
        self.resident_bytes = sum(g.tensors[n].nbytes for n in self.resident_names)
        self.types = {g.qtype(n) for n in cfg.tensor_shapes()}           # every storage type the kernels will see

    @property
    def slot_bytes(self) -> int:
        """Bytes of one expert-cache slot (0 for a dense model)."""
        return slot_size(self.expert_parts) if self.expert_parts else 0


def model_sizes(g: GGUFFile, cfg: ModelConfig) -> dict:
    """Byte counts of a model, from the same layout the runtime loads: resident part, experts, one expert,
    and one expert's cache slot (what the RAM plan counts)."""
    check_tensors(g, cfg)
    parts, _ = expert_layout(g, cfg)
    resident = sum(g.tensors[n].nbytes for n in cfg.tensor_shapes() if not is_expert_tensor(n))
    per_expert = sum(p.nbytes for p in parts)
    return {"resident_bytes": resident, "expert_bytes": per_expert * cfg.n_layer * cfg.n_expert,
            "bytes_per_expert": per_expert, "expert_slot_bytes": slot_size(parts) if parts else 0}
