"""The forward pass (Mixtral / Mistral / Llama, Qwen3-MoE, Qwen2-MoE, OLMoE as llama.cpp lays them out in GGUF)
over Weights, a RunState and the expert cache. What the architectures do differently is data (format/config.ARCHS):
the RoPE style, Q/K norms, Q/K/V biases, top-k renormalisation and a shared expert, each a small piece here.

Shape legend: T tokens in the batch, D hidden, H query heads, G KV heads, R = H // G heads per KV head,
hd head size, N positions in the KV cache, E experts, A experts used per token, F FFN size, V vocabulary.
"""
from __future__ import annotations

import numpy as np
from gguf import quants

from lazymoe import kernels
from lazymoe.format.config import ModelConfig
from lazymoe.kernels.attention import attend_one
from lazymoe.kernels.grouped import combine, group_layout, grouped_ffn, sort_assignments
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
    while `trace` is a list, appends each forward's routes to it ([T, L, A] int16 arrays). `grouped` (default) runs
    the experts of a layer that the cache holds as one kernel call (kernels/grouped.py); False: one call per expert.
    While `observer` is set, it is shown each weight matrix's input (`lazymoe imatrix`; the experts then run one
    call each): observer.inputs(il, names, X [T, cols]) and, for an FFN (expert e, or None when dense),
    observer.ffn(il, e, X [t, D], gate, up)."""

    grouped = True

    def __init__(self, cfg: ModelConfig, weights: Weights, state: RunState, experts: ExpertCache | None,
                 options: CacheOptions, depth: int):
        self.cfg, self.w, self.state, self.experts, self.options = cfg, weights, state, experts, options
        self.prefetch_depth = depth          # layers ahead whose experts a decode step guesses
        self.predicted = self.predicted_right = 0
        self.trace: list | None = None
        self.observer = None
        self._guess = None                   # experts guessed for the next layer, [A]
        self.layouts = [group_layout(p[0].qt, p[1].qt, p[2].qt, p[0].shape[0], p[0].shape[1])
                        for p in weights.expert_parts] if experts is not None else []

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        qt, w = self.w.token_embd
        rows = w[ids]                                                       # [T, row_bytes] or [T, D]
        if qt.is_block:
            return quants.dequantize(rows, qt.ggml).astype(np.float32).reshape(len(ids), self.cfg.n_embd)
        if qt.name == "bf16":                                               # uint16 bits [T, D]: the top half of an f32
            return (rows.astype(np.uint32) << 16).view(np.float32)
        return rows.astype(np.float32)                                      # [T, D]

    def _rope(self, x: np.ndarray, pos: int) -> None:
        """Rotate x [T, heads, hd] in place for positions pos..: pairs (i, i + hd/2) for NeoX-style
        architectures (Hugging Face's rotate_half), else adjacent pairs (2i, 2i+1) of the permuted rows."""
        T, half = x.shape[0], x.shape[-1] // 2
        c = self.state.rope_cos[pos:pos + T, None, :]                       # [T, 1, hd/2]
        s = self.state.rope_sin[pos:pos + T, None, :]                       # [T, 1, hd/2]
        a, b = (slice(0, half), slice(half, None)) if self.cfg.kind.rope_neox else (slice(0, None, 2), slice(1, None, 2))
        x0, x1 = x[..., a].copy(), x[..., b].copy()                         # [T, heads, hd/2]
        x[..., a] = x0 * c - x1 * s
        x[..., b] = x0 * s + x1 * c

    def _qkv(self, L: Layer, h: np.ndarray):
        """Projections of h [T, D] -> q [T, H, hd], k [T, G, hd], v [T, G, hd] with the architecture's biases and
        Q/K RMSNorms (OLMoE: over the whole projection; Qwen3: over each head), before RoPE."""
        cfg, T = self.cfg, h.shape[0]
        out = []
        for w, bias, norm, heads in ((L.attn_q, L.attn_q_bias, L.attn_q_norm, cfg.n_head),
                                     (L.attn_k, L.attn_k_bias, L.attn_k_norm, cfg.n_head_kv),
                                     (L.attn_v, L.attn_v_bias, None, cfg.n_head_kv)):
            y = lin(w, h)                                                   # [T, heads*hd]
            if bias is not None:
                y = y + bias
            if norm is not None and cfg.kind.qk_norm == "all":
                y = rmsnorm(y, norm, cfg.rms_eps)
            y = y.reshape(T, heads, cfg.head_dim)                           # [T, heads, hd]
            if norm is not None and cfg.kind.qk_norm == "head":
                y = rmsnorm(y, norm, cfg.rms_eps)
            out.append(np.ascontiguousarray(y, dtype=np.float32))
        return out

    def _attention(self, il: int, L: Layer, h: np.ndarray, pos: int) -> np.ndarray:
        cfg = self.cfg
        T, H, G, hd = h.shape[0], cfg.n_head, cfg.n_head_kv, cfg.head_dim
        R, N = H // G, pos + h.shape[0]
        if self.observer is not None:
            self.observer.inputs(il, ("attn_q", "attn_k", "attn_v"), h)
        q, k, v = self._qkv(L, h)                                           # [T, H, hd], [T, G, hd], [T, G, hd]
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
        """Router for h [T, D] -> chosen experts [T, A] best first, and their weights [T, A]: the softmax over all
        E experts at the chosen A, renormalised to sum 1 where the architecture does (Mixtral, Qwen3-MoE: the
        softmax over the chosen A), else as they are (Qwen2-MoE, OLMoE)."""
        A = self.cfg.n_expert_used
        r = lin(L.ffn_gate_inp, h)                                          # [T, E] router logits
        top = np.argsort(-r, axis=1, kind="stable")[:, :A]                  # [T, A] chosen experts, best first
        sel = np.take_along_axis(r, top, axis=1)                            # [T, A]
        wt = np.exp(sel - sel[:, :1])                                       # [T, A] exp relative to the best
        if self.cfg.kind.norm_topk:
            wt /= wt.sum(axis=1, keepdims=True)
        else:
            wt /= np.exp(r - sel[:, :1]).sum(axis=1, keepdims=True)         # [T, A] / the sum over all E
        return top, wt

    def _moe(self, il: int, L: Layer, h: np.ndarray, x: np.ndarray, routes: list) -> np.ndarray:
        """The expert FFN for h [T, D] (x [T, D]: the residual it came from, for the next layer's guess)."""
        T = h.shape[0]
        top, wt = self._route(L, h)                                         # [T, A], [T, A]
        routes.append(top)
        if self.observer is not None:
            self.observer.inputs(il, ("ffn_gate_inp",), h)
        cache = self.experts
        # Experts in increasing id (G of them), each owning the assignments gs[g]:gs[g+1] of tok [M] (weights w [M]):
        # each token's sum has one fixed order whatever the cache holds.
        experts, gs, tok, w = sort_assignments(top, wt)                     # [G], [G + 1], [M], [M]
        cache.settle(il, experts)
        if self._guess is not None:                                         # recall of the guess made one layer up
            self.predicted += len(experts)
            self.predicted_right += len(set(self._guess.tolist()) & set(experts.tolist()))
            self._guess = None
        if self.options.overlap:
            cache.want(il, experts)                                         # read the rest while the first computes
        if self.options.prefetch and T == 1 and not cache.holds_all():
            for nl in range(il + 1, min(self.cfg.n_layer, il + 1 + self.prefetch_depth)):
                self._prefetch_next(nl, x)
        if not self.grouped or self.observer is not None:
            return self._moe_per_expert(il, h, top, wt, experts)
        layout, parts, arena = self.layouts[il], self.w.expert_parts[il], cache.arena(il)
        counts = np.diff(gs)                                                # [G] tokens per expert
        Y = np.empty((len(tok), h.shape[1]), np.float32)                    # [M, D] each assignment's expert output
        pending = np.arange(len(experts))                                   # groups not computed yet
        while len(pending):
            if self.options.overlap and len(pending) < len(experts):
                cache.want(il, experts[pending])                            # slots freed by finished experts
            got, at = cache.acquire(il, experts[pending].tolist())         # the resident ones, [n], [n, 3]
            ready = pending[got]
            small = counts[ready] <= layout.max_tokens                      # few tokens: the grouped kernel
            if small.any():
                g = ready[small]
                rows = g if len(g) == len(tok) or T == 1 else np.concatenate([np.arange(gs[i], gs[i + 1]) for i in g])
                sub = np.zeros(len(g) + 1, np.int64)
                np.cumsum(counts[g], out=sub[1:])
                Y[rows] = grouped_ffn(layout, arena, at[small], sub, h, tok[rows])
            for i, o in zip(ready[~small], at[~small]):                     # many tokens: dequantize + sgemm
                gate, up, down = (arena[a:a + p.nbytes].view(p.qt.dtype).reshape(p.qt.storage_shape(p.shape))
                                  for a, p in zip(o, parts))
                Y[gs[i]:gs[i + 1]] = kernels.expert_ffn_batch(parts[0].qt, gate, parts[1].qt, up, parts[2].qt, down,
                                                              np.ascontiguousarray(h[tok[gs[i]:gs[i + 1]]]))
            cache.release(il, experts[ready].tolist())
            pending = np.delete(pending, got)
        return combine(tok, w, Y, np.zeros_like(h))                         # [T, D]

    def _moe_per_expert(self, il: int, h: np.ndarray, top: np.ndarray, wt: np.ndarray, order: np.ndarray) -> np.ndarray:
        """The routed experts one kernel call each (the path before grouping; kept for A/B measurements)."""
        T, cache = h.shape[0], self.experts
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

    def _refining(self, x: np.ndarray) -> bool:
        o = self.options
        return o.prefetch and o.refine and x.shape[0] == 1 and not self.experts.holds_all()

    def _refine_next(self, nl: int, x: np.ndarray) -> None:
        """Guess layer nl's experts again from this layer's output x [1, D] (only nl's attention is missing from
        its router's input now): cancel the first guesses for nl that this one drops, read the ones it adds."""
        Ln = self.w.layers[nl]
        top, _ = self._route(Ln, rmsnorm(x, Ln.ffn_norm, self.cfg.rms_eps))  # [1, A]
        self._guess = top[0]
        self.experts.settle(nl, top[0])
        self.experts.prefetch(nl, top[0])

    @staticmethod
    def _ffn(gate: Weight, up: Weight, down: Weight, h: np.ndarray) -> np.ndarray:
        """down(silu(gate h) * up h) of resident weights for h [T, D] -> [T, D]."""
        (q1, w1), (q3, w3), (q2, w2) = gate, up, down
        if h.shape[0] == 1:
            return kernels.expert_ffn(q1, w1, q3, w3, q2, w2, h[0]).reshape(1, -1)   # [1, D]
        return kernels.expert_ffn_batch(q1, w1, q3, w3, q2, w2, np.ascontiguousarray(h))  # [T, D]

    def _dense_ffn(self, L: Layer, h: np.ndarray) -> np.ndarray:
        if self.observer is not None:
            self.observer.ffn(next(i for i, x in enumerate(self.w.layers) if x is L), None, h, L.ffn_gate, L.ffn_up)
        return self._ffn(L.ffn_gate, L.ffn_up, L.ffn_down, h)                # [T, D]

    def _shared_expert(self, L: Layer, h: np.ndarray) -> np.ndarray:
        """Qwen2-MoE's shared expert for h [T, D]: its FFN scaled by sigmoid(ffn_gate_inp_shexp . h) -> [T, D]."""
        g = 1.0 / (1.0 + np.exp(-(h @ L.ffn_gate_inp_shexp)))              # [T]
        return self._ffn(L.ffn_gate_shexp, L.ffn_up_shexp, L.ffn_down_shexp, h) * g[:, None].astype(np.float32)

    def warm_up(self) -> None:
        """One decode step of token 0 at position 0, run at load as llama.cpp's load runs one: Numba loads a
        kernel's cached machine code on its first call (~50 ms each; the grouped experts, the output head's
        parallel matvec), which would otherwise fall in the first prompt or token. Leaves no trace: the sequence
        stays empty (the KV row it writes is rewritten before any read), the cache's hit and miss counts and the
        prefetch recall are put back; a model whose weights overflow raises later, in its first real step."""
        c = self.experts
        counts = (c.hits, c.misses) if c is not None else None
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                self.forward(np.zeros(1, np.int64), 0, False)
        except NonFiniteError:
            pass
        if c is not None:
            c.hits, c.misses = counts
            c.unpin(0)
        self.predicted = self.predicted_right = 0
        self._guess = None

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
        last = cfg.n_layer - 1
        for il, L in enumerate(self.w.layers):
            h = rmsnorm(x, L.attn_norm, cfg.rms_eps)                        # [T, D]
            x += self._attention(il, L, h, pos)                             # [T, D]
            check_finite(x, il, "attention")
            if il == last and not all_logits and self.trace is None and self.observer is None:
                # only the last token's output is read: the last layer's FFN runs for it alone (llama.cpp's
                # inp_out_ids), a quarter less expert work on a 4-layer prompt (the trace wants every route)
                x = x[-1:]                                                  # [1, D]
            h = rmsnorm(x, L.ffn_norm, cfg.rms_eps)                         # [T, D]
            if not cfg.is_moe:
                x += self._dense_ffn(L, h)                                  # [T, D]
            else:
                x += self._moe(il, L, h, x, routes)                         # [T, D]
                if cfg.n_ff_shexp:
                    x += self._shared_expert(L, h)                          # [T, D]
                if il < last and self._refining(x):
                    self._refine_next(il + 1, x)
            check_finite(x, il, "feed-forward")
        if self.trace is not None and routes:
            self.trace.append(np.stack(routes, axis=1).astype(np.int16))    # [T, L, A]
        if not all_logits:
            x = x[-1:]                                                      # [1, D]
        logits = lin(self.w.output, rmsnorm(x, self.w.output_norm, cfg.rms_eps))  # [T or 1, V]
        check_finite(logits, cfg.n_layer, "output")
        return logits
