"""llama.cpp's side of importance matrices, through llama-cpp-python (the `llama` extra): no llama-quantize binary.

- load_imatrix_ggml(path): llama-quantize's load_imatrix (tools/quantize/quantize.cpp) step for step over ggml's
  own GGUF reader (gguf_init_from_file and the ggml_context it fills, from llama-cpp-python's libggml-base):
  the three imatrix.* keys required, NAME.in_sum2 paired with NAME.counts, row j's importance in_sum2[j] /
  counts[j] (1 where the count is 0). What llama-quantize would hand its quantizer.
- llama_quantize(src, out, ftype, imatrix, overrides): llama_model_quantize with that imatrix (its
  llama_model_imatrix_data array) and --tensor-type style overrides (llama_model_tensor_override).
"""
from __future__ import annotations

import ctypes
import os

import numpy as np


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def _ggml():
    import llama_cpp
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    P, I64, SZ = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
    for name, res, args in (
            ("gguf_init_from_file", P, [ctypes.c_char_p, _InitParams]), ("gguf_free", None, [P]),
            ("gguf_find_key", I64, [P, ctypes.c_char_p]), ("gguf_get_val_u32", ctypes.c_uint32, [P, I64]),
            ("gguf_get_arr_n", SZ, [P, I64]), ("gguf_get_arr_str", ctypes.c_char_p, [P, I64, SZ]),
            ("gguf_get_n_tensors", I64, [P]), ("ggml_free", None, [P]),
            ("ggml_get_first_tensor", P, [P]), ("ggml_get_next_tensor", P, [P, P]),
            ("ggml_get_name", ctypes.c_char_p, [P]), ("ggml_nelements", I64, [P]), ("ggml_nrows", I64, [P]),
            ("ggml_get_data_f32", ctypes.POINTER(ctypes.c_float), [P])):
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    return lib


def load_imatrix_ggml(path: str) -> tuple[dict[str, np.ndarray], list[str], int]:
    """(importance by name, flat float32 [n_mat * cols], datasets, chunk count) as llama-quantize loads a GGUF
    imatrix; ValueError where it would exit."""
    lib = _ggml()
    ctx = ctypes.c_void_p()
    g = lib.gguf_init_from_file(os.fspath(path).encode(), _InitParams(False, ctypes.pointer(ctx)))
    if not g:
        raise ValueError(f"{path}: ggml's gguf_init_from_file cannot read it")
    try:
        if lib.gguf_get_n_tensors(g) < 1:
            raise ValueError(f"{path}: no data")
        keys = [lib.gguf_find_key(g, k.encode()) for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")]
        if min(keys) < 0:
            raise ValueError(f"{path}: missing imatrix metadata")
        pairs: dict[str, list] = {}
        t = lib.ggml_get_first_tensor(ctx)
        while t:
            name = lib.ggml_get_name(t).decode()
            for suffix, i in ((".in_sum2", 0), (".counts", 1)):
                if name.endswith(suffix):
                    pairs.setdefault(name[:-len(suffix)], [None, None])[i] = t
            t = lib.ggml_get_next_tensor(ctx, t)
        out = {}
        for name, (s, c) in sorted(pairs.items()):
            if not s or not c:
                raise ValueError(f"{path}: mismatched sums and counts for {name}")
            if ctypes.c_int.from_address(s).value != 0 or ctypes.c_int.from_address(c).value != 0:
                raise ValueError(f"{path}: {name} is not F32")        # ggml_tensor.type is its first field, F32 = 0
            ne1 = lib.ggml_nrows(s)
            ne0 = lib.ggml_nelements(s) // ne1
            sums = np.ctypeslib.as_array(lib.ggml_get_data_f32(s), (ne1 * ne0,)).reshape(ne1, ne0)
            counts = np.ctypeslib.as_array(lib.ggml_get_data_f32(c), (lib.ggml_nelements(c),))
            e = np.ones((ne1, ne0), np.float32)
            for j in range(ne1):
                if counts[j] > 0:
                    e[j] = sums[j] / counts[j]
            out[name] = e.reshape(-1)
        datasets = [lib.gguf_get_arr_str(g, keys[0], i).decode() for i in range(lib.gguf_get_arr_n(g, keys[0]))]
        return out, datasets, int(lib.gguf_get_val_u32(g, keys[1]))
    finally:
        lib.gguf_free(g)
        lib.ggml_free(ctx)


def llama_quantize(src: str, out: str, ftype: int, imatrix: dict[str, np.ndarray] | None = None,
                   overrides: list[tuple[str, int]] | None = None, nthread: int = 2, pure: bool = False) -> None:
    """llama.cpp's quantizer on a GGUF: ftype (a LlamaFileType), imatrix by tensor name (flat float32),
    overrides (regex, GGMLQuantizationType) as llama-quantize --tensor-type, pure as its --pure; ValueError
    if it fails."""
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype, p.nthread, p.pure = int(ftype), nthread, pure
    keep = []
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, v) in enumerate(sorted(imatrix.items())):
            v = np.ascontiguousarray(v, dtype=np.float32)
            keep += [v, name.encode()]
            arr[i].name, arr[i].size = keep[-1], v.size
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(arr)
    if overrides:
        tt = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, t) in enumerate(overrides):
            keep.append(pattern.encode())
            tt[i].pattern, tt[i].type = keep[-1], int(t)
        p.tt_overrides = ctypes.cast(tt, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep.append(tt)
    if llama_cpp.llama_model_quantize(os.fspath(src).encode(), os.fspath(out).encode(), ctypes.byref(p)) != 0:
        raise ValueError(f"{src}: llama_model_quantize failed (see its log)")
