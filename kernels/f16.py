"""float16 rounding of the quantizers' scales, in float64 scalar code (llama.cpp's GGML_FP32_TO_FP16 as F16C
computes it: round half to even)."""
from __future__ import annotations

import math

import numpy as np
from numba import njit

f32 = np.float32
F16_MAX = 65504.0


@njit(cache=True)
def f16_round(x: float) -> float:
    """The float16 value nearest to x (round half to even), as a float; inf beyond f16's range (as F16C)."""
    ax = abs(x)
    if ax != ax:
        return x
    if ax >= 65520.0:
        return math.inf if x > 0 else -math.inf
    if ax < 6.103515625e-05:                     # subnormal f16: quantum 2^-24
        return round(x * 16777216.0) / 16777216.0
    m, e = math.frexp(x)                         # x = m·2^e, 0.5 <= |m| < 1: 11 significant bits
    return math.ldexp(round(m * 2048.0) / 2048.0, e)


@njit(cache=True)
def f16_f32(x):
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x)) for a float32 x, as float32."""
    return f32(f16_round(float(x)))


@njit(cache=True)
def f16_finite(x: float) -> float:
    """Our scales: the nearest f16 value, clamped to f16's finite range (a huge block keeps a finite scale)."""
    return f16_round(min(F16_MAX, max(-F16_MAX, x)))


@njit(cache=True)
def f16_bits(v: float) -> int:
    """The IEEE half bits of v, which must be an f16 value (f16_round's output), inf or nan."""
    s = 0x8000 if (v < 0 or (v == 0 and math.copysign(1.0, v) < 0)) else 0
    a = abs(v)
    if a != a:
        return 0x7e00
    if a == math.inf:
        return s | 0x7c00
    if a == 0:
        return s
    if a < 6.103515625e-05:
        return s | int(round(a * 16777216.0))
    m, e = math.frexp(a)                          # a = m·2^e, mantissa 2m - 1 in 10 bits
    return s | ((e + 14) << 10) | int(round((m * 2.0 - 1.0) * 1024.0))
