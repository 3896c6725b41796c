"""IQ4_NL and IQ4_XS, llama.cpp's non-linear 4-bit types: row dots and dequantizers (blocks.py KERNELS rows).

Layouts (ggml-common.h; `gguf.quants.dequantize` is the reference). A 4-bit index u picks one of 16 int8 values,
KVALUES (llama.cpp's kvalues_iq4nl), not u - 8:
  IQ4_NL  32 weights in 18 bytes: f16 d @0, qs[16] @2; weight j < 16 is KVALUES[qs[j] & 15], weight j + 16 is
          KVALUES[qs[j] >> 4]; w = d * kv.
  IQ4_XS  256 weights in 136 bytes: f16 d @0, u16 scales_h @2, scales_l[4] @4, qs[128] @8. Sub-block ib (0..7) of
          32 weights takes qs[16 ib .. 16 ib + 15] as IQ4_NL's block does and the 6-bit scale
          ls = ((scales_l[ib / 2] >> 4 (ib % 2)) & 15) | (((scales_h >> 2 ib) & 3) << 4); w = f32(d (ls - 32)) * kv.

Activations as llama.cpp's dots take them: IQ4_NL against Q8 blocks of 32 (activations.Q8: ggml_vec_dot_iq4_nl_q8_0),
IQ4_XS against Q8_K (activations.Q8_K: ggml_vec_dot_iq4_xs_q8_K). Neither reads the block sums (no min, no offset).

Each type has, in kquant.py's calling convention (w flat uint8, wo the row's byte offset):
  dot_<t>_x86(w, wo, xq, xd, xc) -> f32     the table lookup is vpshufb (`llvm.x86.avx2.pshuf.b`, the table in both
                                            128-bit lanes), then |kv| . (x with kv's sign) by vpmaddubsw + vpmaddwd,
                                            llama.cpp's AVX2 form
  dot_<t>_ir                                generic LLVM IR on every CPU: the lookup is a tree of 15 selects on the
                                            index bits (LLVM has no portable variable byte shuffle), the products
                                            widening multiplies (kquant._chunk_dot's generic form)
  dot_<t>_plain                             the plain-Numba twin (tests)
  dequant_<t>(w, wo, out, oo, nb)           nb blocks -> out[oo:] float32, gguf's float operations bit for bit
  TILES[<t>] (AVX2)                         simd.tile_switch codegen: one row x 1..4 tokens, each block's lookup
                                            once for them; 1.5-1.8x the row dots at 16-32 tokens (14336x4096,
                                            2 threads, benchmarks/tiles_ab.py, RESULTS.md)

Arithmetic: every integer sum is exact in int32 for any bytes: |kv| <= 127, |x| <= 128, so a pair of products fits
i16 (32,512); IQ4_XS's super-block sum is at most 8 * 32 * 32 * 127 * 128 < 2^31. The x86 form gives x its weight's
sign with vpsignb, so an activation of -128 against a negative kv would wrap (as in llama.cpp); the quantizers in
activations.py never write -128. IQ4_XS's forms agree bit for bit: f32(d d_x) * f32(sum) per super-block, added in
block order; IQ4_NL's keep 8 float lanes (as simd.py's Q4_0) whose grouping differs between the forms, so those agree
to float rounding only.

Safety: as kquant.py's, a kernel reads block b of a row only at wo + b * type_size + fixed positions inside the block,
with the block count clamped once per call to what w, xq and xd (or out) hold: any bytes at all, NaN/Inf scales
included, give some float and never an access out of bounds.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit
from numba.core import cgutils, typing

from .kquant import (
    QK_K,
    _bcast,
    _c64,
    _chunk_dot,
    _clamp,
    _cv,
    _dequant,
    _dequant_span,
    _dot,
    _dot_span,
    _fn,
    _half,
    _hsum_f,
    _load,
    _nibbles32,
    _prefetch,
    _reduce_add,
    _shape0,
    _shuf,
    _splat,
)
from .simd import HAVE_AVX2, f16_to_f32, tile_switch

# llama.cpp's kvalues_iq4nl (ggml-common.h), also gguf.quants.IQ4_NL.kvalues
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

_TYPES = ("iq4_nl", "iq4_xs")
BLOCK = {t: GGML_QUANT_SIZES[GGMLQuantizationType[t.upper()]][0] for t in _TYPES}
TYPE_SIZE = {t: GGML_QUANT_SIZES[GGMLQuantizationType[t.upper()]][1] for t in _TYPES}

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_V = ir.VectorType


# ---- the lookup and the 32-weight step --------------------------------------------------------

# x86 below is True (AVX2 forms), False (generic IR) or NEON (the arm64 form: the generic IR with the lookup on
# NEON's tbl; only ever compiled for aarch64, where it is the registry's `neon` dot)
NEON = "neon"


def _lookup(b, u, x86):
    """u <32 x i8> of indices 0..15 -> <32 x i8> KVALUES[u]."""
    if x86 == NEON:                                                 # two tbl of the 16-byte table
        tbl = _fn(b, "llvm.aarch64.neon.tbl1.v16i8", _V(_I8, 16), [_V(_I8, 16)] * 2)
        table = _cv(_I8, KVALUES)
        lo = b.call(tbl, [table, b.shuffle_vector(u, u, _cv(ir.IntType(32), range(16)))])
        hi = b.call(tbl, [table, b.shuffle_vector(u, u, _cv(ir.IntType(32), range(16, 32)))])
        return b.shuffle_vector(lo, hi, _cv(ir.IntType(32), range(32)))
    if x86 is True:
        pshufb = _fn(b, "llvm.x86.avx2.pshuf.b", _V(_I8, 32), [_V(_I8, 32)] * 2)
        return b.call(pshufb, [_cv(_I8, KVALUES * 2), u])           # indices < 16: no lane zeroed
    n = u.type.count
    level = [_splat(_I8, n, v) for v in KVALUES]
    for bit in range(4):                                            # level k: entries that agree on bits above k
        on = b.icmp_unsigned("!=", b.and_(u, _splat(_I8, n, 1 << bit)), _splat(_I8, n, 0))
        level = [b.select(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def _weights(b, q16, x86):
    """The 32 weights' values of one 32-block: q16 <16 x i8> the packed indices (low nibbles weights 0..15, high
    16..31) -> KVALUES[u] <32 x i8>; on x86 also |kv| for vpmaddubsw, (kv, |kv|)."""
    kv = _lookup(b, _nibbles32(b, q16), x86)
    if x86 is not True:
        return kv, None
    psign = _fn(b, "llvm.x86.avx2.psign.b", _V(_I8, 32), [_V(_I8, 32)] * 2)
    return kv, b.call(psign, [kv, kv])


def _product(b, kv, x, s, x86):
    """<8 x i32> partial sums of s * sum_l kv_l x_l: kv from _weights, x <32 x i8>, s <16 x i16> the scale in every
    lane. x86: |kv| . (x with kv's sign); generic: widening multiplies, which sign-extend kv and x."""
    if x86 is True:
        psign = _fn(b, "llvm.x86.avx2.psign.b", _V(_I8, 32), [_V(_I8, 32)] * 2)
        return _chunk_dot(b, kv[1], b.call(psign, [x, kv[0]]), s, True)
    return _chunk_dot(b, kv[0], x, s, False)


def _step(b, q16, x, s, x86):
    """<8 x i32> partial sums of s * sum_l KVALUES[u_l] x_l over the 32 weights whose indices are q16."""
    return _product(b, _weights(b, q16, x86), x, s, x86)


# ---- IQ4_NL -------------------------------------------------------------------------------------

def _nl_dot_codegen(x86):
    """sum_b f32(d_w d_x) * sum_j kv_j x_j, 8 float lanes (as simd.py's Q4_0)."""
    ts = TYPE_SIZE["iq4_nl"]

    def codegen(context, b, sig, args):
        nb, wp, xqa, xda, _ = _dot_span(context, b, sig, args, ts, 32)
        fma = _fn(b, "llvm.fma.v8f32", _V(_F32, 8), [_V(_F32, 8)] * 3)
        acc = cgutils.alloca_once_value(b, ir.Constant(_V(_F32, 8), None))
        ones = _splat(_I16, 16, 1)
        with cgutils.for_range(b, nb) as loop:
            i = loop.index
            p = b.gep(wp, [b.mul(i, _c64(ts))])
            _prefetch(b, p)
            x = _load(b, xqa.data, b.mul(i, _c64(32)), _V(_I8, 32))
            s = _step(b, _load(b, p, 2, _V(_I8, 16)), x, ones, x86)
            dx = b.load(b.gep(xda.data, [i]))
            b.store(b.call(fma, [b.sitofp(s, _V(_F32, 8)), _bcast(b, b.fmul(_half(b, p, 0), dx), 8), b.load(acc)]), acc)
        return _hsum_f(b, b.load(acc))

    return codegen


def _nl_dequant_codegen():
    """out[oo + 32 i + j] = d * kv_j, gguf's one float multiply."""
    ts = TYPE_SIZE["iq4_nl"]

    def codegen(context, b, sig, args):
        nb, wp, op = _dequant_span(context, b, sig, args, ts, 32)
        with cgutils.for_range(b, nb) as loop:
            i = loop.index
            p = b.gep(wp, [b.mul(i, _c64(ts))])
            kv = _lookup(b, _nibbles32(b, _load(b, p, 2, _V(_I8, 16))), HAVE_AVX2)
            y = b.fmul(_bcast(b, _half(b, p, 0), 32), b.sitofp(kv, _V(_F32, 32)))
            dst = b.gep(op, [b.mul(i, _c64(32))])
            b.store(y, b.bitcast(dst, _V(_F32, 32).as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


# ---- IQ4_XS -------------------------------------------------------------------------------------

def _xs_scales(b, p):
    """The 8 sub-block scales ls - 32 of the super-block at p -> <8 x i16> (-32..31)."""
    lo = _shuf(b, _load(b, p, 4, _V(_I8, 4)), [k // 2 for k in range(8)])
    lo = b.and_(b.lshr(lo, _cv(_I8, [4 * (k % 2) for k in range(8)])), _splat(_I8, 8, 15))
    hi = _bcast(b, _load(b, p, 2, _I16), 8)
    hi = b.and_(b.lshr(hi, _cv(_I16, [2 * k for k in range(8)])), _splat(_I16, 8, 3))
    return b.sub(b.or_(b.zext(lo, _V(_I16, 8)), b.shl(hi, _splat(_I16, 8, 4))), _splat(_I16, 8, 32))


def _xs_dot_codegen(x86):
    """sum over super-blocks of f32(d d_x) * sum_ib (ls_ib - 32) sum_j kv_j x_j, the integer sum exact."""
    ts = TYPE_SIZE["iq4_xs"]

    def codegen(context, b, sig, args):
        nb, wp, xqa, xda, _ = _dot_span(context, b, sig, args, ts, QK_K)
        acc = cgutils.alloca_once_value(b, ir.Constant(_F32, 0.0))
        with cgutils.for_range(b, nb) as loop:
            i = loop.index
            p = b.gep(wp, [b.mul(i, _c64(ts))])
            _prefetch(b, p)
            ls = _xs_scales(b, p)
            xb = b.mul(i, _c64(QK_K))
            sumi = ir.Constant(_V(_I32, 8), None)
            for c in range(8):
                x = _load(b, xqa.data, b.add(xb, _c64(32 * c)), _V(_I8, 32))
                sumi = b.add(sumi, _step(b, _load(b, p, 8 + 16 * c, _V(_I8, 16)), x, _shuf(b, ls, [c] * 16), x86))
            dx = b.load(b.gep(xda.data, [i]))
            t = b.fmul(b.fmul(_half(b, p, 0), dx), b.sitofp(_reduce_add(b, sumi), _F32))
            b.store(b.fadd(b.load(acc), t), acc)
        return b.load(acc)

    return codegen


def _xs_dequant_codegen():
    """out[oo + 256 i + 32 c + j] = f32(d (ls_c - 32)) * kv_j, gguf's order of float operations."""
    ts = TYPE_SIZE["iq4_xs"]

    def codegen(context, b, sig, args):
        nb, wp, op = _dequant_span(context, b, sig, args, ts, QK_K)
        with cgutils.for_range(b, nb) as loop:
            i = loop.index
            p = b.gep(wp, [b.mul(i, _c64(ts))])
            dl = b.fmul(_bcast(b, _half(b, p, 0), 8), b.sitofp(_xs_scales(b, p), _V(_F32, 8)))
            for c in range(8):
                kv = _lookup(b, _nibbles32(b, _load(b, p, 8 + 16 * c, _V(_I8, 16))), HAVE_AVX2)
                y = b.fmul(_shuf(b, dl, [c] * 32), b.sitofp(kv, _V(_F32, 32)))
                dst = b.gep(op, [b.add(b.mul(i, _c64(QK_K)), _c64(32 * c))])
                b.store(y, b.bitcast(dst, _V(_F32, 32).as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


# ---- token tiles: one row x kk (1..4) tokens, each block's lookup once for the kk tokens ------------------

def _tile_emit(kind, x86):
    """emit(context, b, sig, args, kk) for simd.tile_switch: the row at byte wo times tokens k0 .. k0+kk-1.

    args (w, wo, xq int8 [T, C], xd f32 [T, NB], xc and xct (sums, not read), k0, kk); kk accumulators, the float
    operations of the row dot per token (IQ4_XS's tile equals its dot bit for bit, IQ4_NL's to float rounding)."""
    ts, bs = TYPE_SIZE[kind], BLOCK[kind]

    def emit(context, b, sig, args, kk):
        wa, wn = _shape0(context, b, sig.args[0], args[0])
        xqa = context.make_array(sig.args[2])(context, b, args[2])
        xda = context.make_array(sig.args[3])(context, b, args[3])
        wo, k0 = args[1], args[6]
        cols = cgutils.unpack_tuple(b, xqa.shape)[1]
        nbx = cgutils.unpack_tuple(b, xda.shape)[1]
        nb = _clamp(b, nbx, [(cols, bs), (b.sub(wn, wo), ts)])
        nb = b.select(b.icmp_signed("<", wo, _c64(0)), _c64(0), nb)
        wp = b.gep(wa.data, [wo])
        xps = [b.gep(xqa.data, [b.mul(b.add(k0, _c64(k)), cols)]) for k in range(kk)]
        dps = [b.gep(xda.data, [b.mul(b.add(k0, _c64(k)), nbx)]) for k in range(kk)]
        fma = _fn(b, "llvm.fma.v8f32", _V(_F32, 8), [_V(_F32, 8)] * 3)
        zero = ir.Constant(_V(_F32, 8), None) if kind == "iq4_nl" else ir.Constant(_F32, 0.0)
        acc = [cgutils.alloca_once_value(b, zero) for _ in range(kk)]
        with cgutils.for_range(b, nb) as loop:
            i = loop.index
            p = b.gep(wp, [b.mul(i, _c64(ts))])
            _prefetch(b, p)
            d = _half(b, p, 0)
            dx = [b.load(b.gep(dps[k], [i])) for k in range(kk)]
            if kind == "iq4_nl":
                kv = _weights(b, _load(b, p, 2, _V(_I8, 16)), x86)
                for k in range(kk):
                    x = _load(b, xps[k], b.mul(i, _c64(32)), _V(_I8, 32))
                    s = _product(b, kv, x, _splat(_I16, 16, 1), x86)
                    b.store(b.call(fma, [b.sitofp(s, _V(_F32, 8)), _bcast(b, b.fmul(d, dx[k]), 8), b.load(acc[k])]),
                            acc[k])
            else:
                ls = _xs_scales(b, p)
                sumi = [ir.Constant(_V(_I32, 8), None)] * kk
                for c in range(8):                                      # chunk-major: one lookup for kk tokens
                    kv = _weights(b, _load(b, p, 8 + 16 * c, _V(_I8, 16)), x86)
                    sc = _shuf(b, ls, [c] * 16)
                    for k in range(kk):
                        x = _load(b, xps[k], b.add(b.mul(i, _c64(QK_K)), _c64(32 * c)), _V(_I8, 32))
                        sumi[k] = b.add(sumi[k], _product(b, kv, x, sc, x86))
                for k in range(kk):
                    t = b.fmul(b.fmul(d, dx[k]), b.sitofp(_reduce_add(b, sumi[k]), _F32))
                    b.store(b.fadd(b.load(acc[k]), t), acc[k])
        if kind == "iq4_nl":
            return [_hsum_f(b, b.load(a)) for a in acc]
        return [b.load(a) for a in acc]

    return emit


# One @intrinsic per (type, form), bound to module-level names so cached njit callers find them.
dot_iq4_nl_ir = _dot("dot_iq4_nl_ir", _nl_dot_codegen(False))
dot_iq4_xs_ir = _dot("dot_iq4_xs_ir", _xs_dot_codegen(False))
dot_iq4_nl_x86 = _dot("dot_iq4_nl_x86", _nl_dot_codegen(True))
dot_iq4_xs_x86 = _dot("dot_iq4_xs_x86", _xs_dot_codegen(True))
dequant_iq4_nl = _dequant("dequant_iq4_nl", _nl_dequant_codegen())
dequant_iq4_xs = _dequant("dequant_iq4_xs", _xs_dequant_codegen())


# ---- plain-Numba twins: the same integer sums and float operations, one weight at a time ------------

_KV = np.array(KVALUES, np.int64)


@njit(cache=True, inline="always")
def _d(w, o):
    return f16_to_f32(np.uint16(w[o]) | np.uint16(w[o + 1]) << np.uint16(8))


@njit(cache=True, inline="always")
def _sub_dot(w, q, xq, xo):
    """sum_j KVALUES[u_j] xq[xo + j] over the 32 weights whose indices are the 16 bytes at q."""
    t = 0
    for j in range(16):
        v = np.int64(w[q + j])
        t += _KV[v & 15] * np.int64(xq[xo + j]) + _KV[v >> 4] * np.int64(xq[xo + 16 + j])
    return t


@njit(cache=True)
def dot_iq4_nl_plain(w, wo, xq, xd, xc):
    nb = min(xd.shape[0], xq.shape[0] // 32, (w.shape[0] - wo) // 18) if wo >= 0 else 0
    acc = np.float32(0.0)
    for i in range(nb):
        p = wo + 18 * i
        acc += (_d(w, p) * xd[i]) * np.float32(_sub_dot(w, p + 2, xq, 32 * i))
    return acc


@njit(cache=True)
def dot_iq4_xs_plain(w, wo, xq, xd, xc):
    nb = min(xd.shape[0], xq.shape[0] // QK_K, (w.shape[0] - wo) // 136) if wo >= 0 else 0
    acc = np.float32(0.0)
    for i in range(nb):
        p = wo + 136 * i
        sh = np.int64(w[p + 2]) | np.int64(w[p + 3]) << 8
        isum = 0
        for c in range(8):
            ls = ((np.int64(w[p + 4 + c // 2]) >> (4 * (c % 2))) & 15) | (((sh >> (2 * c)) & 3) << 4)
            isum += (ls - 32) * _sub_dot(w, p + 8 + 16 * c, xq, QK_K * i + 32 * c)
        acc += (_d(w, p) * xd[i]) * np.float32(np.int32(isum))
    return acc


# ---- the registry's codegens (blocks.py KERNELS rows), in simd.py's argument lists ------------------

_DOTS = {"iq4_nl": _nl_dot_codegen, "iq4_xs": _xs_dot_codegen}
_DEQUANTS = {"iq4_nl": _nl_dequant_codegen, "iq4_xs": _xs_dequant_codegen}


def _registry_dot(kind, form=None):
    """Codegen (w, wo, x, xq, xd, xc) -> f32: the x86 form where HAVE_AVX2, else the generic IR (form: the one
    asked for, NEON for arm64's); x is not read."""
    cg = _DOTS[kind](HAVE_AVX2 if form is None else form)

    def codegen(context, b, sig, args):
        inner = typing.signature(sig.return_type, sig.args[0], sig.args[1], *sig.args[3:6])
        return cg(context, b, inner, [args[0], args[1], *args[3:6]])
    return codegen


def _registry_dequant(kind):
    """Codegen (w, wo, out, oo, cols): cols weights (whole blocks) from byte wo of w into out[oo:]."""
    cg = _DEQUANTS[kind]()

    def codegen(context, b, sig, args):
        return cg(context, b, sig, [*args[:4], b.sdiv(args[4], _c64(BLOCK[kind]))])
    return codegen


REGISTRY = {t: (_registry_dot(t), _registry_dequant(t)) for t in _TYPES}
NEON_DOTS = {t: _registry_dot(t, NEON) for t in _TYPES}   # the arm64 dots (blocks.py's `neon`): tbl + arm64.py's sdot
# 1 row x 4 token tiles for int_matmul (AVX2 only, as simd.py's and kquant.py's: the portable build runs the dots
# per (row, token)); the generic-IR form exists (x86=False) but is not registered.
TILES = {t: tile_switch(_tile_emit(t, True)) if HAVE_AVX2 else None for t in _TYPES}
