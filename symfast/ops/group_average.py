"""Public orbit / orbit_mean ops: checks, the backend switch, torch.library registration.

The torch ops ``symfast::orbit`` and ``symfast::orbit_mean`` work on flattened views
(x: (M, N), y: (G, M, N), N = the size of the dims the group acts on) and take the group's
gather tables as tensors, so ``torch.compile`` sees plain tensor ops with fake implementations.
"""
from __future__ import annotations

import torch

from symfast import _backend
from symfast.groups import Group, get
from symfast.reference import group_average as reference

_OP = "group_average"


def _run(backend: str, name: str, inp: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    if backend == "cpu":
        _backend.resolve("cpu", inp, _OP)  # loads the extension on first use
        return getattr(torch.ops.symfast, f"{name}_cpu")(inp, table)
    if backend == "triton":
        from symfast.kernels import group_average as triton_kernels
        return getattr(triton_kernels, name)(inp, table)
    raise ValueError(f"backend must be 'cpu' or 'triton' for symfast::{name}, got {backend!r}")


def _check_tables(inp: torch.Tensor, table: torch.Tensor, inverse_table: torch.Tensor) -> None:
    for arg, t in (("table", table), ("inverse_table", inverse_table)):
        if t.device != inp.device:
            raise ValueError(f"{arg} is on {t.device} but the input is on {inp.device}; build "
                             f"tables with group.tables(shape, device=input.device)")
        if t.dtype != torch.int32 or t.dim() != 2 or t.shape[1] != inp.shape[-1]:
            raise ValueError(f"{arg} must be int32 of shape (G, {inp.shape[-1]}), got "
                             f"{t.dtype} {tuple(t.shape)}")


@torch.library.custom_op("symfast::orbit", mutates_args=())
def _orbit_op(x: torch.Tensor, table: torch.Tensor, inverse_table: torch.Tensor,
              backend: str) -> torch.Tensor:
    _check_tables(x, table, inverse_table)
    return _run(backend, "orbit", x, table)


@_orbit_op.register_fake
def _(x, table, inverse_table, backend):
    return x.new_empty((table.shape[0], x.shape[0], x.shape[1]))


@torch.library.custom_op("symfast::orbit_mean", mutates_args=())
def _orbit_mean_op(y: torch.Tensor, table: torch.Tensor, inverse_table: torch.Tensor,
                   backend: str) -> torch.Tensor:
    _check_tables(y, table, inverse_table)
    if y.shape[0] != table.shape[0]:
        raise ValueError(f"y has {y.shape[0]} orbit blocks but the group has {table.shape[0]} elements")
    return _run(backend, "orbit_mean", y, inverse_table)


@_orbit_mean_op.register_fake
def _(y, table, inverse_table, backend):
    return y.new_empty((y.shape[1], y.shape[2]))


def _setup_context(ctx, inputs, output):
    ctx.tables = inputs[1], inputs[2]
    ctx.backend = inputs[3]


# d/dx of g_k x is g_kᵀ = g_k⁻¹ (orthogonal maps), so each op's backward is the other op.
def _orbit_backward(ctx, grad):
    table, inverse_table = ctx.tables
    n = table.shape[0]
    return _orbit_mean_op(grad.contiguous(), table, inverse_table, ctx.backend) * n, None, None, None


def _orbit_mean_backward(ctx, grad):
    table, inverse_table = ctx.tables
    n = table.shape[0]
    return _orbit_op(grad.contiguous(), table, inverse_table, ctx.backend) / n, None, None, None


_orbit_op.register_autograd(_orbit_backward, setup_context=_setup_context)
_orbit_mean_op.register_autograd(_orbit_mean_backward, setup_context=_setup_context)


def _check_floating(t: torch.Tensor, name: str) -> None:
    # every backend, the reference included: an average of ints or bools has no meaning here
    # (bool + bool is OR), and the kernels take real floating point only
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor, got {t.dtype}")


def _tables(t: torch.Tensor, group: Group) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's (table, inverse_table) for t's trailing dims, on t's device."""
    return group.tables(t.shape[t.dim() - group.event_ndim:], t.device)


@_backend.profiled("orbit")
def orbit(x: torch.Tensor, group: Group | str, *, backend: str | None = None) -> torch.Tensor:
    """The orbit of a batch: x (B, ...) -> (|G|·B, ...), element-major (block k is g_k x).

    ``backend``: "reference", "cpu", "triton", or None/"auto" for the fastest for x's device.
    """
    group = get(group)
    _check_floating(x, "x")
    group.check_input(x)
    if x.dim() == group.event_ndim:
        raise ValueError(f"x has shape {tuple(x.shape)}: needs a batch dim before the "
                         f"{group.event_ndim} dims group {group.name} acts on")
    backend = _backend.resolve(backend, x, _OP)
    if backend == "reference" or x.numel() == 0:  # empty: no work, and the kernels' tables need N > 0
        return reference.orbit(x, group)
    table, inverse_table = _tables(x, group)
    n = table.shape[1]
    out = _orbit_op(x.reshape(-1, n).contiguous(), table, inverse_table, backend)
    return out.reshape((len(group) * x.shape[0],) + tuple(x.shape[1:]))


@_backend.profiled("orbit_mean")
def orbit_mean(y: torch.Tensor, group: Group | str, *, backend: str | None = None) -> torch.Tensor:
    """Average over the orbit: y (|G|·B, ...) -> (B, ...) = 1/|G| Σ_k g_k⁻¹ y_k, where
    y_k = y[k·B:(k+1)·B] (the layout :func:`orbit` produces)."""
    group = get(group)
    _check_floating(y, "y")
    group.check_input(y, "y")
    g = len(group)
    if y.dim() == group.event_ndim or y.shape[0] % g != 0:
        raise ValueError(f"y has shape {tuple(y.shape)}: its first dim must be a multiple of "
                         f"|G| = {g} (group {group.name})")
    backend = _backend.resolve(backend, y, _OP)
    if backend == "reference" or y.numel() == 0:
        return reference.orbit_mean(y, group)
    table, inverse_table = _tables(y, group)
    n = table.shape[1]
    out = _orbit_mean_op(y.reshape(g, -1, n).contiguous(), table, inverse_table, backend)
    return out.reshape((y.shape[0] // g,) + tuple(y.shape[1:]))
