"""Triton signed-gather kernels for orbit / orbit_mean (table encoding: symfast/groups.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from symfast.kernels._grid import grid, row_and_offsets
from symfast.kernels._tables import check_once

_BLOCK = 1024


@triton.jit
def _orbit_kernel(x_ptr, table_ptr, out_ptr, M, N, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row, offs = row_and_offsets(N, BLOCK)  # row of the (G, M) output rows: k * M + m
    k = row // M
    m = row % M
    mask = offs < N
    t = tl.load(table_ptr + k.to(tl.int64) * N + offs, mask=mask, other=0)
    src = tl.where(t < 0, -t - 1, t)
    # Negate in the accumulation type: exact, and the interpreter mis-negates raw bf16 values.
    v = tl.load(x_ptr + m.to(tl.int64) * N + src, mask=mask, other=0.0).to(ACC)
    v = tl.where(t < 0, -v, v)
    tl.store(out_ptr + row.to(tl.int64) * N + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _orbit_mean_kernel(y_ptr, table_ptr, out_ptr, G, M, N, BLOCK: tl.constexpr, ACC: tl.constexpr):
    m, offs = row_and_offsets(N, BLOCK)
    mask = offs < N
    acc = tl.zeros([BLOCK], dtype=ACC)
    # y's row k * M + m, carried in int64: k * M passes 2^31 for a group acting on single values
    # (sign: N = 1, M every value of x)
    y_row = m.to(tl.int64)
    for k in range(0, G):
        t = tl.load(table_ptr + k * N + offs, mask=mask, other=0)
        src = tl.where(t < 0, -t - 1, t)
        v = tl.load(y_ptr + y_row * N + src, mask=mask, other=0.0).to(ACC)
        acc += tl.where(t < 0, -v, v)
        y_row += M
    acc = acc / G
    tl.store(out_ptr + m.to(tl.int64) * N + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _acc(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _check(inp: torch.Tensor, table: torch.Tensor) -> None:
    n = inp.shape[-1]

    def in_range() -> None:
        src = torch.where(table < 0, -table - 1, table)
        if table.numel() and (src.min() < 0 or src.max() >= n):
            raise ValueError(f"table holds an index outside [0, {n})")
    check_once(table, n, in_range)


def orbit(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """x: (M, N) -> (G, M, N)."""
    out = torch.empty((table.shape[0],) + tuple(x.shape), dtype=x.dtype, device=x.device)
    orbit_out(x, table, out)
    return out


def orbit_out(x: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> None:
    """x: (M, N) -> out, contiguous with G·M·N elements (any shape), x's dtype and device."""
    _check(x, table)
    x = x.contiguous()
    g, (m, n) = table.shape[0], x.shape
    if not out.is_contiguous() or out.numel() != g * m * n or out.dtype != x.dtype \
            or out.device != x.device:
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of {g * m * n} elements "
                         f"on {x.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
    if out.numel():
        block = min(_BLOCK, triton.next_power_of_2(n))
        _orbit_kernel[grid(g * m, n, block)](x, table, out, m, n, BLOCK=block, ACC=_acc(x))


def orbit_mean(y: torch.Tensor, inverse_table: torch.Tensor) -> torch.Tensor:
    """y: (G, M, N) -> (M, N), mean of the inverse-transformed blocks."""
    _check(y, inverse_table)
    y = y.contiguous()
    g, m, n = y.shape
    out = torch.empty((m, n), dtype=y.dtype, device=y.device)
    if out.numel():
        block = min(_BLOCK, triton.next_power_of_2(n))
        _orbit_mean_kernel[grid(m, n, block)](
            y, inverse_table, out, g, m, n, BLOCK=block,
            ACC=_acc(y))
    return out
