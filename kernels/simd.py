"""Row kernels written as LLVM IR: one codegen per (kernel, weight type), switched on in blocks.py.

Why IR and not plain Numba loops: Numba promotes small-int arithmetic to int64, so a
nibble-times-int8 loop never becomes vpmaddubsw; the plain-Numba float loops below
measure ~1 GB/s per core on Q4_0 (in cache), the AVX2 integer path ~11 GB/s.
This is llama.cpp's `ggml_vec_dot_q4_0_q8_0` / `ggml_vec_dot_q8_0_q8_0` for AVX2:
per 32-weight block, u8 x s8 -> pairs of i16 (vpmaddubsw), pairs of i16 -> i32
(vpmaddwd), i32 -> f32, FMA with d_w * d_x into an 8-lane float accumulator.

Each kernel is a codegen(context, builder, sig, args) -> value, not an intrinsic of its own: a
KERNELS row (blocks.py) names a type's codegens, and blocks.py builds one intrinsic per kernel
that switches on the type code, so the drivers call one function for every type and nothing
between a driver and the IR takes references (Numba's refcounting on every row of an njit
switch function cost 50 ns per row, more than a 256-weight Q4_0 dot). Argument lists, the same
for every type of a kernel:
  dot      (w, wo, x, xq, xd, xc) -> f32      the row at byte wo of flat uint8 w, times x
  tile     (w, wo, xq, xd, xc, xct, k0, kk) -> 4 f32   the row times tokens k0 .. k0+kk-1, kk <= 4
  dequant  (w, wo, out, oo, cols) -> none     out[oo : oo + cols] = the row as float32
Activations come pre-quantized (activations.Q8, `activations.quantize_q8`): xq int8 [cols],
xd f32 [cols/32] scales, xc f32 [cols/32] = xd * sum(xq of block), from which Q4_0's -8 offset
is 8 * d_w * xc. Float types read x itself.

Without AVX2 (`HAVE_AVX2` False; LAZYMOE_NO_AVX2=1 forces it, for the tests) the integer dots
are plain-Numba `*_portable` loops with the same arithmetic, compiled in place, and there are
no tiles; the float dots and the dequantizers are generic IR on every CPU.
"""
from __future__ import annotations

import os

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, typing
from numba.extending import intrinsic

# Numba's cache does not see this flag: kernels/__init__.py keys the cache directory by it too.
HAVE_AVX2 = "+avx2" in llvm.get_host_cpu_features().flatten().split(",") and not os.environ.get("LAZYMOE_NO_AVX2")
# 512-bit integer forms (kquant.py's K-quant sums) where AVX-512BW is there; LAZYMOE_NO_AVX512=1 forces the 256-bit
# AVX2 forms (the tests run them so on any x86 machine), LAZYMOE_NO_AVX2 the portable ones.
HAVE_AVX512 = (HAVE_AVX2 and "+avx512bw" in llvm.get_host_cpu_features().flatten().split(",")
               and not os.environ.get("LAZYMOE_NO_AVX512"))

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


def _high_bits(builder, wp, off):
    """<32 x i8>: 16 where bit j of the little-endian u32 at byte off is set (Q5's fifth bit of element j)."""
    qh = _load(builder, wp, off, _I32)
    v = builder.insert_element(ir.Constant(_V(_I32, 32), None), qh, ir.Constant(_I32, 0))
    v = builder.shuffle_vector(v, v, ir.Constant(_V(_I32, 32), [0] * 32))
    bits = builder.and_(v, ir.Constant(_V(_I32, 32), [1 << j for j in range(32)]))
    return builder.select(builder.icmp_unsigned("!=", bits, _splat(_I32, 32, 0)), _splat(_I8, 32, 16), _splat(_I8, 32, 0))


def _block_dot_codegen(kind):
    """IR for sum_b d_w[b] * d_x[b] * <q_w[b], q_x[b]> plus the offset term: Q4_0's -8 * d_w[b] * xc[b],
    Q5_1's m_w[b] * xc[b] (xc = d_x * sum q_x, so the offset costs one multiply-add per block)."""
    bytes_per_block = {"q4_0": 18, "q5_1": 24, "q8_0": 34}[kind]
    qoff = 8 if kind == "q5_1" else 2                            # byte of the quants in a block

    def codegen(context, builder, sig, args):
        wa = _data(context, builder, sig.args[0], args[0])
        xqa = _data(context, builder, sig.args[3], args[3])
        xda = _data(context, builder, sig.args[4], args[4])
        xca = _data(context, builder, sig.args[5], args[5])
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
            oq = builder.add(o, ir.Constant(_I64, qoff))
            x = _load(builder, xqa.data, builder.mul(b, ir.Constant(_I64, 32)), _V(_I8, 32))
            if kind in ("q4_0", "q5_1"):
                v = _load(builder, wp, oq, _V(_I8, 16))
                lo = builder.and_(v, _splat(_I8, 16, 15))             # elements 0..15
                hi = builder.lshr(v, _splat(_I8, 16, 4))              # elements 16..31
                u = builder.shuffle_vector(lo, hi, ir.Constant(_V(_I32, 32), list(range(32))))
                if kind == "q5_1":
                    u = builder.or_(u, _high_bits(builder, wp, builder.add(o, ir.Constant(_I64, 4))))
            else:
                # vpmaddubsw wants an unsigned left operand: |w| and x with w's sign.
                # |w| <= 128, |x| <= 127, so a pair sum <= 32385 never saturates i16.
                w = _load(builder, wp, oq, _V(_I8, 32))
                neg = builder.icmp_signed("<", w, _splat(_I8, 32, 0))
                u = builder.select(neg, builder.neg(w), w)
                x = builder.select(neg, builder.neg(x), x)
            p = builder.call(maddwd, [builder.call(maddubs, [u, x]), _splat(_I16, 16, 1)])
            dx = builder.load(builder.gep(xda.data, [b]))
            s = builder.fmul(d, dx)
            builder.store(builder.call(fma, [builder.sitofp(p, _V(_F32, 8)), _bcast(builder, s), builder.load(acc)]), acc)
            if kind in ("q4_0", "q5_1"):
                c = builder.load(builder.gep(xca.data, [b]))
                dm = d if kind == "q4_0" else builder.fpext(_load(builder, wp, builder.add(o, ir.Constant(_I64, 2)),
                                                                   ir.HalfType()), _F32)
                builder.store(builder.fadd(builder.load(corr), builder.fmul(dm, c)), corr)
        tot = _hsum8(builder, builder.load(acc))
        if kind == "q4_0":
            return builder.fsub(tot, builder.fmul(ir.Constant(_F32, 8.0), builder.load(corr)))
        return builder.fadd(tot, builder.load(corr)) if kind == "q5_1" else tot

    return codegen


@intrinsic
def f16_to_f32(typingctx, u):
    """IEEE half stored as uint16 -> float32 (vcvtph2ps with F16C; LLVM lowers it anywhere)."""
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(builder.trunc(args[0], _I16), ir.HalfType()), _F32)
    return types.float32(u), codegen


def _widen(builder, v, kind):
    """f16, bf16 (i16 bits) or f32 weights (a scalar or a vector) -> float32: bf16 is its bits << 16, exact."""
    if kind == "f16":
        return builder.fpext(v, _V(_F32, v.type.count) if isinstance(v.type, ir.VectorType) else _F32)
    if kind == "bf16":
        if isinstance(v.type, ir.VectorType):
            n = v.type.count
            return builder.bitcast(builder.shl(builder.zext(v, _V(_I32, n)), _splat(_I32, n, 16)), _V(_F32, n))
        return builder.bitcast(builder.shl(builder.zext(v, _I32), ir.Constant(_I32, 16)), _F32)
    return v


def _float_dot_codegen(kind):
    """IR for sum_c w_c x_c over the C = len(x) f16, bf16 or f32 weights at byte wo of a flat uint8 w.

    Four 8-lane accumulators over 32 weights at a time (one waits on its FMA's latency), then 8 at a
    time, then a scalar tail. Generic LLVM IR (f16 -> f32 is vcvtph2ps with F16C): no portable twin.
    Against the plain-Numba loops they replaced, 4096 x 4096 from DRAM (benchmarks/kernels_ab.py, 2026-12-01):
    f16 1.6-1.8x; f32 0.95x without the prefetch, 1.04x with it.
    """
    ety = {"f16": ir.HalfType(), "bf16": _I16, "f32": _F32}[kind]
    esz = 4 if kind == "f32" else 2

    def codegen(context, builder, sig, args):
        wa = _data(context, builder, sig.args[0], args[0])
        xa = _data(context, builder, sig.args[2], args[2])
        widen = lambda v: _widen(builder, v, kind)                  # noqa: E731
        cols = cgutils.unpack_tuple(builder, xa.shape)[0]
        wp = builder.bitcast(builder.gep(wa.data, [args[1]]), ety.as_pointer())
        fma = _fn(builder, "llvm.fma.v8f32", _V(_F32, 8), [_V(_F32, 8)] * 3)
        acc = [cgutils.alloca_once_value(builder, ir.Constant(_V(_F32, 8), None)) for _ in range(4)]

        def step(o, a):
            wv = widen(_load(builder, wp, o, _V(ety, 8)))
            builder.store(builder.call(fma, [wv, _load(builder, xa.data, o, _V(_F32, 8)), builder.load(a)]), a)

        n32 = builder.sdiv(cols, ir.Constant(_I64, 32))
        n8 = builder.sdiv(cols, ir.Constant(_I64, 8))
        prefetch = _fn(builder, "llvm.prefetch.p0i8", ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
        bp = builder.gep(wa.data, [args[1]])
        with cgutils.for_range(builder, n32) as loop:
            base = builder.mul(loop.index, ir.Constant(_I64, 32))
            for line in range(0, 32 * esz, 64):           # each 64-byte line PREFETCH_AHEAD bytes on, as the block dots
                ahead = builder.add(builder.mul(base, ir.Constant(_I64, esz)), ir.Constant(_I64, PREFETCH_AHEAD + line))
                builder.call(prefetch, [builder.gep(bp, [ahead]), ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                                        ir.Constant(_I32, 1)])
            for j in range(4):
                step(builder.add(base, ir.Constant(_I64, 8 * j)), acc[j])
        with cgutils.for_range(builder, n8, start=builder.mul(n32, ir.Constant(_I64, 4))) as loop:
            step(builder.mul(loop.index, ir.Constant(_I64, 8)), acc[0])
        v = builder.fadd(builder.fadd(builder.load(acc[0]), builder.load(acc[1])),
                         builder.fadd(builder.load(acc[2]), builder.load(acc[3])))
        tot = cgutils.alloca_once_value(builder, _hsum8(builder, v))
        with cgutils.for_range(builder, cols, start=builder.mul(n8, ir.Constant(_I64, 8))) as loop:
            wv = widen(builder.load(builder.gep(wp, [loop.index])))
            xv = builder.load(builder.gep(xa.data, [loop.index]))
            builder.store(builder.fadd(builder.load(tot), builder.fmul(wv, xv)), tot)
        return builder.load(tot)

    return codegen


# Block layouts the tiles read: (bytes per block, byte of the quants, byte of the u32 of fifth bits or None,
# byte of the f16 min m or None, the offset o in w = d (u - o)); weights d (u - o) or d u + m.
_TILE_LAYOUT = {"q4_0": (18, 2, None, None, 8), "q4_1": (20, 4, None, 2, 0), "q5_0": (22, 6, 2, None, 16),
                "q5_1": (24, 8, 4, 2, 0), "q8_0": (34, 2, None, None, 0)}


def _emit_tile(context, builder, sig, args, kind, kk):
    """IR for one weight row x kk tokens of Y = X W^T: kk block dots sharing the row's loads.

    Each block of the weight row is unpacked once for kk tokens; kk independent accumulators keep the
    FMA and multiply units busy (one dot at a time waits on its accumulator). Returns the kk dots.
    """
    bytes_per_block, qoff, qh_at, m_at, offset = _TILE_LAYOUT[kind]
    nibbles = kind != "q8_0"
    c64 = lambda v: ir.Constant(_I64, v)                         # noqa: E731
    wa = _data(context, builder, sig.args[0], args[0])
    xqa = _data(context, builder, sig.args[2], args[2])
    xda = _data(context, builder, sig.args[3], args[3])
    xca = _data(context, builder, sig.args[5], args[5])      # xct: the block sums transposed
    wo, k0 = args[1], args[6]
    cols = cgutils.unpack_tuple(builder, xqa.shape)[1]
    nb = cgutils.unpack_tuple(builder, xda.shape)[1]
    tp = cgutils.unpack_tuple(builder, xca.shape)[1]
    wp = builder.gep(wa.data, [wo])
    xps = [builder.gep(xqa.data, [builder.mul(builder.add(k0, c64(k)), cols)]) for k in range(kk)]
    dps = [builder.gep(xda.data, [builder.mul(builder.add(k0, c64(k)), nb)]) for k in range(kk)]
    maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", _V(_I16, 16), [_V(_I8, 32)] * 2)
    maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", _V(_I32, 8), [_V(_I16, 16)] * 2)
    psign = _fn(builder, "llvm.x86.avx2.psign.b", _V(_I8, 32), [_V(_I8, 32)] * 2)
    fma = _fn(builder, "llvm.fma.v8f32", _V(_F32, 8), [_V(_F32, 8)] * 3)
    fmac = _fn(builder, "llvm.fma.v4f32", _V(_F32, 4), [_V(_F32, 4)] * 3)
    acc = [cgutils.alloca_once_value(builder, ir.Constant(_V(_F32, 8), None)) for _ in range(kk)]
    corr = cgutils.alloca_once_value(builder, ir.Constant(_V(_F32, 4), None))   # offset terms, tokens k0..
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        o = builder.mul(b, c64(bytes_per_block))
        o2 = builder.add(o, c64(qoff))
        xs = [_load(builder, xps[k], builder.mul(b, c64(32)), _V(_I8, 32)) for k in range(kk)]
        dx = [_bcast(builder, builder.load(builder.gep(dps[k], [b]))) for k in range(kk)]
        d = builder.fpext(_load(builder, wp, o, ir.HalfType()), _F32)
        if nibbles:
            xc = _load(builder, xca.data, builder.add(builder.mul(b, tp), k0), _V(_F32, 4))
            v = _load(builder, wp, o2, _V(_I8, 16))
            lo = builder.and_(v, _splat(_I8, 16, 15))
            hi = builder.lshr(v, _splat(_I8, 16, 4))
            u = builder.shuffle_vector(lo, hi, ir.Constant(_V(_I32, 32), list(range(32))))
            if qh_at is not None:
                u = builder.or_(u, _high_bits(builder, wp, builder.add(o, c64(qh_at))))
            dm = d if m_at is None else builder.fpext(_load(builder, wp, builder.add(o, c64(m_at)), ir.HalfType()), _F32)
            builder.store(builder.call(fmac, [_bcast(builder, dm, 4), xc, builder.load(corr)]), corr)
            xw = xs
        else:                                                    # |w| and x with w's sign, as in the dot
            w = _load(builder, wp, o2, _V(_I8, 32))
            u = builder.call(psign, [w, w])
            xw = [builder.call(psign, [x, w]) for x in xs]
        dv = _bcast(builder, d)
        for k in range(kk):
            p = builder.call(maddwd, [builder.call(maddubs, [u, xw[k]]), _splat(_I16, 16, 1)])
            s = builder.fmul(dv, dx[k])
            builder.store(builder.call(fma, [builder.sitofp(p, _V(_F32, 8)), s, builder.load(acc[k])]), acc[k])
    cv = builder.load(corr)
    vals = []
    for k in range(kk):
        t = _hsum8(builder, builder.load(acc[k]))
        c = builder.extract_element(cv, ir.Constant(_I32, k))
        if m_at is not None:
            t = builder.fadd(t, c)
        elif offset:
            t = builder.fsub(t, builder.fmul(ir.Constant(_F32, float(offset)), c))
        vals.append(t)
    return vals


def _tile_codegen(kind):
    """IR for the row at byte wo of flat uint8 w times tokens k0 .. k0+kk-1, kk in 1..4, as 4 floats (lanes
    from kk on are 0): one body per kk behind a switch on kk.

    xq int8 [T, C], xd f32 [T, NB], xct f32 [NB, >= k0 + 4]: the activations' block sums, transposed
    (tokens contiguous); xc (the sums untransposed) is not read.
    """
    return tile_switch(lambda context, builder, sig, args, kk: _emit_tile(context, builder, sig, args, kind, kk))


def tile_switch(emit):
    """Tile codegen from emit(context, builder, sig, args, kk) -> kk floats: a switch on kk (args[7]) to one
    body per kk in 1..4, the result padded with zeros to 4 floats (kquant.py's K-quant tiles use it too)."""
    def codegen(context, builder, sig, args):
        res = [cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in range(4)]
        done = builder.append_basic_block("tile.done")
        sw = builder.switch(args[7], done)
        for kk in range(1, 5):
            bb = builder.append_basic_block(f"tile.x{kk}")
            sw.add_case(ir.Constant(args[7].type, kk), bb)
            builder.position_at_end(bb)
            for r, v in zip(res, emit(context, builder, sig, args, kk)):
                builder.store(v, r)
            builder.branch(done)
        builder.position_at_end(done)
        return context.make_tuple(builder, sig.return_type, [builder.load(r) for r in res])
    return codegen


def _dequant_codegen(kind):
    """IR for out[oo + 32 b + j] = d_b * q_bj (+ m_b for Q5_1) over the cols / 32 blocks at byte wo of w."""
    bytes_per_block = {"q4_0": 18, "q5_1": 24, "q8_0": 34}[kind]
    qoff = 8 if kind == "q5_1" else 2

    def codegen(context, builder, sig, args):
        wa = _data(context, builder, sig.args[0], args[0])
        oa = _data(context, builder, sig.args[2], args[2])
        wp = builder.gep(wa.data, [args[1]])
        op = builder.gep(oa.data, [args[3]])
        with cgutils.for_range(builder, builder.sdiv(args[4], ir.Constant(_I64, 32))) as loop:
            b = loop.index
            o = builder.mul(b, ir.Constant(_I64, bytes_per_block))
            d = builder.fpext(_load(builder, wp, o, ir.HalfType()), _F32)
            o2 = builder.add(o, ir.Constant(_I64, qoff))
            if kind in ("q4_0", "q5_1"):
                v = _load(builder, wp, o2, _V(_I8, 16))
                lo = builder.and_(v, _splat(_I8, 16, 15))
                hi = builder.lshr(v, _splat(_I8, 16, 4))
                q = builder.shuffle_vector(lo, hi, ir.Constant(_V(_I32, 32), list(range(32))))
                if kind == "q5_1":
                    q = builder.or_(q, _high_bits(builder, wp, builder.add(o, ir.Constant(_I64, 4))))
                q = builder.zext(q, _V(_I32, 32))
                if kind == "q4_0":
                    q = builder.sub(q, _splat(_I32, 32, 8))
            else:
                q = builder.sext(_load(builder, wp, o2, _V(_I8, 32)), _V(_I32, 32))
            y = builder.fmul(builder.sitofp(q, _V(_F32, 32)), _bcast(builder, d, 32))
            if kind == "q5_1":
                m = builder.fpext(_load(builder, wp, builder.add(o, ir.Constant(_I64, 2)), ir.HalfType()), _F32)
                y = builder.fadd(y, _bcast(builder, m, 32))
            dst = builder.bitcast(builder.gep(op, [builder.mul(b, ir.Constant(_I64, 32))]), _V(_F32, 32).as_pointer())
            builder.store(y, dst, align=4)
        return context.get_dummy_value()

    return codegen


def _float_dequant_codegen(kind):
    """IR for out[oo + c] = the c-th f16, bf16 or f32 weight at byte wo of w, c < cols."""
    ety = {"f16": ir.HalfType(), "bf16": _I16, "f32": _F32}[kind]

    def codegen(context, builder, sig, args):
        wa = _data(context, builder, sig.args[0], args[0])
        oa = _data(context, builder, sig.args[2], args[2])
        wp = builder.bitcast(builder.gep(wa.data, [args[1]]), ety.as_pointer())
        op = builder.gep(oa.data, [args[3]])
        with cgutils.for_range(builder, args[4]) as loop:
            v = builder.load(builder.gep(wp, [loop.index]), align=1)
            builder.store(_widen(builder, v, kind), builder.gep(op, [loop.index]))
        return context.get_dummy_value()

    return codegen


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
        acc += d * (xd[b] * np.float32(s) - np.float32(8.0) * xc[b])
    return acc


@njit(cache=True)
def dot_q5_1_portable(w, wo, xq, xd, xc):
    acc = np.float32(0.0)
    for b in range(xd.shape[0]):
        o = wo + b * 24
        qh = np.uint32(w[o + 4]) | np.uint32(w[o + 5]) << 8 | np.uint32(w[o + 6]) << 16 | np.uint32(w[o + 7]) << 24
        s = 0
        for j in range(16):
            v = w[o + 8 + j]
            lo = (v & 15) | ((qh >> j) & 1) << 4
            hi = (v >> 4) | ((qh >> (j + 16)) & 1) << 4
            s += lo * xq[b * 32 + j] + hi * xq[b * 32 + 16 + j]
        d = f16_to_f32(np.uint16(w[o]) | np.uint16(w[o + 1]) << np.uint16(8))
        m = f16_to_f32(np.uint16(w[o + 2]) | np.uint16(w[o + 3]) << np.uint16(8))
        acc += d * xd[b] * np.float32(s) + m * xc[b]
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


def _inline(fn, argidx):
    """Codegen that compiles the plain-Numba fn in place on the arguments at argidx (a portable twin)."""
    def codegen(context, builder, sig, args):
        inner = typing.signature(types.float32, *[sig.args[i] for i in argidx])
        return context.compile_internal(builder, fn.py_func, inner, [args[i] for i in argidx])
    return codegen


def code_switch(table, default):
    """Codegen for an intrinsic f(code, *rest): an LLVM switch on code to table[code] applied to rest, and
    default(context, builder, return type) for any other code."""
    def codegen(context, builder, sig, args):
        inner = typing.signature(sig.return_type, *sig.args[1:])
        unit = sig.return_type == types.none
        out = None if unit else cgutils.alloca_once_value(builder, default(context, builder, sig.return_type))
        done = builder.append_basic_block("code.done")
        sw = builder.switch(args[0], done)
        for code, cg in table.items():
            bb = builder.append_basic_block(f"code.{code}")
            sw.add_case(ir.Constant(args[0].type, code), bb)
            builder.position_at_end(bb)
            v = cg(context, builder, inner, args[1:])
            if not unit:
                builder.store(v, out)
            builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value() if unit else builder.load(out)
    return codegen


def rows_of(dot):
    """Codegen (w, rb, x, xq, xd, xc, y, r0, r1): y[r] = dot of row r (byte r * rb of w) for r in [r0, r1).

    The row loop sits inside one type's case of the switch on the code, so the switch runs once per
    call: with it inside the loop (one switch per row) Q4_0 matvec ran 4 % slower in cache."""
    def codegen(context, builder, sig, args):
        w, rb, x, xq, xd, xc, y, r0, r1 = args
        ya = _data(context, builder, sig.args[6], y)
        inner = typing.signature(types.float32, sig.args[0], types.int64, *sig.args[2:6])
        with cgutils.for_range(builder, r1, start=r0) as loop:
            r = loop.index
            builder.store(dot(context, builder, inner, [w, builder.mul(r, rb), x, xq, xd, xc]), builder.gep(ya.data, [r]))
        return context.get_dummy_value()
    return codegen


# Each type's codegens, as the KERNELS rows in blocks.py name them.
_PORTABLE_ARGS = (0, 1, 3, 4, 5)           # (w, wo, xq, xd, xc) of the dot's (w, wo, x, xq, xd, xc)
dot_q4_0 = _block_dot_codegen("q4_0") if HAVE_AVX2 else _inline(dot_q4_0_portable, _PORTABLE_ARGS)
dot_q8_0 = _block_dot_codegen("q8_0") if HAVE_AVX2 else _inline(dot_q8_0_portable, _PORTABLE_ARGS)
dot_q5_1 = _block_dot_codegen("q5_1") if HAVE_AVX2 else _inline(dot_q5_1_portable, _PORTABLE_ARGS)
dot_f16, dot_bf16, dot_f32 = _float_dot_codegen("f16"), _float_dot_codegen("bf16"), _float_dot_codegen("f32")
# 1 row x 4 tokens tiles for int_matmul (1 x 1..3 at the edge). At 24 and 120 tokens (14328 x 4096 Q4_0,
# 2 threads) 1 x 4 ran 111 GFLOP/s, 1 x 3 102, 1 x 5 104, 1 x 6 89, 2 x 2 86, 2 x 4 76-83 (its 8 accumulators
# and 4 token vectors spill), 4 x 2 63.
tile_q4_0 = _tile_codegen("q4_0") if HAVE_AVX2 else None
tile_q8_0 = _tile_codegen("q8_0") if HAVE_AVX2 else None
tile_q5_1 = _tile_codegen("q5_1") if HAVE_AVX2 else None
tile_q4_1 = _tile_codegen("q4_1") if HAVE_AVX2 else None   # beside kquant.py's dots (the portable build: no tiles)
tile_q5_0 = _tile_codegen("q5_0") if HAVE_AVX2 else None
dequant_q4_0, dequant_q8_0, dequant_q5_1 = _dequant_codegen("q4_0"), _dequant_codegen("q8_0"), _dequant_codegen("q5_1")
dequant_f16, dequant_bf16, dequant_f32 = (_float_dequant_codegen("f16"), _float_dequant_codegen("bf16"),
                                          _float_dequant_codegen("f32"))
