"""A GGUF file's weights as a Hugging Face Mixtral/Mistral (Qwen3-MoE, Qwen2-MoE, OLMoE) state dict: the reference that golden logits and
the demo model's golden ids are computed with (transformers on exactly the GGUF's dequantized weights).
Needs torch (the `ref` extra), imported on call."""
from __future__ import annotations

import numpy as np


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's w.reshape(n_head, 2, hd//2, D).swapaxes(1, 2).reshape(w.shape) on Q/K rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_state_dict(g, cfg, moe: bool) -> dict:
    """GGUF tensors of GGUFFile g (dequantized to float32) under Hugging Face names (transformers' in-memory
    names: experts merged as mlp.experts.gate_up_proj [E, 2F, D] and down_proj [E, D, F]), as torch tensors."""
    import torch
    from gguf import quants

    def t(name):
        info = g.tensors[name]
        raw = g.raw(name)
        return np.ascontiguousarray(quants.dequantize(raw, info.ggml_type).reshape(info.shape), dtype=np.float32)

    sd = {"model.embed_tokens.weight": t("token_embd.weight"), "model.norm.weight": t("output_norm.weight"),
          "lm_head.weight": t("output.weight" if "output.weight" in g.tensors else "token_embd.weight")}   # tied
    for i in range(cfg.n_layer):
        b, h = f"blk.{i}.", f"model.layers.{i}."
        sd[h + "input_layernorm.weight"] = t(b + "attn_norm.weight")
        sd[h + "post_attention_layernorm.weight"] = t(b + "ffn_norm.weight")
        fix = (lambda w, n: w) if cfg.kind.rope_neox else unpermute           # NeoX-RoPE files keep HF's rows
        sd[h + "self_attn.q_proj.weight"] = fix(t(b + "attn_q.weight"), cfg.n_head)
        sd[h + "self_attn.k_proj.weight"] = fix(t(b + "attn_k.weight"), cfg.n_head_kv)
        if cfg.kind.qkv_bias:
            for n in "qkv":
                sd[h + f"self_attn.{n}_proj.bias"] = t(b + f"attn_{n}.bias")
        if cfg.kind.qk_norm:
            sd[h + "self_attn.q_norm.weight"] = t(b + "attn_q_norm.weight")
            sd[h + "self_attn.k_norm.weight"] = t(b + "attn_k_norm.weight")
        if cfg.n_ff_shexp:
            for n in ("gate", "up", "down"):
                sd[h + f"mlp.shared_expert.{n}_proj.weight"] = t(b + f"ffn_{n}_shexp.weight")
            sd[h + "mlp.shared_expert_gate.weight"] = t(b + "ffn_gate_inp_shexp.weight").reshape(1, -1)   # [1, D]
        sd[h + "self_attn.v_proj.weight"] = t(b + "attn_v.weight")
        sd[h + "self_attn.o_proj.weight"] = t(b + "attn_output.weight")
        if moe:
            sd[h + "mlp.gate.weight"] = t(b + "ffn_gate_inp.weight")
            sd[h + "mlp.experts.gate_up_proj"] = np.concatenate(
                [t(b + "ffn_gate_exps.weight"), t(b + "ffn_up_exps.weight")], axis=1)      # [E, 2F, D]
            sd[h + "mlp.experts.down_proj"] = t(b + "ffn_down_exps.weight")              # [E, D, F]
        else:
            sd[h + "mlp.gate_proj.weight"] = t(b + "ffn_gate.weight")
            sd[h + "mlp.up_proj.weight"] = t(b + "ffn_up.weight")
            sd[h + "mlp.down_proj.weight"] = t(b + "ffn_down.weight")
    return {k: torch.from_numpy(v) for k, v in sd.items()}
