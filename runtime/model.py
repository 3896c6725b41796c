"""load_model and Model: open a GGUF, check it, plan the RAM budget, and run the network on it.

A Model is four parts built once by the loader: Weights (views into the file mapping), the ExpertCache (a
budgeted pool of expert slots), the RunState (KV cache, RoPE tables, the ids in the cache) and the Network
(the forward pass over them). Generation returns its results as values (runtime/generate.py).
"""
from __future__ import annotations

import mmap
import os

import numpy as np

from lazymoe import kernels
from lazymoe.format.checks import whole_number
from lazymoe.format.config import config_from_metadata
from lazymoe.format.gguf_file import GGUFFile
from lazymoe.format.metadata import meta
from lazymoe.kernels.attention import attend_one
from lazymoe.kernels.dispatch import INT_MATMUL_MAX_TOKENS, KTILE_MAX_TOKENS
from lazymoe.kernels.grouped import SERIAL_MAX, combine
from lazymoe.runtime.expert_cache import CacheOptions, ExpertCache, cache_options, compile_reader
from lazymoe.runtime.memory import N_BATCH, MemoryPlan, MiB, plan_memory, process_baseline
from lazymoe.runtime.network import Network, NonFiniteError, prefetch_depth
from lazymoe.runtime.state import RunState
from lazymoe.runtime.tokenizer import Tokenizer, load_tokenizer
from lazymoe.runtime.weights import Weights

DEFAULT_CTX = 4096


class Model:
    """A loaded model: `logits(ids)`, `generate(prompt, ...)` (text pieces), `stream_generate(prompt, ...)`
    (step records), `tokenizer`, `stats` (of the last finished generation), `plan`, `close()`."""

    def __init__(self, path, file: GGUFFile, cfg, tokenizer: Tokenizer, weights: Weights, plan: MemoryPlan,
                 state: RunState, experts: ExpertCache | None, net: Network):
        self.path, self.file, self.cfg, self.tokenizer = path, file, cfg, tokenizer
        self.weights, self.plan, self.state, self.experts, self.net = weights, plan, state, experts, net
        self.chat_template = meta(file.metadata, "tokenizer.chat_template", path, None)
        self.ctx = state.ctx
        self.stats: dict = {}

    # --- the sequence in the KV cache ------------------------------------------------
    @property
    def tokens(self) -> list[int]:
        """Ids whose K/V are in the cache, in order."""
        return self.state.tokens

    def check_ids(self, ids) -> np.ndarray:
        a = np.asarray(ids)
        if a.ndim != 1 or a.size == 0:
            raise ValueError("the token sequence is empty" if a.size == 0 else "token ids must be a flat sequence")
        if not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= self.cfg.n_vocab:
            raise ValueError(f"token ids must be whole numbers from 0 to {self.cfg.n_vocab - 1}")
        return a.astype(np.int64)

    def rewind(self, n: int) -> None:
        """Keep only the first n tokens of the KV cache."""
        self.state.rewind(n)

    def eval(self, ids, all_logits: bool = False) -> np.ndarray:
        """Append ids to the sequence in the KV cache; logits [T, V] (all_logits) or [V] of the last token."""
        a = self.check_ids(ids)
        pos = len(self.state.tokens)
        if pos + len(a) > self.ctx:
            raise ValueError(f"{pos + len(a)} tokens do not fit the context of {self.ctx} tokens")
        outs = []
        try:
            with np.errstate(over="ignore", invalid="ignore"):      # non-finite values are checked per layer
                for c in range(0, len(a), N_BATCH):
                    chunk = a[c:c + N_BATCH]
                    last = c + N_BATCH >= len(a)
                    if all_logits or last:
                        outs.append(self.net.forward(chunk, pos + c, all_logits))
                    else:
                        self.net.forward(chunk, pos + c, False)
        except NonFiniteError as e:
            raise NonFiniteError(f"{self.path}: {e}") from None
        self.state.tokens.extend(int(t) for t in a)
        return np.concatenate(outs) if all_logits else outs[-1][0]

    def logits(self, token_ids) -> np.ndarray:
        """float32 logits [T, V] for token_ids as a fresh sequence (the KV cache is reset)."""
        self.rewind(0)
        return self.eval(token_ids, all_logits=True)

    # --- generation ---------------------------------------------------------------
    def prompt_ids(self, prompt) -> list[int]:
        """Token ids of a prompt given as text (BOS first) or as ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            return self.tokenizer.encode(prompt, bos=True)
        return [int(t) for t in self.check_ids(list(prompt))]

    def stream_generate(self, prompt, max_tokens: int = 128, temperature: float = 0.0, seed: int | None = None,
                        top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0,
                        stop=(), reuse: bool = False, frequency_penalty: float = 0.0, presence_penalty: float = 0.0):
        """Check the request, then return a generator of generate.Step records (token id, text piece, running
        stats, finish_reason on the last) continuing `prompt` (text, or token ids). Greedy by default.
        reuse=True keeps the longest prefix already in the KV cache (chat turns)."""
        from lazymoe.runtime.generate import stream_generate
        from lazymoe.runtime.sampling import Sampler
        sampler = Sampler(temperature, top_k, top_p, min_p, repeat_penalty, seed, frequency_penalty, presence_penalty)
        return stream_generate(self, self.prompt_ids(prompt), sampler, max_tokens, stop, reuse=reuse)

    def generate(self, prompt, **options):
        """Yield text pieces continuing `prompt` as they are decoded (options as stream_generate's); when the
        generator ends, `stats` holds the generation's figures."""
        steps = self.stream_generate(prompt, **options)
        return self._pieces(steps)

    def _pieces(self, steps):
        for step in steps:
            if step.finish_reason is not None:
                self.stats = step.stats
            if step.text:
                yield step.text

    def close(self) -> None:
        if self.experts is not None:
            self.experts.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- the loader -------------------------------------------------------------------------

def _warm_up(types, moe: bool, resident_ffn: bool) -> None:
    """Compile every kernel the model will call, so the measured baseline includes the JIT. resident_ffn: an FFN
    runs on resident (read-only) weights: a dense model's, or a shared expert's."""
    if moe:
        compile_reader()
        Y = np.zeros((2, SERIAL_MAX // 2 + 1), np.float32)          # over SERIAL_MAX: a prompt's parallel combine
        combine(np.zeros(2, np.int64), np.ones(2, np.float32), Y, np.zeros((1, Y.shape[1]), np.float32))
    n = 256
    x = np.ones(n, np.float32)
    # 2 tokens take the integer row dots and tiles; past the tiles' limit, a prompt's busy experts and its
    # projections take dequantize + sgemm (another kernel, first met in a long prompt)
    many = np.ones((max(INT_MATMUL_MAX_TOKENS, KTILE_MAX_TOKENS) + 1, n), np.float32)
    for qt in types:
        # Numba compiles read-only and writable arrays apart: resident weights are read-only views of the file
        # mapping, experts sit in writable cache slots (a variant first met in the prompt put ~11 s of JIT into
        # a cold first token)
        w = np.zeros(qt.storage_shape((n, n)), qt.dtype)
        ro = w.copy()
        ro.setflags(write=False)
        kernels.matvec(qt, ro, x)
        for X in (many[:2], many):
            kernels.matmul(qt, ro, X)
        for e in ([w] if moe else []) + ([ro] if resident_ffn else []):
            kernels.expert_ffn(qt, e, qt, e, qt, e, x)
            for X in (many[:2], many):
                kernels.expert_ffn_batch(qt, e, qt, e, qt, e, X)
    kv = np.zeros((1, 2, 8), np.float32)
    attend_one(np.ones((2, 8), np.float32), kv, kv, 2, np.float32(1.0), np.empty((2, 8), np.float32))


def _touch_resident(g: GGUFFile, names, progress: bool) -> None:
    """Fault in every resident tensor once (sequential reads beat faults during the first token)."""
    from tqdm import tqdm
    total = sum(g.tensors[n].nbytes for n in names)
    page = mmap.PAGESIZE
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress,
              leave=False) as bar:
        for n in names:
            t = g.tensors[n]
            g.madvise(t.offset, t.nbytes, mmap.MADV_WILLNEED)
            for a in range(0, t.nbytes, 64 * MiB):
                raw = g.data[t.offset + a:t.offset + min(t.nbytes, a + 64 * MiB)]
                int(raw[::page].sum())
                bar.update(len(raw))


def _preload_experts(experts: ExpertCache, n_layer: int, progress: bool) -> bool:
    """Read every expert into its slot at load when the budget holds them all (as llama.cpp's load touches the
    weights it maps): otherwise the prompt and the first decode steps of a fresh process wait for the reads."""
    if not experts.fits_all():
        return False
    from tqdm import tqdm
    with tqdm(total=n_layer, unit="layer", desc="loading experts", disable=not progress, leave=False) as bar:
        return experts.preload(lambda layer: bar.update(1))


def load_model(path, ram_budget=None, ctx: int | None = None, progress: bool = True,
               cache: CacheOptions | None = None, **cache_changes) -> Model:
    """Open a GGUF model within `ram_budget` (bytes or "8G"; default: available RAM minus a reserve, see
    memory.default_budget) with a KV cache of `ctx` tokens (default: the model's, at most 4096). `cache`
    holds the expert-cache options (runtime.expert_cache.CacheOptions: policy, read, prefetch,
    prefetch_depth, overlap); keyword arguments of those names override single fields. ValueError with one
    sentence for any bad input."""
    options = cache_options(cache, **cache_changes)
    path = os.fspath(path)
    g = GGUFFile(path)
    experts = None
    try:
        cfg = config_from_metadata(g.metadata, path, g.tensors)
        weights = Weights(g, cfg)
        tokenizer = load_tokenizer(g.metadata, path)
        meta(g.metadata, "tokenizer.chat_template", path, None)
        if tokenizer.vocab_size != cfg.n_vocab:
            raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model {cfg.n_vocab}")
        ctx = min(cfg.n_ctx_train, DEFAULT_CTX) if ctx is None else whole_number(
            ctx, "ctx", 1, cfg.n_ctx_train, hint=" (the model's context length)")
        _warm_up(weights.types, cfg.is_moe, not cfg.is_moe or cfg.n_ff_shexp > 0)
        plan = plan_memory(cfg, weights.resident_bytes, weights.slot_sizes, ctx, ram_budget, process_baseline(), path)
        _touch_resident(g, weights.resident_names, progress)
        state = RunState(cfg, ctx)
        experts = (ExpertCache(path, weights.expert_parts, weights.expert_offsets, [n for _, _, n in plan.slots], options.policy,
                               options.read) if cfg.is_moe else None)
        preloaded = experts is not None and _preload_experts(experts, cfg.n_layer, progress)
        net = Network(cfg, weights, state, experts, options, prefetch_depth(options, plan.n_slots, plan.n_experts))
        if experts is None or preloaded:       # out of RAM the warm-up step would read experts: not at load
            net.warm_up()
    except BaseException:
        if experts is not None:
            experts.close()
        g.close()
        raise
    return Model(path, g, cfg, tokenizer, weights, plan, state, experts, net)
