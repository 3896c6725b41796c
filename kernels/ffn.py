"""Mixtral's expert feed-forward: y = W2 (silu(W1 x) * (W3 x)).

Shapes: D hidden, F FFN width, T tokens routed to this expert.
w1 (gate) and w3 (up) are [F, D], w2 (down) is [D, F], each stored in its own type.
"""
from __future__ import annotations

import numpy as np

from .dispatch import (
    check_out,
    check_tokens,
    check_vector,
    check_weight,
    int_path,
    quantize_act,
    quantize_act_rows,
    resolve,
    run_matmul,
    run_matvec,
    threads_for,
)
from .matvec import gate_up_parallel


def _check_expert(qt1, w1, qt3, w3, qt2, w2):
    (q1, k1), (q3, k3), (q2, k2) = resolve(qt1), resolve(qt3), resolve(qt2)
    w1k, f, d = check_weight(q1, k1, w1, "w1")
    w3k, f3, d3 = check_weight(q3, k3, w3, "w3")
    w2k, d2, f2 = check_weight(q2, k2, w2, "w2")
    if (f3, d3) != (f, d) or (d2, f2) != (d, f):
        raise ValueError(f"expert matrices disagree: w1 is [{f}, {d}], w3 [{f3}, {d3}], w2 [{d2}, {f2}]; "
                         f"expected w1, w3 [F, D] and w2 [D, F]")
    return (k1, w1k), (k3, w3k), (k2, w2k), f, d


def _silu_mul(g, u):
    # g, u [.., F] -> silu(g) * u, in place in g; exp(-g) = inf for g << 0 gives the right 0
    np.multiply(g, u, out=u)
    np.negative(g, out=g)
    with np.errstate(over="ignore"):
        np.exp(g, out=g)
    g += 1.0
    np.divide(u, g, out=g)
    return g


def expert_ffn(qt1, w1, qt3, w3, qt2, w2, x) -> np.ndarray:
    """y [D] = W2 (silu(W1 x) * (W3 x)) for one token x [D]; w1, w3 [F, D], w2 [D, F] as stored."""
    (k1, w1k), (k3, w3k), (k2, w2k), f, d = _check_expert(qt1, w1, qt3, w3, qt2, w2)
    check_vector(x, d, f"expert with hidden size {d}")
    nt = threads_for(f * d)
    h = np.empty(f, np.float32)                                       # [F]
    qx = quantize_act(k1, x)                                          # x per W1's scheme, shared with W3 if it reads the same
    if k1.act is k3.act and nt > 1:
        # fused: one parallel pass computes both rows (each in its own type) and silu * up
        gate_up_parallel(k1.code, k3.code, w1k, w3k, x, *qx, h, nt)
    else:
        u = np.empty(f, np.float32)
        _silu_mul(run_matvec(k1, w1k, x, h, nt, qx), run_matvec(k3, w3k, x, u, nt, qx if k1.act is k3.act else None))
    return run_matvec(k2, w2k, h, np.empty(d, np.float32), nt)        # [D]


def expert_ffn_batch(qt1, w1, qt3, w3, qt2, w2, X) -> np.ndarray:
    """Y [T, D] = expert_ffn for each row of X [T, D] (tokens routed to this expert)."""
    (k1, w1k), (k3, w3k), (k2, w2k), f, d = _check_expert(qt1, w1, qt3, w3, qt2, w2)
    check_tokens(X, d, f"expert with hidden size {d}")
    if X.shape[0] == 1:
        return expert_ffn(qt1, w1, qt3, w3, qt2, w2, X[0])[None]
    t = X.shape[0]
    nt = threads_for(f * d * t)
    qx = quantize_act_rows(k1, X) if int_path(k1, t) else None       # X per W1's scheme, shared with W3 if it reads the same
    g = run_matmul(k1, w1k, X, f, d, np.empty((t, f), np.float32), nt, qx)                      # [T, F]
    u = run_matmul(k3, w3k, X, f, d, np.empty((t, f), np.float32), nt, qx if k1.act is k3.act else None)  # [T, F]
    h = _silu_mul(g, u)                                                 # [T, F]
    return run_matmul(k2, w2k, h, d, f, check_out(None, (t, d)), nt)    # [T, D]
