"""The forward pass (Mixtral / Mistral / Llama as llama.cpp lays them out in GGUF) over Weights, a RunState
and the expert cache.

Shape legend: T tokens in the batch, D hidden, H query heads, G KV heads, R = H // G heads per KV head,
hd head size, N positions in the KV cache, E experts, A experts used per token, F FFN size, V vocabulary.
"""
from __future__ import annotations

import numpy as np
from gguf import quants

from lazymoe import kernels
from lazymoe.format.config import ModelConfig
from lazymoe.kernels.attention import attend_one
from lazymoe.runtime.expert_cache import CacheOptions, ExpertCache
from lazymoe.runtime.memory import ATTN_CHUNK_FLOATS
from lazymoe.runtime.state import RunState
from lazymoe.runtime.weights import Layer, Weight, Weights


class NonFiniteError(ValueError):
    """A layer produced NaN or Inf: the file's weights are corrupt or out of range."""


def non_finite(il: int, what: str) -> NonFiniteError:
    where = "the token embedding" if il < 0 else "the output head" if what == "output" else f"layer {il}'s {what}"
    return NonFiniteError(f"{where} produced non-finite values (NaN or Inf): the model's weights are corrupt "
                          f"or out of range")


def check_finite(x: np.ndarray, il: int, what: str) -> None:
    """NonFiniteError naming layer il (-1: the embedding) unless x is all finite. A few microseconds per
    call on [T, D]; it keeps NaN and Inf out of the kernels and the sampler."""
    if not np.isfinite(x).all():
        raise non_finite(il, what)


def lin(w: Weight, X: np.ndarray) -> np.ndarray:
    """X [T, cols] -> X @ W.T [T, rows]: matvec for one token, matmul for a batch."""
    qt, a = w
    if X.shape[0] == 1:
        return kernels.matvec(qt, a, X[0]).reshape(1, -1)
    return kernels.matmul(qt, a, np.ascontiguousarray(X))


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x [T, D] * w [D] / rms(x) -> [T, D]."""
    ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)    # [T, 1]
    return (x / np.sqrt(ms + np.float32(eps))) * w


# Prefetch depth when none is given: 2 layers ahead when the cache holds at least this share of the experts,
# else 1. On the 24.5 GiB 8x7B file (benchmarks/RESULTS.md, prefetch depth A/B): with 221 of 256 slots (uncapped)
# two layers ahead decoded 1.10x faster; with 113 of 256 (12G cap) it was no faster, three layers slower.
DEEP_PREFETCH_SHARE = 0.75


def prefetch_depth(options: CacheOptions, n_slots: int, n_experts: int) -> int:
    """The options' depth, or the automatic one (see DEEP_PREFETCH_SHARE)."""
    if options.prefetch_depth is not None:
        return int(options.prefetch_depth)
    return 2 if n_slots >= DEEP_PREFETCH_SHARE * max(n_experts, 1) else 1


class Network:
    """forward(ids, pos) fills the state's KV cache and returns logits. Counts prefetch recall (`predicted`:
    experts the routers chose where a guess was made one layer up, `predicted_right`: of those, guessed) and,
    while `trace` is a list, appends each forward's routes to it ([T, L, A] int16 arrays). While `observer` is
    set, it is shown each weight matrix's input (`lazymoe imatrix`): observer.inputs(il, names, X [T, cols]) and,
    for an FFN (expert e, or None when dense), observer.ffn(il, e, X [t, D], gate, up)."""

    def __init__(self, cfg: ModelConfig, weights: Weights, state: RunState, experts: ExpertCache | None,
                 options: CacheOptions, depth: int):
        self.cfg, self.w, self.state, self.experts, self.options = cfg, weights, state, experts, options
        self.prefetch_depth = depth          # layers ahead whose experts a decode step guesses
        self.predicted = self.predicted_right = 0
        self.trace: list | None = None
        self.observer = None
        self._guess = None                   # experts guessed for the next layer, [A]

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        qt, w = self.w.token_embd
        rows = w[ids]                                                       # [T, row_bytes] or [T, D]
        if qt.is_block:
            return quants.dequantize(rows, qt.ggml).astype(np.float32).reshape(len(ids), self.cfg.n_embd)
        if qt.name == "bf16":                                               # uint16 bits [T, D]: the top half of an f32
            return (rows.astype(np.uint32) << 16).view(np.float32)
        return rows.astype(np.float32)                                      # [T, D]

    def _rope(self, x: np.ndarray, pos: int) -> None:
        """Rotate adjacent pairs (2i, 2i+1) of x [T, heads, hd] in place for positions pos.."""
        T = x.shape[0]
        c = self.state.rope_cos[pos:pos + T, None, :]                       # [T, 1, hd/2]
        s = self.state.rope_sin[pos:pos + T, None, :]                       # [T, 1, hd/2]
        x0, x1 = x[..., 0::2].copy(), x[..., 1::2].copy()                   # [T, heads, hd/2]
        x[..., 0::2] = x0 * c - x1 * s
        x[..., 1::2] = x0 * s + x1 * c

    def _attention(self, il: int, L: Layer, h: np.ndarray, pos: int) -> np.ndarray:
        cfg = self.cfg
        T, H, G, hd = h.shape[0], cfg.n_head, cfg.n_head_kv, cfg.head_dim
        R, N = H // G, pos + h.shape[0]
        if self.observer is not None:
            self.observer.inputs(il, ("attn_q", "attn_k", "attn_v"), h)
        q = lin(L.attn_q, h).reshape(T, H, hd)                              # [T, H, hd]
        k = lin(L.attn_k, h).reshape(T, G, hd)                              # [T, G, hd]
        v = lin(L.attn_v, h).reshape(T, G, hd)                              # [T, G, hd]
        self._rope(q, pos)
        self._rope(k, pos)
        self.state.k_cache[il, :, pos:N] = k.transpose(1, 0, 2)                   # [G, T, hd]
        self.state.v_cache[il, :, pos:N] = v.transpose(1, 0, 2)                   # [G, T, hd]
        scale = np.float32(1.0 / np.sqrt(hd))
        if T == 1:                                                          # decoding: one Numba pass
            for a in (q, k, v):
                check_finite(a, il, "attention")
            out1 = np.empty((H, hd), dtype=np.float32)                      # [H, hd]
            try:
                attend_one(q[0], self.state.k_cache[il], self.state.v_cache[il], N, scale, out1)
            except ArithmeticError:                                         # finite q.k that overflowed
                raise non_finite(il, "attention") from None
            if self.observer is not None:
                self.observer.inputs(il, ("attn_output",), out1.reshape(1, H * hd))
            return lin(L.attn_output, out1.reshape(1, H * hd))              # [1, D]
        # query t (position pos+t) sees keys 0..pos+t
        mask = np.where(np.arange(N)[None, :] > pos + np.arange(T)[:, None], -np.inf, 0).astype(np.float32)  # [T, N]
        qg = q.reshape(T, G, R, hd).transpose(1, 2, 0, 3)                   # [G, R, T, hd]
        out = np.empty((G, R, T, hd), dtype=np.float32)                     # [G, R, T, hd]
        # groups in chunks of gs: one batched product per chunk (decoding: all groups at once), with the
        # scores of a chunk bounded to ATTN_CHUNK_FLOATS
        gs = max(1, min(G, ATTN_CHUNK_FLOATS // (R * T * N)))
        for g0 in range(0, G, gs):
            g1 = min(G, g0 + gs)
            qc = np.ascontiguousarray(qg[g0:g1]).reshape(g1 - g0, R * T, hd)  # [g, R*T, hd]; contiguous for BLAS
            s = qc @ self.state.k_cache[il, g0:g1, :N].transpose(0, 2, 1)         # [g, R*T, N]
            s *= scale
            s.reshape(g1 - g0, R, T, N)[...] += mask
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            out[g0:g1] = (s @ self.state.v_cache[il, g0:g1, :N]).reshape(g1 - g0, R, T, hd)
        out = out.transpose(2, 0, 1, 3)                                     # [T, G, R, hd] = [T, H, hd]
        if self.observer is not None:
            self.observer.inputs(il, ("attn_output",), np.ascontiguousarray(out).reshape(T, H * hd))
        return lin(L.attn_output, np.ascontiguousarray(out).reshape(T, H * hd))  # [T, D]

    def _route(self, L: Layer, h: np.ndarray):
        """Router for h [T, D] -> chosen experts [T, A] best first, and their weights [T, A]."""
        A = self.cfg.n_expert_used
        r = lin(L.ffn_gate_inp, h)                                          # [T, E] router logits
        top = np.argsort(-r, axis=1, kind="stable")[:, :A]                  # [T, A] chosen experts, best first
        sel = np.take_along_axis(r, top, axis=1)                            # [T, A]
        wt = np.exp(sel - sel[:, :1])                                       # [T, A] softmax over the chosen A
        wt /= wt.sum(axis=1, keepdims=True)
        return top, wt

    def _moe(self, il: int, L: Layer, h: np.ndarray, x: np.ndarray, routes: list) -> np.ndarray:
        """The expert FFN for h [T, D] (x [T, D]: the residual it came from, for the next layer's guess)."""
        T = h.shape[0]
        top, wt = self._route(L, h)                                         # [T, A], [T, A]
        routes.append(top)
        if self.observer is not None:
            self.observer.inputs(il, ("ffn_gate_inp",), h)
        cache = self.experts
        # Experts in increasing id, so each token's sum has one fixed order whatever the cache holds.
        order = np.unique(top)                                              # [<=E]
        cache.settle(il, order)
        if self._guess is not None:                                         # recall of the guess made one layer up
            self.predicted += len(order)
            self.predicted_right += len(set(self._guess.tolist()) & set(order.tolist()))
            self._guess = None
        if self.options.overlap:
            cache.want(il, order)                                           # read the rest while the first computes
        if self.options.prefetch and T == 1:
            for nl in range(il + 1, min(self.cfg.n_layer, il + 1 + self.prefetch_depth)):
                self._prefetch_next(nl, x)
        p = self.w.expert_parts[il]                                         # gate, up, down of this layer
        out = np.zeros_like(h)                                              # [T, D]
        for i, e in enumerate(order):
            if self.options.overlap and i:
                cache.want(il, order[i:])                                   # slots freed by finished experts
            gate, up, down = cache.get(il, int(e))
            if self.observer is not None:
                self.observer.ffn(il, int(e), h[(top == e).any(axis=1)], (p[0].qt, gate), (p[1].qt, up))
            if T == 1:
                a = int(np.nonzero(top[0] == e)[0][0])
                out[0] += wt[0, a] * kernels.expert_ffn(p[0].qt, gate, p[1].qt, up, p[2].qt, down, h[0])  # [D]
            else:
                rows, rank = np.nonzero(top == e)                           # tokens routed to e, and at which rank
                y = kernels.expert_ffn_batch(p[0].qt, gate, p[1].qt, up, p[2].qt, down,
                                             np.ascontiguousarray(h[rows]))  # [t_e, D]
                out[rows] += wt[rows, rank][:, None] * y
            cache.unpin(il, int(e))
        return out

    def _prefetch_next(self, nl: int, x: np.ndarray) -> None:
        """Guess layer nl's experts by its router on this layer's residual x [1, D]; start reading them.
        (Recall is counted for the next layer's guess only.)"""
        Ln = self.w.layers[nl]
        top, _ = self._route(Ln, rmsnorm(x, Ln.ffn_norm, self.cfg.rms_eps))  # [1, A]
        if self._guess is None:
            self._guess = top[0]
        self.experts.prefetch(nl, top[0])

    def _dense_ffn(self, L: Layer, h: np.ndarray) -> np.ndarray:
        (q1, w1), (q3, w3), (q2, w2) = L.ffn_gate, L.ffn_up, L.ffn_down
        if self.observer is not None:
            self.observer.ffn(next(i for i, x in enumerate(self.w.layers) if x is L), None, h, L.ffn_gate, L.ffn_up)
        if h.shape[0] == 1:
            return kernels.expert_ffn(q1, w1, q3, w3, q2, w2, h[0]).reshape(1, -1)   # [1, D]
        return kernels.expert_ffn_batch(q1, w1, q3, w3, q2, w2, np.ascontiguousarray(h))  # [T, D]

    def forward(self, ids: np.ndarray, pos: int, all_logits: bool) -> np.ndarray:
        """Run ids [T] at positions pos.. through the network, filling the KV cache.
        Returns logits [T, V] (all_logits) or [1, V] for the last token."""
        cfg = self.cfg
        x = self._embed(ids)                                                # [T, D]
        check_finite(x, -1, "embedding")
        routes: list = []                                                   # per layer [T, A]
        self._guess = None
        if self.experts is not None:
            self.experts.unpin(0)                                           # nothing in use between forwards
        for il, L in enumerate(self.w.layers):
            h = rmsnorm(x, L.attn_norm, cfg.rms_eps)                        # [T, D]
            x += self._attention(il, L, h, pos)                             # [T, D]
            check_finite(x, il, "attention")
            h = rmsnorm(x, L.ffn_norm, cfg.rms_eps)                         # [T, D]
            x += self._moe(il, L, h, x, routes) if cfg.is_moe else self._dense_ffn(L, h)  # [T, D]
            check_finite(x, il, "feed-forward")
        if self.trace is not None and routes:
            self.trace.append(np.stack(routes, axis=1).astype(np.int16))    # [T, L, A]
        if not all_logits:
            x = x[-1:]                                                      # [1, D]
        logits = lin(self.w.output, rmsnorm(x, self.w.output_norm, cfg.rms_eps))  # [T or 1, V]
        check_finite(logits, cfg.n_layer, "output")
        return logits
