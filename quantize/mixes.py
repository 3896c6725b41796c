"""llama.cpp's file types ("Q4_K_M", ...): which block type each tensor gets, as its quantizer chooses.

The rules are llama_tensor_get_type() in llama.cpp's src/llama-quant.cpp (read there, for the llama
architecture: Mixtral, Mistral, Llama), without an importance matrix and without user overrides:
- not quantized: 1-D tensors, norms and the router (ffn_gate_inp) keep their source type;
- output.weight: Q6_K (Q8_0 stays Q8_0; Q8_0 where a row is not a whole number of the ftype's blocks); a file
  without one (tied embeddings) gives token_embd.weight that rule;
- attn_v: by ftype (Q2_K: Q4_K with >= 4 query heads per KV head, else Q3_K; Q3_K_M: Q5_K in the first two
  layers, then Q4_K; Q3_K_L: Q5_K; Q4_K_M, Q5_K_M: Q6_K in the use_more_bits layers; Q4_K_S: Q5_K in the
  first four); any 8-expert model (Mixtral) then takes Q8_0 for attn_v and attn_k;
- ffn_down (merged experts, one tensor per expert, or dense): Q2_K: Q3_K; Q3_K_M: Q5_K in the first n/16
  layers, then Q4_K; Q3_K_L: Q5_K; Q4_K_M, Q5_K_M: Q6_K in the use_more_bits layers; Q4_K_S: Q5_K in the
  first n/8;
- attn_output: 8-expert models take Q5_K for Q2_K, Q3_K_S, Q3_K_M, Q4_K_S, Q4_K_M; others Q3_K for Q2_K,
  Q4_K for Q3_K_M, Q5_K for Q3_K_L;
- with an importance matrix, Q4_0 and Q5_0 files put the first n/8 layers' ffn_down in Q4_1 / Q5_1;
- a row that is not a whole number of the chosen type's blocks falls back (tensor_type_fallback: Q2_K/Q3_K:
  Q4_0, IQ4_XS: IQ4_NL, Q4_K: Q5_0, Q5_K: Q5_1, Q6_K: Q8_0; older llama.cpp took IQ4_NL for Q2_K/Q3_K), and to F16
  when that does not divide either; the other types have no fallback (llama.cpp refuses the tensor).
User overrides (llama-quantize --tensor-type; lazymoe's --expert-type / --resident-type) replace the rules for
the tensors they match; the fallback still applies.
Left out: Falcon's and the 70B Llama's special cases, the IQ and TQ ftypes.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from lazymoe.format.config import ModelConfig

# ftype name as users type it -> (LlamaFileType, the default block type of its weight matrices)
FTYPES = {
    "f32": (LlamaFileType.ALL_F32, "F32"),
    "f16": (LlamaFileType.MOSTLY_F16, "F16"),
    "bf16": (LlamaFileType.MOSTLY_BF16, "BF16"),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, "Q8_0"),
    "q4_0": (LlamaFileType.MOSTLY_Q4_0, "Q4_0"),
    "q4_1": (LlamaFileType.MOSTLY_Q4_1, "Q4_1"),
    "q5_0": (LlamaFileType.MOSTLY_Q5_0, "Q5_0"),
    "q5_1": (LlamaFileType.MOSTLY_Q5_1, "Q5_1"),
    "q2_k": (LlamaFileType.MOSTLY_Q2_K, "Q2_K"),
    "q3_k_s": (LlamaFileType.MOSTLY_Q3_K_S, "Q3_K"),
    "q3_k_m": (LlamaFileType.MOSTLY_Q3_K_M, "Q3_K"),
    "q3_k_l": (LlamaFileType.MOSTLY_Q3_K_L, "Q3_K"),
    "q4_k_s": (LlamaFileType.MOSTLY_Q4_K_S, "Q4_K"),
    "q4_k_m": (LlamaFileType.MOSTLY_Q4_K_M, "Q4_K"),
    "q5_k_s": (LlamaFileType.MOSTLY_Q5_K_S, "Q5_K"),
    "q5_k_m": (LlamaFileType.MOSTLY_Q5_K_M, "Q5_K"),
    "q6_k": (LlamaFileType.MOSTLY_Q6_K, "Q6_K"),
}

# llama.cpp's tensor_type_fallback, as vendored by llama-cpp-python 0.3.36 (tests/test_mixes.py holds it)
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "IQ4_XS": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"blk\.(\d+)\.")

# Tensors lazymoe quantizes with llama.cpp's quantizer (kernels.kquantizers' port, bit for bit) instead of its
# search, by name, in these block types. The token embedding is read one row per token, so a few frequent
# tokens' rows carry a third of the positions and the direction of their error, not only its size, decides:
# in Q4_K..Q6_K our rows (lower error on every row, unbiased) gave higher KL than llama.cpp's on both demo
# models measured, in Q2_K/Q3_K (10-13 % lower error) lower (RESULTS.md, Quantizer).
LLAMA_QUANTIZER = {"token_embd.weight": ("q4_k", "q5_k", "q6_k")}


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: the first and last eighth, and every third between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _blocks(t: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[t]][0]


def fallback(t: str, cols: int, where: str = "tensor") -> str:
    """The type llama.cpp stores a row of `cols` weights in when `t` was chosen: t if cols is a whole number of
    its blocks, else its fallback (F16 when that does not divide either); ValueError where llama.cpp has none."""
    if cols % _blocks(t) == 0:
        return t
    if t not in _FALLBACK:
        raise ValueError(f"{where}: rows of {cols} weights are not a whole number of {t}'s blocks of {_blocks(t)}, "
                         f"and {t} has no fallback type")
    t = _FALLBACK[t]
    return t if cols % _blocks(t) == 0 else "F16"


def ftype(name: str):
    """(LlamaFileType, default type name) of an ftype name; ValueError naming the known ones."""
    try:
        return FTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown file type {name!r}; expected one of {', '.join(FTYPES)}") from None


def is_quantized(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama.cpp's quantizer changes this tensor's type at all."""
    return (name.endswith("weight") and len(shape) >= 2 and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def tensor_types(cfg: ModelConfig, ftype_name: str, shapes: dict[str, tuple[int, ...]] | None = None,
                 has_imatrix: bool = False, overrides=None, wanted: dict | None = None) -> dict[str, str]:
    """GGML type name (e.g. "Q6_K") for every tensor that llama.cpp's quantizer would change, by GGUF name, for
    a model of cfg's shapes (default cfg.tensor_shapes(); numpy order, row length last) in `ftype_name`.
    Tensors it leaves alone (norms, the router) are not in the result. has_imatrix: an importance matrix is
    given. overrides(name) -> a GGML type name or None: llama-quantize's --tensor-type, in place of the rules.
    wanted, if given, receives each tensor's type before the fallback for rows that do not divide into its blocks."""
    _, default = ftype(ftype_name)
    ft = ftype_name.lower()
    shapes = cfg.tensor_shapes() if shapes is None else shapes
    n_layer = cfg.n_layer
    n_gqa = cfg.n_head // cfg.n_head_kv
    eight = cfg.n_expert == 8
    k_quant = default not in ("F32", "F16", "BF16")
    # llama.cpp visits tensors ordered by layer, then name; attn_v's counter follows that order
    order = sorted(shapes, key=lambda n: (int(m.group(1)) if (m := _LAYER.match(n)) else -1, n))
    n_attn_v = sum("attn_v.weight" in n for n in order)
    i_attn_v = 0
    out: dict[str, str] = {}
    for name in order:
        shape = shapes[name]
        if not is_quantized(name, shape):
            continue
        t = default
        if not k_quant:
            out[name] = t
            continue
        m = _LAYER.match(name)
        layer = int(m.group(1)) if m else 0
        manual = overrides(name) if overrides is not None else None
        if manual is not None:
            t = manual
        elif name == "output.weight" or (name == "token_embd.weight" and "output.weight" not in shapes):  # tied
            t = "Q8_0" if shape[-1] % _blocks(default) else (t if t == "Q8_0" else "Q6_K")
        elif name == "token_embd.weight":
            pass
        elif "attn_v.weight" in name:
            if ft == "q2_k":
                t = "Q4_K" if n_gqa >= 4 else "Q3_K"
            elif ft == "q3_k_m":
                t = "Q5_K" if i_attn_v < 2 else "Q4_K"
            elif ft == "q3_k_l":
                t = "Q5_K"
            elif ft in ("q4_k_m", "q5_k_m") and use_more_bits(i_attn_v, n_attn_v):
                t = "Q6_K"
            elif ft == "q4_k_s" and i_attn_v < 4:
                t = "Q5_K"
            if eight:
                t = "Q8_0"          # llama.cpp: "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
            i_attn_v += 1
        elif "attn_k.weight" in name:
            if eight:
                t = "Q8_0"
        elif "ffn_down" in name:
            if ft == "q2_k":
                t = "Q3_K"
            elif ft == "q3_k_m":
                t = "Q5_K" if layer < n_layer // 16 else "Q4_K"
            elif ft == "q3_k_l":
                t = "Q5_K"
            elif ft in ("q4_k_m", "q5_k_m"):
                if use_more_bits(layer, n_layer):
                    t = "Q6_K"
            elif ft == "q4_k_s" and layer < n_layer // 8:
                t = "Q5_K"
            elif ft in ("q4_0", "q5_0") and has_imatrix and layer < n_layer // 8:
                t = "Q4_1" if ft == "q4_0" else "Q5_1"
        elif "attn_output.weight" in name:
            if eight:
                if ft in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m"):
                    t = "Q5_K"
            elif ft == "q2_k":
                t = "Q3_K"
            elif ft == "q3_k_m":
                t = "Q4_K"
            elif ft == "q3_k_l":
                t = "Q5_K"
        if wanted is not None:
            wanted[name] = t
        out[name] = fallback(t, shape[-1], name)
    return out


# --- the per-tensor types of one `lazymoe quantize` run --------------------------------------------------

# llama_model_loader's guess of a file's ftype from its most common tensor type (when general.file_type is absent)
_GUESSED = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0",
            "Q5_1": "q5_1", "Q8_0": "q8_0", "Q2_K": "q2_k", "Q3_K": "q3_k_m", "Q4_K": "q4_k_m", "Q5_K": "q5_k_m",
            "Q6_K": "q6_k"}
BLOCK_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")


def is_expert(name: str) -> bool:
    """A routed expert's matrix (merged [E, rows, cols]); shared experts (_shexp) are resident."""
    return "_exps." in name


def is_mix(ftype_name: str) -> bool:
    """Whether the ftype is one of llama.cpp's K-quant mixes (per-tensor rules), not a plain type."""
    return FTYPES[ftype_name.lower()][1].endswith("_K")


def block_type(name: str, flag: str) -> str:
    """GGML name ("Q2_K") of a block type as a flag gives it ("q2_k"); ValueError naming the known ones."""
    n = name.lower()
    if n in BLOCK_TYPES:
        return n.upper()
    hint = f" (a file type; its block type is {FTYPES[n][1].lower()})" if n in FTYPES else ""
    raise ValueError(f"{flag} {name!r} is not a block type{hint}; expected one of {', '.join(BLOCK_TYPES)}")


@dataclass(frozen=True)
class TypePlan:
    types: dict[str, str]                    # GGUF name -> GGML type name, every tensor
    file_type: int                           # general.file_type (a LlamaFileType)
    fallbacks: tuple[tuple[str, str, str], ...]  # (name, chosen, stored) where rows forced llama.cpp's fallback

    def fallback_note(self) -> str:
        """'; N tensors in llama.cpp's fallback type ... (Q4_K -> Q5_0 x N, ...)' or ''."""
        if not self.fallbacks:
            return ""
        pairs = Counter((a, b) for _, a, b in self.fallbacks)
        what = ", ".join(f"{a} -> {b} x {n}" for (a, b), n in sorted(pairs.items()))
        return (f"; {len(self.fallbacks)} tensors in llama.cpp's fallback type, their rows not a whole number of "
                f"the chosen type's blocks ({what})")


def choose_types(cfg: ModelConfig, tensors, type_name: str | None = None, expert_type: str | None = None,
                 resident_type: str | None = None, pure: bool = False, has_imatrix: bool = False) -> TypePlan:
    """The type of every tensor of one quantize run. tensors: (GGUF name, numpy shape, keep_f32) for each.

    type_name (default q4_0): a file type. llama.cpp's K-quant mixes (q4_k_m, ...) get its per-tensor rules
    (tensor_types); plain types (q4_0, q8_0, ...) and pure=True put every weight matrix in the ftype's block
    type (llama-quantize --pure). expert_type / resident_type (block types, "q2_k") replace the type of the
    routed experts' matrices / of every other weight matrix, as llama-quantize's --tensor-type does; rows that
    do not divide into the chosen type's blocks take llama.cpp's fallback. Norms and the router stay F32.
    general.file_type is the ftype's, as llama.cpp writes it whatever the overrides; with no type_name and both
    overrides, the one llama.cpp's loader guesses from the most common tensor type."""
    ft = (type_name or "q4_0").lower()
    ftype(ft)                                                   # ValueError naming the known file types
    et = block_type(expert_type, "--expert-type") if expert_type else None
    rt = block_type(resident_type, "--resident-type") if resident_type else None
    quantized = {n: tuple(s) for n, s, keep in tensors if not keep and is_quantized(n, tuple(s))}
    if et and not any(is_expert(n) for n in quantized):
        raise ValueError(f"--expert-type {expert_type}: the model has no expert matrices (it is a dense model)")

    def override(name: str) -> str | None:
        return et if is_expert(name) else rt

    wanted: dict[str, str] = {}
    if is_mix(ft) and not pure:
        chosen = tensor_types(cfg, ft, quantized, has_imatrix, override, wanted)
    else:
        base = FTYPES[ft][1]
        chosen = {}
        for n, s in quantized.items():
            wanted[n] = override(n) or base
            # llama.cpp has no fallback for the plain types: the writer refuses such rows in one line
            chosen[n] = fallback(wanted[n], s[-1], n) if wanted[n] in _FALLBACK else wanted[n]
    types = {n: chosen.get(n, "F32") for n, _, _ in tensors}
    falls = tuple((n, wanted[n], chosen[n]) for n in chosen if chosen[n] != wanted[n])
    if type_name is None and et and rt:
        counts: Counter = Counter()
        best, most = "F32", 0
        for n in sorted(types, key=lambda n: (int(m.group(1)) if (m := _LAYER.match(n)) else -1, n)):
            counts[types[n]] += 1
            if counts[types[n]] > most:
                best, most = types[n], counts[types[n]]
        ft = _GUESSED.get(best, "f32")
    return TypePlan(types, int(FTYPES[ft][0]), falls)
