"""Float32 rows -> stored GGUF bytes, for the types of kernels.qtypes that lazymoe writes.

Q4_0 without an importance vector (32 weights in 18 bytes: f16 d, 16 bytes of nibbles,
byte j = q[j] | q[j+16] << 4, x = (q - 8)·d) picks each block's scale to minimise squared
error: it tries a ladder of scales around llama.cpp's max/-8, refits each by least squares,
and keeps the best, always counting llama.cpp's own choice (reproduced bit for bit) among
the candidates, so no block is ever worse than `gguf.quants.quantize` makes it.
The K-quants (Q2_K..Q6_K), Q4_1, Q5_0, Q5_1, and Q4_0 with an importance vector, are
kernels.kquantizers': per block the better of llama.cpp's quantizer (ported bit for bit)
and our search. Q8_0 is llama.cpp's reference quantizer itself (round(x/d), d = amax/127;
llama.cpp ignores the importance there too): at 8 bits a search buys almost nothing.
"""
from __future__ import annotations

import math

import numpy as np
from gguf import quants as gq
from numba import njit, prange

from lazymoe.kernels import kquantizers as kq
from lazymoe.kernels.qtypes import QType, qtype

QK = 32
ROWS_PER_CHUNK = 256   # rows quantized per call: bounds the float temporaries
# Q4_0 scale ladder: the block's extreme value maps to -LADDER_LO, ..., -6.6 (NNEG steps of 0.2)
# and to +6.5 ... +7.25 (steps of 0.25). A wider ladder (down to -11) gained nothing measurable.
LADDER_LO = 9.0
NNEG = 13
NLADDER = NNEG + 4


_f16_round = kq.f16_finite    # the nearest f16, clamped to its finite range (a block beyond it keeps a finite scale)


@njit(cache=True, fastmath=True)
def _ladder(xb, maxv):
    """The best candidate scale of one block: returns (inv, d), codes q = clamp(round(x·inv), -8, 7).

    The extreme value maps to -9..-6.6 or +6.5..+7.5; each candidate's codes get their
    least-squares scale d = Sxq/Sqq (rounded to f16), ranked by the block's squared error
    Sxx - 2·d·Sxq + d²·Sqq (Sxx is common to all, so left out). float32 and fast-math:
    this only ranks; the caller checks the winner exactly.
    """
    best_e = np.inf
    best_d = 0.0
    best_inv = np.float32(0.0)
    for k in range(NLADDER):
        tden = np.float32(-LADDER_LO + 0.2 * k) if k < NNEG else np.float32(6.5 + 0.25 * (k - NNEG))
        inv = tden / maxv
        sxq = np.float32(0.0)
        sqq = np.float32(0.0)
        for i in range(QK):
            v = min(np.float32(7.0), max(np.float32(-8.0), np.floor(xb[i] * inv + np.float32(0.5))))
            sxq += xb[i] * v
            sqq += v * v
        if sqq == 0:
            continue
        dk = _f16_round(float(sxq) / float(sqq))
        e = dk * (dk * float(sqq) - 2.0 * float(sxq))
        if e < best_e:
            best_e = e
            best_d = dk
            best_inv = inv
    return best_inv, best_d


@njit(cache=True, parallel=True)
def _q4_0_search(x, d_out, q_out):
    """x [n_blocks, 32] float32 -> d_out [n_blocks] (f16-exact values), q_out [n_blocks, 32] uint8 in 0..15."""
    n = x.shape[0]
    nthr = 64
    step = (n + nthr - 1) // nthr
    for t in prange(nthr):
        qr = np.empty(QK, np.uint8)
        ql = np.empty(QK, np.uint8)
        for b in range(t * step, min(n, (t + 1) * step)):
            xb = x[b]
            # llama.cpp's choice, float32 arithmetic exactly as gguf.quants.Q4_0.quantize_blocks
            amax = np.float32(0.0)
            maxv = np.float32(0.0)
            for i in range(QK):
                if abs(xb[i]) > amax:
                    amax = abs(xb[i])
                    maxv = xb[i]
            if amax == 0:
                d_out[b] = 0.0
                q_out[b, :] = 8
                continue
            d = maxv / np.float32(-8.0)
            idv = np.float32(1.0) / d
            dr = _f16_round(float(d))
            inv, dl = _ladder(xb, maxv)
            e_ref = 0.0
            e_lad = 0.0
            for i in range(QK):
                qr[i] = min(15, int(math.trunc(xb[i] * idv + np.float32(8.5))))
                ql[i] = min(7, max(-8, int(math.floor(xb[i] * inv + np.float32(0.5))))) + 8
                r = float(xb[i]) - dr * (int(qr[i]) - 8)
                e_ref += r * r
                r = float(xb[i]) - dl * (int(ql[i]) - 8)
                e_lad += r * r
            # exact float64 errors of the codes actually stored: never worse than llama.cpp's
            if e_lad < e_ref:
                d_out[b] = dl
                q_out[b, :] = ql
            else:
                d_out[b] = dr
                q_out[b, :] = qr


def _quantize_q4_0(rows: np.ndarray) -> np.ndarray:
    """rows float32 [R, C] -> uint8 [R, C/32*18]."""
    R, C = rows.shape
    x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, QK)          # [B, 32]
    d = np.empty(x.shape[0], np.float32)
    q = np.empty(x.shape, np.uint8)
    _q4_0_search(x, d, q)
    out = np.empty((x.shape[0], 18), np.uint8)
    out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out.reshape(R, C // QK * 18)


def _quantize_q8_0(rows: np.ndarray) -> np.ndarray:
    from gguf import GGMLQuantizationType
    return gq.quantize(np.ascontiguousarray(rows, dtype=np.float32), GGMLQuantizationType.Q8_0)


def _quantize_block(name: str):
    """rows float32 [R, C], importance float32 [C] or None, search -> uint8 [R, C/bs*type_size], by
    kernels.kquantizers (search False: llama.cpp's quantizer, its port)."""
    return lambda rows, importance, search: kq.quantize_blocks(rows, name, importance, search)


# Types `lazymoe quantize -t` and synth's uniform files write in every weight matrix.
_QUANTIZE = {
    "f32": lambda r, imp, search: np.ascontiguousarray(r, dtype=np.float32),
    "f16": lambda r, imp, search: np.asarray(r, dtype=np.float32).astype(np.float16),
    "q8_0": lambda r, imp, search: _quantize_q8_0(r),
    "q4_0": lambda r, imp, search: (_quantize_q4_0(r) if imp is None and search
                                    else _quantize_block("q4_0")(r, imp, search)),
    "q5_1": _quantize_block("q5_1"),
}
WRITES = tuple(_QUANTIZE)
# Types quantize() writes: the above, the K-quants and the other 32-weight types (llama.cpp's mixes use them).
_QUANTIZE.update({name: _quantize_block(name) for name in ("q4_1", "q5_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")})
QUANTIZES = tuple(_QUANTIZE)


def quantize(x: np.ndarray, qt: QType | str, importance: np.ndarray | None = None, search: bool = True) -> np.ndarray:
    """Float array (..., cols) -> stored array of type qt, shape qt.storage_shape(x.shape).

    importance [cols] float32 (llama.cpp's imatrix entry for this tensor: mean squared activation per
    column) weights each column's squared error; None weighs all alike. search False: llama.cpp's
    quantizer's bytes (kernels.kquantizers' port; Q8_0 is that anyway). Works through ROWS_PER_CHUNK
    rows at a time, so temporaries stay small whatever the size of x. ValueError if cols is not a whole
    number of blocks, if the importance has another length or is negative or not finite, or if x holds
    NaN or Inf (llama.cpp's quantizer writes garbage scales for those).
    """
    qt = qtype(qt) if isinstance(qt, str) else qt
    shape = tuple(x.shape)
    out = np.empty(qt.storage_shape(shape), dtype=qt.dtype)   # checks cols for block types
    fn = _QUANTIZE.get(qt.name)
    if fn is None:
        raise ValueError(f"lazymoe cannot write {qt.name} (it computes on it); types it writes: {', '.join(_QUANTIZE)}")
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if importance.shape[0] != shape[-1]:
            raise ValueError(f"the importance vector has {importance.shape[0]} entries; expected one per column ({shape[-1]})")
        if not (np.isfinite(importance).all() and (importance >= 0).all()):
            raise ValueError("the importance vector must hold finite, non-negative values")
    if x.size == 0:
        return out
    src = x.reshape(-1, shape[-1])
    dst = out.reshape(src.shape[0], -1)
    for r in range(0, src.shape[0], ROWS_PER_CHUNK):
        rows = np.ascontiguousarray(src[r:r + ROWS_PER_CHUNK], dtype=np.float32)
        if qt.is_block and not np.isfinite(rows).all():
            bad = r + int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
            raise ValueError(f"row {bad} holds NaN or Inf; {qt.name} blocks need finite weights")
        dst[r:r + ROWS_PER_CHUNK] = fn(rows, importance, search)
    return out


def reference_quantize(x: np.ndarray, qt: QType | str, importance: np.ndarray | None = None) -> np.ndarray:
    """quantize() with llama.cpp's quantizer alone: its bytes, bit for bit (kernels.kquantizers' port)."""
    return quantize(x, qt, importance, search=False)


def dequantize(data: np.ndarray, qt: QType | str) -> np.ndarray:
    """Stored array of type qt -> float32 of the logical shape (llama.cpp's numpy reference)."""
    qt = qtype(qt) if isinstance(qt, str) else qt
    if qt.name == "bf16":
        return (np.asarray(data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    if not qt.is_block:
        return np.asarray(data, dtype=np.float32)
    return gq.dequantize(np.asarray(data), qt.ggml).astype(np.float32, copy=False)
