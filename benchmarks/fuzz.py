"""Hostile-input fuzzer: mutated model files, chat templates and Hugging Face folders, each through the whole
load path in a bounded worker process, counted by outcome.

Targets (seed files are made once per campaign in a scratch folder):
  demo      the shipped demo model (runtime.DEMO_MODEL)
  mixtral   a one-layer Mixtral-shaped synth file (8 experts, top-2, GQA 4:1, Q4_0, rows of 256)
  kquant    the same shape in llama.cpp's Q4_K_M mix
  types     the same shape once per type the runtime computes on (TYPE_SEEDS), every weight matrix in that type;
            a case picks one of them
  template  hostile Jinja chat templates, rendered and then tokenized
  hf        hostile Hugging Face folders (config.json, safetensors headers, tokenizer files) converted

A GGUF case is one mutation of a seed (byte and bit flips, boundary integers, truncation, metadata of the
wrong type, huge counts and lengths, tensor infos and offsets, general.alignment, non-finite and extreme
block data) run through the reader, the config, the tokenizer, the chat template, `lazymoe info`, and
`lazymoe run -n 2` (model construction and a two-token generation). Outcomes:
  ok         every step succeeded
  clean      refused with a ValueError/OSError that the CLI prints as one line (exit 2)
  traceback  any other exception, or a CLI error that is not one line
  signal     the worker died of a signal
  hang       the case ran past its deadline (alarm in the worker; a hard kill by the parent after that)
  over_1gb   peak RSS beyond 1 GiB over the worker's baseline (VmHWM, reset per case), or a MemoryError
             anywhere (raised, or behind a ValueError as its context) under RLIMIT_AS of 2 GiB over it

Workers are processes started once (`python -m lazymoe.benchmarks.fuzz --worker`), fed cases over a pipe and
restarted only when they die or hang; a case is (target, seed), so any case replays alone:
`python -m lazymoe.benchmarks.fuzz --replay demo:1234`. Workers run the `lazymoe` command in-process as
its main(argv), started as programs like every benchmark starts the CLI (benchmarks sit below it).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback

OUTCOMES = ("ok", "clean", "traceback", "signal", "hang", "over_1gb")
TARGETS = ("demo", "mixtral", "kquant", "types", "template", "hf")
WEIGHTS = {"demo": 4, "mixtral": 2, "kquant": 1, "types": 2, "template": 2, "hf": 1}   # share of cases per target
# The "types" target's seed files: every block and float type of kernels.qtypes but Q4_0 (the mixtral seed) and F32
# (the norms and router of every seed), one file each.
TYPE_SEEDS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl", "iq4_xs", "bf16", "f16")
GGUF_TARGETS = ("demo", "mixtral", "kquant", "types")
CASE_SECONDS = 10        # per-case alarm in the worker; the parent kills at twice this (+5 s)
# A fresh worker's warm-up (before it says it is ready): on a cold Numba cache it compiles every driver, 2-5 min
# on a busy 2-core machine; the parent used to count it against the first case (5 false hangs in a row).
WARM_UP_SECONDS = 900
MEMORY_LIMIT = 1 << 30   # over the worker's baseline: peak RSS beyond it, or any MemoryError, is "over_1gb"
ADDRESS_LIMIT = 2 << 30  # RLIMIT_AS over the baseline: the hard stop, so that a case cannot take the machine

# --- GGUF as parts: a seed file parsed once, mutated, written back ------------------------------------------

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


def _value_end(buf: bytes, pos: int, vtype: int) -> int:
    if vtype in _SCALAR:
        return pos + struct.calcsize(_SCALAR[vtype])
    if vtype == STRING:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n
    etype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if etype in _SCALAR:
        return pos + count * struct.calcsize(_SCALAR[etype])
    for _ in range(count):
        pos = _value_end(buf, pos, etype)
    return pos


class Gguf:
    """A (trusted) GGUF split into editable parts: kvs [(key, vtype, value bytes)], tensors
    [[name, dims, type, offset]] and the data after the header; `bytes()` lays them out again."""

    def __init__(self, buf: bytes):
        self.version, n_t, n_kv = struct.unpack_from("<IQQ", buf, 4)
        pos, self.kvs, self.tensors = 24, [], []
        for _ in range(n_kv):
            (n,) = struct.unpack_from("<Q", buf, pos)
            key = buf[pos + 8:pos + 8 + n].decode()
            (vt,) = struct.unpack_from("<I", buf, pos + 8 + n)
            start = pos + 12 + n
            pos = _value_end(buf, start, vt)
            self.kvs.append((key, vt, buf[start:pos]))
        for _ in range(n_t):
            (n,) = struct.unpack_from("<Q", buf, pos)
            name = buf[pos + 8:pos + 8 + n].decode()
            (nd,) = struct.unpack_from("<I", buf, pos + 8 + n)
            p = pos + 12 + n
            dims = list(struct.unpack_from(f"<{nd}Q", buf, p))
            gt, off = struct.unpack_from("<IQ", buf, p + 8 * nd)
            pos = p + 8 * nd + 12
            self.tensors.append([name, dims, gt, off])
        self.align = 32
        for k, vt, raw in self.kvs:
            if k == "general.alignment":
                self.align = struct.unpack(_SCALAR[vt], raw)[0]
        self.data = buf[-(-pos // self.align) * self.align:]

    def header(self, n_kv=None, n_t=None) -> bytes:
        out = [b"GGUF", struct.pack("<IQQ", self.version, len(self.tensors) if n_t is None else n_t,
                                    len(self.kvs) if n_kv is None else n_kv)]
        for k, vt, raw in self.kvs:
            kb = k.encode("utf-8", "surrogatepass")
            out += [struct.pack("<Q", len(kb)), kb, struct.pack("<I", vt), raw]
        for name, dims, gt, off in self.tensors:
            nb = name.encode()
            out += [struct.pack("<Q", len(nb)), nb, struct.pack(f"<I{len(dims)}Q", len(dims), *dims),
                    struct.pack("<IQ", gt, off)]
        return b"".join(out)

    def bytes(self, align=None) -> bytes:
        h = self.header()
        a = align or self.align
        return h + b"\0" * (-len(h) % a) + self.data

    def set(self, key: str, vtype: int, raw: bytes) -> None:
        """Replace (or add) key's value with an already encoded one."""
        self.kvs = [kv for kv in self.kvs if kv[0] != key] + [(key, vtype, raw)]

    def tensor(self, name: str):
        return next(t for t in self.tensors if t[0] == name)


def enc(vtype: int, v) -> bytes:
    """A GGUF value of vtype: a scalar, a str/bytes for STRING, or (etype, [values]) for ARRAY."""
    if vtype in _SCALAR:
        return struct.pack(_SCALAR[vtype], v)
    if vtype == STRING:
        b = v.encode("utf-8", "surrogatepass") if isinstance(v, str) else v
        return struct.pack("<Q", len(b)) + b
    etype, items = v
    return struct.pack("<IQ", etype, len(items)) + b"".join(enc(etype, x) for x in items)


# --- mutations --------------------------------------------------------------------------------------------

BOUNDARY = (0, 1, 2, 3, 7, 8, 31, 32, 255, 256, 1023, 4096, 65535, 65536, (1 << 20) - 1, 1 << 20, (1 << 20) + 1,
            2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1)
F16_SPECIAL = (0x7C00, 0xFC00, 0x7E00, 0x7BFF, 0xFBFF, 0x0001, 0x0000, 0x3C00)   # inf, -inf, NaN, +-65504, ...
F32_SPECIAL = (float("inf"), float("-inf"), float("nan"), 3.4e38, -3.4e38, 1e-45, 0.0, -0.0)


def _int_of(rng, vtype):
    lo, hi = {0: (0, 255), 1: (-128, 127), 2: (0, 65535), 3: (-32768, 32767), 4: (0, 2**32 - 1),
              5: (-2**31, 2**31 - 1), 10: (0, 2**64 - 1), 11: (-2**63, 2**63 - 1)}[vtype]
    v = rng.choice(BOUNDARY + (-1, -2, -(2**31)))
    return min(hi, max(lo, v))


def random_value(rng: random.Random) -> tuple[int, bytes]:
    """A GGUF value of a random type, boundary-valued: (vtype, encoded)."""
    vt = rng.choice(list(_SCALAR) + [STRING] * 3 + [ARRAY] * 4)
    if vt in (6, 12):
        return vt, enc(vt, rng.choice(F32_SPECIAL + (1.0, 1e-5, -1.0)))
    if vt == 7:
        return vt, enc(vt, rng.random() < 0.5)
    if vt in _SCALAR:
        return vt, enc(vt, _int_of(rng, vt))
    if vt == STRING:
        s = rng.choice(["", "llama", "gpt2", "\udcff", "x" * rng.choice((1, 100, 70000)), "{{ 'a' * 9 }}"])
        if rng.random() < 0.15:                                        # a length past the end
            return vt, struct.pack("<Q", rng.choice((2**24, 2**40, 2**64 - 1))) + b"abc"
        return vt, enc(vt, s)
    et = rng.choice([0, 4, 5, 6, 7, 10, STRING, ARRAY])
    n = rng.choice((0, 1, 3, 320, 512))
    if rng.random() < 0.15:                                            # a count past the end
        return vt, struct.pack("<IQ", et, rng.choice((2**20, 2**32, 2**62, 2**64 - 1)))
    if et == ARRAY:
        return vt, struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", 4, 0)
    if et == STRING:
        return vt, enc(vt, (et, [rng.choice(["a", "", "<s>", "\u2581b"]) for _ in range(n)]))
    if et in (6, 12):
        return vt, enc(vt, (et, [rng.choice(F32_SPECIAL + (0.5,)) for _ in range(n)]))
    if et == 7:
        return vt, enc(vt, (et, [True] * n))
    return vt, enc(vt, (et, [_int_of(rng, et) for _ in range(n)]))


def _same_type_boundary(rng, vt, raw):
    if vt in (6, 12):
        return enc(vt, rng.choice(F32_SPECIAL))
    if vt in _SCALAR and vt != 7:
        return enc(vt, _int_of(rng, vt))
    if vt == ARRAY:
        et, n = struct.unpack_from("<IQ", raw)
        if et in (6, 12) and n:
            k = struct.calcsize(_SCALAR[et])
            i = rng.randrange(n)
            return raw[:12 + i * k] + struct.pack(_SCALAR[et], rng.choice(F32_SPECIAL)) + raw[12 + (i + 1) * k:]
        if et in _SCALAR and et != 7 and n:
            k = struct.calcsize(_SCALAR[et])
            i = rng.randrange(n)
            return raw[:12 + i * k] + enc(et, _int_of(rng, et)) + raw[12 + (i + 1) * k:]
        return struct.pack("<IQ", et, rng.choice((0, n - 1 if n else 0, n + 1, 2**40))) + raw[12:]
    return raw


# Offsets of the f16 scales (d, and a min where the type has one) in a block of each type the seeds hold
# (ggml-common.h); F16 and BF16 are blocks of one element.
SCALES_AT = {"F16": (0,), "BF16": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
             "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,),
             "IQ4_XS": (0,)}
BF16_SPECIAL = (0x7F80, 0xFF80, 0x7FC0, 0x7F7F, 0xFF7F, 0x0001, 0x0000, 0x3F80)   # inf, -inf, NaN, +-max, ...
# Type ids a tensor is retyped to: every computed one, some the runtime refuses (IQ2_XXS 16, IQ3_S 21, I8 24,
# TQ1_0 34, MXFP4 39) and ids past gguf's table.
RETYPE = (0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 16, 20, 21, 23, 24, 30, 34, 39, 40, 2**31)


def _block_layout(type_id: int):
    """(weights per block, block bytes, offsets of its f16 scales) for the types the seeds hold, else None."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    try:
        g = GGMLQuantizationType(type_id)
    except ValueError:
        return None
    if g.name not in SCALES_AT:
        return None
    return (*GGML_QUANT_SIZES[g], SCALES_AT[g.name])


def mutate_gguf(seed_bytes: bytes, parts: Gguf, rng: random.Random) -> bytes:
    """One hostile variant of a seed file."""
    kind = rng.choice(("bits", "bits", "bytes", "int", "truncate", "retype", "retype", "boundary", "boundary",
                       "drop", "dup", "tensor", "tensor", "align", "data", "data", "data", "template", "count"))
    if kind in ("bits", "bytes", "int"):
        b = bytearray(seed_bytes)
        hlen = len(parts.header())
        for _ in range(rng.choice((1, 1, 2, 4, 16))):
            i = rng.randrange(hlen if rng.random() < 0.8 else len(b))
            if kind == "bits":
                b[i] ^= 1 << rng.randrange(8)
            elif kind == "bytes":
                b[i] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x01, rng.randrange(256)))
            else:
                v = rng.choice(BOUNDARY + (len(b), len(b) - 1, len(b) + 1))
                b[i:i + 8] = struct.pack("<Q", v % 2**64)[:len(b) - i]
        return bytes(b)
    if kind == "truncate":
        return seed_bytes[:rng.choice((0, 3, 4, 23, 24, 25, rng.randrange(len(seed_bytes))))]
    p = Gguf.__new__(Gguf)
    p.__dict__.update(parts.__dict__)
    p.kvs, p.tensors = list(parts.kvs), [list(t) for t in parts.tensors]
    align = None
    if kind == "retype":
        k = rng.choice(p.kvs)[0]
        p.set(k, *random_value(rng))
    elif kind == "boundary":
        k, vt, raw = rng.choice(p.kvs)
        p.set(k, vt, _same_type_boundary(rng, vt, raw))
    elif kind == "drop":
        del p.kvs[rng.randrange(len(p.kvs))]
    elif kind == "dup":
        p.kvs.append(rng.choice(p.kvs))
    elif kind == "count":
        return p.header(n_kv=rng.choice(BOUNDARY) if rng.random() < 0.5 else None,
                        n_t=rng.choice(BOUNDARY)) + p.data[:4096]
    elif kind == "tensor":
        t = rng.choice(p.tensors)
        what = rng.randrange(5)
        if what == 0:
            t[1][rng.randrange(len(t[1]))] = rng.choice(BOUNDARY)
        elif what == 1:
            t[1] = t[1][::-1] if rng.random() < 0.5 else t[1] + [rng.choice((1, 2, 8))]
        elif what == 2:
            t[2] = rng.choice(RETYPE)
        elif what == 3:
            t[3] = rng.choice((t[3] + rng.choice((-64, -32, 32, 64)), 2**63, 2**64 - 32, 0)) % 2**64
        else:
            t[0] = rng.choice(p.tensors)[0] if rng.random() < 0.5 else t[0] + "x"
    elif kind == "align":
        v = rng.choice((1, 2, 3, 8, 16, 64, 0, 1 << 21, 2**32 - 1))
        p.set("general.alignment", rng.choice((4, 4, 10, 5)), enc(4, v) if v < 2**32 else enc(10, v))
        align = v if v and not v & (v - 1) and v < 4096 else rng.choice((16, 32))   # the data stays where it was
    elif kind == "data":
        return _mutate_data(p, rng)
    elif kind == "template":
        p.set("tokenizer.chat_template", STRING, enc(STRING, rng.choice(hostile_templates(rng))))
    return p.bytes(align)


def _mutate_data(p: Gguf, rng: random.Random) -> bytes:
    """Non-finite or extreme values in one tensor's data: f16 block scales, float elements, raw garbage."""
    import numpy as np
    buf = np.frombuffer(bytearray(p.bytes()), np.uint8)
    start = len(buf) - len(p.data)
    name, dims, gt, off = rng.choice(p.tensors)
    n = 1
    for d in dims:
        n *= d
    layout = _block_layout(gt)
    if gt == 0:
        nbytes = n * 4
    elif layout:
        nbytes = n // layout[0] * layout[1]
    else:
        return buf.tobytes()
    base = start + off
    if base + nbytes > len(buf):
        return buf.tobytes()
    data = buf[base:base + nbytes]
    everywhere = rng.random() < 0.3
    if gt == 0:
        f = data.view(np.float32)
        idx = slice(None) if everywhere else rng.sample(range(n), min(n, rng.choice((1, 4, 64))))
        f[idx] = rng.choice(F32_SPECIAL)
    elif rng.random() < 0.15:
        i = rng.randrange(max(1, nbytes - 64))
        data[i:i + 64] = np.frombuffer(rng.randbytes(64), np.uint8)[:len(data[i:i + 64])]
    else:
        _, bsize, scales = layout
        blocks = data.reshape(-1, bsize)
        rows = slice(None) if everywhere else rng.sample(range(len(blocks)), min(len(blocks), rng.choice((1, 4, 64))))
        val = np.frombuffer(struct.pack("<H", rng.choice(BF16_SPECIAL if gt == 30 else F16_SPECIAL)), np.uint8)
        for sc in scales[:1 if rng.random() < 0.7 else None]:
            blocks[rows, sc:sc + 2] = val
    return buf.tobytes()


# --- hostile chat templates -------------------------------------------------------------------------------

def hostile_templates(rng: random.Random) -> list[str]:
    """Templates aimed at every resource path of the sandbox (runtime/chat.py), a few with random sizes."""
    n = rng.choice((50, 120, 300, 1000, 5000))
    w = rng.choice((9, 999999, 1999999999, 9999999999, 10**30))
    near = 1_000_000 - rng.choice((1, 10, 1000))
    return [
        "{{ '%" + str(w) + "s'|format('a') }}",
        "{{ '%." + str(w) + "f'|format(1.0) }}",
        "{{ '%*s'|format(" + str(w) + ", 'a') }}",
        "{{ '{:" + str(w) + "}'.format('a') }}",
        "{{ '{:{}}'.format('a', " + str(w) + ") }}",
        "{{ 'x' * " + str(w) + " }}",
        "{{ ['x'] * " + str(w) + " }}",
        "{{ 'ab'|center(" + str(w) + ") }}",
        "{{ 'ab'.ljust(" + str(w) + ") }}",
        "{{ 'ab'.zfill(" + str(w) + ") }}",
        "{{ 'ab'.expandtabs(" + str(w) + ") }}",
        "{{ '\t' * 1000 }}{{ ('\t' * 1000).expandtabs(1000) }}",
        "{{ " + " + ".join(["1"] * n) + " }}",
        "{{ " + "(" * n + "1" + ")" * n + " }}",
        "{{ " + "[" * n + "1" + "]" * n + " }}",
        "{{ " + "-" * n + "1 }}",
        "{{ " + " ~ ".join(["'a'"] * n) + " }}",
        "{{ x" + ".y" * n + " }}",
        "{{ " + "not " * n + "1 }}",
        "".join("{% for i in range(1) %}" for _ in range(n)) + "x" + "{% endfor %}" * n,
        "".join("{% if 1 %}" for _ in range(n)) + "x" + "{% endif %}" * n,
        "{% macro m(i) %}{{ m(i + 1) }}{% endmacro %}{{ m(0) }}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% set s = namespace(v='ab') %}{% for i in range(40) %}{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v }}",
        "{{ 'a' * " + str(near) + " }}",
        "{{ '<s>' * " + str(near // 3) + " }}",
        "{{ ('\u2581' * " + str(near) + ") }}",
        "{% for i in range(" + str(near // 10) + ") %}abcdefghi {% endfor %}",
        "{{ ('x' * 1000)|replace('x', 'y' * 1000) }}",
        "{{ ('x\n' * 1000)|indent(100000) }}",
        "{{ range(100000)|list|join('x' * 100) }}",
        "{{ (2 ** 100000) }}{{ 9 ** 9 ** 9 }}",
        "{{ '%s' % ('x' * 999999) ~ 'x' * 999999 }}",
        "{{ messages.__class__ }}",
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ raise_exception('no') }}",
        "{{ strftime_now('%Y' * 100000) }}",
        "{{ messages|tojson(indent=100000) }}",
        "{% for m in messages %}{{ m.content * 100000 }}{% endfor %}",
        "{{ '%" + "s%" * n + "s' % (1,) }}",
        "{{ 'x'|wordwrap(" + str(w) + ") }}",
        "{{ 'x'|truncate(" + str(w) + ") }}",
        "{{ 'abc'|batch(" + str(w) + ")|list }}",
        "{{ range(10)|slice(" + str(w) + ")|list }}",
        "{{ lipsum(" + str(w) + ") }}",
        "{{ '{0:%s}'.format(1) }}".replace("%s", str(w)),
        "{{ {}|dictsort }}{{ " + "{'a': " * 100 + "1" + "}" * 100 + " }}",
        "{{ 1/0 }}{{ 1//0 }}{{ 1%0 }}",
        "{% " + "x" * 100000 + " %}",
        "{{ '" + "\\x" * 1000 + "' }}",
        "{{",
        "{% for %}",
        rng.randbytes(rng.choice((10, 1000))).decode("latin-1"),
    ]


def mutate_template(rng: random.Random) -> str:
    ts = hostile_templates(rng)
    t = rng.choice(ts)
    r = rng.random()
    if r < 0.2:                       # two hostile templates glued together
        t += rng.choice(ts)
    elif r < 0.35 and t:              # a random cut or a repeated slice
        i, j = sorted(rng.randrange(len(t) + 1) for _ in range(2))
        t = t[:i] + t[i:j] * rng.choice((0, 2, 50)) + t[j:]
    return t


# --- hostile Hugging Face folders ----------------------------------------------------------------------------

def _deep(n: int, leaf="1") -> str:
    return "[" * n + leaf + "]" * n


HOSTILE_JSON = ("1e999", "-1e999", "1.5", "-1", "0", "2147483648", "18446744073709551616", "1" + "0" * 5000,
                "\"64\"", "true", "null", "[64]", "{}", "NaN", "Infinity", _deep(100000), _deep(50),
                "\"" + "x" * 1000 + "\"")


def mutate_hf(folder: str, out: str, rng: random.Random) -> None:
    """Copy a tiny HF folder to `out` with one hostile change in config.json, a safetensors header,
    tokenizer.model or tokenizer_config.json."""
    shutil.copytree(folder, out)
    what = rng.choice(("config", "config", "config", "header", "header", "header", "tokenizer", "tokcfg"))
    if what == "config":
        p = os.path.join(out, "config.json")
        text = open(p).read()
        c = json.loads(text)
        key = rng.choice(list(c) + ["architectures", "hidden_size", "num_hidden_layers", "head_dim", "rope_scaling"])
        c[key] = "@@"
        text = json.dumps(c).replace('"@@"', rng.choice(HOSTILE_JSON))
        if rng.random() < 0.1:
            text = text[:rng.randrange(len(text))]
        open(p, "w").write(text)
    elif what == "header":
        p = os.path.join(out, "model.safetensors")
        b = open(p, "rb").read()
        (n,) = struct.unpack_from("<Q", b)
        h = json.loads(b[8:8 + n])
        name = rng.choice([k for k in h if k != "__metadata__"])
        field = rng.choice(("shape", "shape", "dtype", "data_offsets", None))
        if field is None:
            h[name] = "@@"
        elif field == "shape":
            h[name]["shape"] = "@@" if rng.random() < 0.5 else h[name]["shape"][:-1] + ["@@"]
        else:
            h[name][field] = "@@" if rng.random() < 0.6 else rng.choice((["F64"], "I8", "BOOL", [0, 2**70], [-8, 0]))
        text = json.dumps(h).replace('"@@"', rng.choice(HOSTILE_JSON)).encode()
        if rng.random() < 0.1:
            size = rng.choice((2**64 - 1, len(text) + 10**9, 0))
        else:
            size = len(text)
        open(p, "wb").write(struct.pack("<Q", size) + text + b[8 + n:])
    elif what == "tokenizer":
        p = os.path.join(out, "tokenizer.model")
        b = bytearray(open(p, "rb").read())
        for _ in range(rng.choice((1, 4, 32))):
            i = rng.randrange(len(b))
            b[i] = rng.choice((0, 0xFF, 0x80, rng.randrange(256)))
        if rng.random() < 0.2:
            b = b[:rng.randrange(len(b))]
        open(p, "wb").write(bytes(b))
    else:
        p = os.path.join(out, "tokenizer_config.json")
        val = rng.choice((json.dumps(mutate_template(rng)), "5", "[5]", _deep(100000), "[{\"name\": 5}]"))
        open(p, "w").write("{\"chat_template\": " + val + "}")


# --- seeds ---------------------------------------------------------------------------------------------------

def mixtral_config():
    """A one-layer Mixtral-shaped model small enough for thousands of cases: 8 experts, top-2, GQA 4:1,
    rows of 256 so that llama.cpp's K-quant mixes apply as they do to the real 8x7B."""
    from lazymoe.format.config import ModelConfig
    return ModelConfig(n_layer=1, n_embd=256, n_ff=512, n_head=8, n_head_kv=2, n_vocab=512, n_ctx_train=4096,
                       rms_eps=1e-5, rope_theta=1e6, n_expert=8, n_expert_used=2)


def make_seeds(folder: str) -> dict[str, str]:
    """The seed files of every target, written under folder (once per campaign)."""
    from lazymoe.format.chat_templates import MIXTRAL_8X7B_TEMPLATE
    from lazymoe.kernels.qtypes import qtype
    from lazymoe.quantize.convert import write_gguf
    from lazymoe.quantize.mixes import FTYPES, is_quantized
    from lazymoe.quantize.synth import synth_source
    from lazymoe.runtime import DEMO_MODEL
    seeds = {"demo": DEMO_MODEL}
    cfg = mixtral_config()
    matrices = [n for n, shp in cfg.tensor_shapes().items() if is_quantized(n, shp)]
    files = [("mixtral", "q4_0", None), ("kquant", "q4_k_m", None)]
    files += [(f"types-{t}", "f32", t) for t in TYPE_SEEDS]
    for name, ty, every in files:
        path = os.path.join(folder, f"{name}.gguf")
        if not os.path.exists(path):
            src = synth_source(cfg, type_name=ty, seed=1, types=dict.fromkeys(matrices, every) if every else None)
            src.metadata["tokenizer.chat_template"] = MIXTRAL_8X7B_TEMPLATE
            write_gguf(src, path, qtype(ty) if ty != "q4_k_m" else qtype("f32"), force=True, progress=False,
                       file_type=every if every in FTYPES else ty)
        seeds[name] = path
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hf = os.path.join(here, "tests", "fixtures", "tiny-mixtral")
    if os.path.isdir(hf):
        seeds["hf"] = hf
    return seeds


# --- the worker ----------------------------------------------------------------------------------------------

class _Deadline(Exception):
    pass


class _OutOfMemory(Exception):
    """A refusal that a MemoryError led to: the case tried to take more than the address-space limit."""


def _refused(e: BaseException) -> None:
    """Called with a clean refusal: _OutOfMemory if a MemoryError is anywhere in its context chain."""
    seen = 0
    while e is not None and seen < 50:
        if isinstance(e, MemoryError):
            raise _OutOfMemory(str(e))
        e, seen = e.__cause__ or e.__context__, seen + 1


def _alarm(signum, frame):
    raise _Deadline()


def _cli(cli_main, argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = cli_main(argv)
    return rc, err.getvalue()


def _one_line(rc: int, err: str, what: str) -> None:
    """A refusal must be exit 2 with one stderr line; anything else is counted as a traceback."""
    if rc not in (0, 2):
        raise AssertionError(f"{what} exited {rc}")
    if rc == 2 and err.count("\n") != 1:
        raise AssertionError(f"{what} printed {err.count(chr(10))} stderr lines: {err[:200]!r}")


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More?"}]


def run_gguf(path: str, cli_main) -> str:
    """The whole load path of a model file: 'ok', or 'clean' when some step refused it with a ValueError
    or OSError (every later step is still run where it does not depend on the refused one)."""
    from lazymoe.format.config import config_from_metadata
    from lazymoe.format.gguf_file import GGUFFile
    from lazymoe.format.metadata import meta
    from lazymoe.runtime.chat import chat_prompt_ids
    from lazymoe.runtime.tokenizer import load_tokenizer
    clean = False
    try:
        with GGUFFile(path) as g:
            md, tensors = g.metadata, g.tensors
            config_from_metadata(md, path, tensors)
            tok = load_tokenizer(md, path)
            template = meta(md, "tokenizer.chat_template", path, None)
            chat_prompt_ids(MESSAGES, template, tok, 2048)
    except (ValueError, OSError) as e:
        _refused(e)
        clean = True
    rc, err = _cli(cli_main, ["info", path])
    _one_line(rc, err, "info")
    rc2, err = _cli(cli_main, ["run", path, "-p", "Hi there", "-n", "2", "--temp", "0", "--ram", "900M"])
    _one_line(rc2, err, "run")
    return "clean" if clean or rc or rc2 else "ok"


def run_template(template: str, tok) -> str:
    """Render for the demo model's context and tokenize, as `lazymoe chat` does."""
    from lazymoe.runtime.chat import chat_prompt_ids
    try:
        chat_prompt_ids(MESSAGES, template, tok, 2048)
    except ValueError as e:
        _refused(e)
        return "clean"
    return "ok"


def run_hf(folder: str, out: str, cli_main) -> str:
    rc, err = _cli(cli_main, ["quantize", folder, "-o", out, "-q", "--force"])
    _one_line(rc, err, "quantize")
    if rc:
        return "clean"
    rc, err = _cli(cli_main, ["run", out, "-p", "Hi", "-n", "2", "--temp", "0", "--ram", "900M"])
    _one_line(rc, err, "run")
    return "clean" if rc else "ok"


class Worker:
    """The state of one worker process: seeds parsed once, a scratch folder, the demo tokenizer, and the
    `lazymoe` command's main(argv) (passed in by the worker's command line: benchmarks sit below the CLI)."""

    def __init__(self, seeds: dict[str, str], scratch: str, cli_main):
        from lazymoe.format.gguf_file import GGUFFile
        from lazymoe.runtime.tokenizer import Tokenizer
        self.seeds, self.scratch, self.cli_main = seeds, scratch, cli_main
        self.bytes = {k: open(v, "rb").read() for k, v in seeds.items() if k.split("-")[0] in GGUF_TARGETS}
        self.parts = {k: Gguf(b) for k, b in self.bytes.items()}
        with GGUFFile(seeds["demo"]) as g:
            self.tok = Tokenizer.from_gguf_metadata(g.metadata)

    def case(self, target: str, seed: int) -> str:
        rng = random.Random(f"{target}:{seed}")
        if target == "template":
            return run_template(mutate_template(rng), self.tok)
        if target == "hf":
            d = os.path.join(self.scratch, "hf")
            shutil.rmtree(d, ignore_errors=True)
            mutate_hf(self.seeds["hf"], d, rng)
            return run_hf(d, os.path.join(self.scratch, "hf.gguf"), self.cli_main)
        seed_file = f"types-{rng.choice(TYPE_SEEDS)}" if target == "types" else target
        path = os.path.join(self.scratch, "case.gguf")
        with open(path, "wb") as f:
            f.write(mutate_gguf(self.bytes[seed_file], self.parts[seed_file], rng))
        return run_gguf(path, self.cli_main)


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def warm_up(seeds: dict, scratch: str, cli_main) -> None:
    """Compile (or load from numba's cache) every kernel once, outside any case's time and memory: the demo model's
    generation and, when the hf target has a seed, `lazymoe quantize` (its quantizers; on a cold cache their compile
    inside a case ran past the case's alarm)."""
    from lazymoe.runtime import DEMO_MODEL
    from lazymoe.runtime.model import load_model
    with load_model(DEMO_MODEL, progress=False) as m:
        list(m.generate("Hi", max_tokens=2))
    if "hf" in seeds:
        out = os.path.join(scratch, "warm-up.gguf")
        _cli(cli_main, ["quantize", seeds["hf"], "-o", out, "-q", "--force"])
        with contextlib.suppress(OSError):
            os.unlink(out)


WORKER = ("import sys; from lazymoe.cli import main; from lazymoe.benchmarks.fuzz import worker_main; "
          "worker_main(sys.argv[1], main)")


def worker_main(seeds_json: str, cli_main) -> None:
    """Serve cases read from stdin as JSON lines {target, seed}; answer {outcome, detail, seconds}."""
    seeds = json.loads(seeds_json)
    scratch = tempfile.mkdtemp(prefix="lazymoe-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        warm_up(seeds, scratch, cli_main)
        w = Worker(seeds, scratch, cli_main)
        base_as = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + ADDRESS_LIMIT, base_as[1]))
        base_rss = _peak_rss()
        signal.signal(signal.SIGALRM, _alarm)
        out = sys.stdout
        sys.stdout = sys.stderr
        out.write(json.dumps({"ready": True}) + "\n")     # the parent starts the first case's clock here
        out.flush()
        for line in sys.stdin:
            c = json.loads(line)
            t0 = time.perf_counter()
            detail = ""
            _reset_peak()
            signal.alarm(CASE_SECONDS)
            try:
                outcome = w.case(c["target"], c["seed"])
            except _Deadline as e:
                outcome, detail = "hang", "".join(traceback.format_exception(e))[-3000:]
            except (MemoryError, _OutOfMemory) as e:
                outcome, detail = "over_1gb", "".join(traceback.format_exception(e))[-3000:]
            except BaseException as e:             # noqa: BLE001 (every escape is a finding)
                outcome, detail = "traceback", "".join(traceback.format_exception(e))[-3000:]
            finally:
                signal.alarm(0)
            if outcome not in ("hang", "traceback") and _peak_rss() - base_rss > MEMORY_LIMIT:
                outcome, detail = "over_1gb", f"peak RSS {(_peak_rss() - base_rss) >> 20} MiB over the baseline"
            out.write(json.dumps({"outcome": outcome, "detail": detail, "seconds": time.perf_counter() - t0}) + "\n")
            out.flush()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- the parent ----------------------------------------------------------------------------------------------

class _Proc:
    def __init__(self, seeds: dict, nice: int):
        cmd = [sys.executable, "-c", WORKER, json.dumps(seeds)]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  preexec_fn=(lambda: os.nice(nice)) if nice else None)
        self.case = None
        self.started = 0.0
        self.buf = b""
        self.ready = False          # warmed up (its first line): until then the case's clock allows WARM_UP_SECONDS

    def send(self, case) -> None:
        self.case, self.started = case, time.monotonic()
        self.p.stdin.write((json.dumps({"target": case[0], "seed": case[1]}) + "\n").encode())
        self.p.stdin.flush()

    def kill(self) -> None:
        try:
            self.p.kill()
        except ProcessLookupError:
            pass
        self.p.wait()


def campaign(n: int, seed: int = 0, workers: int = 2, targets=TARGETS, nice: int = 0, log=None,
             progress: bool = False, case_seeds=None) -> dict:
    """Run n cases (target chosen by WEIGHTS, case seeds seed.., reproducible; or exactly `case_seeds` on the
    first target) over `workers` processes.
    Returns {"counts": {target: {outcome: n}}, "findings": [...], "seconds", "cases_per_s", "ms_per_case": {target: ms}}."""
    scratch = tempfile.mkdtemp(prefix="lazymoe-fuzz-seeds-")
    try:
        seeds = json.loads(subprocess.run(                  # in a child: this process stays small
            [sys.executable, "-c", "import json, sys; from lazymoe.benchmarks.fuzz import make_seeds; "
             "print(json.dumps(make_seeds(sys.argv[1])))", scratch],
            capture_output=True, text=True, check=True).stdout)
        targets = [t for t in targets if t in seeds or t == "template" or t == "types" and "types-f16" in seeds]
        pick = random.Random(seed)
        cases = [(pick.choices(targets, [WEIGHTS[t] for t in targets])[0], seed * 1_000_003 + i) for i in range(n)] \
            if case_seeds is None else [(targets[0], s) for s in case_seeds]
        workers = min(workers, len(cases))
        counts = {t: dict.fromkeys(OUTCOMES, 0) for t in targets}
        busy_s = dict.fromkeys(targets, 0.0)            # seconds the workers spent on each target's cases
        findings = []
        t0 = time.monotonic()
        done = 0

        def record(case, outcome, detail="", seconds=0.0):
            nonlocal done
            counts[case[0]][outcome] += 1
            busy_s[case[0]] += seconds
            done += 1
            if outcome not in ("ok", "clean"):
                findings.append({"target": case[0], "seed": case[1], "outcome": outcome, "detail": detail})
                if log:
                    print(f"{case[0]}:{case[1]} {outcome}\n{detail}", file=log, flush=True)
            if progress and done % 1000 == 0:
                el = time.monotonic() - t0
                print(f"{done}/{n} cases, {done / el:.1f}/s, findings {len(findings)}", file=sys.stderr, flush=True)

        procs = [_Proc(seeds, nice) for _ in range(max(1, workers))]
        todo, idle = list(reversed(cases)), list(procs)
        try:
            _drive(procs, idle, todo, seeds, nice, record)
        finally:
            for w in procs:                                 # an interrupted campaign leaves no worker behind
                if w.p.poll() is None and w.case is not None:
                    w.kill()

        for w in procs:
            w.p.stdin.close()
            w.p.wait()
        el = time.monotonic() - t0
        ms = {t: 1e3 * busy_s[t] / max(1, sum(counts[t].values())) for t in targets}
        return {"cases": n, "seed": seed, "workers": workers, "counts": counts, "findings": findings,
                "seconds": el, "cases_per_s": n / el, "ms_per_case": ms}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _drive(procs: list, idle: list, todo: list, seeds: dict, nice: int, record) -> None:
    """Feed cases to idle workers until none is left; a worker that dies or overruns is replaced."""
    while todo or len(idle) < len(procs):
        while todo and idle:
            w = idle.pop()
            w.send(todo.pop())
        busy = [w for w in procs if w.case is not None]
        ready, _, _ = select.select([w.p.stdout for w in busy], [], [], 0.5)
        now = time.monotonic()
        for w in list(procs):
            if w.case is None:
                continue
            died = w.p.poll() is not None
            if w.p.stdout in ready and not died:
                chunk = os.read(w.p.stdout.fileno(), 65536)
                w.buf += chunk
                died = not chunk
            answered = False
            while b"\n" in w.buf and not answered:
                line, w.buf = w.buf.split(b"\n", 1)
                r = json.loads(line)
                if r.get("ready"):
                    w.ready, w.started = True, now
                    continue
                record(w.case, r["outcome"], r["detail"], r["seconds"])
                w.case = None
                idle.append(w)
                answered = True
            if answered:
                continue
            late = now - w.started > 2 * CASE_SECONDS + (5 if w.ready else WARM_UP_SECONDS)
            if died or late:
                rc = w.p.poll()
                outcome = "hang" if late and rc is None else "signal" if rc is not None and rc < 0 else "traceback"
                record(w.case, outcome, f"worker exit {rc}")
                w.kill()
                procs[procs.index(w)] = nw = _Proc(seeds, nice)
                idle.append(nw)


def table(r: dict) -> str:
    """The campaign's counts as a Markdown table, one row per target and a total."""
    rows = ["| target | cases | " + " | ".join(OUTCOMES) + " | ms/case |", "|---|---:|" + "---:|" * (len(OUTCOMES) + 1)]
    total = dict.fromkeys(OUTCOMES, 0)
    for t, c in r["counts"].items():
        rows.append(f"| {t} | {sum(c.values()):,} | " + " | ".join(f"{c[o]:,}" for o in OUTCOMES)
                    + f" | {r['ms_per_case'][t]:.0f} |")
        for o in OUTCOMES:
            total[o] += c[o]
    rows.append(f"| **all** | **{sum(total.values()):,}** | " + " | ".join(f"{total[o]:,}" for o in OUTCOMES) + " | |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lazymoe.benchmarks.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-j", "--workers", type=int, default=2)
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of " + ", ".join(TARGETS))
    ap.add_argument("--nice", type=int, default=0, help="niceness of the workers")
    ap.add_argument("--log", default=None, help="append every finding (with its traceback) to this file")
    ap.add_argument("--json", default=None, help="write the result as JSON to this file")
    ap.add_argument("--replay", default=None, metavar="TARGET:SEED", help="run one case here and print its outcome")
    a = ap.parse_args(argv)
    if a.replay:
        target, s = a.replay.split(":")
        r = campaign(1, targets=[target], case_seeds=[int(s)])
        f = r["findings"]
        print(f"{a.replay}: " + (f"{f[0]['outcome']}\n{f[0]['detail']}" if f else
                                 next(o for o in OUTCOMES if r["counts"][target][o])))
        return 0
    log = open(a.log, "a") if a.log else None
    r = campaign(a.cases, a.seed, a.workers, a.targets.split(","), a.nice, log, progress=True)
    print(table(r))
    print(f"{r['cases']:,} cases in {r['seconds']:.0f} s ({r['cases_per_s']:.1f} cases/s, {a.workers} workers)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f)
    bad = sum(c[o] for c in r["counts"].values() for o in OUTCOMES[2:])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
