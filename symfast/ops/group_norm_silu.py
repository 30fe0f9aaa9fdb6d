"""Public group_norm_silu op: checks, the backend switch, torch.library registration.

``symfast::group_norm_silu`` computes z = silu(group_norm(x + shift[:, :, None, ...])) and also
returns the per-(b, g) mean and rstd (float32; float64 for float64 x), which its backward,
``symfast::group_norm_silu_backward``, reads instead of recomputing the statistics. The backward
returns the gradients of x, shift, weight and bias in one call: the latter three are per-channel
sums of the same per-element terms gx needs.
"""
from __future__ import annotations

import torch

from symfast import _backend
from symfast.ops import _checks, _dispatch
from symfast.reference import group_norm_silu as reference

_OP = "group_norm_silu"


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@_dispatch.forwarding(_OP, cpu="group_norm_silu_cpu", triton="forward")
def _forward_impl(x: torch.Tensor, shift: torch.Tensor | None, weight: torch.Tensor | None,
                  bias: torch.Tensor | None, groups: int, eps: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z, and the per-(b, g) mean and rstd the backward reads."""


def _forward_fake(x, shift, weight, bias, groups, eps, backend):
    stats = x.new_empty((x.shape[0], groups), dtype=_stats_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


@_dispatch.forwarding(_OP, cpu="group_norm_silu_backward_cpu", triton="backward")
def _backward_impl(grad_z: torch.Tensor, x: torch.Tensor, shift: torch.Tensor | None,
                   weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor,
                   rstd: torch.Tensor, groups: int,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x, shift, weight and bias."""


def _backward_fake(grad_z, x, shift, weight, bias, mean, rstd, groups, backend):
    b, c = x.shape[:2]
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((b, c)),
            x.new_empty((c,)), x.new_empty((c,)))


_backward_op = _dispatch.custom_op("symfast::group_norm_silu_backward", _backward_impl,
                                   _backward_fake)


def _setup_context(ctx, inputs, output):
    x, shift, weight, bias, groups, eps, backend = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, shift, weight, bias, mean, rstd)
    ctx.groups, ctx.backend = groups, backend


def _make_backward(backward_fn):
    """The backward, through the backward op (the custom op, or its impl when eager)."""
    def backward(ctx, grad_z, _grad_mean, _grad_rstd):
        x, shift, weight, bias, mean, rstd = ctx.saved_tensors
        gx, gshift, gweight, gbias = backward_fn(grad_z.contiguous(), x, shift, weight, bias, mean,
                                                 rstd, ctx.groups, ctx.backend)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, gshift if shift is not None and need[1] else None,
                gweight if weight is not None and need[2] else None,
                gbias if bias is not None and need[3] else None, None, None, None)
    return backward


_forward_op, _forward_eager = _dispatch.kernel_op(
    "symfast::group_norm_silu", _forward_impl, _forward_fake, _setup_context, _make_backward,
    _backward_op, _backward_impl)


def _check(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
           eps: float, shift: torch.Tensor | None) -> None:
    _checks.floating("x", x)
    for name, t in (("shift", shift), ("weight", weight), ("bias", bias)):
        _checks.floating(name, t, optional=True)
    if x.dim() < 2:
        raise ValueError(f"x must be (B, C, *spatial), got shape {tuple(x.shape)}")
    _checks.integer("groups", groups)
    b, c = x.shape[:2]
    if groups < 1 or c % groups:
        raise ValueError(f"groups must be a positive divisor of the {c} channels of x, got {groups}")
    _checks.finite_number("eps", eps, positive=False)  # numpy scalars too, as F.group_norm
    for name, t, shape in (("shift", shift, (b, c)), ("weight", weight, (c,)), ("bias", bias, (c,))):
        if t is not None and t.shape != shape:  # the message formatted only when it is raised
            _checks.shape(name, t, shape, f" for x of shape {tuple(x.shape)}")
        _checks.like(name, t, "x", x)


@_backend.profiled("group_norm_silu")
def group_norm_silu(x: torch.Tensor, groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5,
                    shift: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """z = silu(group_norm(x + shift[:, :, None, ...], groups, weight, bias, eps)), in one pass
    over memory forward and one backward (the paper's code takes three forward, with the shift).

    x: (B, C, *spatial); shift: (B, C) or None, added to every position of its channel before the
    normalisation (a UNet block's time embedding); weight, bias: (C,) or None; groups divides C.
    Returns z: (B, C, *spatial), differentiable in x, shift, weight and bias.
    ``backend``: "reference", "cpu", "triton", or None/"auto" for the fastest for x's device.
    A bf16/fp16 x takes float32 weight, bias and shift (used in x's dtype), as F.group_norm
    takes float32 parameters with a bf16 input (under autocast, or a model cast by hand).
    """
    if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16):
        weight, bias, shift = (t.to(x.dtype) if isinstance(t, torch.Tensor) and t.dtype == torch.float32
                               else t for t in (weight, bias, shift))
    _check(x, groups, weight, bias, eps, shift)
    backend = _dispatch.resolve(backend, x, _OP)
    if backend == "reference":
        return reference.group_norm_silu(x, groups, weight, bias, float(eps), shift)
    return _forward_eager(x, shift, weight, bias, groups, float(eps), backend)[0]
