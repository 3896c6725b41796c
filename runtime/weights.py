"""The model's weights, by GGUF name, as views into the file mapping: nothing is copied at load.

Resident weights (embeddings, attention, norms, router, output head) are numpy views; experts are
described by where their matrices start in the file (the expert cache reads them on demand).
"""
from __future__ import annotations

import numpy as np

from lazymoe.format.config import EXPERT_MATRICES, TIED_OUTPUT, ModelConfig, expert_tensors, is_expert_tensor
from lazymoe.format.gguf_file import GGUFFile
from lazymoe.kernels.qtypes import QType
from lazymoe.runtime.expert_cache import ExpertPart, slot_classes, slot_size

Weight = tuple[QType, np.ndarray]          # (storage type, stored array [rows, row_bytes] or [rows, cols])


def weight(g: GGUFFile, name: str) -> Weight:
    return g.qtype(name), g.tensor(name)


def norm_weight(g: GGUFFile, name: str) -> np.ndarray:
    qt = g.qtype(name)
    if qt.is_block:
        raise ValueError(f"{g.path}: tensor {name} is {qt.name}; norm weights must be F32 or F16")
    return np.asarray(g.tensor(name), dtype=np.float32)


class Layer:
    """One block's resident weights: stored arrays and their types, by GGUF name (a tensor's `.bias` is
    attribute `_bias`); what the architecture lacks is None."""

    def __init__(self, g: GGUFFile, i: int, cfg: ModelConfig):
        b, a = f"blk.{i}.", cfg.kind
        vec = lambda n, on: norm_weight(g, b + n) if on else None   # noqa: E731
        self.attn_norm = norm_weight(g, b + "attn_norm.weight")     # [D]
        self.attn_q = weight(g, b + "attn_q.weight")                # [H*hd, D]  rows permuted unless rope_neox
        self.attn_k = weight(g, b + "attn_k.weight")                # [G*hd, D]  ditto
        self.attn_v = weight(g, b + "attn_v.weight")                # [G*hd, D]
        self.attn_q_bias = vec("attn_q.bias", a.qkv_bias)           # [H*hd] or None
        self.attn_k_bias = vec("attn_k.bias", a.qkv_bias)           # [G*hd] or None
        self.attn_v_bias = vec("attn_v.bias", a.qkv_bias)           # [G*hd] or None
        self.attn_q_norm = vec("attn_q_norm.weight", a.qk_norm)     # [hd] (per head) or [H*hd] (whole) or None
        self.attn_k_norm = vec("attn_k_norm.weight", a.qk_norm)     # [hd] or [G*hd] or None
        self.attn_output = weight(g, b + "attn_output.weight")      # [D, H*hd]
        self.ffn_norm = norm_weight(g, b + "ffn_norm.weight")       # [D]
        if cfg.is_moe:
            self.ffn_gate_inp = weight(g, b + "ffn_gate_inp.weight")  # [E, D] router
            shared = cfg.n_ff_shexp > 0
            self.ffn_gate_inp_shexp = vec("ffn_gate_inp_shexp.weight", shared)   # [D] shared expert's gate, or None
            if shared:
                self.ffn_gate_shexp = weight(g, b + "ffn_gate_shexp.weight")     # [S, D]
                self.ffn_up_shexp = weight(g, b + "ffn_up_shexp.weight")         # [S, D]
                self.ffn_down_shexp = weight(g, b + "ffn_down_shexp.weight")     # [D, S]
        else:
            self.ffn_gate = weight(g, b + "ffn_gate.weight")        # [F, D]
            self.ffn_up = weight(g, b + "ffn_up.weight")            # [F, D]
            self.ffn_down = weight(g, b + "ffn_down.weight")        # [D, F]


def per_expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    """GGUF names of one expert's matrices in the layout before llama.cpp merged them (PR #6387, 2024-03),
    which many downloads still use: blk.N.ffn_{gate,up,down}.E.weight."""
    return tuple(f"blk.{layer}.ffn_{m}.{expert}.weight" for m in ("gate", "up", "down"))


def _expert_tensors(g: GGUFFile, cfg: ModelConfig, layer: int):
    """[E][3] tensor infos of layer's experts, from merged tensors or the older one-tensor-per-expert layout;
    None when neither is complete."""
    merged = expert_tensors(layer)
    if all(n in g.tensors for n in merged):
        return None
    names = [per_expert_names(layer, e) for e in range(cfg.n_expert)]
    if not all(n in g.tensors for ns in names for n in ns):
        return None
    return [[g.tensors[n] for n in ns] for ns in names]


def check_tensors(g: GGUFFile, cfg: ModelConfig) -> None:
    """Every tensor the network needs is present, of the expected shape and a supported type. Experts may be
    merged ([E, rows, cols] per layer) or stored one tensor each ([rows, cols], the older layout)."""
    old = {i: _expert_tensors(g, cfg, i) for i in range(cfg.n_layer)} if cfg.is_moe else {}
    for name, shape in cfg.tensor_shapes().items():
        if is_expert_tensor(name) and name not in g.tensors:
            i = int(name.split(".")[1])
            k = EXPERT_MATRICES.index(name.split(".")[2])
            if old[i] is None:
                raise ValueError(f"{g.path}: tensor {name} is missing (nor are all of layer {i}'s experts stored "
                                 f"one tensor each, as {per_expert_names(i, 0)[k]})")
            for infos in old[i]:
                t = infos[k]
                if t.shape != shape[1:]:
                    raise ValueError(f"{g.path}: tensor {t.name} has shape {t.shape}, expected {shape[1:]}")
                g.qtype(t.name)
            continue
        if name == TIED_OUTPUT and name not in g.tensors:          # tied to token_embd, checked as that
            continue
        if name not in g.tensors:
            raise ValueError(f"{g.path}: tensor {name} is missing")
        got = g.tensors[name].shape
        if got != shape:
            raise ValueError(f"{g.path}: tensor {name} has shape {got}, expected {shape}")
        g.qtype(name)


def expert_layout(g: GGUFFile, cfg: ModelConfig) -> tuple[list, list]:
    """(parts, offsets): parts[layer] = the gate/up/down ExpertParts (type, [rows, cols], bytes of one expert's
    matrix) of that layer's experts, and offsets[layer][expert] = the 3 absolute file offsets of its matrices.
    This is the one place that knows both expert layouts (merged and one tensor per expert). ([], []) for a
    dense model. Call check_tensors first."""
    if not cfg.is_moe:
        return [], []
    parts, offsets = [], []
    for i in range(cfg.n_layer):
        old = _expert_tensors(g, cfg, i)
        if old is None:                                            # merged [E, rows, cols]
            infos = [g.tensors[n] for n in expert_tensors(i)]
            lp = tuple(ExpertPart(g.qtype(t.name), t.shape[1:], t.nbytes // cfg.n_expert) for t in infos)
            offsets.append([[t.offset + e * p.nbytes for t, p in zip(infos, lp)] for e in range(cfg.n_expert)])
        else:
            lp = tuple(ExpertPart(g.qtype(t.name), t.shape, t.nbytes) for t in old[0])
            for infos in old:
                for t, p in zip(infos, lp):
                    if g.qtype(t.name) != p.qt:
                        raise ValueError(f"{g.path}: tensor {t.name} is {g.qtype(t.name).name} but expert 0's is "
                                         f"{p.qt.name}; the experts of one layer must share a type")
            offsets.append([[t.offset for t in infos] for infos in old])
        parts.append(lp)
    return parts, offsets


def resident_names(g: GGUFFile, cfg: ModelConfig) -> list[str]:
    """The tensors kept resident (all but the experts): views into the mapping, counted in the RAM plan."""
    return [n for n in cfg.tensor_shapes() if not is_expert_tensor(n) and (n != TIED_OUTPUT or n in g.tensors)]


def slot_sizes(parts) -> list[tuple[int, int]]:
    """[(bytes of one slot, layers of that size)] for the RAM plan, in the expert cache's class order."""
    return [(slot_size(cp), len(layers)) for cp, layers in slot_classes(parts)]


class Weights:
    """Every weight of the network: resident views by GGUF name, and the experts' layout in the file."""

    def __init__(self, g: GGUFFile, cfg: ModelConfig):
        check_tensors(g, cfg)
        self.token_embd = weight(g, "token_embd.weight")                # [V, D]
        self.output_norm = norm_weight(g, "output_norm.weight")         # [D]
        self.output = weight(g, TIED_OUTPUT) if TIED_OUTPUT in g.tensors else self.token_embd   # [V, D]
        self.layers = [Layer(g, i, cfg) for i in range(cfg.n_layer)]
        self.expert_parts, self.expert_offsets = expert_layout(g, cfg)  # [L] parts, [L][E][3] offsets
        self.resident_names = resident_names(g, cfg)
        self.resident_bytes = sum(g.tensors[n].nbytes for n in self.resident_names)
        self.slot_sizes = slot_sizes(self.expert_parts)                 # [(slot bytes, layers)]
        self.types = ({g.qtype(n) for n in self.resident_names}         # every storage type the kernels will see
                      | {p.qt for lp in self.expert_parts for p in lp})


def model_sizes(g: GGUFFile, cfg: ModelConfig) -> dict:
    """Byte counts of a model, from the same layout the runtime loads: resident part, experts, one expert
    (the mean over layers), and the expert-cache slot sizes the RAM plan counts."""
    check_tensors(g, cfg)
    parts, _ = expert_layout(g, cfg)
    resident = sum(g.tensors[n].nbytes for n in resident_names(g, cfg))
    expert_bytes = sum(p.nbytes for lp in parts for p in lp) * cfg.n_expert
    slots = slot_sizes(parts)
    return {"resident_bytes": resident, "expert_bytes": expert_bytes,
            "bytes_per_expert": expert_bytes // max(1, cfg.n_layer * cfg.n_expert) if cfg.is_moe else 0,
            "expert_slot_bytes": max((b for b, _ in slots), default=0), "expert_slot_sizes": slots}
