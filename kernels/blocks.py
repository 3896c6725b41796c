"""The registry: one row per weight type naming its kernels, and the three calls the drivers make.

A KERNELS row names the type's code (GGML's type id, the numbering a GGUF file already carries),
its activation scheme (activations.py) and its codegens in simd.py: a row dot, a dequantizer and,
with AVX2 and where they pay, token tiles; integer types also name their arm64 dot (`neon`, arm64.py),
which an arm64 host runs in place of `dot`. From the rows this module builds row_dot (and rows_dot, its
loop over rows), row_tile and dequant_row, each one intrinsic whose IR switches on the code
(simd.code_switch). The drivers
(matvec.py, int_matmul.py, dequant_matmul.py) are written once and pass the code, an ordinary int64
argument, down to them: one compiled, cached signature per driver for all types, and a type is
its codegens plus one row here. The switch costs one compare per call of rows_dot (per row of
row_tile and dequant_row, where a row is the larger part of the work).

Weights arrive as bytes: w is the flat uint8 view of a C-contiguous [R, row_bytes] matrix and wo the
byte offset of a row in it, for f16 and f32 too. An unknown code yields NaN (row_dot, row_tile) or
leaves the output untouched (rows_dot, dequant_row).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gguf import GGMLQuantizationType as G
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from . import arm64, iq4, kquant, simd
from .activations import FLOAT, Q8, Q8_K, ActScheme


@dataclass(frozen=True)
class TypeKernels:
    code: int                        # GGML's type id: the value the drivers pass down
    act: ActScheme                   # how x is prepared for the row dots (activations.py)
    dot: Callable                    # simd codegen (w, wo, x, xq, xd, xc) -> f32
    dequant: Callable                # simd codegen (w, wo, out, oo, cols): the row as float32
    tile: Callable | None = None     # simd codegen, 1 row x 1..4 tokens; None: one dot per (row, token)
    as_stored: bool = False          # rows are float32: sgemm reads them as stored, no dequantizing
    neon: Callable | None = None     # the dot on an arm64 host (arm64.py: sdot where +dotprod); None: dot

    @property
    def int_matmul(self) -> bool:
        """Few tokens take the row dots on quantized activations rather than dequantize + sgemm."""
        return self.act.quantize is not None


def _kq(code, act, name, **kw):
    """A row whose dot and dequantizer are kquant.py's (the fast form per CPU)."""
    dot, dequant = kquant.REGISTRY[name]
    kw.setdefault("tile", kquant.TILES.get(name))
    kw.setdefault("neon", kquant.NEON[name])
    return TypeKernels(int(code), act, dot, dequant, **kw)


KERNELS: dict[str, TypeKernels] = {
    "f32": TypeKernels(int(G.F32), FLOAT, simd.dot_f32, simd.dequant_f32, as_stored=True),
    "f16": TypeKernels(int(G.F16), FLOAT, simd.dot_f16, simd.dequant_f16),
    "bf16": TypeKernels(int(G.BF16), FLOAT, simd.dot_bf16, simd.dequant_bf16),
    "q8_0": TypeKernels(int(G.Q8_0), Q8, simd.dot_q8_0, simd.dequant_q8_0, simd.tile_q8_0, neon=arm64.NEON["q8_0"]),
    "q4_0": TypeKernels(int(G.Q4_0), Q8, simd.dot_q4_0, simd.dequant_q4_0, simd.tile_q4_0, neon=arm64.NEON["q4_0"]),
    "q5_1": TypeKernels(int(G.Q5_1), Q8, simd.dot_q5_1, simd.dequant_q5_1, simd.tile_q5_1, neon=arm64.NEON["q5_1"]),
    "q4_1": _kq(G.Q4_1, Q8, "q4_1", tile=simd.tile_q4_1),
    "q5_0": _kq(G.Q5_0, Q8, "q5_0", tile=simd.tile_q5_0),
    "q2_k": _kq(G.Q2_K, Q8_K, "q2_k"),
    "q3_k": _kq(G.Q3_K, Q8_K, "q3_k"),
    "q4_k": _kq(G.Q4_K, Q8_K, "q4_k"),
    "q5_k": _kq(G.Q5_K, Q8_K, "q5_k"),
    "q6_k": _kq(G.Q6_K, Q8_K, "q6_k"),
    "iq4_nl": TypeKernels(int(G.IQ4_NL), Q8, *iq4.REGISTRY["iq4_nl"], iq4.TILES["iq4_nl"],
                            neon=iq4.NEON_DOTS["iq4_nl"]),
    "iq4_xs": TypeKernels(int(G.IQ4_XS), Q8_K, *iq4.REGISTRY["iq4_xs"], iq4.TILES["iq4_xs"],
                            neon=iq4.NEON_DOTS["iq4_xs"]),
}


def _nan(context, builder, ty):
    nan = ir.Constant(ir.FloatType(), float("nan"))
    return context.make_tuple(builder, ty, [nan] * ty.count) if isinstance(ty, types.UniTuple) else nan


def arm64_dot(k: TypeKernels) -> Callable:
    """The row's dot on an arm64 host: its arm64 form, or its dot where that is generic IR (the float types)."""
    return k.neon if k.neon is not None else k.dot


def host_dot(k: TypeKernels) -> Callable:
    """The row's dot for this host: arm64_dot on arm64 (arm64.ARM64), else its dot (AVX2 or portable)."""
    return arm64_dot(k) if arm64.ARM64 else k.dot


_DOTS = simd.code_switch({k.code: host_dot(k) for k in KERNELS.values()}, _nan)
_ROWS = simd.code_switch({k.code: simd.rows_of(host_dot(k)) for k in KERNELS.values()}, None)
_TILES = simd.code_switch({k.code: k.tile for k in KERNELS.values() if k.tile is not None}, _nan)
_DEQUANTS = simd.code_switch({k.code: k.dequant for k in KERNELS.values()}, None)


@intrinsic
def row_dot(typingctx, code, w, wo, x, xq, xd, xc):
    """The dot of the row at byte wo of w with x (or its quantized xq, xd, xc): float32."""
    return types.float32(code, w, wo, x, xq, xd, xc), _DOTS


@intrinsic
def rows_dot(typingctx, code, w, rb, x, xq, xd, xc, y, r0, r1):
    """y[r] = row_dot of row r (byte r * rb of w) for r in [r0, r1): the switch on code once, not per row."""
    return types.none(code, w, rb, x, xq, xd, xc, y, r0, r1), _ROWS


@intrinsic
def row_tile(typingctx, code, w, wo, xq, xd, xc, xct, k0, kk):
    """The row at byte wo times tokens k0 .. k0+kk-1, kk in 1..4, as 4 floats (types with a tile); xc [T, ...]
    the activations' block sums, xct the same transposed (each tile reads the layout it is fastest on)."""
    return types.UniTuple(types.float32, 4)(code, w, wo, xq, xd, xc, xct, k0, kk), _TILES


@intrinsic
def dequant_row(typingctx, code, w, wo, out, oo, cols):
    """out[oo : oo + cols] = the row of cols weights at byte wo of w, as float32."""
    return types.none(code, w, wo, out, oo, cols), _DEQUANTS
