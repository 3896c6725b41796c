"""The fixed workload every benchmark gives a model: what the model is (read without loading it) and a
prompt of exactly P tokens built from the model's own vocabulary."""
from __future__ import annotations

import os

WORD_STRIDE = 7919        # a prime: visits every id of any vocabulary it does not divide
RANDOM_NOTE = ("random weights: routing is not a trained model's, so these hit rates do not predict one "
               "(see benchmarks/RESULTS.md)")


def bench_prompt(tok, n_tokens: int) -> tuple[str, list[int]]:
    """(text, ids): text that encodes to exactly n_tokens ids, BOS first, made of whole-word pieces of the
    tokenizer's own vocabulary taken in a fixed order. Deterministic for a given vocabulary."""
    from lazymoe.format.tokens import NORMAL
    from lazymoe.runtime.tokenizer import SPACE
    if n_tokens < 2:
        raise ValueError(f"the prompt needs at least 2 tokens (BOS and one word), got {n_tokens}")
    V = tok.vocab_size
    order = range(V) if V % WORD_STRIDE == 0 else ((k * WORD_STRIDE + 1) % V for k in range(V))
    words = []
    for i in order:
        p = tok.pieces[i]
        w = p[1:]
        if tok.types[i] == NORMAL and p.startswith(SPACE) and w.isascii() and w.isalpha() and tok.encode(w, bos=False) == [i]:
            words.append(w)
            if len(words) == n_tokens - 1:
                break
    if not words:
        raise ValueError("the vocabulary has no whole-word pieces to build a benchmark prompt from")
    text = " ".join(words[k % len(words)] for k in range(n_tokens - 1))
    ids = tok.encode(text, bos=True)
    if len(ids) != n_tokens:
        raise ValueError(f"could not build a prompt of exactly {n_tokens} tokens from this vocabulary (got {len(ids)})")
    return text, ids


def model_facts(path: str, ctx: int) -> dict:
    """What the parent needs without loading the model: tokenizer, name, smallest budget, whether synthetic."""
    from lazymoe.format.config import config_from_metadata
    from lazymoe.format.gguf_file import GGUFFile
    from lazymoe.runtime.memory import min_budget
    from lazymoe.runtime.tokenizer import Tokenizer
    from lazymoe.runtime.weights import model_sizes
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such model file")
    with GGUFFile(path) as f:           # closed before any run: a live mapping would pin pages in the cache
        cfg = config_from_metadata(f.metadata, path)
        tok = Tokenizer.from_gguf_metadata(f.metadata)
        name = str(f.get("general.name", "") or "")
        sizes = model_sizes(f, cfg)
    return {"cfg": cfg, "tokenizer": tok, "name": name, "synthetic": "random weights" in name,
            "file_bytes": os.path.getsize(path), **sizes,
            "min_budget_bytes": min_budget(cfg, sizes["resident_bytes"], sizes["expert_slot_sizes"], ctx)}
