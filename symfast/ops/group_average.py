"""Public orbit / orbit_mean ops: checks, the backend switch, torch.library registration.

The torch ops ``symfast::orbit`` and ``symfast::orbit_mean`` work on flattened views
(x: (M, N), y: (G, M, N), N = the size of the dims the group acts on) and take the group's
gather tables as tensors, so ``torch.compile`` sees plain tensor ops with fake implementations.
``symfast::orbit_out`` writes the orbit into a caller's tensor (``orbit(..., out=)``); its schema
declares the mutation (``Tensor(a!) out``), so torch.compile functionalizes it.
"""
from __future__ import annotations

import torch

from symfast import _backend
from symfast.groups import Group, get
from symfast.ops import _checks, _dispatch
from symfast.reference import group_average as reference

_OP = "group_average"


def _check_tables(inp: torch.Tensor, table: torch.Tensor,
                  inverse_table: torch.Tensor | None = None) -> None:
    for arg, t in (("table", table), ("inverse_table", inverse_table)):
        if t is None:
            continue
        if t.device != inp.device:
            raise ValueError(f"{arg} is on {t.device} but the input is on {inp.device}; build "
                             f"tables with group.tables(shape, device=input.device)")
        if t.dtype != torch.int32 or t.dim() != 2 or t.shape[1] != inp.shape[-1]:
            raise ValueError(f"{arg} must be int32 of shape (G, {inp.shape[-1]}), got "
                             f"{t.dtype} {tuple(t.shape)}")


def _orbit_impl(x: torch.Tensor, table: torch.Tensor, inverse_table: torch.Tensor,
                backend: str) -> torch.Tensor:
    _check_tables(x, table, inverse_table)
    return _dispatch.kernel(_OP, backend, cpu="orbit_cpu", triton="orbit")(x, table)


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[low, high) bytes of memory t's elements lie in."""
    low = high = t.data_ptr()
    for size, stride in zip(t.shape, t.stride()):
        reach = (size - 1) * stride * t.element_size()
        low, high = (low + reach, high) if reach < 0 else (low, high + reach)
    return low, high + t.element_size()


def _check_no_overlap(x: torch.Tensor, out: torch.Tensor) -> None:
    """out must not share memory with x: the kernels read x while they write out. Compared by
    the memory the two span (a strided x interleaved with out, sharing no element, is refused
    too)."""
    if x.numel() == 0 or out.numel() == 0 or x.device.type == "meta":
        return
    (x_low, x_high), (out_low, out_high) = _extent(x), _extent(out)
    if x_low < out_high and out_low < x_high:
        raise ValueError("out shares memory with x; orbit(..., out=) needs a separate output "
                         "tensor (the kernels read x while writing out)")


def _orbit_out_impl(x: torch.Tensor, table: torch.Tensor, backend: str,
                    out: torch.Tensor) -> None:
    _check_tables(x, table)
    _check_no_overlap(x, out)
    _dispatch.kernel(_OP, backend, cpu="orbit_out_cpu", triton="orbit_out")(x, table, out)


def _orbit_mean_impl(y: torch.Tensor, table: torch.Tensor, inverse_table: torch.Tensor,
                     backend: str) -> torch.Tensor:
    _check_tables(y, table, inverse_table)
    if y.shape[0] != table.shape[0]:
        raise ValueError(f"y has {y.shape[0]} orbit blocks but the group has {table.shape[0]} elements")
    run = _dispatch.kernel(_OP, backend, cpu="orbit_mean_cpu", triton="orbit_mean")
    return run(y, inverse_table)


def _orbit_fake(x, table, inverse_table, backend):
    return x.new_empty((table.shape[0], x.shape[0], x.shape[1]))


def _orbit_mean_fake(y, table, inverse_table, backend):
    return y.new_empty((y.shape[1], y.shape[2]))


def _setup_context(ctx, inputs, output):
    ctx.tables = inputs[1], inputs[2]
    ctx.backend = inputs[3]


# d/dx of g_k x is g_kᵀ = g_k⁻¹ (orthogonal maps), so each op's backward is the other op
# (orbit's: |G| · orbit_mean; orbit_mean's: orbit / |G|), differentiable in turn (gradgradcheck
# in tests/test_group_average.py): the eager backward calls the other op's eager caller, so a
# double backward stays on the fast path too.
def _backward_through(other, times_order: bool):
    def backward(ctx, grad):
        table, inverse_table = ctx.tables
        out = other(grad.contiguous(), table, inverse_table, ctx.backend)
        return (out * table.shape[0] if times_order else out / table.shape[0]), None, None, None
    return backward


# Measured (1 thread on a shared 2-core machine, d4 on an (8·3, 16·16) input, best of 15 rounds
# interleaved): the custom op called directly, with its registered autograd, 46 us per call
# without grad and 332 us per forward + sum().backward(); through kernel_op's eager path 26 us
# and 237 us. So orbit/orbit_mean take the eager path like every other op with autograd.
_orbit_op, _orbit_eager = _dispatch.kernel_op(
    "symfast::orbit", _orbit_impl, _orbit_fake, _setup_context,
    lambda other: _backward_through(other, times_order=True),
    lambda *a: _orbit_mean_op(*a), lambda *a: _orbit_mean_eager(*a), differentiable_backward=True)
_orbit_mean_op, _orbit_mean_eager = _dispatch.kernel_op(
    "symfast::orbit_mean", _orbit_mean_impl, _orbit_mean_fake, _setup_context,
    lambda other: _backward_through(other, times_order=False),
    _orbit_op, _orbit_eager, differentiable_backward=True)


# orbit(..., out=): no autograd (as torch's out= functions), so no autograd.Function either; eager
# calls run the implementation directly, compiled ones the custom op, whose fake returns nothing.
_orbit_out_op = torch.library.custom_op("symfast::orbit_out", mutates_args=("out",))(_orbit_out_impl)


@_orbit_out_op.register_fake
def _orbit_out_fake(x, table, backend, out):
    return None


def _orbit_out(x: torch.Tensor, table: torch.Tensor, backend: str, out: torch.Tensor) -> None:
    if torch.compiler.is_compiling():
        _orbit_out_op(x, table, backend, out)
    else:
        _orbit_out_impl(x, table, backend, out)


def _check_out(out, x: torch.Tensor, group: Group) -> None:
    """out= of orbit: a contiguous tensor of the orbit's shape, dtype and device, apart from x;
    like torch's out= functions, no autograd through it."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.dtype != x.dtype:
        raise TypeError(f"out has dtype {out.dtype} but x has {x.dtype}")
    if out.device != x.device:
        raise ValueError(f"out is on {out.device} but x is on {x.device}")
    want = (len(group) * x.shape[0],) + tuple(x.shape[1:])
    if tuple(out.shape) != want:
        raise ValueError(f"out must have shape {want} (|G|·B, ...) for x of shape "
                         f"{tuple(x.shape)} and group {group.name}, got {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous (strides {out.stride()} for shape "
                         f"{tuple(out.shape)})")
    if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad):
        raise RuntimeError("orbit(): functions with out=... arguments don't support automatic "
                           "differentiation, but one of the arguments requires grad (call it "
                           "under torch.no_grad(), or without out=)")
    if not torch.compiler.is_compiling():  # compiled: the op checks the real tensors it runs on
        _check_no_overlap(x, out)


def _tables(t: torch.Tensor, group: Group) -> tuple[torch.Tensor, torch.Tensor]:
    """The group's (table, inverse_table) for t's trailing dims, on t's device."""
    return group.tables(t.shape[t.dim() - group.event_ndim:], t.device)


@_backend.profiled("orbit")
def orbit(x: torch.Tensor, group: Group | str, *, backend: str | None = None,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """The orbit of a batch: x (B, ...) -> (|G|·B, ...), element-major (block k is g_k x).

    ``backend``: "reference", "cpu", "triton", or None/"auto" for the fastest for x's device.
    ``out``: a contiguous tensor of shape (|G|·B, ...), x's dtype and device, sharing no memory
    with x, to write the orbit into (and return): a caller in a loop reuses one buffer instead of
    a fresh |G|-times-larger allocation per call. As with torch's out= functions there is no
    autograd through it: with grad enabled, x and out must not require grad.
    """
    group = get(group)
    _checks.floating("x", x)
    group.check_input(x)
    if x.dim() == group.event_ndim:
        raise ValueError(f"x has shape {tuple(x.shape)}: needs a batch dim before the "
                         f"{group.event_ndim} dims group {group.name} acts on")
    if out is not None:
        _check_out(out, x, group)
    backend = _dispatch.resolve(backend, x, _OP)
    if backend == "reference" or x.numel() == 0:  # empty: no work, and the kernels' tables need N > 0
        return reference.orbit(x, group, out=out)
    table, inverse_table = _tables(x, group)
    n = table.shape[1]
    if out is not None:
        _orbit_out(x.reshape(-1, n).contiguous(), table, backend, out)
        return out
    out = _orbit_eager(x.reshape(-1, n).contiguous(), table, inverse_table, backend)
    return out.reshape((len(group) * x.shape[0],) + tuple(x.shape[1:]))


@_backend.profiled("orbit_mean")
def orbit_mean(y: torch.Tensor, group: Group | str, *, backend: str | None = None) -> torch.Tensor:
    """Average over the orbit: y (|G|·B, ...) -> (B, ...) = 1/|G| Σ_k g_k⁻¹ y_k, where
    y_k = y[k·B:(k+1)·B] (the layout :func:`orbit` produces)."""
    group = get(group)
    _checks.floating("y", y)
    group.check_input(y, "y")
    g = len(group)
    if y.dim() == group.event_ndim or y.shape[0] % g != 0:
        raise ValueError(f"y has shape {tuple(y.shape)}: its first dim must be a multiple of "
                         f"|G| = {g} (group {group.name})")
    backend = _dispatch.resolve(backend, y, _OP)
    if backend == "reference" or y.numel() == 0:
        return reference.orbit_mean(y, group)
    table, inverse_table = _tables(y, group)
    n = table.shape[1]
    out = _orbit_mean_eager(y.reshape(g, -1, n).contiguous(), table, inverse_table, backend)
    return out.reshape((y.shape[0] // g,) + tuple(y.shape[1:]))
