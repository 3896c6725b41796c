"""The arm64 forms of the integer row dots and the K-quants' token tiles: LLVM vector IR shaped for NEON.

Every 16 weights' products go through `dot16`: where Numba's target CPU has the dot-product instructions
(DOTPROD: +dotprod, Apple M1 and later, Neoverse N1/V1, Cortex-A76 on) it is one `sdot`
(llvm.aarch64.neon.sdot); elsewhere the generic llvm.vector.partial.reduce.add over mul(sext u, sext x), which
LLVM lowers to smull / smlal on plain NEON (Cortex-A72) and expands on any other target. (The generic form
alone is not enough: LLVM sees that unpacked weights are never negative, widens them unsigned, and without
i8mm's usdot falls back to smull even where sdot exists.) DOTPROD is decided at import by asking LLVM to lower
one partial reduction of unknown signs for Numba's target (its host CPU name and features, or NUMBA_CPU_NAME)
and looking for sdot. tests/test_arm64_codegen.py cross-compiles every type's dot for apple-m1 (sdot) and
cortex-a72 (smull, no sdot); tests/arm64/run.sh runs the kernel tests on both under emulation.

  dot16(b, acc, u, x)          <4 x i32> acc + the products of u, x <16 x i8>, in 4 lanes (one sdot)
  chunk_dot(b, u, x, s)        kquant.py's 32-weight K-quant step: two dot16, each times its 16 weights' scale
  dot32_codegen(kind)          the row dot of a 32-weight block type (q4_0, q4_1, q5_0, q5_1, q8_0)
  NEON[t]                      the registry's codegens of simd.py's types (q4_0, q8_0, q5_1) on arm64

Where the host is arm64 (ARM64), blocks.py takes each KERNELS row's `neon` codegen in place of its `dot`
(kquant.py's tiles are its generic ones there): a new integer type plugs in by naming its arm64 form in its
row (built on dot16 or kquant's generic _chunk_dot; the codegen test checks every such row for sdot).
Operands stay within int8: weights are unsigned < 64 after unpacking (Q8_0: int8), activations
|q| <= 127, so every sum is exact in int32 and the lanes' grouping never changes a result.

The 32-block dot keeps two <4 x f32> accumulators (even and odd blocks): one would wait on its FMA's
latency every block (4 cycles on the M1's cores; llvm-mca issues a block in ~3.7).
"""
from __future__ import annotations

import os
import platform

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils, typing
from numba.extending import intrinsic

from .simd import _TILE_LAYOUT, PREFETCH_AHEAD

# arm64 host: the NEON forms replace simd.py's portable twins (LAZYMOE_NO_NEON=1 keeps the twins, for tests)
ARM64 = platform.machine().lower() in ("arm64", "aarch64") and not os.environ.get("LAZYMOE_NO_NEON")

# LLVM 22 dropped "experimental" from the name (llvm-project #158637); LLVM 20 and 21 know only the old one
_PARTIAL = ("llvm.vector.partial.reduce.add" if llvm.llvm_version_info >= (22,)
            else "llvm.experimental.vector.partial.reduce.add") + ".v4i32.v16i32"

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V = ir.VectorType
_SDOT = "llvm.aarch64.neon.sdot.v4i32.v16i8"


def _numba_target():
    """(cpu name, features) that Numba compiles for: NUMBA_CPU_NAME / NUMBA_CPU_FEATURES, else the host's."""
    from numba.core import config
    name = config.CPU_NAME or llvm.get_host_cpu_name()
    return name, config.CPU_FEATURES if config.CPU_FEATURES is not None else llvm.get_host_cpu_features().flatten()


def target_has_sdot(triple: str | None = None, cpu: str = "", features: str = "") -> bool:
    """Whether a target (default: Numba's, the host) has the dot-product instructions: LLVM lowers a 16 x i8
    partial reduction of unknown signs for it, and the answer is whether sdot came out (never a fatal 'cannot
    select', which the intrinsic on a CPU without them would be)."""
    if triple is None:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        triple, (cpu, features) = llvm.get_process_triple(), _numba_target()
    m = ir.Module("probe")
    f = ir.Function(m, ir.FunctionType(_V(_I32, 4), [_V(_I8, 16), _V(_I8, 16), _V(_I32, 4)]), "probe")
    b = ir.IRBuilder(f.append_basic_block())
    b.ret(_partial(b, f.args[2], *f.args[:2]))
    mod = llvm.parse_assembly(str(m))
    mod.triple = triple
    tm = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, features=features, opt=2)
    return "sdot" in tm.emit_assembly(mod)




def _c64(v):
    return ir.Constant(_I64, v)


def _cv(ty, vals):
    return ir.Constant(_V(ty, len(vals)), list(vals))


def _fn(b, name, ret, args):
    return cgutils.get_or_insert_function(b.module, ir.FunctionType(ret, args), name)


def _load(b, base, off, ty):
    """Unaligned load of ty at element offset off (int or i64 value) of pointer base."""
    off = _c64(off) if isinstance(off, int) else off
    return b.load(b.bitcast(b.gep(base, [off]), ty.as_pointer()), align=1)


def _splat(b, s, n):
    v = b.insert_element(ir.Constant(_V(s.type, n), None), s, ir.Constant(_I32, 0))
    return b.shuffle_vector(v, v, _cv(_I32, [0] * n))


def _half(b, p, off):
    return b.fpext(_load(b, p, off, ir.HalfType()), _F32)


def _partial(b, acc, u, x):
    m = b.mul(b.sext(u, _V(_I32, 16)), b.sext(x, _V(_I32, 16)))
    return b.call(_fn(b, _PARTIAL, _V(_I32, 4), [_V(_I32, 4), _V(_I32, 16)]), [acc, m])


# The sdot intrinsic where Numba's target has it (an arm64 host with +dotprod: Apple M1 and later, Neoverse N1
# and later); the generic partial reduction elsewhere. Read when IR is generated: the codegen test sets it.
DOTPROD = ARM64 and target_has_sdot()


def dot16(b, acc, u, x):
    """acc <4 x i32> + the 16 products u[l] x[l] of u, x <16 x i8> (both signed), summed into 4 lanes.

    DOTPROD: one `sdot` (the intrinsic: LLVM's generic form would see that unpacked weights are never negative,
    widen them unsigned, and fall back to smull for want of i8mm's usdot). Else the generic partial reduction:
    smull / smlal on plain NEON."""
    if DOTPROD:
        return b.call(_fn(b, _SDOT, _V(_I32, 4), [_V(_I32, 4), _V(_I8, 16), _V(_I8, 16)]), [acc, u, x])
    return _partial(b, acc, u, x)


def _halves(b, v):
    """<32 x i8> -> its lanes 0..15 and 16..31."""
    return (b.shuffle_vector(v, v, _cv(_I32, range(16))), b.shuffle_vector(v, v, _cv(_I32, range(16, 32))))


def chunk_dot(b, u, x, s):
    """kquant.py's generic _chunk_dot: <8 x i32> whose lanes sum to sum_l s[l // 2] u[l] x[l] over 32 weights
    (u <32 x i8> < 64, x <32 x i8>, s <16 x i16>: lane 0 the scale of weights 0..15, lane 8 of 16..31).

    Lanes 0..3: dot16 of weights 0..15 times s[0]; lanes 4..7: of 16..31 times s[8] (each |lane| <= 4 * 63 *
    128 * 128 < 2^31). Two sdot and two mla per 32 weights."""
    zero = ir.Constant(_V(_I32, 4), None)
    sw = b.sext(s, _V(_I32, 16))
    out = []
    for h, (uh, xh) in enumerate(zip(_halves(b, u), _halves(b, x))):
        out.append(b.mul(dot16(b, zero, uh, xh), b.shuffle_vector(sw, sw, _cv(_I32, [8 * h] * 4))))
    return b.shuffle_vector(out[0], out[1], _cv(_I32, range(8)))


def _bits16(b, v, k):
    """Bits 0..15 of the little-endian u16 at bytes k, k + 1 of v <16 x i8> -> <16 x i8>: 16 where bit j is set."""
    h = b.shuffle_vector(v, v, _cv(_I32, [k + j // 8 for j in range(16)]))
    on = b.icmp_unsigned("!=", b.and_(h, _cv(_I8, [1 << (j % 8) for j in range(16)])), _cv(_I8, [0] * 16))
    return b.select(on, _cv(_I8, [16] * 16), _cv(_I8, [0] * 16))


def _unpack32(kind, b, p):
    """Block at p -> (d, m or None, weights 0..15, weights 16..31 as <16 x i8>): u for the nibble types
    (w = d (u - offset) or d u + m), the int8 weights themselves for Q8_0."""
    _, qoff, qh_at, m_at, _ = _TILE_LAYOUT[kind]
    d = _half(b, p, 0)
    m = _half(b, p, m_at) if m_at is not None else None
    if kind == "q8_0":
        return (d, m, *_halves(b, _load(b, p, qoff, _V(_I8, 32))))
    q = _load(b, p, qoff, _V(_I8, 16))
    lo, hi = b.and_(q, _cv(_I8, [15] * 16)), b.lshr(q, _cv(_I8, [4] * 16))
    if qh_at is not None:                          # Q5: bit j of the u32 qh is bit 4 of weight j
        # the u32 qh in every 4 bytes of a register; each half's two bytes spread over 16 lanes
        h = b.bitcast(_splat(b, _load(b, p, qh_at, _I32), 4), _V(_I8, 16))
        lo, hi = b.or_(lo, _bits16(b, h, 0)), b.or_(hi, _bits16(b, h, 2))
    return d, m, lo, hi


def _clamp(b, n, limits):
    """min(n, each count // per), 0 if negative: the blocks that every array holds."""
    for count, per in limits:
        c = b.sdiv(count, _c64(per))
        n = b.select(b.icmp_signed("<", c, n), c, n)
    return b.select(b.icmp_signed("<", n, _c64(0)), _c64(0), n)


def dot32_codegen(kind):
    """Codegen (w, wo, xq, xd, xc) -> f32 for a 32-weight block type, Q8 activations (activations.quantize_q8):
    sum_b f32(d_w d_x) <u, x>  +  Q4_1/Q5_1: m_w xc  or  Q4_0/Q5_0: - offset d_w xc  (xc = d_x sum q_x).

    The block count is clamped to what w (from wo), xq, xd and xc hold. Blocks 2i and 2i + 1 go to two
    accumulators (float sums grouped differently from simd.py's 8 lanes: equal to float rounding)."""
    ts, _, _, m_at, offset = _TILE_LAYOUT[kind]

    def codegen(context, b, sig, args):
        wa, xqa, xda, xca = [context.make_array(sig.args[j])(context, b, args[j]) for j in (0, 2, 3, 4)]
        n = [cgutils.unpack_tuple(b, a.shape)[0] for a in (wa, xqa, xda, xca)]
        wo = args[1]
        nb = _clamp(b, n[2], [(n[1], 32), (n[3], 1), (b.sub(n[0], wo), ts)])
        nb = b.select(b.icmp_signed("<", wo, _c64(0)), _c64(0), nb)
        wp = b.gep(wa.data, [wo])
        fma = _fn(b, "llvm.fma.v4f32", _V(_F32, 4), [_V(_F32, 4)] * 3)
        pf = _fn(b, "llvm.prefetch.p0i8", ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
        acc = [cgutils.alloca_once_value(b, ir.Constant(_V(_F32, 4), None)) for _ in range(2)]
        corr = [cgutils.alloca_once_value(b, ir.Constant(_F32, 0.0)) for _ in range(2)]
        zero = ir.Constant(_V(_I32, 4), None)

        def block(i, k):
            p = b.gep(wp, [b.mul(i, _c64(ts))])
            # read, keep in all cache levels; past the row's end it is the next row's (never faults)
            b.call(pf, [b.gep(p, [_c64(PREFETCH_AHEAD)]), ir.Constant(_I32, 0), ir.Constant(_I32, 3),
                        ir.Constant(_I32, 1)])
            d, m, lo, hi = _unpack32(kind, b, p)
            xo = b.mul(i, _c64(32))
            s = dot16(b, dot16(b, zero, lo, _load(b, xqa.data, xo, _V(_I8, 16))), hi,
                      _load(b, xqa.data, b.add(xo, _c64(16)), _V(_I8, 16)))
            dx = b.load(b.gep(xda.data, [i]))
            b.store(b.call(fma, [b.sitofp(s, _V(_F32, 4)), _splat(b, b.fmul(d, dx), 4), b.load(acc[k])]), acc[k])
            if m_at is not None or offset:
                c = b.load(b.gep(xca.data, [i]))
                b.store(b.fadd(b.load(corr[k]), b.fmul(m if m is not None else d, c)), corr[k])

        half = b.sdiv(nb, _c64(2))
        with cgutils.for_range(b, half) as loop:
            i2 = b.mul(loop.index, _c64(2))
            block(i2, 0)
            block(b.add(i2, _c64(1)), 1)
        with cgutils.if_unlikely(b, b.icmp_signed("!=", b.mul(half, _c64(2)), nb)):      # an odd block count
            block(b.sub(nb, _c64(1)), 0)
        v = b.fadd(b.load(acc[0]), b.load(acc[1]))
        tot = b.extract_element(v, ir.Constant(_I32, 0))
        for k in range(1, 4):
            tot = b.fadd(tot, b.extract_element(v, ir.Constant(_I32, k)))
        c = b.fadd(b.load(corr[0]), b.load(corr[1]))
        if m_at is not None:
            return b.fadd(tot, c)
        return b.fsub(tot, b.fmul(ir.Constant(_F32, float(offset)), c)) if offset else tot

    return codegen


def _registry(cg):
    """The registry's argument list (w, wo, x, xq, xd, xc) for a (w, wo, xq, xd, xc) codegen: x is not read."""
    def codegen(context, b, sig, args):
        inner = typing.signature(sig.return_type, sig.args[0], sig.args[1], *sig.args[3:6])
        return cg(context, b, inner, [args[0], args[1], *args[3:6]])
    return codegen


def _dot(name, codegen):
    def typer(typingctx, w, wo, xq, xd, xc):
        return types.float32(w, wo, xq, xd, xc), codegen
    typer.__name__ = typer.__qualname__ = name
    return intrinsic(typer)


# The arm64 dots of simd.py's types, as the KERNELS rows (blocks.py) name them; kquant.py's generic forms
# (dot_<t>_ir, kquant.NEON) are built on chunk_dot and dot32_codegen.
NEON = {t: _registry(dot32_codegen(t)) for t in ("q4_0", "q8_0", "q5_1")}
# The same as (w, wo, xq, xd, xc) intrinsics, for the tests and benchmarks on any CPU.
dot_q4_0 = _dot("dot_q4_0", dot32_codegen("q4_0"))
dot_q8_0 = _dot("dot_q8_0", dot32_codegen("q8_0"))
dot_q5_1 = _dot("dot_q5_1", dot32_codegen("q5_1"))
