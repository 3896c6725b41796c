"""llama.cpp's importance-matrix files: read both formats, write the current one.

An importance matrix holds, per weight matrix, the sum over calibration tokens of the square of each input
column (x_j^2), and how many tokens went in; the quantizer weights each column's rounding error by the mean.
For merged expert tensors [E, rows, cols] there is one row of sums and one count per expert (the tokens
routed to it), and expert e is quantized with row e (llama-quant.cpp: `imatrix + i03 * n_per_row`).

- GGUF (llama-imatrix since 2025, tools/imatrix/imatrix.cpp save_imatrix): keys general.type = "imatrix",
  imatrix.datasets (strings), imatrix.chunk_count and imatrix.chunk_size (u32); per matrix NAME the F32
  tensors NAME.in_sum2 (ggml [cols, n_mat]: the sums) and NAME.counts (ggml [1, n_mat]). llama-quantize
  (tools/quantize/quantize.cpp load_imatrix) refuses a file without the three keys and takes
  in_sum2[j] / counts[j] as row j's importance, 1 where counts[j] is 0.
- Legacy .dat: i32 n_entries; per entry i32 name length, the name, i32 ncall, i32 nval, nval f32 (the mean
  times ncall); then optionally i32 last chunk and i32 length + the dataset's name. The importance is
  values / ncall (the values as they are when ncall <= 0).

Files are untrusted: every count and length is checked against the file before it is used.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lazymoe.format.checks import open_regular
from lazymoe.format.gguf_file import GGUFFile

SUMS, COUNTS = ".in_sum2", ".counts"
KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
MAX_NAME = 4096          # bytes of a tensor name in a legacy file (GGUF names are at most 64)


@dataclass
class Imatrix:
    path: str
    values: dict[str, np.ndarray]          # name -> float32 [n_mat, cols]: the mean x^2 llama-quantize uses
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    legacy: bool = False


def _bad(path: str, what: str) -> ValueError:
    return ValueError(f"{path}: not a valid importance matrix ({what})")


def _check_values(path: str, name: str, a: np.ndarray, what: str) -> None:
    if not np.isfinite(a).all():
        raise _bad(path, f"{name} has non-finite {what}")
    if (a < 0).any():
        raise _bad(path, f"{name} has negative {what}")


def read_imatrix(path: str) -> Imatrix:
    """Read a GGUF or legacy .dat importance matrix; ValueError with one sentence for any defect."""
    path = os.fspath(path)
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    return _read_gguf(path) if head == b"GGUF" else _read_legacy(path)


def _read_gguf(path: str) -> Imatrix:
    with GGUFFile(path) as g:
        md = g.metadata
        missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in md]
        if missing:
            raise _bad(path, f"GGUF without {', '.join(missing)}, which llama-quantize requires")
        ds = md[KEY_DATASETS]
        if not isinstance(ds, list) or not all(isinstance(s, str) for s in ds):
            raise _bad(path, f"{KEY_DATASETS} is not a list of strings")
        for k in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
            if not isinstance(md[k], (int, np.integer)) or isinstance(md[k], bool) or md[k] < 0:
                raise _bad(path, f"{k} is not a whole number")
        names = {n[:-len(SUMS)] for n in g.tensors if n.endswith(SUMS)} | \
                {n[:-len(COUNTS)] for n in g.tensors if n.endswith(COUNTS)}
        values = {}
        for name in sorted(names):
            s, c = g.tensors.get(name + SUMS), g.tensors.get(name + COUNTS)
            if s is None or c is None:
                raise _bad(path, f"{name} has {'no ' + SUMS if s is None else 'no ' + COUNTS} tensor to pair")
            if s.type_name != "F32" or c.type_name != "F32":
                raise _bad(path, f"{name}'s sums and counts must be F32, not {s.type_name} and {c.type_name}")
            if len(s.shape) > 2 or c.n_elements != (s.shape[0] if len(s.shape) == 2 else 1):
                raise _bad(path, f"{name} has sums of shape {list(s.shape)} and {c.n_elements} counts "
                                 f"(expected one count per row of sums)")
            sums = np.array(g.tensor(name + SUMS), dtype=np.float32).reshape(-1, s.shape[-1])   # [n_mat, cols]
            counts = np.array(g.tensor(name + COUNTS), dtype=np.float32).reshape(-1)          # [n_mat]
            _check_values(path, name, sums, "sums")
            _check_values(path, name, counts, "counts")
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.where(counts[:, None] > 0, sums / counts[:, None], np.float32(1.0))
            values[name] = v.astype(np.float32)
        if not values:
            raise _bad(path, "GGUF with no .in_sum2/.counts tensors")
        return Imatrix(path, values, list(ds), int(md[KEY_CHUNK_COUNT]))


def _read_legacy(path: str) -> Imatrix:
    try:
        with os.fdopen(open_regular(path), "rb") as f:
            buf = f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    pos = 0

    def i32(what: str) -> int:
        nonlocal pos
        if pos + 4 > len(buf):
            raise _bad(path, f"legacy .dat truncated at its {what}")
        (v,) = struct.unpack_from("<i", buf, pos)
        pos += 4
        return v

    n = i32("entry count")
    if not 1 <= n <= len(buf) // 16:           # an entry takes >= 16 bytes
        raise _bad(path, f"legacy .dat claims {n} entries in {len(buf)} bytes")
    values: dict[str, np.ndarray] = {}
    for i in range(n):
        ln = i32(f"entry {i + 1}'s name length")
        if not 1 <= ln <= min(MAX_NAME, len(buf) - pos):
            raise _bad(path, f"entry {i + 1} has a name of {ln} bytes")
        try:
            name = buf[pos:pos + ln].decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(path, f"entry {i + 1}'s name is not UTF-8") from None
        pos += ln
        ncall, nval = i32(f"{name}'s call count"), i32(f"{name}'s value count")
        if not 1 <= nval <= (len(buf) - pos) // 4:
            raise _bad(path, f"entry {name} claims {nval} values with {len(buf) - pos} bytes left")
        if name in values:
            raise _bad(path, f"entry {name} appears twice")
        v = np.frombuffer(buf, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        _check_values(path, name, v, "values")
        values[name] = (v / np.float32(ncall) if ncall > 0 else v).reshape(1, -1)
    datasets, last = [], 0
    if pos < len(buf):                         # optional: the chunk count and the dataset's name
        last = i32("chunk count")
        ln = i32("dataset name length")
        if not 0 <= ln <= len(buf) - pos:
            raise _bad(path, f"dataset name of {ln} bytes with {len(buf) - pos} left")
        datasets = [buf[pos:pos + ln].decode("utf-8", errors="replace")]
        pos += ln
    if pos != len(buf):
        raise _bad(path, f"{len(buf) - pos} bytes after the last entry")
    return Imatrix(path, values, datasets, last, legacy=True)


def importance_lookup(im: Imatrix, names, quantized, model: str) -> Callable[[str, int], np.ndarray | None]:
    """Check `im` against a model: names, every tensor's GGUF name; quantized, (name, numpy shape) of each
    matrix to be quantized. Returns lookup(name, expert) -> float32 [cols] (expert: the index in a merged
    [E, rows, cols] tensor, 0 for 2-D matrices) or None where the imatrix has no entry (llama-quantize quantizes
    those without one, and ignores a token_embd entry of another size); entries for tensors that are not
    quantized (the router) are ignored. ValueError when it is for another model: an entry that names no tensor
    of the model, or a matrix's entry whose size is not cols x experts."""
    names, shapes = set(names), {n: tuple(s) for n, s in quantized}
    usable = {}
    for name, v in im.values.items():
        if name not in names:
            raise ValueError(f"{im.path}: the importance matrix has an entry {name}, which is no tensor of {model}; "
                             f"it is for another model")
        if name not in shapes:
            continue
        s = shapes[name]
        n_mat = s[0] if len(s) == 3 else 1
        if v.size == s[-1] * n_mat:
            usable[name] = v.reshape(-1, s[-1])                # [n_mat or 1, cols]
        elif name != "token_embd.weight":
            raise ValueError(f"{im.path}: the importance matrix's {name} has {v.size} values but {model}'s tensor "
                             f"needs {s[-1]} x {n_mat}; it is for another model")

    def lookup(name: str, expert: int) -> np.ndarray | None:
        v = usable.get(name)
        if v is None:
            return None
        return v[expert]
    return lookup


def write_imatrix(path: str, sums: dict[str, np.ndarray], counts: dict[str, np.ndarray], datasets: list[str],
                  chunk_count: int, chunk_size: int) -> None:
    """Write an importance matrix as llama-imatrix does (GGUF): sums[name] float [n_mat, cols] of x^2,
    counts[name] [n_mat] tokens; names sorted. Atomic: written beside `path` and renamed when complete."""
    from gguf import GGUFValueType, GGUFWriter
    if not datasets:
        raise ValueError("an importance matrix needs the name of at least one dataset (llama-quantize prints the first)")
    path = os.path.abspath(os.fspath(path))
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.lazymoe-tmp")
    w = GGUFWriter(tmp, "imatrix")
    w.kv_data[0].pop("general.architecture", None)       # llama-imatrix writes none
    try:
        w.add_string("general.type", "imatrix")
        w.add_key_value(KEY_DATASETS, list(datasets), GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
        w.add_uint32(KEY_CHUNK_COUNT, int(chunk_count))
        w.add_uint32(KEY_CHUNK_SIZE, int(chunk_size))
        for name in sorted(sums):
            s = np.ascontiguousarray(sums[name], dtype=np.float32).reshape(len(counts[name]), -1)   # [n_mat, cols]
            w.add_tensor(name + SUMS, s)
            w.add_tensor(name + COUNTS, np.asarray(counts[name], dtype=np.float32).reshape(-1, 1))  # [n_mat, 1]
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
