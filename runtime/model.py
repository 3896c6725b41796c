"""The network (Mixtral / Mistral / Llama as llama.cpp lays them out in GGUF) and load_model.

Shape legend: T tokens in the batch, D hidden, H query heads, G KV heads, R = H // G
heads per KV head, hd head size, N positions in the KV cache, E experts, A experts
used per token, F FFN size, V vocabulary.

Attributes carry the GGUF tensor names. Resident weights (embeddings, attention,
norms, router, output head) are zero-copy views into the file mapping; experts live
in the ExpertCache and are read only when the router picks them.
"""
from __future__ import annotations

import os

import numpy as np
from gguf import quants

from lazymoe import kernels
from lazymoe.kernels.attention import attend_one
from lazymoe.kernels.qtypes import QType
from lazymoe.format.config import ModelConfig, config_from_metadata
from lazymoe.runtime.expert_cache import ExpertCache, ExpertPart, compile_reader, slot_size
from lazymoe.format.gguf_file import GGUFFile
from lazymoe.runtime.memory import ATTN_CHUNK_FLOATS, MiB, N_BATCH, MemoryPlan, plan_memory, process_baseline
from lazymoe.runtime.tokenizer import Tokenizer

DEFAULT_CTX = 4096


class Layer:
    """One block's resident weights: stored arrays and their types, by GGUF name."""

    def __init__(self, g: GGUFFile, i: int, moe: bool):
        b = f"blk.{i}."
        self.attn_norm = _f32(g, b + "attn_norm.weight")          # [D]
        self.attn_q = _w(g, b + "attn_q.weight")                  # [D, D]  rows permuted for adjacent-pair RoPE
        self.attn_k = _w(g, b + "attn_k.weight")                  # [G*hd, D]  ditto
        self.attn_v = _w(g, b + "attn_v.weight")                  # [G*hd, D]
        self.attn_output = _w(g, b + "attn_output.weight")        # [D, D]
        self.ffn_norm = _f32(g, b + "ffn_norm.weight")            # [D]
        if moe:
            self.ffn_gate_inp = _w(g, b + "ffn_gate_inp.weight")  # [E, D] router
        else:
            self.ffn_gate = _w(g, b + "ffn_gate.weight")          # [F, D]
            self.ffn_up = _w(g, b + "ffn_up.weight")              # [F, D]
            self.ffn_down = _w(g, b + "ffn_down.weight")          # [D, F]


def _w(g: GGUFFile, name: str) -> tuple[QType, np.ndarray]:
    return g.qtype(name), g.tensor(name)


def _f32(g: GGUFFile, name: str) -> np.ndarray:
    qt = g.qtype(name)
    if qt.is_block:
        raise ValueError(f"{g.path}: tensor {name} is {qt.name}; norm weights must be F32 or F16")
    return np.asarray(g.tensor(name), dtype=np.float32)


def lin(w: tuple[QType, np.ndarray], X: np.ndarray) -> np.ndarray:
    """X [T, cols] -> X @ W.T [T, rows]: matvec for one token, matmul for a batch."""
    qt, a = w
    if X.shape[0] == 1:
        return kernels.matvec(qt, a, X[0]).reshape(1, -1)
    return kernels.matmul(qt, a, np.ascontiguousarray(X))


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x [T, D] * w [D] / rms(x) -> [T, D]."""
    ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)    # [T, 1]
    return (x / np.sqrt(ms + np.float32(eps))) * w


def check_tensors(g: GGUFFile, cfg: ModelConfig) -> None:
    """Every tensor the network needs is present, of the expected shape and a supported type."""
    for name, shape in cfg.tensor_shapes().items():
        if name not in g.tensors:
            old = name.replace("_exps.weight", ".0.weight")
            if name.endswith("_exps.weight") and old in g.tensors:
                raise ValueError(f"{g.path}: experts are stored one tensor each ({old}), the pre-2024 layout; "
                                 f"re-convert the model with lazymoe quantize or a recent llama.cpp")
            raise ValueError(f"{g.path}: tensor {name} is missing")
        got = g.tensors[name].shape
        if got != shape:
            raise ValueError(f"{g.path}: tensor {name} has shape {got}, expected {shape}")
        g.qtype(name)


# Prefetch depth when none is given: 2 layers ahead when the cache holds at least this share of the experts,
# else 1. On the 24.5 GiB 8x7B file (benchmarks/RESULTS.md, depth A/B): with 221 of 256 slots (uncapped) two
# layers ahead decoded 1.10x faster (median of 3 paired rounds; 0.96 -> 0.87 s/token); with 113 of 256 (12G cap)
# it was no faster (the reader is busy 93 % already, and more wrong guesses evict more), three layers slower.
DEEP_PREFETCH_SHARE = 0.75


class Model:
    """A loaded model: `logits(ids)`, `generate(prompt, ...)`, `tokenizer`, `stats`, `plan`."""

    def __init__(self, path, ram_budget=None, ctx: int | None = None, progress: bool = True, policy=None,
                 prefetch: bool = True, overlap: bool = True, read: str | None = None, prefetch_depth: int | None = None):
        self.path = os.fspath(path)
        self.file = g = GGUFFile(self.path)
        self.cfg = cfg = config_from_metadata(g.metadata, self.path)
        check_tensors(g, cfg)
        self.tokenizer = Tokenizer.from_gguf_metadata(g.metadata)
        if self.tokenizer.vocab_size != cfg.n_vocab:
            raise ValueError(f"{self.path}: the tokenizer has {self.tokenizer.vocab_size} tokens but the model {cfg.n_vocab}")
        self.chat_template = g.get("tokenizer.chat_template")
        if ctx is None:
            ctx = min(cfg.n_ctx_train, DEFAULT_CTX)
        if isinstance(ctx, bool) or not isinstance(ctx, (int, np.integer)) or not 1 <= ctx <= cfg.n_ctx_train:
            raise ValueError(f"ctx must be a whole number from 1 to the model's context length {cfg.n_ctx_train}, got {ctx!r}")
        self.ctx = int(ctx)
        if prefetch_depth is not None and (isinstance(prefetch_depth, bool) or not isinstance(prefetch_depth, (int, np.integer))
                                           or prefetch_depth < 1):
            raise ValueError(f"prefetch depth must be a whole number of layers >= 1, got {prefetch_depth!r}")

        # Resident weights: views into the mapping.
        self.token_embd = _w(g, "token_embd.weight")                    # [V, D]
        self.output_norm = _f32(g, "output_norm.weight")                # [D]
        self.output = _w(g, "output.weight")                            # [V, D]
        self.layers = [Layer(g, i, cfg.is_moe) for i in range(cfg.n_layer)]

        # Experts: where each one's three matrices start in the file.
        parts, offsets = (), []
        if cfg.is_moe:
            names = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
            parts = tuple(ExpertPart(g.qtype(f"blk.0.{n}.weight"), g.tensors[f"blk.0.{n}.weight"].shape[1:],
                                     g.tensors[f"blk.0.{n}.weight"].nbytes // cfg.n_expert) for n in names)
            for i in range(cfg.n_layer):
                infos = [g.tensors[f"blk.{i}.{n}.weight"] for n in names]
                for n, inf, p in zip(names, infos, parts):
                    if g.qtype(inf.name) != p.qt:
                        raise ValueError(f"{self.path}: tensor {inf.name} is {g.qtype(inf.name).name} but blk.0.{n} is "
                                         f"{p.qt.name}; experts of one kind must share a type")
                offsets.append([[inf.offset + e * p.nbytes for inf, p in zip(infos, parts)] for e in range(cfg.n_expert)])
        expert_names = {f"blk.{i}.{n}.weight" for i in range(cfg.n_layer) for n in
                        ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")} if cfg.is_moe else set()
        self._resident_names = [n for n in cfg.tensor_shapes() if n not in expert_names]

        self._warm_up({self.file.qtype(n) for n in cfg.tensor_shapes()})
        self.plan = self._plan(ram_budget, parts)
        self._touch_resident(progress)

        # State allocated once: KV cache, RoPE tables, the expert pool.
        G, hd = cfg.n_head_kv, cfg.head_dim
        self.k_cache = np.zeros((cfg.n_layer, G, self.ctx, hd), dtype=np.float32)   # [L, G, N, hd]
        self.v_cache = np.zeros((cfg.n_layer, G, self.ctx, hd), dtype=np.float32)   # [L, G, N, hd]
        inv = cfg.rope_theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)        # [hd/2]
        ang = np.arange(self.ctx, dtype=np.float64)[:, None] * inv                   # [N, hd/2]
        self.rope_cos = np.cos(ang).astype(np.float32)                               # [N, hd/2]
        self.rope_sin = np.sin(ang).astype(np.float32)                               # [N, hd/2]
        self.experts = ExpertCache(self.path, parts, offsets, self.plan.n_slots, policy, read) if cfg.is_moe else None
        self.prefetch = bool(prefetch)       # guess layers l+1.. experts during layer l and start reading them
        if prefetch_depth is None:           # auto: see DEEP_PREFETCH_SHARE
            prefetch_depth = 2 if self.plan.n_slots >= DEEP_PREFETCH_SHARE * max(self.plan.n_experts, 1) else 1
        self.prefetch_depth = int(prefetch_depth)   # how many layers ahead
        self.overlap = bool(overlap)         # ask for all of a layer's experts before computing the first
        self.predicted = self.predicted_right = 0   # for prefetch recall: |actual| and |predicted & actual|
        self.trace: list | None = None       # a list to record routes into: one [T, L, A] int16 array per forward
        self._guess = None                   # experts guessed for the next layer, [A]
        self.tokens: list[int] = []          # ids whose K/V are in the cache, in order
        self.stats: dict = {}

    # --- load -------------------------------------------------------------
    def _warm_up(self, qts) -> None:
        """Compile every kernel the model will call, so the baseline includes the JIT."""
        if self.cfg.is_moe:
            compile_reader()
        n = 256
        x, X = np.ones(n, np.float32), np.ones((2, n), np.float32)
        for qt in qts:
            w = np.zeros(qt.storage_shape((n, n)), qt.dtype)
            kernels.matvec(qt, w, x)
            kernels.matmul(qt, w, X)
            kernels.expert_ffn(qt, w, qt, w, qt, w, x)
            kernels.expert_ffn_batch(qt, w, qt, w, qt, w, X)
        kv = np.zeros((1, 2, 8), np.float32)
        attend_one(np.ones((2, 8), np.float32), kv, kv, 2, np.float32(1.0), np.empty((2, 8), np.float32))

    def _plan(self, ram_budget, parts) -> MemoryPlan:
        resident = sum(self.file.tensors[n].nbytes for n in self._resident_names)
        slot = slot_size(parts) if parts else 0
        return plan_memory(self.cfg, resident, slot, self.ctx, ram_budget, process_baseline(), self.path)

    def _touch_resident(self, progress: bool) -> None:
        """Fault in every resident tensor once (sequential reads beat faults during the first token)."""
        from tqdm import tqdm
        import mmap
        total = sum(self.file.tensors[n].nbytes for n in self._resident_names)
        page = mmap.PAGESIZE
        with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress,
                  leave=False) as bar:
            for n in self._resident_names:
                t = self.file.tensors[n]
                self.file.madvise(t.offset, t.nbytes, mmap.MADV_WILLNEED)
                for a in range(0, t.nbytes, 64 * MiB):
                    raw = self.file.data[t.offset + a:t.offset + min(t.nbytes, a + 64 * MiB)]
                    int(raw[::page].sum())
                    bar.update(len(raw))

    # --- the network --------------------------------------------------------
    def _embed(self, ids: np.ndarray) -> np.ndarray:
        qt, w = self.token_embd
        rows = w[ids]                                                       # [T, row_bytes] or [T, D]
        if qt.is_block:
            return quants.dequantize(rows, qt.ggml).astype(np.float32).reshape(len(ids), self.cfg.n_embd)
        return rows.astype(np.float32)                                      # [T, D]

    def _rope(self, x: np.ndarray, pos: int) -> None:
        """Rotate adjacent pairs (2i, 2i+1) of x [T, heads, hd] in place for positions pos.."""
        T = x.shape[0]
        c = self.rope_cos[pos:pos + T, None, :]                             # [T, 1, hd/2]
        s = self.rope_sin[pos:pos + T, None, :]                             # [T, 1, hd/2]
        x0, x1 = x[..., 0::2].copy(), x[..., 1::2].copy()                   # [T, heads, hd/2]
        x[..., 0::2] = x0 * c - x1 * s
        x[..., 1::2] = x0 * s + x1 * c

    def _attention(self, il: int, L: Layer, h: np.ndarray, pos: int) -> np.ndarray:
        cfg = self.cfg
        T, H, G, hd = h.shape[0], cfg.n_head, cfg.n_head_kv, cfg.head_dim
        R, N = H // G, pos + h.shape[0]
        q = lin(L.attn_q, h).reshape(T, H, hd)                              # [T, H, hd]
        k = lin(L.attn_k, h).reshape(T, G, hd)                              # [T, G, hd]
        v = lin(L.attn_v, h).reshape(T, G, hd)                              # [T, G, hd]
        self._rope(q, pos)
        self._rope(k, pos)
        self.k_cache[il, :, pos:N] = k.transpose(1, 0, 2)                   # [G, T, hd]
        self.v_cache[il, :, pos:N] = v.transpose(1, 0, 2)                   # [G, T, hd]
        scale = np.float32(1.0 / np.sqrt(hd))
        if T == 1:                                                          # decoding: one Numba pass
            out1 = np.empty((H, hd), dtype=np.float32)                      # [H, hd]
            attend_one(q[0], self.k_cache[il], self.v_cache[il], N, scale, out1)
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
            s = qc @ self.k_cache[il, g0:g1, :N].transpose(0, 2, 1)         # [g, R*T, N]
            s *= scale
            s.reshape(g1 - g0, R, T, N)[...] += mask
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            out[g0:g1] = (s @ self.v_cache[il, g0:g1, :N]).reshape(g1 - g0, R, T, hd)
        out = out.transpose(2, 0, 1, 3)                                     # [T, G, R, hd] = [T, H, hd]
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
        cache = self.experts
        # Experts in increasing id, so each token's sum has one fixed order whatever the cache holds.
        order = np.unique(top)                                              # [<=E]
        cache.settle(il, order)
        if self._guess is not None:                                         # recall of the guess made one layer up
            self.predicted += len(order)
            self.predicted_right += len(set(self._guess.tolist()) & set(order.tolist()))
            self._guess = None
        if self.overlap:
            cache.want(il, order)                                           # read the rest while the first computes
        if self.prefetch and T == 1:
            for nl in range(il + 1, min(self.cfg.n_layer, il + 1 + self.prefetch_depth)):
                self._prefetch_next(nl, x)
        p = cache.parts
        out = np.zeros_like(h)                                              # [T, D]
        for i, e in enumerate(order):
            if self.overlap and i:
                cache.want(il, order[i:])                                   # slots freed by finished experts
            gate, up, down = cache.get(il, int(e))
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
        Ln = self.layers[nl]
        top, _ = self._route(Ln, rmsnorm(x, Ln.ffn_norm, self.cfg.rms_eps))  # [1, A]
        if self._guess is None:
            self._guess = top[0]
        self.experts.prefetch(nl, top[0])

    def _dense_ffn(self, L: Layer, h: np.ndarray) -> np.ndarray:
        (q1, w1), (q3, w3), (q2, w2) = L.ffn_gate, L.ffn_up, L.ffn_down
        if h.shape[0] == 1:
            return kernels.expert_ffn(q1, w1, q3, w3, q2, w2, h[0]).reshape(1, -1)   # [1, D]
        return kernels.expert_ffn_batch(q1, w1, q3, w3, q2, w2, np.ascontiguousarray(h))  # [T, D]

    def _forward(self, ids: np.ndarray, pos: int, all_logits: bool) -> np.ndarray:
        """Run ids [T] at positions pos.. through the network, filling the KV cache.
        Returns logits [T, V] (all_logits) or [1, V] for the last token."""
        cfg = self.cfg
        x = self._embed(ids)                                                # [T, D]
        routes: list = []                                                   # per layer [T, A]
        self._guess = None
        if self.experts is not None:
            self.experts.unpin(0)                                           # nothing in use between forwards
        for il, L in enumerate(self.layers):
            h = rmsnorm(x, L.attn_norm, cfg.rms_eps)                        # [T, D]
            x += self._attention(il, L, h, pos)                             # [T, D]
            h = rmsnorm(x, L.ffn_norm, cfg.rms_eps)                         # [T, D]
            x += self._moe(il, L, h, x, routes) if cfg.is_moe else self._dense_ffn(L, h)  # [T, D]
        if self.trace is not None and routes:
            self.trace.append(np.stack(routes, axis=1).astype(np.int16))    # [T, L, A]
        if not all_logits:
            x = x[-1:]                                                      # [1, D]
        return lin(self.output, rmsnorm(x, self.output_norm, cfg.rms_eps))  # [T or 1, V]

    # --- sequence state ----------------------------------------------------
    def check_ids(self, ids) -> np.ndarray:
        a = np.asarray(ids)
        if a.ndim != 1 or a.size == 0:
            raise ValueError("the token sequence is empty" if a.size == 0 else "token ids must be a flat sequence")
        if not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= self.cfg.n_vocab:
            raise ValueError(f"token ids must be whole numbers from 0 to {self.cfg.n_vocab - 1}")
        return a.astype(np.int64)

    def rewind(self, n: int) -> None:
        """Keep only the first n tokens of the KV cache."""
        del self.tokens[n:]

    def eval(self, ids, all_logits: bool = False) -> np.ndarray:
        """Append ids to the sequence in the KV cache; logits [T, V] (all_logits) or [V] of the last token."""
        a = self.check_ids(ids)
        pos = len(self.tokens)
        if pos + len(a) > self.ctx:
            raise ValueError(f"{pos + len(a)} tokens do not fit the context of {self.ctx} tokens")
        outs = []
        for c in range(0, len(a), N_BATCH):
            chunk = a[c:c + N_BATCH]
            last = c + N_BATCH >= len(a)
            if all_logits or last:
                outs.append(self._forward(chunk, pos + c, all_logits))
            else:
                self._forward(chunk, pos + c, False)
        self.tokens.extend(int(t) for t in a)
        return np.concatenate(outs) if all_logits else outs[-1][0]

    def logits(self, token_ids) -> np.ndarray:
        """float32 logits [T, V] for token_ids as a fresh sequence (the KV cache is reset)."""
        self.rewind(0)
        return self.eval(token_ids, all_logits=True)

    def generate(self, prompt, max_tokens: int = 128, temperature: float = 0.0, seed: int | None = None,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0, stop=(),
                 reuse: bool = False):
        """Yield text pieces continuing `prompt` (text, or a list of token ids) as they are decoded.
        Greedy by default. reuse=True keeps the longest prefix already in the KV cache (chat turns).
        Stats land in `self.stats` and the new ids in `self.generated_ids` when the generator ends."""
        from lazymoe.runtime.generate import generate
        from lazymoe.runtime.sampling import Sampler
        sampler = Sampler(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            ids = self.tokenizer.encode(prompt, bos=True)
        else:
            ids = list(prompt)
        self.check_ids(ids)
        return generate(self, ids, sampler, max_tokens, stop, reuse=reuse)

    def close(self) -> None:
        if self.experts is not None:
            self.experts.close()


def load_model(path, ram_budget=None, ctx: int | None = None, progress: bool = True, policy=None,
               prefetch: bool = True, overlap: bool = True, read: str | None = None,
               prefetch_depth: int | None = None) -> Model:
    """Open a GGUF model within `ram_budget` (bytes or "8G"; default: available RAM minus a reserve, see
    memory.default_budget) with a KV cache of `ctx` tokens. Expert cache: `policy` "lru" | "lfu" | "layer"
    (default); `prefetch` guesses the experts of the next `prefetch_depth` layers (None: see
    DEEP_PREFETCH_SHARE); `overlap` reads a layer's experts while the first computes; `read` "auto" (default) |
    "direct" (O_DIRECT) | "buffered". ValueError with one sentence for any bad input."""
    return Model(path, ram_budget=ram_budget, ctx=ctx, progress=progress, policy=policy, prefetch=prefetch,
                 overlap=overlap, read=read, prefetch_depth=prefetch_depth)
