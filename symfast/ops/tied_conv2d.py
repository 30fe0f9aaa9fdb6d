"""Public tied convolution op: checks, the backend switch, torch.library registration.

``symfast::tied_conv2d`` takes the kernel's orbit tables (CSR positions/offsets, see
symfast/reference/tied_conv2d.py) as tensors, so ``torch.compile`` sees a plain op with a fake
implementation; its backward is one more op, ``symfast::tied_conv2d_backward``, for all three
gradients (input gradient: GEMM + transposed stencil, which on the CPU is the forward kernel run
on grad_out with theta transposed and the kernel reflected; weight gradient: stencil + one GEMM;
bias gradient: a sum), called once whether eager or compiled.
"""
from __future__ import annotations

import torch

from symfast import _backend
from symfast.groups import Group, for_dispatch_mode, get, real_tensors
from symfast.ops import _checks, _dispatch
from symfast.reference import tied_conv2d as reference
from symfast.reference.tied_conv2d import KernelOrbits, kernel_orbits, output_size

_OP = "tied_conv2d"


def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    # the common cases (TiedConv2d passes its pairs every call), checked in one step
    if type(value) is int and value >= minimum:
        return value, value
    if (type(value) is tuple and len(value) == 2 and type(value[0]) is int
            and type(value[1]) is int and value[0] >= minimum and value[1] >= minimum):
        return value
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {tuple(value)}")
    return int(value[0]), int(value[1])


_TABLES: dict[tuple[KernelOrbits, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(orbits: KernelOrbits, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The orbit tables on ``device``, copied there once per process. Under torch.compile the
    copy is traced instead (dynamo warned at every compile that it ignores an lru_cache)."""
    if torch.compiler.is_compiling():
        return orbits.positions.to(device), orbits.offsets.to(device)
    key = (orbits, device)
    tables = _TABLES.get(key)
    if tables is None:
        with real_tensors():
            tables = _TABLES[key] = (orbits.positions.to(device), orbits.offsets.to(device))
    return for_dispatch_mode(tables)


def _cpu_args(kernel_size, stride, padding) -> tuple[int, ...]:
    return (*kernel_size, *stride, *padding)


def _tied_conv2d_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      positions: torch.Tensor, offsets: torch.Tensor, kernel_size: list[int],
                      stride: list[int], padding: list[int], backend: str) -> torch.Tensor:
    run = _dispatch.kernel(_OP, backend, cpu="tied_conv2d_cpu", triton="tied_conv2d")
    if backend == "cpu":
        return run(x, weight, bias, positions, offsets, *_cpu_args(kernel_size, stride, padding))
    return run(x, weight, bias, positions, offsets, kernel_size, stride, padding)


def _tied_conv2d_fake(x, weight, bias, positions, offsets, kernel_size, stride, padding, backend):
    ho = output_size(x.shape[2], kernel_size[0], stride[0], padding[0])
    wo = output_size(x.shape[3], kernel_size[1], stride[1], padding[1])
    return x.new_empty((x.shape[0], weight.shape[0], ho, wo))


def _backward_impl(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   positions: torch.Tensor, offsets: torch.Tensor, kernel_size: list[int],
                   stride: list[int], padding: list[int], backend: str,
                   needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad x, grad weight, grad bias) in one call; a gradient not in ``needs`` comes back as
    an empty tensor (a custom op returns tensors, not None)."""
    if backend == "cpu":
        grads = _dispatch.cpu_kernel(_OP, "tied_conv2d_backward_cpu")(
            grad_out, x, weight, positions, offsets, *_cpu_args(kernel_size, stride, padding), needs)
    else:  # three Triton launchers where the CPU has one op
        kernels = _dispatch.kernels(_OP, backend)
        grad_out = grad_out.contiguous()
        grads = (kernels.grad_input(grad_out, x.shape, weight, positions, offsets, kernel_size,
                                    stride, padding) if needs[0] else None,
                 kernels.grad_weight(grad_out, x, weight.shape, positions, offsets, kernel_size,
                                     stride, padding) if needs[1] else None,
                 grad_out.sum((0, 2, 3)) if needs[2] else None)
    return tuple(g if need else x.new_empty(0) for g, need in zip(grads, needs))


def _backward_fake(grad_out, x, weight, positions, offsets, kernel_size, stride, padding, backend,
                   needs):
    shapes = (x.shape, weight.shape, weight.shape[:1])
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


_backward_op = _dispatch.custom_op("symfast::tied_conv2d_backward", _backward_impl, _backward_fake)


def _setup_context(ctx, inputs, output):
    x, weight, bias, positions, offsets, kernel_size, stride, padding, backend = inputs
    ctx.save_for_backward(x, weight, positions, offsets)
    ctx.geometry = (kernel_size, stride, padding, backend)
    ctx.has_bias = bias is not None


def _make_backward(backward_fn):
    """The backward: ONE call of the backward op (or its impl when eager) for all gradients."""
    def backward(ctx, grad):
        x, weight, positions, offsets = ctx.saved_tensors
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                 ctx.has_bias and ctx.needs_input_grad[2]]
        grads = backward_fn(grad, x, weight, positions, offsets, *ctx.geometry, needs)
        return (*(g if need else None for g, need in zip(grads, needs)),
                None, None, None, None, None, None)
    return backward


_tied_conv2d_op, _tied_conv2d_eager = _dispatch.kernel_op(
    "symfast::tied_conv2d", _tied_conv2d_impl, _tied_conv2d_fake, _setup_context, _make_backward,
    _backward_op, _backward_impl)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, orbits: KernelOrbits,
           stride: tuple[int, int], padding: tuple[int, int]) -> None:
    _checks.floating("x", x)
    _checks.floating("weight", weight)
    _checks.floating("bias", bias, optional=True)
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 3 or weight.shape[1] != x.shape[1] or weight.shape[2] != orbits.count:
        raise ValueError(f"weight must be (out_channels, {x.shape[1]}, {orbits.count}) (one value "
                         f"per kernel orbit), got shape {tuple(weight.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must be ({weight.shape[0]},), got shape {tuple(bias.shape)}")
    _checks.like("weight", weight, "x", x)
    _checks.like("bias", bias, "x", x)
    kh, kw = orbits.kernel_size
    if x.shape[2] + 2 * padding[0] < kh or x.shape[3] + 2 * padding[1] < kw:
        raise ValueError(f"x of spatial size {tuple(x.shape[2:])} with padding {padding} is smaller "
                         f"than the kernel ({kh}, {kw})")


@_backend.profiled("tied_conv2d")
def tied_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                kernel_size: int | tuple[int, int], group: Group | str,
                stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0, *,
                backend: str | None = None) -> torch.Tensor:
    """Convolution with a ``group``-invariant kernel stored as one value per kernel orbit.

    x: (B, C, H, W); weight θ: (O, C, R) with R = number of orbits of the (kh, kw) kernel grid
    under ``group`` (D4 3×3: 3, D4 5×5: 6, C4 3×3: 3, flip_h 3×3: 6); bias: (O,) or None.
    Returns (B, O, Ho, Wo), equal to F.conv2d(x, expand_weight(θ), bias, stride, padding) up to
    rounding: the inputs of one orbit are summed before θ multiplies them, so a sum that passes
    the dtype's largest value (x near 3e38 in float32) is inf where F.conv2d's products are not,
    and an infinite θ gives ±inf where F.conv2d's 0·inf (a padded zero) gives NaN.
    ``backend``: "reference", "cpu", "triton", or None/"auto" for the fastest for x's device.
    """
    x, weight, bias = _backend.cast_for_autocast(x, weight, bias)  # as F.conv2d casts its inputs
    kernel_size = _pair(kernel_size, "kernel_size", 1)
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    orbits = kernel_orbits(get(group), kernel_size)
    _check(x, weight, bias, orbits, stride, padding)
    backend = _dispatch.resolve(backend, x, _OP)
    if backend == "reference":
        return reference.tied_conv2d(x, weight, bias, orbits, stride, padding)
    positions, offsets = _tables(orbits, x.device)
    return _tied_conv2d_eager(x, weight, bias, positions, offsets, list(kernel_size), list(stride),
                              list(padding), backend)
