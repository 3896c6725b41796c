"""A layer's routed experts in one call: out [T, D] += sum over a token's experts of w * W2 (silu(W1 x) * (W3 x)).

Fine-grained MoE (Qwen3-30B-A3B: 8 of 128 experts of 2048 x 768 in each of 48 layers) makes hundreds of small
expert calls per token; one call per expert pays Python, validation and two parallel regions each time. Here
the experts of one layer (or those of them already in the cache) are one Numba call, as mlx-lm's SwitchGLU
sorts tokens by expert: the M = T x A (token, expert) assignments are sorted by expert, so expert g owns the
assignments [gs[g], gs[g + 1]), and its tokens are gathered contiguously for the row tiles.

Shapes: T tokens, D hidden, F expert FFN width, G experts in the call, M assignments.
The experts live in one uint8 arena (an expert-cache pool, or the file mapping): offs [G, 3] are the byte
offsets of expert g's gate [F, D], up [F, D] and down [D, F] in it. Every expert of the call has the same three
types (a layer's merged tensors have one type each); spec [3, SPEC] holds per matrix its type code, its
activation scheme (SCHEMES), that scheme's block and sums, whether the type has token tiles, and its row bytes.
Each expert's output row Y[m] does not depend on which experts share the call or on the thread split, and
`combine` adds them per token in assignment order, so the sum is the same whatever the cache held.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from .activations import FLOAT, Q8, Q8_K, quantize_q8
from .blocks import row_dot, row_tile, rows_dot
from .dispatch import int_path, resolve
from .kquant import quantize_q8_k
from .matvec import split

SCHEMES = {FLOAT.name: 0, Q8.name: 1, Q8_K.name: 2}     # activation scheme -> the code the kernel switches on
CODE, SCHEME, BLOCK, SUMS, TILES, ROW_BYTES, SPEC = range(7)   # columns of spec [3, SPEC]
# Below this many weights x assignments a stage runs in the calling thread (dispatch.PARALLEL_MIN_WEIGHTS' reason)
SERIAL_MAX = 1 << 16
# Past the integer paths' token limits (dispatch.int_path) an expert's tokens are better served by dequantize +
# sgemm (ffn.expert_ffn_batch): the caller sends only experts with at most GroupLayout.max_tokens tokens here.
MAX_TOKENS = 64


@njit(cache=True)
def _quantize(scheme, x, xq, xd, xc):
    if scheme == 1:
        quantize_q8(x, xq, xd, xc)
    elif scheme == 2:
        quantize_q8_k(x, xq, xd, xc)


@njit(cache=True)
def _act_buffers(spec_row, M, C):
    """Empty (xq [M, C], xd [M, C/block], xc [M, C/block * sums], xct [C/block * sums, M + 3]); zero-size for floats."""
    b, s = spec_row[BLOCK], spec_row[SUMS]
    nb = C // b if b > 0 else 0
    return (np.empty((M, C if b > 0 else 0), np.int8), np.empty((M, nb), np.float32),
            np.empty((M, nb * s), np.float32), np.zeros((nb * s, M + 3), np.float32))


@njit(cache=True)
def _transpose_sums(xc, xct):
    for m in range(xc.shape[0]):
        for b in range(xc.shape[1]):
            xct[b, m] = xc[m, b]


@njit(cache=True)
def _group_rows(spec_row, w, X, xq, xd, xc, xct, Y, s, e, r0, r1):
    """Y[m, r] = row r of w (a matrix of spec_row's type at the start of w) times token m, m in [s, e), r in [r0, r1)."""
    code, rb = spec_row[CODE], spec_row[ROW_BYTES]
    if e - s == 1:                                           # one token (decoding): the switch on code once per call
        rows_dot(code, w, rb, X[s], xq[s], xd[s], xc[s], Y[s], r0, r1)
        return
    tiles = spec_row[TILES] != 0
    for r in range(r0, r1):
        o = r * rb
        k = s
        while tiles and k + 4 <= e:                          # kk = 4 a constant: LLVM folds the tile's switch on kk
            t = row_tile(code, w, o, xq, xd, xc, xct, k, 4)
            Y[k, r], Y[k + 1, r], Y[k + 2, r], Y[k + 3, r] = t
            k += 4
        if tiles and k < e:
            t = row_tile(code, w, o, xq, xd, xc, xct, k, e - k)
            for j in range(e - k):
                Y[k + j, r] = t[j]
            k = e
        for j in range(k, e):
            Y[j, r] = row_dot(code, w, o, X[j], xq[j], xd[j], xc[j])


@njit(cache=True, fastmath=True, inline="always")
def _silu_mul(g, u):
    return g / (np.float32(1.0) + np.exp(-g)) * u


@njit(parallel=True, cache=True)
def grouped_kernel(spec, arena, offs, gs, X, tok, F, Y, nt):
    """Y [M, D]: row m = W2_g (silu(W1_g x) * (W3_g x)) for x = X[tok[m]] (X [T, D]) and g the expert owning m.

    spec int64 [3, SPEC]; arena uint8 [bytes]; offs int64 [G, 3]; gs int64 [G + 1]; tok int64 [M]."""
    G, M, D = offs.shape[0], tok.shape[0], X.shape[1]
    n1, n3, n2 = F * spec[0, ROW_BYTES], F * spec[1, ROW_BYTES], D * spec[2, ROW_BYTES]
    # tokens quantized once per scheme, then gathered in assignment order
    Xs = np.empty((M, D), np.float32)                        # [M, D]
    for m in range(M):
        Xs[m] = X[tok[m]]
    acts = []
    for i in range(2):
        xq, xd, xc, xct = _act_buffers(spec[i], M, D)
        if spec[i, SCHEME] != 0:
            if i == 1 and spec[1, SCHEME] == spec[0, SCHEME]:
                xq, xd, xc, xct = acts[0]
            else:
                q0, d0, c0, _ = _act_buffers(spec[i], X.shape[0], D)
                for t in range(X.shape[0]):
                    _quantize(spec[i, SCHEME], X[t], q0[t], d0[t], c0[t])
                for m in range(M):
                    xq[m], xd[m], xc[m] = q0[tok[m]], d0[tok[m]], c0[tok[m]]
                _transpose_sums(xc, xct)
        acts.append((xq, xd, xc, xct))
    (q1, d1, c1, t1), (q3, d3, c3, t3) = acts[0], acts[1]
    H = np.empty((M, F), np.float32)                         # [M, F] gate, then silu(gate) * up
    U = np.empty((M, F), np.float32)                         # [M, F] up
    for t in prange(nt):
        r0, r1 = split(F, nt, t)
        for g in range(G):
            s, e = gs[g], gs[g + 1]
            _group_rows(spec[0], arena[offs[g, 0]:offs[g, 0] + n1], Xs, q1, d1, c1, t1, H, s, e, r0, r1)
            _group_rows(spec[1], arena[offs[g, 1]:offs[g, 1] + n3], Xs, q3, d3, c3, t3, U, s, e, r0, r1)
            for m in range(s, e):
                for r in range(r0, r1):
                    H[m, r] = _silu_mul(H[m, r], U[m, r])
    hq, hd, hc, hct = _act_buffers(spec[2], M, F)
    if spec[2, SCHEME] != 0:
        if M * F <= SERIAL_MAX:
            for m in range(M):
                _quantize(spec[2, SCHEME], H[m], hq[m], hd[m], hc[m])
        else:
            for t in prange(nt):
                m0, m1 = split(M, nt, t)
                for m in range(m0, m1):
                    _quantize(spec[2, SCHEME], H[m], hq[m], hd[m], hc[m])
        _transpose_sums(hc, hct)
    for t in prange(nt):
        r0, r1 = split(D, nt, t)
        for g in range(G):
            _group_rows(spec[2], arena[offs[g, 2]:offs[g, 2] + n2], H, hq, hd, hc, hct, Y, gs[g], gs[g + 1], r0, r1)


@njit(cache=True)
def _combine_cols(tok, wt, Y, out, d0, d1):
    for m in range(Y.shape[0]):
        o, w = out[tok[m]], wt[m]
        for d in range(d0, d1):
            o[d] += w * Y[m, d]


@njit(parallel=True, cache=True)
def _combine_parallel(tok, wt, Y, out, nt):
    for t in prange(nt):
        d0, d1 = split(Y.shape[1], nt, t)
        _combine_cols(tok, wt, Y, out, d0, d1)


def combine(tok: np.ndarray, wt: np.ndarray, Y: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out [T, D] += wt[m] * Y[m] at row tok[m], m in order: each token's experts added in one fixed order."""
    if Y.size <= SERIAL_MAX:
        _combine_cols(tok, wt, Y, out, 0, Y.shape[1])
    else:
        _combine_parallel(tok, wt, Y, out, numba.get_num_threads())
    return out


@dataclass(frozen=True)
class GroupLayout:
    """The three matrix types of a layer's experts and their sizes, as the grouped kernel reads them."""
    spec: np.ndarray          # int64 [3, SPEC]
    n_ff: int                 # F
    n_embd: int               # D
    nbytes: tuple             # bytes of gate, up, down
    max_tokens: int           # the most tokens per expert for which every matrix takes its integer row dots




def group_layout(qt1, qt3, qt2, n_ff: int, n_embd: int) -> GroupLayout:
    """The GroupLayout of experts with gate qt1 [F, D], up qt3 [F, D], down qt2 [D, F]; ValueError for a type
    without kernels or rows that are not whole blocks."""
    rows, nbytes, limit = [], [], MAX_TOKENS
    for qt, (r, c) in ((qt1, (n_ff, n_embd)), (qt3, (n_ff, n_embd)), (qt2, (n_embd, n_ff))):
        q, k = resolve(qt)
        if q.is_block and c % q.block_size:
            raise ValueError(f"expert rows of {c} weights are not whole {q.name} blocks of {q.block_size}")
        if k.act.block and c % k.act.block:
            raise ValueError(f"expert rows of {c} weights are not whole {k.act.name} activation blocks of {k.act.block}")
        rows.append((k.code, SCHEMES[k.act.name], k.act.block, k.act.sums, int(k.tile is not None), q.row_bytes(c)))
        nbytes.append(r * q.row_bytes(c))
        while limit > 1 and not int_path(k, limit):
            limit -= 1
    return GroupLayout(np.array(rows, np.int64), int(n_ff), int(n_embd), tuple(nbytes), limit)


def threads(layout: GroupLayout, m: int) -> int:
    """Threads for a grouped call over m assignments."""
    n = layout.n_ff * layout.n_embd * m
    return 1 if n < (1 << 18) else numba.get_num_threads()


def grouped_ffn(layout: GroupLayout, arena: np.ndarray, offs: np.ndarray, gs: np.ndarray, X: np.ndarray,
                tok: np.ndarray, Y: np.ndarray | None = None) -> np.ndarray:
    """Y [M, D]: each assignment's expert output (unweighted), for experts at offs [G, 3] in arena, expert g owning
    assignments gs[g]:gs[g + 1] of tok [M] (token rows of X [T, D]). See grouped_kernel; checks every offset."""
    D, F = layout.n_embd, layout.n_ff
    if not (isinstance(arena, np.ndarray) and arena.dtype == np.uint8 and arena.ndim == 1 and arena.flags.c_contiguous):
        raise ValueError("the expert arena must be a C-contiguous 1-D uint8 array")
    if X.dtype != np.float32 or X.ndim != 2 or X.shape[1] != D or not X.flags.c_contiguous:
        raise ValueError(f"X must be a C-contiguous float32 array [tokens, {D}], got {X.dtype} {X.shape}")
    G = offs.shape[0]
    if offs.shape != (G, 3) or gs.shape != (G + 1,) or gs[0] != 0 or gs[-1] != tok.shape[0] or (np.diff(gs) < 1).any():
        raise ValueError(f"expected offsets [G, 3] and group starts [G + 1] from 0 to {tok.shape[0]}, each group non-empty")
    if offs.min() < 0 or (offs + np.array(layout.nbytes, np.int64)).max() > arena.size:
        raise ValueError(f"an expert's matrices lie outside the expert arena of {arena.size} bytes")
    if tok.size and (tok.min() < 0 or tok.max() >= X.shape[0]):
        raise ValueError(f"assignment tokens must be rows of X (0..{X.shape[0] - 1})")
    M = tok.shape[0]
    if Y is None:
        Y = np.empty((M, D), np.float32)
    grouped_kernel(layout.spec, arena, offs.astype(np.int64, copy=False), gs.astype(np.int64, copy=False), X,
                   tok.astype(np.int64, copy=False), F, Y, threads(layout, M))
    return Y


def sort_assignments(top: np.ndarray, wt: np.ndarray):
    """Routes top [T, A] (expert ids) and weights wt [T, A] -> (experts [G] ascending, gs [G + 1], tok [M], w [M]):
    the assignments sorted by expert (ties by token), expert experts[g] owning gs[g]:gs[g + 1]."""
    T, A = top.shape
    flat = top.reshape(-1)
    order = np.argsort(flat, kind="stable")                  # by expert, then token (then rank)
    e_sorted = flat[order]
    experts, counts = np.unique(e_sorted, return_counts=True)
    gs = np.zeros(len(experts) + 1, np.int64)
    np.cumsum(counts, out=gs[1:])
    return experts, gs, (order // A).astype(np.int64), wt.reshape(-1)[order].astype(np.float32)
