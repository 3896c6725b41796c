"""Numba kernels that multiply directly on llama.cpp's quantized blocks.

matvec(qt, w, x)                          y [R]    = W [R, C] x [C]
matmul(qt, w, X)                          Y [T, R] = X [T, C] W^T
expert_ffn(qt1, w1, qt3, w3, qt2, w2, x)  y [D]    = W2 (silu(W1 x) * (W3 x))
expert_ffn_batch(..., X)                  Y [T, D], the same for T tokens

Weights are the stored arrays (uint8 [R, row_bytes] for the block types: q4_0, q4_1, q5_0,
q5_1, q8_0, q2_k..q6_k, iq4_nl, iq4_xs; float16 / float32 / bf16 as uint16 bits [R, C] otherwise), in any mix of
types across an expert's matrices; bad inputs raise ValueError.
"""
import os

# OpenMP workers that spin after each parallel region steal the CPU from everything else when the
# machine is busy (a laptop always is): measured here with the other core loaded, a 256x256 Q4_0
# matvec took 2.2 ms with libgomp's default spinning and 43 us with PASSIVE. Set before numba's
# OpenMP layer starts; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# OpenBLAS's workers spin for 2^28 cycles (~0.1 s) after each sgemm before they sleep, so every sgemm
# took a core from the Numba kernels that follow it: an int matmul right after an sgemm measured 60-80
# GFLOP/s with the default and 92-102 with 2^4 cycles (2 cores, 2026-11-27). Only read when OpenBLAS
# loads (numpy's import), so runtime/__init__.py sets it too, before the CLI imports numpy.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def sources_key(folder: str) -> str:
    """16 hex digits of a hash over the names and contents of the .py files in folder."""
    import hashlib
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()[:16]


def _numba_cache_dir() -> None:
    """Numba's on-disk cache checks only the source file of each cached function, so kernels that inline
    intrinsics from simd.py kept their stale compiled code after simd.py changed. Key the cache directory by
    a hash of all of this package's sources instead (a user cache directory; Numba's default if it cannot
    be made). A user's own NUMBA_CACHE_DIR wins."""
    if "NUMBA_CACHE_DIR" in os.environ:
        return
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    # LAZYMOE_NO_AVX2, LAZYMOE_NO_AVX512 (simd.py) and LAZYMOE_NO_NEON (arm64.py) change the code that the same
    # sources compile to
    forms = ("-portable" if os.environ.get("LAZYMOE_NO_AVX2") or os.environ.get("LAZYMOE_NO_NEON") else "") + \
        ("-avx2" if os.environ.get("LAZYMOE_NO_AVX512") else "")
    path = os.path.join(base, "lazymoe", "numba-" + sources_key(os.path.dirname(os.path.abspath(__file__))) + forms)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return
    if os.access(path, os.W_OK):
        os.environ["NUMBA_CACHE_DIR"] = path
        import sys
        if "numba" in sys.modules:      # numba read the environment at its import: a caller imported it first
            sys.modules["numba"].config.CACHE_DIR = path


_numba_cache_dir()

from .dispatch import KERNELS, matmul, matvec  # noqa: E402
from .ffn import expert_ffn, expert_ffn_batch  # noqa: E402
from .qtypes import QTYPES, QType, qtype, qtype_of_ggml  # noqa: E402

__all__ = ["KERNELS", "QTYPES", "QType", "expert_ffn", "expert_ffn_batch", "matmul", "matvec", "qtype",
           "qtype_of_ggml"]
