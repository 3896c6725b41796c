"""`lazymoe imatrix`: an importance matrix computed with lazymoe's runtime, in llama-imatrix's GGUF format.

As llama-imatrix (tools/imatrix/imatrix.cpp) does: the text is tokenized with BOS, cut into chunks of --ctx
tokens (each chunk's first token replaced by BOS), and each chunk runs as one sequence; for every weight
matrix the sum over tokens of each input column's square is kept with the number of tokens, per expert for
the merged expert tensors (the tokens routed to it). The router's input is recorded as llama-imatrix records
it; the output head is not (its --process-output is off by default). Perplexity is reported over each chunk's
second half, as llama-imatrix prints it.
"""
from __future__ import annotations

import numpy as np


class Collector:
    """The Network's observer: sums[name] float64 [n_mat, cols] of x^2 and counts[name] [n_mat] tokens."""

    def __init__(self, n_expert: int):
        self.n_expert = n_expert
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}

    def _add(self, name: str, n_mat: int, m: int, sq: np.ndarray, n: int) -> None:
        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, sq.shape[0]), np.float64)
            self.counts[name] = np.zeros(n_mat, np.int64)
        self.sums[name][m] += sq
        self.counts[name][m] += n

    def inputs(self, il: int, names, X: np.ndarray) -> None:
        """X [T, cols]: the input of layer il's matrices `names` (one product each)."""
        sq = np.square(X, dtype=np.float64).sum(axis=0)                      # [cols]
        for n in names:
            self._add(f"blk.{il}.{n}.weight", 1, 0, sq, len(X))

    def ffn(self, il: int, expert, X: np.ndarray, gate, up) -> None:
        """X [t, D]: the tokens of one FFN (expert e of layer il, or its dense FFN when expert is None); the
        down projection's input silu(X gate^T) * (X up^T) [t, F] is recomputed here from gate and up."""
        from lazymoe.runtime.network import lin
        if len(X) == 0:
            return
        X = np.ascontiguousarray(X, dtype=np.float32)
        g = lin(gate, X)                                                     # [t, F]
        act = g / (np.float32(1.0) + np.exp(-g)) * lin(up, X)                # [t, F]
        sx, sa = np.square(X, dtype=np.float64).sum(axis=0), np.square(act, dtype=np.float64).sum(axis=0)
        n_mat, m, suffix = (1, 0, "") if expert is None else (self.n_expert, expert, "_exps")
        for kind, sq in (("ffn_gate", sx), ("ffn_up", sx), ("ffn_down", sa)):
            self._add(f"blk.{il}.{kind}{suffix}.weight", n_mat, m, sq, len(X))


def add_imatrix_parser(sub) -> None:
    p = sub.add_parser("imatrix", help="compute an importance matrix (llama-imatrix's GGUF format) for --imatrix",
                       description="Run MODEL over a text and write, for every weight matrix, the sums of its "
                                   "inputs' squares per column (per expert for the experts) as llama-imatrix "
                                   "does, in its GGUF format: `lazymoe quantize --imatrix` and llama-quantize read it.")
    p.add_argument("model", help="a GGUF model lazymoe runs (any type; F32/F16 gives the truest activations)")
    p.add_argument("--text", required=True, metavar="FILE", help="calibration text (UTF-8)")
    p.add_argument("-o", "--output", required=True, help="output imatrix file (.gguf)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512, as llama-imatrix)")
    p.add_argument("--chunks", type=int, default=None, help="at most this many chunks (default: all of the text)")
    p.add_argument("--ram", default=None, help="RAM budget for the model (default: what is available)")
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_imatrix)


def compute_imatrix(model_path: str, text_path: str, out: str, ctx: int = 512, chunks: int | None = None,
                    ram=None, force: bool = False, progress: bool = True) -> str:
    """Write the importance matrix of `model_path` over the text file to `out`; returns the summary line."""
    import os

    from tqdm import tqdm

    from lazymoe import load_model
    from lazymoe.format.checks import read_regular
    from lazymoe.quantize.convert import _check_writable
    from lazymoe.quantize.imatrix import write_imatrix

    if ctx < 2:
        raise ValueError(f"--ctx must be at least 2 tokens, got {ctx}")
    if chunks is not None and chunks < 1:
        raise ValueError(f"--chunks must be at least 1, got {chunks}")
    out = _check_writable(out, force)
    try:
        text = read_regular(text_path).decode("utf-8")
    except OSError as e:
        raise ValueError(f"{text_path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{text_path}: not UTF-8 text (byte {e.start})") from None
    model = load_model(model_path, ram_budget=ram, ctx=ctx, progress=progress)
    try:
        tok = model.tokenizer
        ids = tok.encode(text, bos=True)
        n = len(ids) // ctx if chunks is None else min(chunks, len(ids) // ctx)
        if n < 1:
            raise ValueError(f"{text_path}: {len(ids)} tokens, fewer than one chunk of --ctx {ctx}")
        col = Collector(model.cfg.n_expert)
        model.net.observer = col
        nll, count = 0.0, 0
        try:
            for c in tqdm(range(n), unit="chunk", desc="imatrix", disable=not progress):
                chunk = np.asarray(ids[c * ctx:(c + 1) * ctx], dtype=np.int64)
                chunk[0] = tok.bos_id
                logits = model.logits(chunk).astype(np.float64)              # [ctx, V]
                first = ctx // 2
                z = logits[first:-1]
                z = z - z.max(axis=1, keepdims=True)
                lp = z[np.arange(len(z)), chunk[first + 1:]] - np.log(np.exp(z).sum(axis=1))
                nll -= float(lp.sum())
                count += len(z)
        finally:
            model.net.observer = None
    finally:
        model.close()
    write_imatrix(out, col.sums, col.counts, [text_path], n, ctx)
    return (f"wrote {out}: {len(col.sums)} entries from {n} chunks of {ctx} tokens of {os.path.basename(text_path)}, "
            f"perplexity {np.exp(nll / max(count, 1)):.4f} over the chunks' second halves")


def _imatrix(args) -> int:
    print(compute_imatrix(args.model, args.text, args.output, args.ctx, args.chunks, args.ram, args.force,
                          not args.quiet))
    return 0
