"""Typed reads of GGUF metadata: the one table of every key lazymoe reads, with its GGUF type and range.

The reader (format/gguf_file.py) maps GGUF values to Python ones: integer types to int, FLOAT32/64 to
float, BOOL to bool, STRING to str, numeric arrays to numpy arrays of that dtype and string arrays to
lists of str. `meta(md, key, where)` checks a value against its entry in KEYS and returns it; anything
else is one ValueError that names the key, the type found and the type expected. Lists of Python numbers
are taken for numeric arrays (metadata built in Python rather than read from a file).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_VOCAB = 1 << 20           # tokens; the largest real vocabularies are ~256 k
MAX_DIM = 1 << 20             # any hyper-parameter count (layers, hidden, heads, context)
MAX_EXPERTS = 256
MAX_MERGES = 1 << 21          # BPE merges; real byte-level vocabularies have <= ~300 k (one per non-base token)
MAX_TEMPLATE = 1 << 20        # characters of a chat template (real ones are 0.5-10 KB)

MISSING = object()


@dataclass(frozen=True)
class Key:
    kind: str                 # "int", "float", "bool", "str", "strings", "floats", "ints"
    lo: float | None = None   # range of the value (int, float) or of each element (floats, ints)
    hi: float | None = None
    max_len: int | None = None   # str characters or array elements

    def expected(self) -> str:
        if self.kind == "float":
            return f"a finite number > {self.lo:g} and <= {self.hi:g}"
        rng = f" from {int(self.lo)} to {int(self.hi)}" if self.lo is not None else ""
        return {"int": f"an integer{rng}", "bool": "a BOOL", "str": "a STRING", "strings": "an ARRAY of STRING",
                "floats": "an ARRAY of finite numbers", "ints": f"an ARRAY of integers{rng}"}[self.kind]


_L = "{arch}."        # the architecture's own keys: one entry serves llama., qwen3moe., ...
_T = "tokenizer.ggml."
KEYS: dict[str, Key] = {
    "general.architecture": Key("str", max_len=64),
    "general.name": Key("str", max_len=4096),
    "general.alignment": Key("int", 1, 1 << 20),
    _L + "block_count": Key("int", 1, MAX_DIM),
    _L + "context_length": Key("int", 1, MAX_DIM),
    _L + "embedding_length": Key("int", 1, MAX_DIM),
    _L + "feed_forward_length": Key("int", 1, MAX_DIM),
    _L + "attention.head_count": Key("int", 1, MAX_DIM),
    _L + "attention.head_count_kv": Key("int", 1, MAX_DIM),
    _L + "vocab_size": Key("int", 1, MAX_VOCAB),
    _L + "rope.dimension_count": Key("int", 1, MAX_DIM),
    _L + "expert_count": Key("int", 0, MAX_EXPERTS),
    _L + "expert_used_count": Key("int", 0, MAX_EXPERTS),
    _L + "expert_feed_forward_length": Key("int", 1, MAX_DIM),
    _L + "expert_shared_feed_forward_length": Key("int", 1, MAX_DIM),
    _L + "attention.key_length": Key("int", 1, MAX_DIM),
    _L + "attention.value_length": Key("int", 1, MAX_DIM),
    _L + "attention.layer_norm_rms_epsilon": Key("float", 0, 1),
    _L + "rope.freq_base": Key("float", 0, 1e12),
    _T + "model": Key("str", max_len=64),
    _T + "pre": Key("str", max_len=64),
    _T + "merges": Key("strings", max_len=MAX_MERGES),
    _T + "tokens": Key("strings", max_len=MAX_VOCAB),
    _T + "scores": Key("floats", max_len=MAX_VOCAB),
    _T + "token_type": Key("ints", 0, 255, max_len=MAX_VOCAB),
    _T + "bos_token_id": Key("int", 0, MAX_VOCAB),
    _T + "eos_token_id": Key("int", 0, MAX_VOCAB),
    _T + "unknown_token_id": Key("int", 0, MAX_VOCAB),
    _T + "padding_token_id": Key("int", 0, MAX_VOCAB),
    _T + "seperator_token_id": Key("int", 0, MAX_VOCAB),
    _T + "cls_token_id": Key("int", 0, MAX_VOCAB),
    _T + "mask_token_id": Key("int", 0, MAX_VOCAB),
    _T + "add_bos_token": Key("bool"),
    _T + "add_eos_token": Key("bool"),
    _T + "add_space_prefix": Key("bool"),
    _T + "remove_extra_whitespaces": Key("bool"),
    "tokenizer.chat_template": Key("str", max_len=MAX_TEMPLATE),
}

_GGUF_NAMES = {np.dtype(t): n for t, n in (("u1", "UINT8"), ("i1", "INT8"), ("<u2", "UINT16"), ("<i2", "INT16"),
                                           ("<u4", "UINT32"), ("<i4", "INT32"), ("<u8", "UINT64"),
                                           ("<i8", "INT64"), ("<f4", "FLOAT32"), ("<f8", "FLOAT64"),
                                           ("?", "BOOL"))}


def describe(v) -> str:
    """A metadata value's GGUF type in words, with the value itself when it is short."""
    if isinstance(v, bool):
        return f"a BOOL ({v})"
    if isinstance(v, (int, np.integer)):
        return f"an integer ({int(v)})"
    if isinstance(v, (float, np.floating)):
        return f"a float ({float(v):g})"
    if isinstance(v, str):
        return f"a STRING ({v[:40]!r})" if len(v) <= 40 else f"a STRING of {len(v)} characters"
    if isinstance(v, np.ndarray):
        return f"an ARRAY of {_GGUF_NAMES.get(v.dtype, str(v.dtype))} ({v.size} elements)"
    if isinstance(v, (list, tuple)):
        kinds = {type(x).__name__ for x in v[:1000]}
        inner = "STRING" if kinds == {"str"} else ", ".join(sorted(kinds)) or "nothing"
        return f"an ARRAY of {inner} ({len(v)} elements)"
    return f"a {type(v).__name__}"


def _ok(spec: Key, v) -> bool:
    k, lo, hi = spec.kind, spec.lo, spec.hi
    if k == "int":
        return (not isinstance(v, bool) and isinstance(v, (int, np.integer))
                and (lo is None or v >= lo) and (hi is None or v <= hi))
    if k == "float":
        return (not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))
                and math.isfinite(v) and (lo is None or v > lo) and (hi is None or v <= hi))
    if k == "bool":
        return isinstance(v, (bool, np.bool_))
    if k == "str":
        return isinstance(v, str) and (spec.max_len is None or len(v) <= spec.max_len)
    if spec.max_len is not None and hasattr(v, "__len__") and len(v) > spec.max_len:
        return False
    if k == "strings":
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if not isinstance(v, np.ndarray) or v.ndim != 1:
        return False
    if k == "floats":
        return v.dtype.kind in "fiu" and bool(np.isfinite(v).all())
    return v.dtype.kind in "iu" and (v.size == 0 or (lo is None or v.min() >= lo) and (hi is None or v.max() <= hi))


def meta(md: dict, key: str, where: str, default=MISSING):
    """md[key] checked against KEYS[key] (int, float, bool, str, list of str, or a 1-D numpy array);
    `default` when the key is absent (ValueError when no default is given)."""
    spec = KEYS.get(key) or KEYS[_L + key.split(".", 1)[-1]]
    if key not in md:
        if default is MISSING:
            raise ValueError(f"{where}: metadata key {key} is missing")
        return default
    v = md[key]
    if spec.kind in ("floats", "ints") and isinstance(v, (list, tuple)) and \
            all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        v = np.asarray(v, dtype=np.float64 if any(isinstance(x, float) for x in v) else np.int64)   # Python lists
    if not _ok(spec, v):
        length = f" of at most {spec.max_len} {'characters' if spec.kind == 'str' else 'elements'}" \
            if spec.max_len is not None and spec.kind != "bool" else ""
        raise ValueError(f"{where}: metadata key {key} is {describe(v)}; expected {spec.expected()}{length}")
    if spec.kind == "int":
        return int(v)
    if spec.kind == "float":
        return float(v)
    if spec.kind == "bool":
        return bool(v)
    return v
