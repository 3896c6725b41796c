"""Block dot products written as LLVM IR, called from @njit code.

Why IR and not plain Numba loops: Numba promotes small-int arithmetic to int64, so a
nibble-times-int8 loop never becomes vpmaddubsw; the plain-Numba float loops below
measure ~1 GB/s per core on Q4_0 (in cache), the AVX2 integer path ~11 GB/s.
This is llama.cpp's `ggml_vec_dot_q4_0_q8_0` / `ggml_vec_dot_q8_0_q8_0` for AVX2:
per 32-weight block, u8 x s8 -> pairs of i16 (vpmaddubsw), pairs of i16 -> i32
(vpmaddwd), i32 -> f32, FMA with d_w * d_x into an 8-lane float accumulator.

Every dot takes a flat uint8/uint16 array and the offset of the row inside it, so
callers pass the whole matrix (no per-row views). Activations come pre-quantized
(see `matvec.quantize_q8`): xq int8 [cols], xd f32 [cols/32] scales,
xc f32 [cols/32] = 8 * xd * sum(xq of block) (Q4_0's -8 offset, folded out).

Without AVX2 (`HAVE_AVX2` False) the same names are plain-Numba loops with the same
arithmetic; the tests check both.
"""
from __future__ import annotations

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

HAVE_AVX2 = "+avx2" in llvm.get_host_cpu_features().flatten().split(",")

# Bytes ahead of the current block that a dot asks the cache for. Q4_0 matvec, 14336 x 4096, side by side:
# 1 thread 9.2 -> 10.1-10.4 GB/s, 2 threads 16.1-17.7 -> 17.9-20.3 GB/s at 2048-2304 (3072-8192 no better).
PREFETCH_AHEAD = 2048

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V = ir.VectorType


def _splat(ty, n, v):
    return ir.Constant(_V(ty, n), [v] * n)


def _fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _load(builder, base, off, ty):
    """Unaligned load of `ty` at byte/element offset `off` from pointer `base`."""
    return builder.load(builder.bitcast(builder.gep(base, [off]), ty.as_pointer()), align=1)


def _hsum8(builder, v):
    tot = builder.extract_element(v, ir.Constant(_I32, 0))
    for k in range(1, 8):
        tot = builder.fadd(tot, builder.extract_element(v, ir.Constant(_I32, k)))
    return tot


def _bcast(builder, s, n=8):
    v = builder.insert_element(ir.Constant(_V(_F32, n), None), s, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_V(_I32, n), [0] * n))


def _data(context, builder, ty, val):
    return context.make_array(ty)(context, builder, val)


def _block_dot_codegen(kind):
    """IR for sum_b d_w[b] * d_x[b] * <q_w[b], q_x[b]> (minus the Q4_0 offset term)."""
    bytes_per_block = {"q4_0": 18, "q8_0": 34}[kind]

    def codegen(context, builder, sig, args):
        wa = _data(context, builder, sig.args[0], args[0])
        xqa = _data(context, builder, sig.args[2], args[2])
        xda = _data(context, builder, sig.args[3], args[3])
        xca = _data(context, builder, sig.args[4], args[4])
        nb = cgutils.unpack_tuple(builder, xda.shape)[0]
        wp = builder.gep(wa.data, [args[1]])
        maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V(_I16, 16), [_V(_I8, 32)] * 2)
        maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _V(_I32, 8), [_V(_I16, 16)] * 2)
        fma = _fn(builder, "llvm.fma.v8f32", _V(_F32, 8), [_V(_F32, 8)] * 3)
        prefetch = _fn(builder, "llvm.prefetch.p0i8", ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
        acc = cgutils.alloca_once_value(builder, ir.Constant(_V(_F32, 8), None))
        corr = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            o = builder.mul(b, ir.Constant(_I64, bytes_per_block))
            # read, keep in all cache levels; past the row's end it is the next row's (never faults)
            builder.call(prefetch, [builder.gep(wp, [builder.add(o, ir.Constant(_I64, PREFETCH_AHEAD))]),
                                    ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
            d = builder.fpext(_load(builder, wp, o, ir.HalfType()), _F32)
            o2 = builder.add(o, ir.Constant(_I64, 2))
            x = _load(builder, xqa.data, builder.mul(b, ir.Constant(_I64, 32)), _V(_I8, 32))
            if kind == "q4_0":
                v = _load(builder, wp, o2, _V(_I8, 16))
                lo = builder.and_(v, _splat(_I8, 16, 15))             # elements 0..15
                hi = builder.lshr(v, _splat(_I8, 16, 4))              # elements 16..31
                u = builder.shuffle_vector(lo, hi, ir.Constant(_V(_I32, 32), list(range(32))))
            else:
                # vpmaddubsw wants an unsigned left operand: |w| and x with w's sign.
                # |w| <= 128, |x| <= 127, so a pair sum <= 32385 never saturates i16.
                w = _load(builder, wp, o2, _V(_I8, 32))
                neg = builder.icmp_signed("<", w, _splat(_I8, 32, 0))
                u = builder.select(neg, builder.neg(w), w)
                x = builder.select(neg, builder.neg(x), x)
            p = builder.call(maddwd, [builder.call(maddubs, [u, x]), _splat(_I16, 16, 1)])
            dx = builder.load(builder.gep(xda.data, [b]))
            s = builder.fmul(d, dx)
            builder.store(builder.call(fma, [builder.sitofp(p, _V(_F32, 8)), _bcast(builder, s), builder.load(acc)]), acc)
            if kind == "q4_0":
                c = builder.load(builder.gep(xca.data, [b]))
                builder.store(builder.fadd(builder.load(corr), builder.fmul(d, c)), corr)
        return builder.fsub(_hsum8(builder, builder.load(acc)), builder.load(corr))

    return codegen


@intrinsic
def _dot_q4_0_avx2(typingctx, w, wo, xq, xd, xc):
    return types.float32(w, wo, xq, xd, xc), _block_dot_codegen("q4_0")


@intrinsic
def _dot_q8_0_avx2(typingctx, w, wo, xq, xd, xc):
    return types.float32(w, wo, xq, xd, xc), _block_dot_codegen("q8_0")


@intrinsic
def f16_to_f32(typingctx, u):
    """IEEE half stored as uint16 -> float32 (vcvtph2ps with F16C; LLVM lowers it anywhere)."""
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(builder.trunc(args[0], _I16), ir.HalfType()), _F32)
    return types.float32(u), codegen


@intrinsic
def dot_f16(typingctx, w, wo, x, n8):
    """sum_i w[wo + i] * x[i] for i < 8 * n8, w a uint16 (f16 bits) array."""
    def codegen(context, builder, sig, args):
        wa = _data(context, builder, sig.args[0], args[0])
        xa = _data(context, builder, sig.args[2], args[2])
        wp = builder.gep(wa.data, [args[1]])
        fma = _fn(builder, "llvm.fma.v8f32", _V(_F32, 8), [_V(_F32, 8)] * 3)
        acc = cgutils.alloca_once_value(builder, ir.Constant(_V(_F32, 8), None))
        with cgutils.for_range(builder, args[3]) as loop:
            o = builder.mul(loop.index, ir.Constant(_I64, 8))
            wv = builder.fpext(_load(builder, wp, o, _V(ir.HalfType(), 8)), _V(_F32, 8))
            xv = _load(builder, xa.data, o, _V(_F32, 8))
            builder.store(builder.call(fma, [wv, xv, builder.load(acc)]), acc)
        return _hsum8(builder, builder.load(acc))
    return types.float32(w, wo, x, types.int64), codegen


def _tile_codegen(kind, rr, kk):
    """IR for an rr-rows x kk-tokens tile of Y = X W^T: rr * kk block dots sharing loads.

    Each block of a weight row is unpacked once for kk tokens and each token's block loaded once for rr
    rows; rr * kk independent accumulators keep the FMA and multiply units busy (one row at a time waits
    on its accumulator). Arguments: w (flat uint8), wo (byte offset of row r), rb (row bytes), xq int8
    [T, C], xd f32 [T, NB], xct f32 [NB, >= k0 + 8] (Q4_0 offset terms, transposed: tokens contiguous),
    k0 (first token). Returns the rr * kk dots, row-major (row r's kk tokens first).
    """
    bytes_per_block = {"q4_0": 18, "q8_0": 34}[kind]

    def codegen(context, builder, sig, args):
        c64 = lambda v: ir.Constant(_I64, v)                     # noqa: E731
        wa = _data(context, builder, sig.args[0], args[0])
        xqa = _data(context, builder, sig.args[3], args[3])
        xda = _data(context, builder, sig.args[4], args[4])
        xca = _data(context, builder, sig.args[5], args[5])
        wo, rb, k0 = args[1], args[2], args[6]
        cols = cgutils.unpack_tuple(builder, xqa.shape)[1]
        nb = cgutils.unpack_tuple(builder, xda.shape)[1]
        tp = cgutils.unpack_tuple(builder, xca.shape)[1]
        wps = [builder.gep(wa.data, [builder.add(wo, builder.mul(rb, c64(i)))]) for i in range(rr)]
        xps = [builder.gep(xqa.data, [builder.mul(builder.add(k0, c64(k)), cols)]) for k in range(kk)]
        dps = [builder.gep(xda.data, [builder.mul(builder.add(k0, c64(k)), nb)]) for k in range(kk)]
        maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V(_I16, 16), [_V(_I8, 32)] * 2)
        maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _V(_I32, 8), [_V(_I16, 16)] * 2)
        psign = _fn(builder, "llvm.x86.avx2.psign.b", _V(_I8, 32), [_V(_I8, 32)] * 2)
        fma = _fn(builder, "llvm.fma.v8f32", _V(_F32, 8), [_V(_F32, 8)] * 3)
        cw = 4 if kk <= 4 else 8                                 # lanes of the Q4_0 offset terms: tokens k0..
        fmac = _fn(builder, f"llvm.fma.v{cw}f32", _V(_F32, cw), [_V(_F32, cw)] * 3)
        acc = [[cgutils.alloca_once_value(builder, ir.Constant(_V(_F32, 8), None)) for _ in range(kk)]
               for _ in range(rr)]
        corr = [cgutils.alloca_once_value(builder, ir.Constant(_V(_F32, cw), None)) for _ in range(rr)]
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            o = builder.mul(b, c64(bytes_per_block))
            o2 = builder.add(o, c64(2))
            xs = [_load(builder, xps[k], builder.mul(b, c64(32)), _V(_I8, 32)) for k in range(kk)]
            dx = [_bcast(builder, builder.load(builder.gep(dps[k], [b]))) for k in range(kk)]
            if kind == "q4_0":
                xc = _load(builder, xca.data, builder.add(builder.mul(b, tp), k0), _V(_F32, cw))
            for i in range(rr):
                d = builder.fpext(_load(builder, wps[i], o, ir.HalfType()), _F32)
                if kind == "q4_0":
                    v = _load(builder, wps[i], o2, _V(_I8, 16))
                    lo = builder.and_(v, _splat(_I8, 16, 15))
                    hi = builder.lshr(v, _splat(_I8, 16, 4))
                    u = builder.shuffle_vector(lo, hi, ir.Constant(_V(_I32, 32), list(range(32))))
                    builder.store(builder.call(fmac, [_bcast(builder, d, cw), xc, builder.load(corr[i])]), corr[i])
                    xw = xs
                else:                                            # |w| and x with w's sign, as in the dot
                    w = _load(builder, wps[i], o2, _V(_I8, 32))
                    u = builder.call(psign, [w, w])
                    xw = [builder.call(psign, [x, w]) for x in xs]
                dv = _bcast(builder, d)
                for k in range(kk):
                    p = builder.call(maddwd, [builder.call(maddubs, [u, xw[k]]), _splat(_I16, 16, 1)])
                    s = builder.fmul(dv, dx[k])
                    a = builder.call(fma, [builder.sitofp(p, _V(_F32, 8)), s, builder.load(acc[i][k])])
                    builder.store(a, acc[i][k])
        vals = []
        for i in range(rr):
            cv = builder.load(corr[i])
            for k in range(kk):
                t = _hsum8(builder, builder.load(acc[i][k]))
                vals.append(builder.fsub(t, builder.extract_element(cv, ir.Constant(_I32, k))) if kind == "q4_0" else t)
        return context.make_tuple(builder, sig.return_type, vals)

    return codegen


def _tile(kind, rr, kk):
    codegen = _tile_codegen(kind, rr, kk)

    @intrinsic
    def tile(typingctx, w, wo, rb, xq, xd, xct, k0):
        return types.UniTuple(types.float32, rr * kk)(w, wo, rb, xq, xd, xct, k0), codegen
    return tile


# 1 row x 4 tokens tiles for matvec.matmul_* (1 x 1..3 at the edge). At 24 and 120 tokens (14328 x 4096 Q4_0,
# 2 threads) 1 x 4 ran 111 GFLOP/s, 1 x 3 102, 1 x 5 104, 1 x 6 89, 2 x 2 86, 2 x 4 76-83 (its 8 accumulators
# and 4 token vectors spill), 4 x 2 63.
tile_q4_0_x1, tile_q4_0_x2, tile_q4_0_x3, tile_q4_0_x4 = (_tile("q4_0", 1, k) for k in (1, 2, 3, 4))
tile_q8_0_x1, tile_q8_0_x2, tile_q8_0_x3, tile_q8_0_x4 = (_tile("q8_0", 1, k) for k in (1, 2, 3, 4))


def _dequant_codegen(kind):
    """IR for out[oo + 32 b + j] = d_b * q_bj over nb blocks starting at byte wo of w."""
    bytes_per_block = {"q4_0": 18, "q8_0": 34}[kind]

    def codegen(context, builder, sig, args):
        wa = _data(context, builder, sig.args[0], args[0])
        oa = _data(context, builder, sig.args[2], args[2])
        wp = builder.gep(wa.data, [args[1]])
        op = builder.gep(oa.data, [args[3]])
        with cgutils.for_range(builder, args[4]) as loop:
            b = loop.index
            o = builder.mul(b, ir.Constant(_I64, bytes_per_block))
            d = builder.fpext(_load(builder, wp, o, ir.HalfType()), _F32)
            o2 = builder.add(o, ir.Constant(_I64, 2))
            if kind == "q4_0":
                v = _load(builder, wp, o2, _V(_I8, 16))
                lo = builder.and_(v, _splat(_I8, 16, 15))
                hi = builder.lshr(v, _splat(_I8, 16, 4))
                q = builder.shuffle_vector(lo, hi, ir.Constant(_V(_I32, 32), list(range(32))))
                q = builder.sub(builder.zext(q, _V(_I32, 32)), _splat(_I32, 32, 8))
            else:
                q = builder.sext(_load(builder, wp, o2, _V(_I8, 32)), _V(_I32, 32))
            dv = _bcast(builder, d, 32)
            dst = builder.bitcast(builder.gep(op, [builder.mul(b, ir.Constant(_I64, 32))]), _V(_F32, 32).as_pointer())
            builder.store(builder.fmul(builder.sitofp(q, _V(_F32, 32)), dv), dst, align=4)
        return context.get_dummy_value()

    return codegen


@intrinsic
def dequant_q4_0(typingctx, w, wo, out, oo, nb):
    """out[oo : oo + 32 nb] = the nb Q4_0 blocks at byte wo of w, as float32 (generic LLVM IR)."""
    return types.none(w, wo, out, oo, nb), _dequant_codegen("q4_0")


@intrinsic
def dequant_q8_0(typingctx, w, wo, out, oo, nb):
    """out[oo : oo + 32 nb] = the nb Q8_0 blocks at byte wo of w, as float32."""
    return types.none(w, wo, out, oo, nb), _dequant_codegen("q8_0")


@njit(cache=True)
def dot_q4_0_portable(w, wo, xq, xd, xc):
    acc = np.float32(0.0)
    for b in range(xd.shape[0]):
        o = wo + b * 18
        s = 0
        for j in range(16):
            v = w[o + 2 + j]
            s += (v & 15) * xq[b * 32 + j] + (v >> 4) * xq[b * 32 + 16 + j]
        d = f16_to_f32(np.uint16(w[o]) | np.uint16(w[o + 1]) << np.uint16(8))
        acc += d * (xd[b] * np.float32(s) - xc[b])
    return acc


@njit(cache=True)
def dot_q8_0_portable(w, wo, xq, xd, xc):
    acc = np.float32(0.0)
    for b in range(xd.shape[0]):
        o = wo + b * 34
        s = 0
        for j in range(32):
            s += np.int8(w[o + 2 + j]) * xq[b * 32 + j]
        d = f16_to_f32(np.uint16(w[o]) | np.uint16(w[o + 1]) << np.uint16(8))
        acc += d * xd[b] * np.float32(s)
    return acc


dot_q4_0 = _dot_q4_0_avx2 if HAVE_AVX2 else dot_q4_0_portable
dot_q8_0 = _dot_q8_0_avx2 if HAVE_AVX2 else dot_q8_0_portable
