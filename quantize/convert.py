"""Stream a checkpoint into a GGUF file laid out as llama.cpp writes Mixtral.

Header, metadata and tensor infos go through gguf-py's GGUFWriter (its key names and
value types); the data is then written part by part (row chunks, one expert at a time),
so memory stays bounded by one part whatever the model's size. The file is written
beside OUT under a temporary name derived from it (.OUT.<pid>.lazymoe-tmp) and renamed only when complete;
an interrupted run removes it, and the next run over OUT removes one left by a run that was killed.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import numpy as np
from gguf import GGUFValueType, GGUFWriter
from tqdm import tqdm

from lazymoe.format.metadata import describe
from lazymoe.kernels.qtypes import QType, qtype
from lazymoe.kernels.quantizers import QUANTIZES, quantize, reference_quantize
from lazymoe.quantize.mixes import LLAMA_QUANTIZER, TypePlan, block_type, choose_types, ftype
from lazymoe.quantize.sources import Source, TensorPlan, open_source

ALIGN = 32


@dataclass
class Summary:
    path: str
    tensors: int
    params: int
    nbytes: int
    seconds: float
    note: str = ""               # what else the line says (llama.cpp's fallback types, the imatrix)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(1, self.params)

    def __str__(self) -> str:
        return (f"wrote {self.path}: {self.tensors} tensors, {self.params / 1e6:.2f} M parameters, "
                f"{self.nbytes / 2**20:.1f} MiB, {self.bits_per_weight:.2f} bits per weight, {self.seconds:.1f} s{self.note}")


def tensor_type(plan: TensorPlan, qt: QType) -> QType:
    """The type a tensor is stored in: F32 for norms and the router, `qt` for weight matrices."""
    if plan.stored is not None:
        return plan.stored
    return qtype("f32") if plan.keep_f32 else qt


def _check_writable(out: str, force: bool) -> str:
    out = os.path.abspath(out)
    if os.path.isdir(out):
        raise ValueError(f"{out}: is a folder; give a file name for the output")
    if os.path.exists(out) and not force:
        raise ValueError(f"{out}: already exists (use --force to overwrite)")
    d = os.path.dirname(out)
    if not os.path.isdir(d):
        raise ValueError(f"{out}: the folder {d} does not exist")
    if not os.access(d, os.W_OK):
        raise ValueError(f"{out}: the folder {d} is not writable")
    return out


TMP_SUFFIX = ".lazymoe-tmp"


def temporary_name(out: str) -> str:
    """Where OUT is written before the rename: .OUT.<pid>.lazymoe-tmp beside it."""
    d, base = os.path.split(out)
    return os.path.join(d, f".{base}.{os.getpid()}{TMP_SUFFIX}")


def remove_stale_temporaries(out: str) -> list[str]:
    """Remove the temporaries of earlier runs over OUT whose process is gone (killed with SIGKILL, or the
    machine went down): .OUT.<pid>.lazymoe-tmp with no process <pid>. Nothing else is touched."""
    d, base = os.path.split(out)
    pattern = re.compile(re.escape(f".{base}.") + r"(\d+)" + re.escape(TMP_SUFFIX))
    removed = []
    try:
        names = os.listdir(d)
    except OSError:
        return removed
    for n in names:
        m = pattern.fullmatch(n)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue                                  # that run is still writing
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        p = os.path.join(d, n)
        try:
            if os.path.isfile(p) and not os.path.islink(p):
                os.unlink(p)
                removed.append(p)
        except OSError:
            pass
    return removed


_ARRAY_TYPES = {np.dtype(t): v for t, v in (
    ("u1", GGUFValueType.UINT8), ("i1", GGUFValueType.INT8), ("<u2", GGUFValueType.UINT16),
    ("<i2", GGUFValueType.INT16), ("<u4", GGUFValueType.UINT32), ("<i4", GGUFValueType.INT32),
    ("<u8", GGUFValueType.UINT64), ("<i8", GGUFValueType.INT64), ("<f4", GGUFValueType.FLOAT32),
    ("<f8", GGUFValueType.FLOAT64), ("?", GGUFValueType.BOOL))}
F32_MAX = float(np.finfo(np.float32).max)


def _add_value(w: GGUFWriter, k: str, v, where: str) -> None:
    """One metadata value in a GGUF type that holds it (a requantized file's keys keep their values:
    UINT64 2^64-1 or a FLOAT64 1e300 would not fit the writer's default UINT32/FLOAT32)."""
    if isinstance(v, (bool, np.bool_)):
        w.add_bool(k, bool(v))
    elif isinstance(v, (int, np.integer)):
        v = int(v)
        if 0 <= v < 2**32:
            w.add_uint32(k, v)
        elif -2**63 <= v < 2**63:
            w.add_int64(k, v)
        elif 0 <= v < 2**64:
            w.add_uint64(k, v)
        else:
            raise ValueError(f"{where}: metadata key {k} = {v} does not fit a 64-bit integer")
    elif isinstance(v, (float, np.floating)):
        v = float(v)
        w.add_float32(k, v) if not np.isfinite(v) or abs(v) <= F32_MAX else w.add_float64(k, v)
    elif isinstance(v, str):
        w.add_string(k, v)
    elif isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype in _ARRAY_TYPES and v.size:
        w.add_key_value(k, [x.item() for x in v], GGUFValueType.ARRAY, sub_type=_ARRAY_TYPES[v.dtype])
    elif isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        w.add_array(k, v)
    else:
        raise ValueError(f"{where}: metadata key {k} is {describe(v)}, which the writer cannot store "
                         f"(expected a number, a string, or a non-empty array of them)")


def _add_metadata(w: GGUFWriter, md: dict, file_type: int, where: str = "model") -> None:
    for k, v in md.items():
        if k != "general.architecture":                   # GGUFWriter adds it
            _add_value(w, k, v, where)
    w.add_file_type(int(file_type))
    w.add_quantization_version(2)


def _expert_pieces(a: np.ndarray, row0: int, per: int):
    """Split rows [row0, row0 + len(a)) of a merged [E, per, cols] tensor at expert boundaries: (expert, rows)."""
    r = 0
    while r < len(a):
        e = (row0 + r) // per
        n = min(len(a) - r, (e + 1) * per - row0 - r)
        yield e, a[r:r + n]
        r += n


def write_gguf(src: Source, out: str, qt: QType, force: bool = False, progress: bool = True,
               quantize_fn=None, file_type: str | int | None = None, types: dict[str, QType] | None = None,
               importance=None, metadata: dict | None = None, note: str = "") -> Summary:
    """Write `src` as a GGUF of weight type `qt` to `out` atomically; returns the summary. file_type: the
    general.file_type to record (a name in quantize/mixes.FTYPES or its number; default qt's). types: the
    stored type by tensor name, in place of qt (tensors not in it: tensor_type). importance(name, expert)
    -> float32 [cols] or None: the importance matrix's row for a tensor (expert: its index in a merged
    [E, rows, cols] tensor, 0 for 2-D). metadata: keys added to the source's. note: appended to the summary.

    quantize_fn(rows, qtype[, importance=]) -> stored rows replaces lazymoe's quantizers (benchmarks use it to
    write llama.cpp's reference Q4_0 for comparison); without it, the tensors of mixes.LLAMA_QUANTIZER get
    llama.cpp's quantizer, the others lazymoe's."""
    ours = quantize_fn or quantize
    llamas = quantize_fn or reference_quantize
    out = _check_writable(out, force)
    t0 = time.perf_counter()
    types = [types[p.name] if types is not None and p.name in types and p.stored is None else tensor_type(p, qt)
             for p in src.tensors]
    for p, t in zip(src.tensors, types):
        if t.is_block and p.shape[-1] % t.block_size:
            raise ValueError(f"{src.path}: tensor {p.name} has rows of {p.shape[-1]}, not a multiple of {t.name}'s block of {t.block_size}")
    remove_stale_temporaries(out)
    tmp = temporary_name(out)
    if os.path.lexists(tmp):                                # a run of ours with a recycled pid, gone
        os.unlink(tmp)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))    # a normal file's mode (umask)
    w = None
    try:
        w = GGUFWriter(tmp, src.metadata.get("general.architecture", "llama"))
        ft = file_type if isinstance(file_type, int) else ftype(file_type or qt.name)[0]
        _add_metadata(w, {**src.metadata, **(metadata or {})}, ft, src.path)
        for p, t in zip(src.tensors, types):
            # a non-uint8 dtype with raw_dtype makes gguf-py take the logical shape as given
            w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), t.nbytes(p.shape), raw_dtype=t.ggml)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        fout.write(b"\0" * (-fout.tell() % ALIGN))
        n_params = sum(int(np.prod(p.shape)) for p in src.tensors)
        nbytes = 0
        with tqdm(total=n_params, unit="w", unit_scale=True, desc="quantize", disable=not progress) as bar:
            for p, t in zip(src.tensors, types):
                bar.set_postfix_str(p.name, refresh=False)
                quantize_fn = llamas if t.name in LLAMA_QUANTIZER.get(p.name, ()) else ours
                written = row = 0
                per = p.shape[-2] if len(p.shape) == 3 else max(1, int(np.prod(p.shape[:-1])))   # rows per expert
                for part in p.parts:
                    a = part()                                    # float32 [rows, cols]
                    pieces = [(0, a)] if p.stored is not None or not t.is_block else _expert_pieces(a, row, per)
                    for e, rows in pieces:
                        imp = importance(p.name, e) if importance is not None and t.is_block else None
                        q = rows if p.stored is not None else (
                            quantize_fn(rows, t) if imp is None else quantize_fn(rows, t, importance=imp))
                        fout.write(np.ascontiguousarray(q).data)  # one part at a time: bounded memory
                        written += q.nbytes
                        bar.update(q.nbytes // t.type_size * t.block_size)
                        del q
                    row += len(a)
                    del a
                if written != t.nbytes(p.shape):
                    raise ValueError(f"{src.path}: tensor {p.name} produced {written} bytes, expected {t.nbytes(p.shape)}")
                nbytes += written
                fout.write(b"\0" * (-fout.tell() % ALIGN))
        w.close()
        w = None
        os.replace(tmp, out)
    except BaseException:
        if w is not None:
            try:
                w.close()
            except Exception:
                pass
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return Summary(out, len(src.tensors), n_params, nbytes, time.perf_counter() - t0, note)


def plan_types(src: Source, type_name: str | None = None, expert_type: str | None = None,
               resident_type: str | None = None, pure: bool = False, has_imatrix: bool = False) -> TypePlan:
    """The stored type of each of src's tensors (quantize/mixes.choose_types), checked to be types lazymoe
    writes before anything is written."""
    plan = choose_types(src.config, [(p.name, p.shape, p.keep_f32) for p in src.tensors], type_name,
                        expert_type, resident_type, pure, has_imatrix)
    cannot = sorted({t.lower() for t in plan.types.values()} - set(QUANTIZES))
    if cannot:
        raise ValueError(f"lazymoe cannot write {', '.join(cannot)} yet (it computes on them); "
                         f"types it writes: {', '.join(QUANTIZES)}")
    return plan


def _imatrix_metadata(im) -> dict:
    """The keys llama-quantize records when it quantizes with an importance matrix."""
    md = {"quantize.imatrix.file": im.path, "quantize.imatrix.entries_count": len(im.values)}
    if im.datasets:
        md["quantize.imatrix.dataset"] = im.datasets[0]
    if im.chunk_count > 0:
        md["quantize.imatrix.chunks_count"] = im.chunk_count
    return md


def convert(src_path: str, out: str, type_name: str | None = "q4_0", force: bool = False, progress: bool = True,
            quantize_fn=None, expert_type: str | None = None, resident_type: str | None = None, pure: bool = False,
            imatrix: str | None = None) -> Summary:
    """Convert a checkpoint folder or GGUF file at `src_path` to `out`: weight matrices in the file type
    `type_name` (a plain type, or one of llama.cpp's K-quant mixes with its per-tensor rules; None: q4_0,
    with general.file_type guessed when both overrides are given), experts' matrices in `expert_type` and the
    other matrices in `resident_type` where given (block types), weighted by the importance matrix file
    `imatrix` (llama.cpp's GGUF or legacy .dat)."""
    from lazymoe.quantize.imatrix import importance_lookup, read_imatrix
    ftype(type_name or "q4_0")                                       # bad names before any file is read
    for flag, t in (("--expert-type", expert_type), ("--resident-type", resident_type)):
        if t is not None:
            block_type(t, flag)
    if os.path.exists(src_path) and os.path.exists(out) and os.path.samefile(src_path, out):
        raise ValueError(f"{out}: the output would overwrite the input")
    src = open_source(src_path)
    try:
        for inp in src.inputs:
            if os.path.exists(out) and os.path.samefile(out, inp):
                also = "" if os.path.abspath(out) == os.path.abspath(inp) else f" ({inp})"
                raise ValueError(f"{out}: is one of the conversion's inputs{also}; give another output file")
        im = read_imatrix(imatrix) if imatrix is not None else None
        plan = plan_types(src, type_name, expert_type, resident_type, pure, im is not None)
        types = {n: qtype(t.lower()) for n, t in plan.types.items()}
        lookup, md, note = None, {}, plan.fallback_note()
        if im is not None:
            quantized = [(p.name, p.shape) for p in src.tensors if types[p.name].is_block and p.stored is None]
            lookup = importance_lookup(im, [p.name for p in src.tensors], quantized, src.path)
            md = _imatrix_metadata(im)
            note += f"; importance matrix {os.path.basename(im.path)} ({len(im.values)} entries)"
        return write_gguf(src, out, qtype("f32"), force=force, progress=progress, quantize_fn=quantize_fn,
                          file_type=plan.file_type, types=types, importance=lookup, metadata=md, note=note)
    finally:
        src.close()
