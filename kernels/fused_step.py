"""Triton kernel for symfast::fused_step (specification: symfast/reference/fused_step.py).

One program per (state row, block of the row): gathers the |G| orbit outputs through the inverse
table, averages, forms x̂0 and the update, draws the Philox noise in registers and writes x_next
(and x̂0 if asked). The noise uses tl.philox + Triton's own uint→float and Box–Muller, keyed by
counter (element // 4, step, stream, 0) under the sample's seed, element e taking normal e % 4
(``tl.randn4x``'s layout): the same numbers as the C++ kernel and the PyTorch reference. A
float64 step takes the same Philox words through Box–Muller in float64 (symfast/philox.py), and
its coefficients arrive as float32 pairs (hi, lo) with hi + lo = c to ~2^-48: a compiled kernel
receives a Python float as float32, which would cut 0.3 to 0.30000001 in a float64 step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, uint_to_uniform_float

from symfast.kernels._grid import grid, row_and_offsets
from symfast.kernels._scalars import scalar_pair, wide_scalar

_BLOCK = 1024
# A global a kernel reads must be a tl.constexpr: a plain float runs under the interpreter but
# fails to compile for a GPU (tests/triton_gpu_compile.py found it).
_TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def _uniform64(r, BLOCK: tl.constexpr):
    """Triton's uint32 -> [0, 1) map in float64: (x < 0 ? ~x : x) · 2^-31 on the int32 bits."""
    i = r.to(tl.int32, bitcast=True)
    i = tl.where(i < 0, -i - 1, i)
    return i.to(tl.float64) * tl.full([BLOCK], 2.0**-31, tl.float64)


@triton.jit
def _fused_step_kernel(x_ptr, y_ptr, table_ptr, u_ptr, v_ptr, noise_ptr, key_ptr, ntable_ptr,
                       out_ptr, den_ptr, G, M, N, R, step,
                       c_skip_hi, c_out_hi, a_hi, b_hi, p_hi, q_hi, c_hi,
                       c_skip_lo, c_out_lo, a_lo, b_lo, p_lo, q_lo, c_lo,
                       HAS_U: tl.constexpr, HAS_V: tl.constexpr, NOISE: tl.constexpr,
                       HAS_NTABLE: tl.constexpr, WRITE_DEN: tl.constexpr,
                       BLOCK: tl.constexpr, ACC: tl.constexpr, WIDE: tl.constexpr):
    c_skip = wide_scalar(c_skip_hi, c_skip_lo, WIDE)
    c_out = wide_scalar(c_out_hi, c_out_lo, WIDE)
    a = wide_scalar(a_hi, a_lo, WIDE)
    b = wide_scalar(b_hi, b_lo, WIDE)
    p = wide_scalar(p_hi, p_lo, WIDE)
    q = wide_scalar(q_hi, q_lo, WIDE)
    c = wide_scalar(c_hi, c_lo, WIDE)
    row, offs = row_and_offsets(N, BLOCK)
    mask = offs < N
    row_base = row.to(tl.int64) * N
    acc = tl.zeros([BLOCK], dtype=ACC)
    y_row = row.to(tl.int64)  # y's row k * M + row, carried in int64 (as in orbit_mean)
    for k in range(0, G):
        t = tl.load(table_ptr + k * N + offs, mask=mask, other=0)
        src = tl.where(t < 0, -t - 1, t)
        # Masking src keeps a malformed table from reading out of bounds, with no host check
        # (which would sync the device every step).
        yv = tl.load(y_ptr + y_row * N + src, mask=mask & (src < N), other=0.0).to(ACC)
        acc += tl.where(t < 0, -yv, yv)
        y_row += M
    xv = tl.load(x_ptr + row_base + offs, mask=mask, other=0.0).to(ACC)
    den = c_skip * xv + c_out * (acc / G)
    res = a * xv + b * den
    if HAS_U:
        res = res + p * tl.load(u_ptr + row_base + offs, mask=mask, other=0.0).to(ACC)
    if HAS_V:
        res = res + q * tl.load(v_ptr + row_base + offs, mask=mask, other=0.0).to(ACC)
    if NOISE == 1:
        res = res + c * tl.load(noise_ptr + row_base + offs, mask=mask, other=0.0).to(ACC)
    if NOISE == 2:
        sample = row // R
        seed = tl.load(key_ptr + sample * 2)
        stream = tl.load(key_ptr + sample * 2 + 1)
        elem = offs
        if HAS_NTABLE:
            nt = tl.load(ntable_ptr + offs, mask=mask, other=0)
            elem = tl.where(nt < 0, -nt - 1, nt)
        # element e is normal e % 4 of counter e // 4 (symfast/philox.py): each lane computes
        # its own counter's words and Box-Muller pair, 4x the Philox work of sharing them across
        # lanes, which a GPU's arithmetic absorbs in this memory-bound step
        e = (row % R).to(tl.int64) * N + elem
        word = e % 4
        zero = e * 0
        r0, r1, r2, r3 = tl.philox(seed, (e // 4).to(tl.uint32), (zero + step).to(tl.uint32),
                                   (zero + stream).to(tl.uint32), zero.to(tl.uint32))
        first = tl.where(word < 2, r0, r2)
        second = tl.where(word < 2, r1, r3)
        if WIDE:
            u1 = tl.maximum(_uniform64(first, BLOCK), tl.full([BLOCK], 1.0e-7, tl.float64))
            th = _uniform64(second, BLOCK) * tl.full([BLOCK], _TWO_PI, tl.float64)
            r = tl.sqrt(-2.0 * tl.log(u1))
            n_cos, n_sin = r * tl.cos(th), r * tl.sin(th)
        else:
            n_cos, n_sin = pair_uniform_to_normal(uint_to_uniform_float(first),
                                                  uint_to_uniform_float(second))
        z = tl.where(word % 2 == 0, n_cos, n_sin)
        if HAS_NTABLE:
            z = tl.where(nt < 0, -z, z)
        res = res + c * z.to(ACC)
    tl.store(out_ptr + row_base + offs, res.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_DEN:
        tl.store(den_ptr + row_base + offs, den.to(den_ptr.dtype.element_ty), mask=mask)


def fused_step(x: torch.Tensor, y: torch.Tensor, inverse_table: torch.Tensor,
               u: torch.Tensor | None, v: torch.Tensor | None, noise: torch.Tensor | None,
               key: torch.Tensor | None, noise_table: torch.Tensor | None, rows_per_sample: int,
               step: int, coefs: list[float], write_denoised: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (M, N), y: (G, M, N) -> (x_next (M, N), denoised (M, N) or empty)."""
    x = x.contiguous()
    y = y.to(x.dtype).contiguous()
    g, m, n = y.shape
    coefs = [float(k) for k in coefs]
    c = coefs[6]
    mode = 0 if c == 0.0 else (1 if noise is not None else 2)
    wide = x.dtype == torch.float64
    hi, lo = zip(*(scalar_pair(k, wide) for k in coefs))
    if mode == 2 and key is None:
        raise ValueError("c != 0 needs either noise or key")
    out = torch.empty_like(x)
    den = torch.empty_like(x) if write_denoised else x.new_empty((0,))
    if out.numel() == 0:
        return out, den
    # read in their own dtype and converted to ACC in the kernel, as the reference computes (an
    # fp16 copy of a large u was inf)
    u = u.contiguous() if u is not None else None
    v = v.contiguous() if v is not None else None
    noise = noise.contiguous() if mode == 1 else None
    block = min(_BLOCK, triton.next_power_of_2(n))
    _fused_step_kernel[grid(m, n, block)](
        x, y, inverse_table, u if u is not None else x, v if v is not None else x,
        noise if noise is not None else x, key if mode == 2 else inverse_table,
        noise_table if noise_table is not None else inverse_table,
        out, den if write_denoised else out, g, m, n, rows_per_sample, step,
        *hi, *lo,
        HAS_U=u is not None, HAS_V=v is not None, NOISE=mode,
        HAS_NTABLE=noise_table is not None and mode == 2,
        WRITE_DEN=write_denoised, BLOCK=block,
        ACC=tl.float64 if wide else tl.float32, WIDE=wide)
    return out, den
