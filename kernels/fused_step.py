"""Triton kernel for symfast::fused_step (specification: symfast/reference/fused_step.py).

One program per (state row, block of the row): gathers the |G| orbit outputs through the inverse
table, averages, forms x̂0 and the update, draws the Philox noise in registers and writes x_next
(and x̂0 if asked). The noise uses tl.philox + Triton's own uint→float and Box–Muller, keyed by
counter (element, step, stream, 0) under the sample's seed: the same numbers as the C++ kernel
and the PyTorch reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, uint_to_uniform_float

_BLOCK = 1024


@triton.jit
def _fused_step_kernel(x_ptr, y_ptr, table_ptr, u_ptr, v_ptr, noise_ptr, key_ptr, ntable_ptr,
                       out_ptr, den_ptr, G, M, N, R, step,
                       c_skip, c_out, a, b, p, q, c,
                       HAS_U: tl.constexpr, HAS_V: tl.constexpr, NOISE: tl.constexpr,
                       HAS_NTABLE: tl.constexpr, WRITE_DEN: tl.constexpr,
                       BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    row_base = row.to(tl.int64) * N
    acc = tl.zeros([BLOCK], dtype=ACC)
    for k in range(0, G):
        t = tl.load(table_ptr + k * N + offs, mask=mask, other=0)
        src = tl.where(t < 0, -t - 1, t)
        # Masking src keeps a malformed table from reading out of bounds, with no host check
        # (which would sync the device every step).
        yv = tl.load(y_ptr + (k * M + row).to(tl.int64) * N + src, mask=mask & (src < N),
                     other=0.0).to(ACC)
        acc += tl.where(t < 0, -yv, yv)
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
        wide = (row % R).to(tl.int64) * N + elem
        zero = wide * 0
        r0, r1, _, _ = tl.philox(seed, wide.to(tl.uint32), (zero + step).to(tl.uint32),
                                 (zero + stream).to(tl.uint32), zero.to(tl.uint32))
        z, _ = pair_uniform_to_normal(uint_to_uniform_float(r0), uint_to_uniform_float(r1))
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
    c_skip, c_out, a, b, p, q, c = (float(k) for k in coefs)
    mode = 0 if c == 0.0 else (1 if noise is not None else 2)
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
    _fused_step_kernel[(m, triton.cdiv(n, block))](
        x, y, inverse_table, u if u is not None else x, v if v is not None else x,
        noise if noise is not None else x, key if mode == 2 else inverse_table,
        noise_table if noise_table is not None else inverse_table,
        out, den if write_denoised else out, g, m, n, rows_per_sample, step,
        c_skip, c_out, a, b, p, q, c,
        HAS_U=u is not None, HAS_V=v is not None, NOISE=mode,
        HAS_NTABLE=noise_table is not None and mode == 2,
        WRITE_DEN=write_denoised, BLOCK=block,
        ACC=tl.float64 if x.dtype == torch.float64 else tl.float32)
    return out, den
