"""The one table from weight type to kernels, input validation, and matvec / matmul.

Adding a type (Q4_K, Q6_K): its QType in qtypes.py, a block dot in simd.py, a rows body
and driver in matvec.py, a dequant body and driver in matmul.py, one row in KERNELS.
(Submodules are imported by name: the package exports functions called matvec and matmul.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numba
import numpy as np

from .matmul import dequant_f16, dequant_q4_0, dequant_q8_0, tiled_matmul
from .matvec import (_rows_f16, _rows_f32, _rows_q4_0, _rows_q8_0, gate_up_q4_0, gate_up_q8_0, matmul_q4_0,
                     matmul_q8_0, matvec_f16, matvec_f32, matvec_q4_0, matvec_q8_0, quantize_q8, quantize_q8_rows)
from .qtypes import QType, qtype


@dataclass(frozen=True)
class TypeKernels:
    matvec: Callable                 # driver (w, x, xq, xd, xc, y, nt)
    matmul: Optional[Callable]       # integer driver (w, Xq, Xd, Xc, Y, nt) for few tokens, or None
    dequant: Optional[Callable]      # driver (w, r0, r1, out, nt); None: w is float32 already
    gate_up: Optional[Callable]      # fused silu(W1 x) * (W3 x) driver, or None
    q8_activations: bool             # x is quantized to Q8 blocks before the dot products
    view: np.dtype                   # dtype the kernels see (f16 bits as uint16: Numba has no f16)
    rows: Callable                   # serial body (w, x, xq, xd, xc, y, r0, r1) for small matrices


KERNELS: dict[str, TypeKernels] = {
    "f32": TypeKernels(matvec_f32, None, None, None, False, np.dtype(np.float32), _rows_f32),
    "f16": TypeKernels(matvec_f16, None, dequant_f16, None, False, np.dtype(np.uint16), _rows_f16),
    "q8_0": TypeKernels(matvec_q8_0, matmul_q8_0, dequant_q8_0, gate_up_q8_0, True, np.dtype(np.uint8), _rows_q8_0),
    "q4_0": TypeKernels(matvec_q4_0, matmul_q4_0, dequant_q4_0, gate_up_q4_0, True, np.dtype(np.uint8), _rows_q4_0),
}

# Below this many weights a matvec runs serially in the calling thread: a parallel region costs
# tens of microseconds to start and join, more than a 256x512 Q4_0 matvec takes on one core (~10 us).
PARALLEL_MIN_WEIGHTS = 1 << 18


def threads_for(n_weights: int) -> int:
    """Threads to use for a product over n_weights weights."""
    return 1 if n_weights < PARALLEL_MIN_WEIGHTS else numba.get_num_threads()

# Up to this many tokens the integer kernels (matvec.matmul_*: 1 row x 4 token tiles, each weight row read
# from DRAM once) beat dequantize + sgemm, which is memory-bound on few tokens. Side by side (2 threads,
# Mixtral w1 and w2 shapes, OpenBLAS thread timeout 2^4, 2026-11-27): 1.6-2.4x at 32 tokens, 1.04-1.08x
# at 64, 0.85-0.87x at 128.
INT_MATMUL_MAX_TOKENS = 64

_NO_Q8 = (np.empty(0, np.int8), np.empty(0, np.float32), np.empty(0, np.float32))


def resolve(qt) -> tuple[QType, TypeKernels]:
    """QType (or its name) -> (QType, its kernels); ValueError for a type without kernels."""
    q = qtype(qt) if isinstance(qt, str) else qt
    if not isinstance(q, QType):
        raise ValueError(f"weight type must be a QType or a name like 'q4_0', got {type(qt).__name__}")
    k = KERNELS.get(q.name)
    if k is None:
        raise ValueError(f"no kernels for weight type {q.name}; expected one of {', '.join(KERNELS)}")
    return q, k


def check_weight(q: QType, k: TypeKernels, w, what="w") -> tuple[np.ndarray, int, int]:
    """Validate stored weights; return (array as the kernels see it, rows, cols)."""
    if not isinstance(w, np.ndarray) or w.ndim != 2:
        raise ValueError(f"{what} must be a 2-D numpy array [rows, {'row_bytes' if q.is_block else 'cols'}] "
                         f"for {q.name}, got {getattr(w, 'shape', type(w).__name__)}")
    if w.dtype != q.dtype:
        raise ValueError(f"{what} must have dtype {q.dtype} for {q.name}, got {w.dtype}")
    if not w.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous (a row-major block of stored rows), got strides {w.strides}")
    rows, n = w.shape
    if rows == 0 or n == 0:
        raise ValueError(f"{what} must have at least one row and one column, got shape {w.shape}")
    if q.is_block:
        if n % q.type_size:
            raise ValueError(f"{what} rows must be a whole number of {q.type_size}-byte {q.name} blocks, got {n} bytes")
        cols = n // q.type_size * q.block_size
    else:
        cols = n
    return (w.view(k.view) if w.dtype != k.view else w), rows, cols


def check_vector(x, n, what, name="x") -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 1 or not x.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous float32 vector, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
    if x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} elements but {what} expects {n}")


def check_tokens(X, n, what, name="X") -> None:
    if not isinstance(X, np.ndarray) or X.dtype != np.float32 or X.ndim != 2 or not X.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous float32 array [tokens, features], got "
                         f"{getattr(X, 'dtype', type(X).__name__)} {getattr(X, 'shape', '')}")
    if X.shape[1] != n or X.shape[0] == 0:
        raise ValueError(f"{name} has shape {X.shape} but {what} expects [tokens >= 1, {n}]")


def check_out(out, shape, name="out") -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != shape
            or not out.flags.c_contiguous):
        raise ValueError(f"{name} must be a C-contiguous float32 array of shape {shape}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    return out


def q8_buffers(k: TypeKernels, cols: int):
    """Scratch for x quantized to Q8 blocks (int8 [C], scales [C/32], offset terms [C/32])."""
    if not k.q8_activations:
        return _NO_Q8
    return np.empty(cols, np.int8), np.empty(cols // 32, np.float32), np.empty(cols // 32, np.float32)


def run_matvec(k: TypeKernels, wk, x, y, nt, q8=None):
    """y = W x on validated inputs; q8 = x already quantized (shared by several matrices)."""
    if q8 is None:
        q8 = q8_buffers(k, x.shape[0])
        if k.q8_activations:
            quantize_q8(x, *q8)
    if nt == 1:
        k.rows(wk, x, *q8, y, 0, y.shape[0])
    else:
        k.matvec(wk, x, *q8, y, nt)
    return y


def matvec(qt, w, x, out=None) -> np.ndarray:
    """y [R] = W [R, C] @ x [C] with W stored as qt (q4_0, q8_0: uint8 [R, row_bytes])."""
    q, k = resolve(qt)
    wk, rows, cols = check_weight(q, k, w)
    check_vector(x, cols, f"{q.name} weights [{rows}, {cols}]")
    y = check_out(out, (rows,))
    return run_matvec(k, wk, x, y, threads_for(rows * cols))


def run_matmul(k: TypeKernels, wk, X, rows, cols, Y, nt):
    t = X.shape[0]
    if t == 1:
        run_matvec(k, wk, X[0], Y[0], nt)
        return Y
    if k.matmul is not None and t <= INT_MATMUL_MAX_TOKENS:
        xq, xd, xc = np.empty((t, cols), np.int8), np.empty((t, cols // 32), np.float32), np.empty((t, cols // 32), np.float32)
        quantize_q8_rows(X, xq, xd, xc)
        k.matmul(wk, xq, xd, xc, Y, nt)
        return Y
    return tiled_matmul(k.dequant, wk, X, rows, cols, Y, nt)


def matmul(qt, w, X, out=None) -> np.ndarray:
    """Y [T, R] = X [T, C] @ W[R, C]^T with W stored as qt; tokens-major like the runtime."""
    q, k = resolve(qt)
    wk, rows, cols = check_weight(q, k, w)
    check_tokens(X, cols, f"{q.name} weights [{rows}, {cols}]")
    Y = check_out(out, (X.shape[0], rows))
    return run_matmul(k, wk, X, rows, cols, Y, threads_for(rows * cols * X.shape[0]))
