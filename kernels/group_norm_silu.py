"""Triton kernels for z = silu(group_norm(x + shift[:, :, None, ...])), forward and backward.

One program per (b, g) tile x[b, g*Cg:(g+1)*Cg, :] (Cg = C / groups channels of S elements),
walked in [CB, SB] blocks (channels x positions). Forward: the tile's sum (mean), its squared
deviations (variance), then z; mean and rstd per (b, g) are stored for the backward. Backward:
per-channel sums of ga = dz * silu'(a) and ga * xhat (stored per (b, c); grad weight/bias are
their sums over b, taken on the host in a fixed order), then gx and its per-channel sum (the
shift's gradient).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from symfast.kernels._scalars import scalar_pair, wide_scalar

_BLOCK = 4096  # elements of one [CB, SB] block


@triton.jit
def _load_tile(x_ptr, shift_ptr, base, b, c0, C, S, cg, ch, pos, HAS_SHIFT: tl.constexpr,
               ACC: tl.constexpr):
    """The [CB, SB] block of y = x + shift at channels c0 + ch, positions pos (0 outside)."""
    cmask = ch < cg
    mask = cmask[:, None] & (pos < S)[None, :]
    y = tl.load(x_ptr + base + ch[:, None] * S + pos[None, :], mask=mask, other=0.0).to(ACC)
    if HAS_SHIFT:
        sh = tl.load(shift_ptr + b * C + c0 + ch, mask=cmask, other=0.0).to(ACC)
        y = tl.where(mask, y + sh[:, None], 0.0)
    return y, mask


@triton.jit
def _channel_params(weight_ptr, bias_ptr, c0, cg, ch, HAS_WEIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    cmask = ch < cg
    w = tl.full(ch.shape, 1.0, ACC)
    bb = tl.zeros(ch.shape, ACC)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + c0 + ch, mask=cmask, other=1.0).to(ACC)
    if HAS_BIAS:
        bb = tl.load(bias_ptr + c0 + ch, mask=cmask, other=0.0).to(ACC)
    return w, bb


@triton.jit
def _sigmoid(a):
    """1 / (1 + e^-a) from e^-|a| <= 1: no overflow for either sign."""
    e = tl.exp(-tl.abs(a))
    return tl.where(a >= 0, 1.0, e) / (1.0 + e)


@triton.jit
def _this_tile(C, S, G):
    """This program's (b, g) tile: (tile index, b, channels per group, first channel, elements,
    offset of its first element)."""
    pid = tl.program_id(0)
    cg = C // G
    count = cg * S
    return pid, pid // G, cg, (pid % G) * cg, count, pid.to(tl.int64) * count


@triton.jit
def _forward_kernel(x_ptr, shift_ptr, weight_ptr, bias_ptr, z_ptr, mean_ptr, rstd_ptr, C, S, G,
                    eps_hi, eps_lo, HAS_SHIFT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, CB: tl.constexpr, SB: tl.constexpr, ACC: tl.constexpr,
                    WIDE: tl.constexpr):
    pid, b, cg, c_start, count, base0 = _this_tile(C, S, G)
    total = tl.zeros([CB, SB], ACC)
    for c_off in range(0, cg, CB):
        ch = c_off + tl.arange(0, CB)
        for s0 in range(0, S, SB):
            y, _ = _load_tile(x_ptr, shift_ptr, base0, b, c_start, C, S, cg, ch,
                              s0 + tl.arange(0, SB), HAS_SHIFT, ACC)
            total += y
    mean = tl.sum(tl.sum(total, axis=1), axis=0) / count
    # Deviations from the mean, minus the square of their sum (makes up for the mean's rounding).
    dev = tl.zeros([CB, SB], ACC)
    dev2 = tl.zeros([CB, SB], ACC)
    for c_off in range(0, cg, CB):
        ch = c_off + tl.arange(0, CB)
        for s0 in range(0, S, SB):
            y, mask = _load_tile(x_ptr, shift_ptr, base0, b, c_start, C, S, cg, ch,
                                 s0 + tl.arange(0, SB), HAS_SHIFT, ACC)
            d = tl.where(mask, y - mean, 0.0)
            dev += d
            dev2 += d * d
    dev_sum = tl.sum(tl.sum(dev, axis=1), axis=0)
    raw_var = (tl.sum(tl.sum(dev2, axis=1), axis=0) - dev_sum * dev_sum / count) / count
    # a comparison keeps a NaN variance (a -inf in the group): maximum(NaN, 0) is 0 on GPUs
    var = tl.where(raw_var < 0.0, 0.0, raw_var)
    rstd = 1.0 / tl.sqrt(var + wide_scalar(eps_hi, eps_lo, WIDE))
    for c_off in range(0, cg, CB):
        ch = c_off + tl.arange(0, CB)
        w, bb = _channel_params(weight_ptr, bias_ptr, c_start + c_off, cg - c_off, tl.arange(0, CB),
                                HAS_WEIGHT, HAS_BIAS, ACC)
        for s0 in range(0, S, SB):
            pos = s0 + tl.arange(0, SB)
            y, mask = _load_tile(x_ptr, shift_ptr, base0, b, c_start, C, S, cg, ch, pos,
                                 HAS_SHIFT, ACC)
            a = (y - mean) * (rstd * w)[:, None] + bb[:, None]
            z = a * _sigmoid(a)
            tl.store(z_ptr + base0 + ch[:, None] * S + pos[None, :], z.to(z_ptr.dtype.element_ty),
                     mask=mask)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)


@triton.jit
def _grad_pre(x_ptr, gz_ptr, shift_ptr, base, b, c0, C, S, cg, ch, pos, mean, rstd, w, bb,
              HAS_SHIFT: tl.constexpr, ACC: tl.constexpr):
    """xhat and ga = dz * silu'(a) on one block (ga = 0 outside)."""
    y, mask = _load_tile(x_ptr, shift_ptr, base, b, c0, C, S, cg, ch, pos, HAS_SHIFT, ACC)
    xhat = (y - mean) * rstd
    a = xhat * w[:, None] + bb[:, None]
    sig = _sigmoid(a)
    gz = tl.load(gz_ptr + base + ch[:, None] * S + pos[None, :], mask=mask, other=0.0).to(ACC)
    ga = tl.where(mask, gz * sig * (1.0 + a * (1.0 - sig)), 0.0)
    return xhat, ga, mask


@triton.jit
def _backward_kernel(gz_ptr, x_ptr, shift_ptr, weight_ptr, bias_ptr, mean_ptr, rstd_ptr, gx_ptr,
                     gshift_ptr, ga_sum_ptr, ga_xhat_sum_ptr, C, S, G, HAS_SHIFT: tl.constexpr,
                     HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, CB: tl.constexpr,
                     SB: tl.constexpr, ACC: tl.constexpr):
    pid, b, cg, c_start, count, base0 = _this_tile(C, S, G)
    mean = tl.load(mean_ptr + pid).to(ACC)
    rstd = tl.load(rstd_ptr + pid).to(ACC)
    # The tile's sums in float64 (0-d): sum of k_ga * ga with k_ga = rstd * w as the second pass
    # rounds it, of w * ga * xhat, and of xhat as the second pass computes it (see k_mean below).
    group_kga_ga = tl.sum(tl.zeros([CB], tl.float64), axis=0)
    group_ga_xhat = tl.sum(tl.zeros([CB], tl.float64), axis=0)
    group_xhat = tl.sum(tl.zeros([CB], tl.float64), axis=0)
    for c_off in range(0, cg, CB):
        ch = c_off + tl.arange(0, CB)
        w, bb = _channel_params(weight_ptr, bias_ptr, c_start + c_off, cg - c_off, tl.arange(0, CB),
                                HAS_WEIGHT, HAS_BIAS, ACC)
        acc_ga = tl.zeros([CB, SB], ACC)
        acc_ga_xhat = tl.zeros([CB, SB], ACC)
        acc_xhat = tl.zeros([CB, SB], ACC)
        for s0 in range(0, S, SB):
            xhat, ga, mask = _grad_pre(x_ptr, gz_ptr, shift_ptr, base0, b, c_start, C, S, cg, ch,
                                       s0 + tl.arange(0, SB), mean, rstd, w, bb, HAS_SHIFT, ACC)
            acc_ga += ga
            acc_ga_xhat += ga * xhat
            acc_xhat += tl.where(mask, xhat, 0.0)
        ga_c = tl.sum(acc_ga, axis=1)
        ga_xhat_c = tl.sum(acc_ga_xhat, axis=1)
        cmask = ch < cg
        tl.store(ga_sum_ptr + b * C + c_start + ch, ga_c, mask=cmask)
        tl.store(ga_xhat_sum_ptr + b * C + c_start + ch, ga_xhat_c, mask=cmask)
        k_ga = (rstd * w).to(tl.float64)
        group_kga_ga += tl.sum(tl.where(cmask, k_ga * ga_c.to(tl.float64), 0.0), axis=0)
        group_ga_xhat += tl.sum(tl.where(cmask, w.to(tl.float64) * ga_xhat_c.to(tl.float64), 0.0),
                                axis=0)
        group_xhat += tl.sum(tl.where(cmask, tl.sum(acc_xhat, axis=1).to(tl.float64), 0.0), axis=0)
    # gx = ga k_ga - xhat k_xhat - k_mean sums to 0 over the tile in exact arithmetic, and every
    # gradient upstream of a per-group shift is made of that sum: k_mean makes the terms formed
    # below sum to 0 (also correcting for the mean of xhat, which the forward's rounded mean
    # leaves off 0) and is subtracted as hi + lo, so that its own rounding does not shift the
    # whole tile one way (as the cpu kernel, csrc/cpu/group_norm_silu.cpp).
    k_xhat = (rstd.to(tl.float64) * group_ga_xhat / count).to(ACC)
    k_mean = (group_kga_ga - k_xhat.to(tl.float64) * group_xhat) / count
    k_mean_hi = k_mean.to(ACC)
    k_mean_lo = (k_mean - k_mean_hi.to(tl.float64)).to(ACC)
    for c_off in range(0, cg, CB):
        ch = c_off + tl.arange(0, CB)
        w, bb = _channel_params(weight_ptr, bias_ptr, c_start + c_off, cg - c_off, tl.arange(0, CB),
                                HAS_WEIGHT, HAS_BIAS, ACC)
        acc_g = tl.zeros([CB, SB], ACC)
        for s0 in range(0, S, SB):
            pos = s0 + tl.arange(0, SB)
            xhat, ga, mask = _grad_pre(x_ptr, gz_ptr, shift_ptr, base0, b, c_start, C, S, cg, ch,
                                       pos, mean, rstd, w, bb, HAS_SHIFT, ACC)
            g = ((ga * (rstd * w)[:, None] - xhat * k_xhat) - k_mean_hi) - k_mean_lo
            tl.store(gx_ptr + base0 + ch[:, None] * S + pos[None, :], g.to(gx_ptr.dtype.element_ty),
                     mask=mask)
            acc_g += tl.where(mask, g, 0.0)
        tl.store(gshift_ptr + b * C + c_start + ch, tl.sum(acc_g, axis=1).to(gshift_ptr.dtype.element_ty),
                 mask=ch < cg)


def _acc(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _blocks(cg: int, s: int) -> tuple[int, int]:
    """[CB, SB] with CB * SB <= _BLOCK, as wide in positions as the plane allows."""
    sb = min(_BLOCK, triton.next_power_of_2(max(s, 1)))
    cb = min(triton.next_power_of_2(cg), max(1, _BLOCK // sb))
    return cb, sb


def _sizes(x: torch.Tensor) -> tuple[int, int, int, torch.dtype]:
    """(B, C, S = elements per plane, the dtype of the saved mean/rstd)."""
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.shape[0], x.shape[1], math.prod(x.shape[2:]), stats_dtype


def _flags(shift, weight, bias, x):
    """Contiguous shift/weight/bias (x stands in for an absent one: the HAS_* flags switch its
    loads off) and the flags."""
    tensors = tuple(t.contiguous() if t is not None else x for t in (shift, weight, bias))
    return (*tensors, dict(HAS_SHIFT=shift is not None, HAS_WEIGHT=weight is not None,
                           HAS_BIAS=bias is not None))


def forward(x: torch.Tensor, shift, weight, bias, groups: int, eps: float):
    """x: (B, C, *spatial) -> (z like x, mean (B, groups), rstd (B, groups))."""
    x = x.contiguous()
    b, c, s, stats_dtype = _sizes(x)
    z = torch.empty_like(x)
    mean = torch.zeros((b, groups), dtype=stats_dtype, device=x.device)
    rstd = torch.zeros_like(mean)
    if x.numel() == 0:
        return z, mean, rstd
    shift_t, weight_t, bias_t, flags = _flags(shift, weight, bias, x)
    cb, sb = _blocks(c // groups, s)
    wide = x.dtype == torch.float64
    _forward_kernel[(b * groups,)](x, shift_t, weight_t, bias_t, z, mean, rstd, c, s, groups,
                                   *scalar_pair(eps, wide), CB=cb, SB=sb, ACC=_acc(x), WIDE=wide, **flags)
    return z, mean, rstd


def backward(grad_z: torch.Tensor, x: torch.Tensor, shift, weight, bias, mean: torch.Tensor,
             rstd: torch.Tensor, groups: int):
    """-> (grad x, grad shift (B, C), grad weight (C,), grad bias (C,))."""
    x, grad_z = x.contiguous(), grad_z.contiguous()
    b, c, s, stats_dtype = _sizes(x)
    gx = torch.empty_like(x)
    gshift = torch.zeros((b, c), dtype=x.dtype, device=x.device)
    ga_sum = torch.zeros((b, c), dtype=stats_dtype, device=x.device)
    ga_xhat_sum = torch.zeros_like(ga_sum)
    if x.numel():
        shift_t, weight_t, bias_t, flags = _flags(shift, weight, bias, x)
        cb, sb = _blocks(c // groups, s)
        _backward_kernel[(b * groups,)](grad_z, x, shift_t, weight_t, bias_t, mean.contiguous(),
                                        rstd.contiguous(), gx, gshift, ga_sum, ga_xhat_sum, c, s,
                                        groups, CB=cb, SB=sb, ACC=_acc(x), **flags)
    return gx, gshift, ga_xhat_sum.sum(0).to(x.dtype), ga_sum.sum(0).to(x.dtype)
