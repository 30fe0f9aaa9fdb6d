"""Host floats as kernel scalars. A compiled kernel receives a Python float as float32 (the
interpreter keeps float64), which would cut 0.3 to 0.30000001 in a float64 kernel: float64
kernels take such a value as a float32 pair (hi, lo) with hi + lo = k to ~2^-48 relative."""
from __future__ import annotations

import math
import struct

import triton
import triton.language as tl


def _to_float32(k: float) -> float:
    return struct.unpack("f", struct.pack("f", k))[0]


def float32_pair(k: float) -> tuple[float, float]:
    """(hi, lo), both float32 values: hi = k rounded to float32, lo = k - hi rounded to float32,
    so that hi + lo in float64 is k to ~2^-48 relative, in a compiled kernel and under the
    interpreter alike."""
    try:
        hi = _to_float32(k)
    except OverflowError:  # beyond float32: the kernel sees inf, as a float32 coefficient would
        return k, 0.0
    return hi, (_to_float32(k - hi) if math.isfinite(hi) else 0.0)


def scalar_pair(k: float, wide: bool) -> tuple[float, float]:
    """The (hi, lo) arguments of ``k`` for a kernel reading it with :func:`wide_scalar`."""
    return float32_pair(k) if wide else (k, 0.0)


@triton.jit
def wide_scalar(hi, lo, WIDE: tl.constexpr):
    """hi + lo in float64 when WIDE, else hi."""
    if WIDE:
        value = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        value = hi
    return value
