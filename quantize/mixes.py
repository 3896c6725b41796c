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
- a row that is not a whole number of the chosen type's blocks falls back (Q2_K/Q3_K: Q4_0, IQ4_XS: IQ4_NL, Q4_K:
  Q5_0, Q5_K: Q5_1, Q6_K: Q8_0: what the pinned llama-cpp-python's quantizer writes on rows of 160, where the
  llama.cpp sources read name IQ4_NL for Q2_K/Q3_K too), and to F16 when that does not divide either.
Left out: Falcon's and the 70B Llama's special cases, the IQ and TQ ftypes, and the imatrix-only rule for
Q4_0/Q5_0's first ffn_down layers.
"""
from __future__ import annotations

import re

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

_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "IQ4_XS": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"blk\.(\d+)\.")


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: the first and last eighth, and every third between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _blocks(t: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[t]][0]


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


def tensor_types(cfg: ModelConfig, ftype_name: str, shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, str]:
    """GGML type name (e.g. "Q6_K") for every tensor that llama.cpp's quantizer would change, by GGUF name, for
    a model of cfg's shapes (default cfg.tensor_shapes(); numpy order, row length last) in `ftype_name`.
    Tensors it leaves alone (norms, the router) are not in the result."""
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
        if name == "output.weight" or (name == "token_embd.weight" and "output.weight" not in shapes):  # tied: as output
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
        if shape[-1] % _blocks(t):
            t = _FALLBACK.get(t, t)
            if shape[-1] % _blocks(t):
                t = "F16"
        out[name] = t
    return out
