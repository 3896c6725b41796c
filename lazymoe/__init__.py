"""lazymoe: run sparse Mixture-of-Experts models larger than RAM. `from lazymoe import load_model`.

load_model is imported on first use, so modules that only read GGUF files or tokenize do not pay for
importing the numba kernels.
"""
import os

# Before anything imports numpy (and with it OpenBLAS): see kernels/__init__.py.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def __getattr__(name):
    if name == "load_model":
        from lazymoe.runtime.model import load_model
        return load_model
    raise AttributeError(f"module 'lazymoe' has no attribute {name!r}")


__all__ = ["load_model"]
