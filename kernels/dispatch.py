"""Input validation and matvec / matmul for every type in KERNELS (blocks.py).

Adding a type (Q5_1, Q4_1, Q5_0, the K-quants and BF16 were added this way) takes:
  * qtypes.py: its QType row (block size, bytes per block); quantizers.py: its quantizer;
  * simd.py (or kquant.py's REGISTRY and TILES): its codegens: a row dot (AVX2 IR with a portable twin:
    plain Numba `*_portable`, or kquant.py's generic IR `_ir` form), a dequantizer, and, if they pay, 1 row x
    1..4 token tiles (AVX2 only; without them the dots run per (row, token));
  * blocks.py: one KERNELS row naming those and its activation scheme; a new scheme (Q8_K for the
    K-quants: 256 per scale, 16 sums) is one ActScheme row in activations.py with its quantizers.
Nothing else: the drivers (matvec.py: matvec and fused gate+up; int_matmul.py: few tokens;
dequant_matmul.py: dequantize + sgemm), ffn.py and this module are written once for all types.
(Submodules are imported by name: the package exports functions called matvec and matmul.)
"""
from __future__ import annotations

import numba
import numpy as np

from .activations import Q8_K
from .blocks import KERNELS, TypeKernels
from .dequant_matmul import tiled_matmul
from .int_matmul import int_matmul_parallel
from .matvec import dot_rows, matvec_parallel
from .qtypes import QType, qtype
from .simd import HAVE_AVX512

__all__ = ["INT_DOTS_MAX_TOKENS", "INT_MATMUL_MAX_TOKENS", "KERNELS", "KTILE_MAX_TOKENS", "PARALLEL_MIN_WEIGHTS",
           "TypeKernels", "matmul", "matvec"]

# Below this many weights a matvec runs serially in the calling thread: a parallel region costs
# tens of microseconds to start and join, more than a 256x512 Q4_0 matvec takes on one core (~10 us).
PARALLEL_MIN_WEIGHTS = 1 << 18


def threads_for(n_weights: int) -> int:
    """Threads to use for a product over n_weights weights."""
    return 1 if n_weights < PARALLEL_MIN_WEIGHTS else numba.get_num_threads()

# Up to this many tokens the integer kernels (int_matmul.py: 1 row x 4 token tiles, each weight row read
# from DRAM once) beat dequantize + sgemm, which is memory-bound on few tokens. Side by side (2 threads,
# Mixtral w1 and w2 shapes, OpenBLAS thread timeout 2^4, 2026-11-27): 1.6-2.4x at 32 tokens, 1.04-1.08x
# at 64, 0.85-0.87x at 128.
INT_MATMUL_MAX_TOKENS = 64
# The K-quants' tiles (kquant.py, Q8_K activations; blocks of rows, the mins as 8-lane products) against
# dequantize + sgemm, 2 threads, side by side (2026-12-01, Xeon guest shared, load 7-15), 14336 x 4096 and
# 4096 x 14336: 256-bit sums (AVX2) 2.1-3.7x at 32 tokens, 1.4-1.9x at 64, 0.8-1.0x at 96-128; 512-bit sums
# (HAVE_AVX512) 2.5-3.9x at 64, 1.6-2.7x at 128, 1.1-2.0x at 256 (N_BATCH, the most a forward passes).
KTILE_MAX_TOKENS = 256 if HAVE_AVX512 else 64
# Types without tiles (every type on the portable build) run one row dot per (row, token):
# against dequantize + sgemm, 14336 x 4096, 2 threads, side by side (2026-12-01): Q4_K, Q6_K, Q2_K 1.7-1.8x
# at 16 tokens, 1.10-1.13x at 32, 0.62-0.66x at 64; Q5_0 on its dots 0.91x at 32 (its tiles: 1.2-1.3x at 64).
INT_DOTS_MAX_TOKENS = 32


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
    return (w if w.dtype == np.uint8 else w.view(np.uint8)), rows, cols   # [R, row_bytes]: what the drivers read


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


def quantize_act(k: TypeKernels, x):
    """x f32 [C] -> (xq, xd, xc) per k's activation scheme, to share between matrices of k's scheme."""
    qx = k.act.buffers(x.shape[0])
    if k.act.quantize is not None:
        k.act.quantize(x, *qx)
    return qx


def run_matvec(k: TypeKernels, wk, x, y, nt, qx=None):
    """y = W x on validated inputs; qx = x already quantized for k (shared by several matrices)."""
    if qx is None:
        qx = quantize_act(k, x)
    if nt == 1:
        dot_rows(k.code, wk, x, *qx, y, 0, y.shape[0])
    else:
        matvec_parallel(k.code, wk, x, *qx, y, nt)
    return y


def matvec(qt, w, x, out=None) -> np.ndarray:
    """y [R] = W [R, C] @ x [C] with W stored as qt (block types: uint8 [R, row_bytes]; bf16: uint16 [R, C])."""
    q, k = resolve(qt)
    wk, rows, cols = check_weight(q, k, w)
    check_vector(x, cols, f"{q.name} weights [{rows}, {cols}]")
    y = check_out(out, (rows,))
    return run_matvec(k, wk, x, y, threads_for(rows * cols))


def int_path(k: TypeKernels, tokens: int) -> bool:
    """Whether a product of k's type over this many tokens (> 1) takes the integer row dots."""
    if k.tile is None:
        limit = INT_DOTS_MAX_TOKENS
    else:
        limit = KTILE_MAX_TOKENS if k.act is Q8_K else INT_MATMUL_MAX_TOKENS
    return k.int_matmul and tokens <= limit


def quantize_act_rows(k: TypeKernels, X):
    """X f32 [T, C] -> (xq, xd, xc) [T, ...] per k's activation scheme, to share between matrices."""
    qx = k.act.buffers(X.shape[1], X.shape[0])
    k.act.quantize_rows(X, *qx)
    return qx


def run_matmul(k: TypeKernels, wk, X, rows, cols, Y, nt, qx=None):
    """Y = X W^T on validated inputs; qx = X already quantized for k ([T, ...], used on the integer path)."""
    t = X.shape[0]
    if t == 1:
        run_matvec(k, wk, X[0], Y[0], nt, None if qx is None else tuple(a[0] for a in qx))
        return Y
    if int_path(k, t):
        if qx is None:
            qx = quantize_act_rows(k, X)
        int_matmul_parallel(k.code, k.tile is not None, wk, X, *qx, Y, nt)
        return Y
    return tiled_matmul(k.code, k.as_stored, wk, X, rows, cols, Y, nt)


def matmul(qt, w, X, out=None) -> np.ndarray:
    """Y [T, R] = X [T, C] @ W[R, C]^T with W stored as qt; tokens-major like the runtime."""
    q, k = resolve(qt)
    wk, rows, cols = check_weight(q, k, w)
    check_tokens(X, cols, f"{q.name} weights [{rows}, {cols}]")
    Y = check_out(out, (X.shape[0], rows))
    return run_matmul(k, wk, X, rows, cols, Y, threads_for(rows * cols * X.shape[0]))
