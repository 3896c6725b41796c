"""What one sequence holds apart from the weights, allocated once at load (llama2.c's RunState)."""
from __future__ import annotations

import numpy as np

from lazymoe.format.config import ModelConfig


class RunState:
    """The KV cache, RoPE tables and the ids whose K/V the cache holds, for up to ctx positions."""

    def __init__(self, cfg: ModelConfig, ctx: int):
        G, hd = cfg.n_head_kv, cfg.head_dim
        self.ctx = ctx
        self.k_cache = np.zeros((cfg.n_layer, G, ctx, hd), dtype=np.float32)     # [L, G, N, hd]
        self.v_cache = np.zeros((cfg.n_layer, G, ctx, hd), dtype=np.float32)     # [L, G, N, hd]
        inv = cfg.rope_theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)    # [hd/2]
        ang = np.arange(ctx, dtype=np.float64)[:, None] * inv                    # [N, hd/2]
        self.rope_cos = np.cos(ang).astype(np.float32)                           # [N, hd/2]
        self.rope_sin = np.sin(ang).astype(np.float32)                           # [N, hd/2]
        self.tokens: list[int] = []                                              # ids in the cache, in order

    def rewind(self, n: int) -> None:
        """Keep only the first n positions (later K/V are overwritten by the next eval)."""
        del self.tokens[n:]

    def common_prefix(self, ids: list[int]) -> int:
        """How many leading ids are already in the cache, leaving at least the last one to evaluate."""
        n = 0
        for a, b in zip(self.tokens, ids[:-1]):
            if a != b:
                break
            n += 1
        return n
