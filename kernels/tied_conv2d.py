"""Triton kernels for the tied convolution: the orbit-sum stencil and its transpose.

The contractions over (orbits × channels) are GEMMs and go to torch.matmul (cuBLAS on a GPU);
the stencils are the memory-bound part Triton fuses (one read of each input pixel per kernel
position, one write per orbit). Orbit tables: CSR positions/offsets (symfast/reference/tied_conv2d.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from symfast.kernels._grid import grid, row_and_offsets
from symfast.kernels._tables import check_once

_BLOCK = 256


@triton.jit
def _stencil_kernel(x_ptr, pos_ptr, off_ptr, out_ptr, C, H, W, Ho, Wo, R, KW, SH, SW, PH, PW,
                    s_b, s_c, s_r, BLOCK: tl.constexpr, ACC: tl.constexpr):
    plane, offs = row_and_offsets(Ho * Wo, BLOCK)  # plane b * C + c
    plane = plane.to(tl.int64)
    b = plane // C
    c = plane % C
    mask = offs < Ho * Wo
    oy = offs // Wo
    ox = offs % Wo
    src = x_ptr + plane * H * W
    # orbit r's output row, carried in int64: in the (C, R, B) layout of the weight gradient
    # s_r is B·Ho·Wo, and r * s_r passed 2^31
    out_row = b * s_b + c * s_c
    for r in range(0, R):
        start = tl.load(off_ptr + r)
        end = tl.load(off_ptr + r + 1)
        acc = tl.zeros([BLOCK], dtype=ACC)
        for t in range(start, end):
            p = tl.load(pos_ptr + t)
            iy = oy * SH + p // KW - PH
            ix = ox * SW + p % KW - PW
            inside = mask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            acc += tl.load(src + iy * W + ix, mask=inside, other=0.0).to(ACC)
        tl.store(out_ptr + out_row + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        out_row += s_r


@triton.jit
def _stencil_transpose_kernel(gs_ptr, pos_ptr, off_ptr, out_ptr, C, H, W, Ho, Wo, R, KW, SH, SW,
                              PH, PW, BLOCK: tl.constexpr, ACC: tl.constexpr):
    # A gather over the output positions each input pixel fed, so no atomics are needed.
    plane, offs = row_and_offsets(H * W, BLOCK)
    plane = plane.to(tl.int64)
    mask = offs < H * W
    iy = offs // W
    ix = offs % W
    base = gs_ptr + plane * R * Ho * Wo
    acc = tl.zeros([BLOCK], dtype=ACC)
    for r in range(0, R):
        start = tl.load(off_ptr + r)
        end = tl.load(off_ptr + r + 1)
        for t in range(start, end):
            p = tl.load(pos_ptr + t)
            ny = iy + PH - p // KW
            nx = ix + PW - p % KW
            ny_safe = tl.where(ny >= 0, ny, 0)
            nx_safe = tl.where(nx >= 0, nx, 0)
            oy = ny_safe // SH
            ox = nx_safe // SW
            hit = (mask & (ny >= 0) & (nx >= 0) & (ny_safe % SH == 0) & (nx_safe % SW == 0)
                   & (oy < Ho) & (ox < Wo))
            acc += tl.load(base + r * Ho * Wo + oy * Wo + ox, mask=hit, other=0.0).to(ACC)
    tl.store(out_ptr + plane * H * W + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _check_tables(positions: torch.Tensor, offsets: torch.Tensor, kernel_size: tuple[int, int]) -> None:
    kh, kw = kernel_size

    def in_range() -> None:
        if positions.numel() and (positions.min() < 0 or positions.max() >= kh * kw):
            raise ValueError(f"positions holds an index outside the {kh}x{kw} kernel")

    def rising() -> None:
        if offsets[0] != 0 or offsets[-1] != positions.numel() or bool((offsets.diff() < 0).any()):
            raise ValueError("offsets must rise from 0 to len(positions)")
    check_once(positions, (kh, kw), in_range)
    check_once(offsets, positions.numel(), rising)


def stencil(x: torch.Tensor, positions: torch.Tensor, offsets: torch.Tensor,
            kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
            layout: str = "bcr") -> torch.Tensor:
    """x: (B, C, H, W) -> S: (B, C, R, Ho, Wo) (layout "bcr"), or (C, R, B, Ho, Wo) ("crb",
    the layout the weight gradient's single GEMM wants)."""
    _check_tables(positions, offsets, kernel_size)
    x = x.contiguous()
    bsz, c, h, w = x.shape
    r = offsets.numel() - 1
    ho, wo = (_out_size(h, kernel_size[0], stride[0], padding[0]),
              _out_size(w, kernel_size[1], stride[1], padding[1]))
    hw = ho * wo
    if layout == "bcr":
        out = torch.empty((bsz, c, r, ho, wo), dtype=x.dtype, device=x.device)
        strides = (c * r * hw, r * hw, hw)
    else:
        out = torch.empty((c, r, bsz, ho, wo), dtype=x.dtype, device=x.device)
        strides = (hw, r * bsz * hw, bsz * hw)
    if out.numel():
        block = min(_BLOCK, triton.next_power_of_2(hw))
        _stencil_kernel[grid(bsz * c, hw, block)](
            x, positions, offsets, out, c, h, w, ho, wo, r, kernel_size[1], stride[0], stride[1],
            padding[0], padding[1], *strides, BLOCK=block, ACC=_acc(x.dtype))
    return out


def stencil_transpose(gs: torch.Tensor, positions: torch.Tensor, offsets: torch.Tensor,
                      kernel_size: tuple[int, int], stride: tuple[int, int],
                      padding: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """gS: (B, C, R, Ho, Wo) -> gx: (B, C, H, W), the adjoint of :func:`stencil`."""
    _check_tables(positions, offsets, kernel_size)
    gs = gs.contiguous()
    bsz, c, r, ho, wo = gs.shape
    h, w = size
    out = torch.empty((bsz, c, h, w), dtype=gs.dtype, device=gs.device)
    if out.numel():
        block = min(_BLOCK, triton.next_power_of_2(h * w))
        _stencil_transpose_kernel[grid(bsz * c, h * w, block)](
            gs, positions, offsets, out, c, h, w, ho, wo, r, kernel_size[1], stride[0], stride[1],
            padding[0], padding[1], BLOCK=block, ACC=_acc(gs.dtype))
    return out


def tied_conv2d(x, weight, bias, positions, offsets, kernel_size, stride, padding) -> torch.Tensor:
    """x: (B, C, H, W), weight: (O, C, R), bias: (O,) or None -> (B, O, Ho, Wo)."""
    s = stencil(x, positions, offsets, kernel_size, stride, padding)
    bsz, c, r, ho, wo = s.shape
    o = weight.shape[0]
    # explicit sizes, no -1: B = 0 or O = 0 are valid and -1 is ambiguous for 0 elements
    y = torch.matmul(weight.reshape(o, c * r), s.view(bsz, c * r, ho * wo))
    if bias is not None:
        y = y + bias.view(1, o, 1)
    return y.view(bsz, o, ho, wo)


def grad_input(grad_out, x_size, weight, positions, offsets, kernel_size, stride, padding):
    """grad_out: (B, O, Ho, Wo) -> grad x: (B, C, H, W)."""
    o, c, r = weight.shape
    bsz, _, ho, wo = grad_out.shape
    gs = torch.matmul(weight.reshape(o, c * r).t(), grad_out.reshape(bsz, o, ho * wo))
    return stencil_transpose(gs.view(bsz, c, r, ho, wo), positions, offsets, kernel_size, stride,
                             padding, (x_size[2], x_size[3]))


def grad_weight(grad_out, x, weight_shape, positions, offsets, kernel_size, stride, padding):
    """grad θ: (O, C, R) = Σ_b grad_out[b] @ S[b]ᵀ as one GEMM over B·Ho·Wo."""
    o, c, r = weight_shape
    s = stencil(x, positions, offsets, kernel_size, stride, padding, layout="crb")
    bsz, _, ho, wo = grad_out.shape
    gy = grad_out.transpose(0, 1).reshape(o, bsz * ho * wo)
    return torch.mm(gy, s.view(c * r, bsz * ho * wo).t()).view(o, c, r)
