"""Block math for the K-quants (Q2_K..Q6_K), Q4_1, Q5_0 and BF16: row dots and dequantizers.

(Q5_1 is simd.py's: its dot there, with token tiles, measured 11.3 against 10.9 GB/s for this module's
form, single thread from DRAM side by side, benchmarks/kquant_dots.py.)

Layouts are llama.cpp's ggml-common.h; `gguf.quants.dequantize` is the reference. Each type has:

  dot_<t>(w, wo, xq, xd, xc) -> float32    one row against quantized activations (fast; chosen by CPU)
  dot_<t>_ir / dot_<t>_x86                 the two forms behind it (kquant_plain.py: plain-Numba twins)
  dequant_<t>(w, wo, out, oo, nb)           nb blocks from byte wo of w -> out[oo : oo + nb * block] float32
  TILES[<t>] (K-quants, AVX2)              simd.py's tile codegen: one row x 1..4 tokens (_k_tile_emit)

w is the whole stored matrix as a flat uint8 array (uint16 for BF16) and wo the byte (BF16: element) offset
of the row, so drivers pass one array for every row, expert slice or cache slot.

Activations, quantized once per product:
  K-quants    Q8_K (`quantize_q8_k`, llama.cpp's quantize_row_q8_K_ref): xq int8 [C], xd f32 [C/256] block
              scales, xc = xbs [C/16] sums of each 16 xq, int16 as llama.cpp's or float32 (the registry's
              buffers, one dtype for every scheme; the sums are whole numbers, exact either way).
  Q4_1, Q5_0  Q8 blocks of 32 as activations.quantize_q8 makes them for Q4_0: xq int8 [C], xd f32 [C/32],
              xc f32 [C/32] = xd * sum(xq of block), llama.cpp's Q8_1 `s`.
  BF16        float32 x as is: dot_bf16(w uint16, wo element offset, x f32 [C], n8) sums 8 * n8 products.

Arithmetic: every integer sum is exact in int32 for any bytes (bounds at each kernel), so the three forms of a
K-quant dot give the same float32 bit for bit, rounding only as llama.cpp does: f32(d_w * d_x) * f32(sum) per
super-block, added in block order. The 32-block dots keep 8 float lanes (as simd.py's Q4_0) whose grouping
differs between the forms, so those agree to float rounding only.

Fast form, one codegen per scheme: generic LLVM vector IR (loads, shuffles, zext/sext, mul, add,
llvm.vector.reduce.add, llvm.fma) except the 32-weight step `_chunk_dot`, which is either
vpmaddubsw + vpmaddwd (`dot_<t>_x86`, used where HAVE_AVX2; the K-quants' `dot_<t>_x86w` and tiles take two
chunks a step in 512-bit registers where HAVE_AVX512) or arm64.py's dot16 pairs (`dot_<t>_ir`, everywhere else:
NEON sdot with the dot-product extension, smull on plain NEON; Q4_1 and Q5_0 take arm64.dot32_codegen whole).
Neither saturates: weights are < 64 after masking.

Safety: a kernel reads block b of a row only at wo + b * type_size + fixed positions inside the block,
and the block count is clamped once per call to what w, xq, xd and xc (or out) hold, so any bytes at all
(NaN/Inf scales, arbitrary packed scales) give some float (NaN is fine) and never an access out of bounds.
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, typing
from numba.extending import intrinsic

from . import arm64
from .arm64 import _c64, _cv, _fn, _load
from .simd import HAVE_AVX2, HAVE_AVX512, PREFETCH_AHEAD, tile_switch

QK_K = 256

# weights per block and bytes per block, from gguf's table (the unpackers below hard-code the same layouts)
_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_1", "q5_0")
BLOCK = {t: GGML_QUANT_SIZES[GGMLQuantizationType[t.upper()]][0] for t in _TYPES}
TYPE_SIZE = {t: GGML_QUANT_SIZES[GGMLQuantizationType[t.upper()]][1] for t in _TYPES}

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V = ir.VectorType


# ---- IR helpers ---------------------------------------------------------------------------

def _splat(ty, n, v):
    return _cv(ty, [v] * n)


def _half(b, p, off):
    return b.fpext(_load(b, p, off, ir.HalfType()), _F32)


def _shuf(b, v, idx):
    return b.shuffle_vector(v, v, _cv(_I32, idx))


def _bcast(b, s, n):
    v = b.insert_element(ir.Constant(_V(s.type, n), None), s, ir.Constant(_I32, 0))
    return _shuf(b, v, [0] * n)


def _lshr(b, v, k):
    n = v.type.count
    return b.lshr(v, _cv(v.type.element, k if isinstance(k, list) else [k] * n))


def _and(b, v, m):
    n = v.type.count
    return b.and_(v, _cv(v.type.element, m if isinstance(m, list) else [m] * n))


def _shl(b, v, k):
    return b.shl(v, _splat(v.type.element, v.type.count, k))


def _reduce_add(b, v):
    n, ty = v.type.count, v.type.element
    return b.call(_fn(b, f"llvm.vector.reduce.add.v{n}i{ty.width}", ty, [v.type]), [v])


def _hsum_f(b, v):
    t = b.extract_element(v, ir.Constant(_I32, 0))
    for k in range(1, v.type.count):
        t = b.fadd(t, b.extract_element(v, ir.Constant(_I32, k)))
    return t


def _maddubs(b, u, x):
    """x86: u <32 x i8> (0..63) . x <32 x i8> in adjacent pairs -> <16 x i16> (vpmaddubsw)."""
    return b.call(_fn(b, "llvm.x86.avx2.pmadd.ub.sw", _V(_I16, 16), [_V(_I8, 32)] * 2), [u, x])


def _maddwd(b, p, s):
    """x86: <16 x i16> . <16 x i16> in adjacent pairs -> <8 x i32> (vpmaddwd)."""
    return b.call(_fn(b, "llvm.x86.avx2.pmadd.wd", _V(_I32, 8), [_V(_I16, 16)] * 2), [p, s])


def _chunk_dot(b, u, x, s, x86):
    """Partial sums <8 x i32> of sum_l s[l // 2] u[l] x[l] over 32 weights: u <32 x i8> (0..63), x <32 x i8>,
    s <16 x i16> the scale of each 16 weights' half (lanes 0..7: weights 0..15, lanes 8..15: 16..31).

    x86: vpmaddubsw + vpmaddwd on adjacent pairs (|u x| <= 63 * 128 and a pair of them fit i16: no
    saturation). Generic: arm64.chunk_dot (NEON sdot with +dotprod).
    """
    if x86:
        return _maddwd(b, _maddubs(b, u, x), s)
    return arm64.chunk_dot(b, u, x, s)


def _super_sums(b, chunks, sc, xps, xb, x86, wide):
    """Per activation row pointer in xps: <8 x i32> partial sums of sum_c sc u.x over a super-block's 8 chunks
    (u the weights' chunks, the activations at element xb of each row, sc <16 x i16> one scale per 16 weights).

    Two sums a row (even, odd steps), so that 2 x len(xps) independent multiply-add chains hide their latency.
    wide (x86 with AVX-512BW): two chunks a step as 512-bit vpmaddubsw + vpmaddwd, half the instructions of the
    256-bit form (Q4_K tile, 64 tokens, one thread in cache: 1.5-3.6x, 2026-12-01); the integer sums are exact in
    every form, so they agree bit for bit.
    """
    zero = ir.Constant(_V(_I32, 16 if wide else 8), None)
    sums = [[zero, zero] for _ in xps]
    if wide:
        mub = _fn(b, "llvm.x86.avx512.pmaddubs.w.512", _V(_I16, 32), [_V(_I8, 64)] * 2)
        mwd = _fn(b, "llvm.x86.avx512.pmaddw.d.512", _V(_I32, 16), [_V(_I16, 32)] * 2)
        for c in range(0, 8, 2):
            s = _shuf(b, sc, [2 * c + j // 8 for j in range(32)])
            u = b.shuffle_vector(chunks[c], chunks[c + 1], _cv(_I32, list(range(64))))
            for k, xp in enumerate(xps):
                x = _load(b, xp, b.add(xb, _c64(32 * c)), _V(_I8, 64))
                sums[k][c // 2 % 2] = b.add(sums[k][c // 2 % 2], b.call(mwd, [b.call(mub, [u, x]), s]))
        halves = [b.add(e, o) for e, o in sums]
        return [b.add(_shuf(b, v, list(range(8))), _shuf(b, v, list(range(8, 16)))) for v in halves]
    for c in range(8):                                      # chunk-major: one chunk and scale live
        s = _shuf(b, sc, [2 * c] * 8 + [2 * c + 1] * 8)
        for k, xp in enumerate(xps):
            x = _load(b, xp, b.add(xb, _c64(32 * c)), _V(_I8, 32))
            sums[k][c % 2] = b.add(sums[k][c % 2], _chunk_dot(b, chunks[c], x, s, x86))
    return [b.add(e, o) for e, o in sums]


def _nibbles32(b, q16):
    """16 bytes -> <32 x i8>: low nibbles are elements 0..15, high nibbles 16..31 (Q4_0/Q4_1/Q5 order)."""
    return b.shuffle_vector(_and(b, q16, 15), _lshr(b, q16, 4), _cv(_I32, list(range(32))))


def _bits32(b, p, off):
    """The 32 bits of the little-endian u32 at byte off -> <32 x i8> of 0/1 (bit j in lane j)."""
    h = _load(b, p, off, _V(_I8, 4))
    h = _shuf(b, h, [j // 8 for j in range(32)])
    on = b.icmp_unsigned("!=", _and(b, h, [1 << (j % 8) for j in range(32)]), _splat(_I8, 32, 0))
    return b.zext(on, _V(_I8, 32))


def _clamp(b, n, limits):
    """min(n, each (count, per) as count // per), and 0 if any count is negative: the blocks all arrays hold."""
    for count, per in limits:
        c = b.sdiv(count, _c64(per))
        n = b.select(b.icmp_signed("<", c, n), c, n)
    return b.select(b.icmp_signed("<", n, _c64(0)), _c64(0), n)


def _shape0(context, b, ty, val):
    a = context.make_array(ty)(context, b, val)
    return a, cgutils.unpack_tuple(b, a.shape)[0]


# ---- K-quant super-blocks: each unpacker gives the 256 weights as 8 chunks of 32 unsigned values u,
# per 16 weights an integer scale sc (and min mn), so that weight i = f32(d * sc) * (u - off) - f32(dmin * mn).

def _k_scales_q4(b, p):
    """Q4_K/Q5_K 12 packed bytes at 4: 8 six-bit scales and mins (get_scale_min_k4) -> <16 x i16> each."""
    s = _load(b, p, 4, _V(_I8, 16))
    sc = b.or_(_and(b, _shuf(b, s, [0, 1, 2, 3, 8, 9, 10, 11]), [63] * 4 + [15] * 4),
               _and(b, _lshr(b, _shuf(b, s, [0, 1, 2, 3, 0, 1, 2, 3]), 2), [0] * 4 + [48] * 4))
    mn = b.or_(_and(b, _lshr(b, _shuf(b, s, [4, 5, 6, 7, 8, 9, 10, 11]), [0] * 4 + [4] * 4), [63] * 4 + [15] * 4),
               _and(b, _lshr(b, _shuf(b, s, [4, 5, 6, 7, 4, 5, 6, 7]), 2), [0] * 4 + [48] * 4))
    dup = [i // 2 for i in range(16)]
    return b.zext(_shuf(b, sc, dup), _V(_I16, 16)), b.zext(_shuf(b, mn, dup), _V(_I16, 16))


def _unpack_q4_k(b, p):
    # d f16 @0, dmin f16 @2, scales[12] @4, qs[128] @16: byte l of 32-byte group j holds weight 64j + l
    # (low nibble) and 64j + 32 + l (high nibble); 8 sub-blocks of 32 share a 6-bit scale and min
    sc, mn = _k_scales_q4(b, p)
    chunks = []
    for j in range(4):
        q = _load(b, p, 16 + 32 * j, _V(_I8, 32))
        chunks += [_and(b, q, 15), _lshr(b, q, 4)]
    return _half(b, p, 0), _half(b, p, 2), chunks, sc, mn, 0


def _unpack_q5_k(b, p):
    # d @0, dmin @2, scales[12] @4, qh[32] @16, qs[128] @48: Q4_K's nibbles + bit c of qh[l] as bit 4 of
    # weight 32c + l
    sc, mn = _k_scales_q4(b, p)
    h = _load(b, p, 16, _V(_I8, 32))
    chunks = []
    for j in range(4):
        q = _load(b, p, 48 + 32 * j, _V(_I8, 32))
        for k, nib in ((2 * j, _and(b, q, 15)), (2 * j + 1, _lshr(b, q, 4))):
            chunks.append(b.or_(nib, _shl(b, _and(b, _lshr(b, h, k), 1), 4)))
    return _half(b, p, 0), _half(b, p, 2), chunks, sc, mn, 0


def _unpack_q6_k(b, p):
    # ql[128] @0, qh[64] @128, int8 scales[16] @192, d @208; per half n: weight 128n + 32k + l takes
    # nibble (k >= 2) of ql[64n + 32(k & 1) + l] and bits 2k..2k+1 of qh[32n + l]; value u - 32
    sc = b.sext(_load(b, p, 192, _V(_I8, 16)), _V(_I16, 16))
    chunks = []
    for n in range(2):
        l0, l1 = _load(b, p, 64 * n, _V(_I8, 32)), _load(b, p, 64 * n + 32, _V(_I8, 32))
        h = _load(b, p, 128 + 32 * n, _V(_I8, 32))
        for k, nib in enumerate((_and(b, l0, 15), _and(b, l1, 15), _lshr(b, l0, 4), _lshr(b, l1, 4))):
            chunks.append(b.or_(nib, _shl(b, _and(b, _lshr(b, h, 2 * k), 3), 4)))
    return _half(b, p, 208), None, chunks, sc, None, 32


def _unpack_q3_k(b, p):
    # hmask[32] @0, qs[64] @32, scales[12] @96, d @108; weight 128n + 32j + l: bits 2j..2j+1 of qs[32n + l]
    # and bit 4n + j of hmask[l] as bit 2; value u - 4; 16 six-bit scales (minus 32), packed as below
    s = _load(b, p, 94, _V(_I8, 16))                            # bytes 94..109: scale byte k is lane k + 2
    lo = _and(b, _lshr(b, _shuf(b, s, [k % 8 + 2 for k in range(16)]), [0] * 8 + [4] * 8), 15)
    hi = _and(b, _lshr(b, _shuf(b, s, [k % 4 + 10 for k in range(16)]), [2 * (k // 4) for k in range(16)]), 3)
    sc = b.sub(b.zext(b.or_(lo, _shl(b, hi, 4)), _V(_I16, 16)), _splat(_I16, 16, 32))
    hm = _load(b, p, 0, _V(_I8, 32))
    chunks = []
    for n in range(2):
        q = _load(b, p, 32 + 32 * n, _V(_I8, 32))
        for j in range(4):
            chunks.append(b.or_(_and(b, _lshr(b, q, 2 * j), 3), _shl(b, _and(b, _lshr(b, hm, 4 * n + j), 1), 2)))
    return _half(b, p, 108), None, chunks, sc, None, 4


def _unpack_q2_k(b, p):
    # scales[16] @0 (low nibble scale, high nibble min per 16 weights), qs[64] @16, d @80, dmin @82;
    # weight 128n + 32j + l: bits 2j..2j+1 of qs[32n + l]
    s = _load(b, p, 0, _V(_I8, 16))
    sc, mn = b.zext(_and(b, s, 15), _V(_I16, 16)), b.zext(_lshr(b, s, 4), _V(_I16, 16))
    chunks = []
    for n in range(2):
        q = _load(b, p, 16 + 32 * n, _V(_I8, 32))
        chunks += [_and(b, _lshr(b, q, 2 * j), 3) for j in range(4)]
    return _half(b, p, 80), _half(b, p, 82), chunks, sc, mn, 0


_K_UNPACK = {"q2_k": _unpack_q2_k, "q3_k": _unpack_q3_k, "q4_k": _unpack_q4_k, "q5_k": _unpack_q5_k,
             "q6_k": _unpack_q6_k}


def _prefetch(b, p):
    pf = _fn(b, "llvm.prefetch.p0i8", ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
    # read, keep in all cache levels; past the array's end it never faults
    b.call(pf, [b.gep(p, [_c64(PREFETCH_AHEAD)]), ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _k_dot_codegen(kind, x86, wide=False):
    """sum over super-blocks of f32(d d_x) * sum_c sc u.x  -  (f32(dmin d_x) * sum mn bsum  or  off sc bsum)."""
    ts, unpack = TYPE_SIZE[kind], _K_UNPACK[kind]

    def codegen(context, b, sig, args):
        nb, wp, xqa, xda, bsa = _dot_span(context, b, sig, args, ts, QK_K, QK_K // 16)
        f32_sums = sig.args[4].dtype == types.float32           # the registry's ActScheme buffers; else int16
        acc = cgutils.alloca_once_value(b, ir.Constant(_F32, 0.0))
        with cgutils.for_range(b, nb) as loop:
            i = loop.index
            p = b.gep(wp, [b.mul(i, _c64(ts))])
            _prefetch(b, p)
            d, dmin, chunks, sc, mn, off = unpack(b, p)
            sumi = _super_sums(b, chunks, sc, [xqa.data], b.mul(i, _c64(QK_K)), x86, wide)[0]
            isum = _reduce_add(b, sumi)                           # |isum| <= 63 * 128 * 128 * 256 < 2^31
            if f32_sums:                                          # whole numbers, |s| <= 16 * 128: exact
                bs = b.fptosi(_load(b, bsa.data, b.mul(i, _c64(16)), _V(_F32, 16)), _V(_I32, 16))
            else:
                bs = b.sext(_load(b, bsa.data, b.mul(i, _c64(16)), _V(_I16, 16)), _V(_I32, 16))
            corr = _reduce_add(b, b.mul(bs, b.sext(mn if mn is not None else sc, _V(_I32, 16))))
            dx = b.load(b.gep(xda.data, [i]))
            if mn is not None:
                t = b.fsub(b.fmul(b.fmul(d, dx), b.sitofp(isum, _F32)), b.fmul(b.fmul(dmin, dx), b.sitofp(corr, _F32)))
            else:
                t = b.fmul(b.fmul(d, dx), b.sitofp(b.sub(isum, b.mul(corr, ir.Constant(_I32, off))), _F32))
            b.store(b.fadd(b.load(acc), t), acc)
        return b.load(acc)

    return codegen


def _k_tile_emit(kind, x86, wide=False):
    """emit(context, b, sig, args, kk) for simd.tile_switch: the row at byte wo times tokens k0 .. k0+kk-1.

    args (w, wo, xq int8 [T, C], xd f32 [T, C/256], xc f32 [T, C/16] (the Q8_K sums of 16), xct (unused),
    k0, kk). Each super-block is unpacked once for kk tokens (its nibbles, the 6-bit scales and their per-chunk
    broadcasts), with one <8 x i32> integer sum and one <8 x f32> accumulator per token. The min (or Q6_K/Q3_K
    offset) term of a token is two <8 x f32> products of its 16 sums with the 16 mins (exact: |bs| <= 16 * 128,
    mn < 64 or |sc| <= 128, two terms a lane < 2^24), scaled into the same accumulator: 4 vector operations a
    token where the transposed sums' 16 broadcast FMAs per 4 tokens took as long as the integer sums (Q4_K,
    64 tokens, in cache, one thread: ~25 against ~45 G MACs/s without them). Against the dot the float sums
    differ in grouping only (8 lanes per token, as simd.py's tiles).
    """
    ts, unpack = TYPE_SIZE[kind], _K_UNPACK[kind]

    def emit(context, b, sig, args, kk):
        wa, wn = _shape0(context, b, sig.args[0], args[0])
        xqa = context.make_array(sig.args[2])(context, b, args[2])
        xda = context.make_array(sig.args[3])(context, b, args[3])
        xca = context.make_array(sig.args[4])(context, b, args[4])
        wo, k0 = args[1], args[6]
        cols = cgutils.unpack_tuple(b, xqa.shape)[1]
        nbx = cgutils.unpack_tuple(b, xda.shape)[1]
        ns = cgutils.unpack_tuple(b, xca.shape)[1]
        nb = _clamp(b, nbx, [(cols, QK_K), (ns, QK_K // 16), (b.sub(wn, wo), ts)])
        nb = b.select(b.icmp_signed("<", wo, _c64(0)), _c64(0), nb)
        wp = b.gep(wa.data, [wo])
        xps = [b.gep(xqa.data, [b.mul(b.add(k0, _c64(k)), cols)]) for k in range(kk)]
        dps = [b.gep(xda.data, [b.mul(b.add(k0, _c64(k)), nbx)]) for k in range(kk)]
        cps = [b.gep(xca.data, [b.mul(b.add(k0, _c64(k)), ns)]) for k in range(kk)]
        fma8 = _fn(b, "llvm.fma.v8f32", _V(_F32, 8), [_V(_F32, 8)] * 3)
        acc = [cgutils.alloca_once_value(b, ir.Constant(_V(_F32, 8), None)) for _ in range(kk)]
        lo, hi = list(range(8)), list(range(8, 16))
        with cgutils.for_range(b, nb) as loop:
            i = loop.index
            p = b.gep(wp, [b.mul(i, _c64(ts))])
            _prefetch(b, p)
            d, dmin, chunks, sc, mn, off = unpack(b, p)
            xb = b.mul(i, _c64(QK_K))
            dx = [b.load(b.gep(dps[k], [i])) for k in range(kk)]
            sumi = _super_sums(b, chunks, sc, xps, xb, x86, wide)
            m16 = b.sitofp(mn if mn is not None else sc, _V(_F32, 16))
            mlo, mhi = _shuf(b, m16, lo), _shuf(b, m16, hi)
            f = dmin if mn is not None else b.fmul(d, ir.Constant(_F32, float(off)))
            for k in range(kk):
                a = b.call(fma8, [b.sitofp(sumi[k], _V(_F32, 8)), _bcast(b, b.fmul(d, dx[k]), 8), b.load(acc[k])])
                bo = b.mul(i, _c64(16))
                cm = b.call(fma8, [mhi, _load(b, cps[k], b.add(bo, _c64(8)), _V(_F32, 8)),
                                   b.fmul(mlo, _load(b, cps[k], bo, _V(_F32, 8)))])       # exact whole numbers
                a = b.call(fma8, [_bcast(b, b.fneg(b.fmul(f, dx[k])), 8), cm, a])
                b.store(a, acc[k])
        return [_hsum_f(b, b.load(acc[k])) for k in range(kk)]

    return emit


def _k_tile_codegen(kind, x86, wide=False):
    """Codegen (w, wo, xq, xd, xc, xct, k0, kk) -> 4 f32: the row times tokens k0 .. k0+kk-1, kk in 1..4."""
    return tile_switch(_k_tile_emit(kind, x86, wide))


def _dot_span(context, b, sig, args, ts, per, per4=None):
    """A row dot's (w, wo, xq, xd[, a4]) -> (blocks, weight pointer, xq, xd, a4 or None): the blocks xd counts,
    clamped to xq's runs of per values, a4's runs of per4 (when given) and the ts-byte blocks left in w after wo;
    none for a negative wo."""
    wa, wn = _shape0(context, b, sig.args[0], args[0])
    xqa, xqn = _shape0(context, b, sig.args[2], args[2])
    xda, nb = _shape0(context, b, sig.args[3], args[3])
    limits = [(xqn, per)]
    a4 = None
    if per4 is not None:
        a4, n4 = _shape0(context, b, sig.args[4], args[4])
        limits.append((n4, per4))
    wo = args[1]
    nb = _clamp(b, nb, limits + [(b.sub(wn, wo), ts)])
    nb = b.select(b.icmp_signed("<", wo, _c64(0)), _c64(0), nb)
    return nb, b.gep(wa.data, [wo]), xqa, xda, a4


def _dequant_span(context, b, sig, args, ts, per):
    """A dequantizer's (w, wo, out, oo, nb) -> (blocks, weight pointer, output pointer): nb clamped to the blocks of
    ts bytes left in w after wo and the runs of per floats left in out after oo, none for a negative offset."""
    wa, wn = _shape0(context, b, sig.args[0], args[0])
    oa, on = _shape0(context, b, sig.args[2], args[2])
    wo, oo = args[1], args[3]
    nb = _clamp(b, args[4], [(b.sub(wn, wo), ts), (b.sub(on, oo), per)])
    nb = b.select(b.or_(b.icmp_signed("<", wo, _c64(0)), b.icmp_signed("<", oo, _c64(0))), _c64(0), nb)
    return nb, b.gep(wa.data, [wo]), b.gep(oa.data, [oo])


def _k_dequant_codegen(kind):
    """out[oo + 256 i + 32 c + l] = f32(d sc) * (u - off) - f32(dmin mn), gguf's order of float operations."""
    ts, unpack = TYPE_SIZE[kind], _K_UNPACK[kind]

    def codegen(context, b, sig, args):
        nb, wp, op = _dequant_span(context, b, sig, args, ts, QK_K)
        with cgutils.for_range(b, nb) as loop:
            i = loop.index
            p = b.gep(wp, [b.mul(i, _c64(ts))])
            d, dmin, chunks, sc, mn, off = unpack(b, p)
            dl = b.fmul(_bcast(b, d, 16), b.sitofp(sc, _V(_F32, 16)))
            ml = b.fmul(_bcast(b, dmin, 16), b.sitofp(mn, _V(_F32, 16))) if mn is not None else None
            for c in range(8):
                sel = [2 * c] * 16 + [2 * c + 1] * 16
                q = b.sub(b.zext(chunks[c], _V(_I32, 32)), _splat(_I32, 32, off))
                y = b.fmul(_shuf(b, dl, sel), b.sitofp(q, _V(_F32, 32)))
                if ml is not None:
                    y = b.fsub(y, _shuf(b, ml, sel))
                dst = b.gep(op, [b.add(b.mul(i, _c64(QK_K)), _c64(32 * c))])
                b.store(y, b.bitcast(dst, _V(_F32, 32).as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


# ---- 32-blocks: Q4_1 (d, m, qs[16]), Q5_0 (d, qh u32, qs[16]); weight j < 16 is the
# low nibble of qs[j], weight j + 16 the high nibble, bit j of qh is bit 4 of weight j.
# Q4_1: w = d u + m;  Q5_0: w = d (u - 16).

def _unpack_32(kind, b, p):
    """-> (d, m or None, u <32 x i8>)."""
    if kind == "q4_1":
        return _half(b, p, 0), _half(b, p, 2), _nibbles32(b, _load(b, p, 4, _V(_I8, 16)))
    u = b.or_(_nibbles32(b, _load(b, p, 6, _V(_I8, 16))), _shl(b, _bits32(b, p, 2), 4))    # Q5_0
    return _half(b, p, 0), None, u


def _dot32_codegen(kind, x86):
    """sum_b f32(d_w d_x) * u.x  +  (Q4_1) m_w * xc  or  (Q5_0) - 16 d_w xc. Generic: arm64.dot32_codegen."""
    if not x86:
        return arm64.dot32_codegen(kind)
    ts = TYPE_SIZE[kind]

    def codegen(context, b, sig, args):
        nb, wp, xqa, xda, xca = _dot_span(context, b, sig, args, ts, 32, 1)
        fma = _fn(b, "llvm.fma.v8f32", _V(_F32, 8), [_V(_F32, 8)] * 3)
        acc = cgutils.alloca_once_value(b, ir.Constant(_V(_F32, 8), None))
        corr = cgutils.alloca_once_value(b, ir.Constant(_F32, 0.0))
        ones = _splat(_I16, 16, 1)
        with cgutils.for_range(b, nb) as loop:
            i = loop.index
            p = b.gep(wp, [b.mul(i, _c64(ts))])
            _prefetch(b, p)
            d, m, u = _unpack_32(kind, b, p)
            x = _load(b, xqa.data, b.mul(i, _c64(32)), _V(_I8, 32))
            s = _chunk_dot(b, u, x, ones, x86)                          # <8 x i32>
            dx = b.load(b.gep(xda.data, [i]))
            b.store(b.call(fma, [b.sitofp(s, _V(_F32, 8)), _bcast(b, b.fmul(d, dx), 8), b.load(acc)]), acc)
            c = b.load(b.gep(xca.data, [i]))
            b.store(b.fadd(b.load(corr), b.fmul(m if m is not None else d, c)), corr)
        tot = _hsum_f(b, b.load(acc))
        if kind == "q5_0":
            return b.fadd(tot, b.fmul(ir.Constant(_F32, -16.0), b.load(corr)))
        return b.fadd(tot, b.load(corr))

    return codegen


def _dequant32_codegen(kind):
    """out[oo + 32 i + j] = d u_j + m (Q4_1) or d (u_j - 16) (Q5_0), gguf's order."""
    ts = TYPE_SIZE[kind]

    def codegen(context, b, sig, args):
        wa, wn = _shape0(context, b, sig.args[0], args[0])
        oa, on = _shape0(context, b, sig.args[2], args[2])
        wo, oo = args[1], args[3]
        nb = _clamp(b, args[4], [(b.sub(wn, wo), ts), (b.sub(on, oo), 32)])
        nb = b.select(b.or_(b.icmp_signed("<", wo, _c64(0)), b.icmp_signed("<", oo, _c64(0))), _c64(0), nb)
        wp, op = b.gep(wa.data, [wo]), b.gep(oa.data, [oo])
        with cgutils.for_range(b, nb) as loop:
            i = loop.index
            d, m, u = _unpack_32(kind, b, b.gep(wp, [b.mul(i, _c64(ts))]))
            q = b.zext(u, _V(_I32, 32))
            if m is None:
                q = b.sub(q, _splat(_I32, 32, 16))
            y = b.fmul(_bcast(b, d, 32), b.sitofp(q, _V(_F32, 32)))
            if m is not None:
                y = b.fadd(y, _bcast(b, m, 32))
            dst = b.gep(op, [b.mul(i, _c64(32))])
            b.store(y, b.bitcast(dst, _V(_F32, 32).as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


def _dot(name, codegen):
    def typer(typingctx, w, wo, xq, xd, xc):
        return types.float32(w, wo, xq, xd, xc), codegen
    typer.__name__ = typer.__qualname__ = name
    return intrinsic(typer)


def _dequant(name, codegen):
    def typer(typingctx, w, wo, out, oo, nb):
        return types.none(w, wo, out, oo, nb), codegen
    typer.__name__ = typer.__qualname__ = name
    return intrinsic(typer)


# One @intrinsic per (type, form), bound to module-level names so cached njit callers find them.
dot_q2_k_ir = _dot("dot_q2_k_ir", _k_dot_codegen("q2_k", False))
dot_q3_k_ir = _dot("dot_q3_k_ir", _k_dot_codegen("q3_k", False))
dot_q4_k_ir = _dot("dot_q4_k_ir", _k_dot_codegen("q4_k", False))
dot_q5_k_ir = _dot("dot_q5_k_ir", _k_dot_codegen("q5_k", False))
dot_q6_k_ir = _dot("dot_q6_k_ir", _k_dot_codegen("q6_k", False))
dot_q4_1_ir = _dot("dot_q4_1_ir", _dot32_codegen("q4_1", False))
dot_q5_0_ir = _dot("dot_q5_0_ir", _dot32_codegen("q5_0", False))

dot_q2_k_x86 = _dot("dot_q2_k_x86", _k_dot_codegen("q2_k", True))
dot_q3_k_x86 = _dot("dot_q3_k_x86", _k_dot_codegen("q3_k", True))
dot_q4_k_x86 = _dot("dot_q4_k_x86", _k_dot_codegen("q4_k", True))
dot_q5_k_x86 = _dot("dot_q5_k_x86", _k_dot_codegen("q5_k", True))
dot_q6_k_x86 = _dot("dot_q6_k_x86", _k_dot_codegen("q6_k", True))
dot_q4_1_x86 = _dot("dot_q4_1_x86", _dot32_codegen("q4_1", True))
dot_q5_0_x86 = _dot("dot_q5_0_x86", _dot32_codegen("q5_0", True))

# 512-bit sums (AVX-512BW only: the fast form where HAVE_AVX512)
dot_q2_k_x86w = _dot("dot_q2_k_x86w", _k_dot_codegen("q2_k", True, True))
dot_q3_k_x86w = _dot("dot_q3_k_x86w", _k_dot_codegen("q3_k", True, True))
dot_q4_k_x86w = _dot("dot_q4_k_x86w", _k_dot_codegen("q4_k", True, True))
dot_q5_k_x86w = _dot("dot_q5_k_x86w", _k_dot_codegen("q5_k", True, True))
dot_q6_k_x86w = _dot("dot_q6_k_x86w", _k_dot_codegen("q6_k", True, True))

dequant_q2_k = _dequant("dequant_q2_k", _k_dequant_codegen("q2_k"))
dequant_q3_k = _dequant("dequant_q3_k", _k_dequant_codegen("q3_k"))
dequant_q4_k = _dequant("dequant_q4_k", _k_dequant_codegen("q4_k"))
dequant_q5_k = _dequant("dequant_q5_k", _k_dequant_codegen("q5_k"))
dequant_q6_k = _dequant("dequant_q6_k", _k_dequant_codegen("q6_k"))
dequant_q4_1 = _dequant("dequant_q4_1", _dequant32_codegen("q4_1"))
dequant_q5_0 = _dequant("dequant_q5_0", _dequant32_codegen("q5_0"))


# ---- BF16: uint16 bits, f32 = bits << 16 (exact) -------------------------------------------

@intrinsic
def dot_bf16_ir(typingctx, w, wo, x, n8):
    """sum_i bf16(w[wo + i]) * x[i] for i < 8 * n8 (clamped to what w and x hold).

    Four 8-lane FMA accumulators, 32 weights a step: one accumulator waits on the FMA latency (4 cycles).
    """
    def codegen(context, b, sig, args):
        wa, wn = _shape0(context, b, sig.args[0], args[0])
        xa, xn = _shape0(context, b, sig.args[2], args[2])
        wo = args[1]
        n = _clamp(b, args[3], [(b.sub(wn, wo), 8), (xn, 8)])
        n = b.select(b.icmp_signed("<", wo, _c64(0)), _c64(0), n)
        wp = b.gep(wa.data, [wo])
        fma = _fn(b, "llvm.fma.v8f32", _V(_F32, 8), [_V(_F32, 8)] * 3)
        accs = [cgutils.alloca_once_value(b, ir.Constant(_V(_F32, 8), None)) for _ in range(4)]

        def step(o, acc):
            wv = b.bitcast(_shl(b, b.zext(_load(b, wp, o, _V(_I16, 8)), _V(_I32, 8)), 16), _V(_F32, 8))
            b.store(b.call(fma, [wv, _load(b, xa.data, o, _V(_F32, 8)), b.load(acc)]), acc)

        n4 = b.sdiv(n, _c64(4))
        with cgutils.for_range(b, n4) as loop:
            o = b.mul(loop.index, _c64(32))
            for k in range(4):
                step(b.add(o, _c64(8 * k)), accs[k])
        with cgutils.for_range(b, b.sub(n, b.mul(n4, _c64(4)))) as loop:
            step(b.mul(b.add(b.mul(n4, _c64(4)), loop.index), _c64(8)), accs[0])
        v = b.fadd(b.fadd(b.load(accs[0]), b.load(accs[1])), b.fadd(b.load(accs[2]), b.load(accs[3])))
        return _hsum_f(b, v)
    return types.float32(w, wo, x, types.int64), codegen


@intrinsic
def bf16_to_f32(typingctx, u):
    """bf16 bits (any integer type, low 16 bits) -> float32: the bits shifted into the top half."""
    def codegen(context, b, sig, args):
        v = args[0]
        v = b.trunc(v, _I16) if v.type.width > 16 else v
        return b.bitcast(b.shl(b.zext(v, _I32), ir.Constant(_I32, 16)), _F32)
    return types.float32(u), codegen


@njit(cache=True)
def dequant_bf16(w, wo, out, oo, n):
    """out[oo : oo + n] = bf16 bits w[wo : wo + n] as float32 (exact)."""
    n = min(n, w.shape[0] - wo, out.shape[0] - oo) if wo >= 0 and oo >= 0 else 0
    for i in range(n):
        out[oo + i] = bf16_to_f32(w[wo + i])


# ---- activations -------------------------------------------------------------------------

@njit(cache=True)
def quantize_q8_k(x, xq, xd, xbs):
    """x f32 [C] -> xq int8 [C], xd f32 [C/256], xbs int16 [C/16]: llama.cpp's quantize_row_q8_K_ref.

    Per 256: max = the first x of largest |x|; iscale = -127 / max; q = min(127, rint(iscale x)) (the
    reference's nearest_int rounds half to even, as rint); d = 1 / iscale; bsums of each 16 q.
    """
    for b in range(xd.shape[0]):
        o = b * QK_K
        amax = np.float32(0.0)
        mx = np.float32(0.0)
        finite = True
        for j in range(QK_K):
            ax = abs(x[o + j])
            finite &= ax <= np.float32(np.inf)                # False for NaN
            if ax > amax:
                amax = ax
                mx = x[o + j]
        if amax == 0 or not finite or amax == np.float32(np.inf):
            # a non-finite input gets a NaN scale, so the product is NaN (the network names the layer), never a
            # division by zero in here or finite garbage
            xd[b] = np.float32(0.0) if finite and amax == 0 else np.float32(np.nan)
            for j in range(QK_K):
                xq[o + j] = 0
            for k in range(16):
                xbs[b * 16 + k] = 0
            continue
        iscale = np.float32(-127.0) / mx
        for k in range(16):
            s = 0
            for j in range(16):
                v = min(127, int(np.rint(iscale * x[o + 16 * k + j])))
                xq[o + 16 * k + j] = v
                s += v
            xbs[b * 16 + k] = s
        xd[b] = np.float32(1.0) / iscale


# ---- the dots drivers call ---------------------------------------------------------------

if HAVE_AVX512:
    dot_q2_k, dot_q3_k, dot_q4_k, dot_q5_k = dot_q2_k_x86w, dot_q3_k_x86w, dot_q4_k_x86w, dot_q5_k_x86w
    dot_q6_k = dot_q6_k_x86w
    dot_q4_1, dot_q5_0 = dot_q4_1_x86, dot_q5_0_x86
elif HAVE_AVX2:
    dot_q2_k, dot_q3_k, dot_q4_k, dot_q5_k, dot_q6_k = dot_q2_k_x86, dot_q3_k_x86, dot_q4_k_x86, dot_q5_k_x86, dot_q6_k_x86
    dot_q4_1, dot_q5_0 = dot_q4_1_x86, dot_q5_0_x86
else:
    dot_q2_k, dot_q3_k, dot_q4_k, dot_q5_k, dot_q6_k = dot_q2_k_ir, dot_q3_k_ir, dot_q4_k_ir, dot_q5_k_ir, dot_q6_k_ir
    dot_q4_1, dot_q5_0 = dot_q4_1_ir, dot_q5_0_ir
dot_bf16 = dot_bf16_ir


# ---- the registry's codegens (blocks.py KERNELS rows), in simd.py's argument lists ------------------

def _registry_dot(kind, x86=HAVE_AVX2):
    """Codegen (w, wo, x, xq, xd, xc) -> f32: the x86 form where HAVE_AVX2 (HAVE_AVX512: the K-quants' 512-bit
    sums), else the generic one; x is not read."""
    cg = _k_dot_codegen(kind, x86, x86 and HAVE_AVX512) if kind in _K_UNPACK else _dot32_codegen(kind, x86)

    def codegen(context, b, sig, args):
        inner = typing.signature(sig.return_type, sig.args[0], sig.args[1], *sig.args[3:6])
        return cg(context, b, inner, [args[0], args[1], *args[3:6]])
    return codegen


def _registry_dequant(kind):
    """Codegen (w, wo, out, oo, cols): cols weights (whole blocks) from byte wo of w into out[oo:]."""
    cg = (_k_dequant_codegen if kind in _K_UNPACK else _dequant32_codegen)(kind)

    def codegen(context, b, sig, args):
        return cg(context, b, sig, [*args[:4], b.sdiv(args[4], _c64(BLOCK[kind]))])
    return codegen


REGISTRY = {t: (_registry_dot(t), _registry_dequant(t)) for t in _TYPES}
NEON = {t: _registry_dot(t, False) for t in _TYPES}        # the arm64 dots (the generic forms: arm64.py)
# 1 row x 4 token tiles for int_matmul: the x86 form where HAVE_AVX2, the generic one (arm64.chunk_dot: sdot)
# on an arm64 host; none on the portable build (the dots run per (row, token)). NEON_TILES: the arm64 ones.
NEON_TILES = {t: _k_tile_codegen(t, False) for t in _K_UNPACK}
TILES = {t: _k_tile_codegen(t, True, HAVE_AVX512) if HAVE_AVX2 else NEON_TILES[t] if arm64.ARM64 else None
         for t in _K_UNPACK}
