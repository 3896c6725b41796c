"""Attention of one new token over the KV cache (decoding), in one Numba pass.

For a single query numpy's batched matmuls, softmax and transposes cost ~0.9 ms per layer here for
8 KV heads x 300 positions (dozens of small calls); this loop does the same arithmetic in one call.
Prompt chunks (several tokens) keep numpy's BLAS path in runtime/model.py.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, fastmath=True)
def attend_one(q, kc, vc, n, scale, out):
    """out [H, hd] = softmax(q k^T * scale) v for query heads q [H, hd] over keys/values kc, vc [G, >= n, hd]
    (positions 0..n-1, all visible); head h reads KV head h // (H / G), as Mixtral's grouped-query attention."""
    H, hd = q.shape
    R = H // kc.shape[0]
    s = np.empty(n, np.float32)
    for h in range(H):
        g = h // R
        m = np.float32(-np.inf)
        for j in range(n):
            acc = np.float32(0.0)
            for d in range(hd):
                acc += q[h, d] * kc[g, j, d]
            acc *= scale
            s[j] = acc
            m = max(m, acc)
        tot = np.float32(0.0)
        for j in range(n):
            e = np.exp(s[j] - m)
            s[j] = e
            tot += e
        inv = np.float32(1.0) / tot if tot > 0 else np.float32(0.0)     # NaN scores: no ZeroDivisionError from a kernel
        for d in range(hd):
            out[h, d] = 0.0
        for j in range(n):
            w = s[j] * inv
            for d in range(hd):
                out[h, d] += w * vc[g, j, d]
