"""Public fused sampler step: checks, the backend switch and the ``symfast::fused_step`` torch op.

One op does a step's elementwise work: inverse-transform and average the orbit outputs
(frame averaging), convert to x̂0, the sampler's linear update and the noise. See
symfast/reference/fused_step.py for the exact formula. The torch op works on flattened views
(x: (M, N), y: (|G|, M, N), N = size of the dims the group acts on, M = B·R) and takes the
group's inverse gather table as a tensor, so ``torch.compile(fullgraph=True)`` sees one opaque
op with a fake implementation. Coefficients are host floats: a step never reads the device.
Under torch.compile the group's gather tables must already exist (one eager call, or
``group.tables(event_shape, device)``): building them is host work dynamo cannot trace.
"""
from __future__ import annotations

import math

import torch

from symfast import _backend
from symfast.groups import Group, get
from symfast.ops import _checks, _dispatch
from symfast.reference import fused_step as reference
from symfast.reference.fused_step import StepCoefficients

_OP = "fused_step"
_IDENTITY_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}

__all__ = ["fused_step", "StepCoefficients"]


@_dispatch.forwarding(_OP, cpu="fused_step_cpu", triton="fused_step")
def _fused_step_impl(x: torch.Tensor, y: torch.Tensor, inverse_table: torch.Tensor,
                     u: torch.Tensor | None, v: torch.Tensor | None, noise: torch.Tensor | None,
                     key: torch.Tensor | None, noise_table: torch.Tensor | None,
                     rows_per_sample: int, step: int, coefs: list[float], write_denoised: bool,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_next, denoised); denoised is empty unless write_denoised."""


def _fused_step_fake(x, y, inverse_table, u, v, noise, key, noise_table, rows_per_sample, step,
                     coefs, write_denoised, backend):
    return torch.empty_like(x), (torch.empty_like(x) if write_denoised else x.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x, y, inverse_table, u, v, noise, key, noise_table, rows, step, coefs, write_denoised, _ = inputs
    ctx.save_for_backward(inverse_table)
    ctx.coefs = coefs
    ctx.dtypes = (x.dtype, y.dtype, *(t.dtype if t is not None else None for t in (u, v, noise)))
    ctx.set_materialize_grads(False)


def _make_backward(_unused):
    """The step is linear in x, y, u, v and a given noise tensor: its backward is a few scaled
    copies and, for y, the transpose of the orbit average (each g_k⁻¹ is a permutation of the N
    positions, so block k's gradient is ȳ's gradient scattered back through it, over |G|).
    Plain torch ops, so one function serves eager calls and torch.compile."""
    def backward(ctx, grad_next, grad_den):
        (inverse_table,) = ctx.saved_tensors
        c_skip, c_out, a, b, p, q, c = ctx.coefs
        dx, dy, du, dv, dnoise = ctx.dtypes
        like = grad_next if grad_next is not None else grad_den
        if like is None or like.numel() == 0:
            return (None,) * 13
        acc = torch.float64 if dx == torch.float64 else torch.float32
        g_next = grad_next.to(acc) if grad_next is not None else torch.zeros_like(like, dtype=acc)
        g_den = b * g_next + (grad_den.to(acc) if grad_den is not None and grad_den.numel() else 0.0)
        need = ctx.needs_input_grad
        grad_x = (a * g_next + c_skip * g_den).to(dx) if need[0] else None
        grad_y = None
        if need[1]:
            order = inverse_table.shape[0]
            g_bar = (c_out / order) * g_den
            # a negative entry ~src gathers -x[src] (sign flips): scatter to src, negated
            table = inverse_table.long()
            flipped = table < 0
            index = torch.where(flipped, ~table, table).unsqueeze(1).expand(order, *g_bar.shape)
            sign = torch.where(flipped, -1.0, 1.0).to(g_bar.dtype).unsqueeze(1)
            grad_y = g_bar.new_empty(index.shape).scatter_(
                2, index, sign * g_bar.unsqueeze(0)).to(dy)
        extra = [(w * g_next).to(dt) if need[i] else None
                 for i, w, dt in ((3, p, du), (4, q, dv), (5, c, dnoise))]
        return (grad_x, grad_y, None, *extra, None, None, None, None, None, None, None)
    return backward


_fused_step_op, _fused_step_call = _dispatch.kernel_op(
    "symfast::fused_step", _fused_step_impl, _fused_step_fake, _setup_context, _make_backward,
    None, None, differentiable_backward=True)


def _identity_table(n: int, device: torch.device) -> torch.Tensor:
    hit = _IDENTITY_TABLES.get((n, device))
    if hit is None:
        hit = torch.arange(n, dtype=torch.int32, device=device).reshape(1, n)
        _IDENTITY_TABLES[(n, device)] = hit
    return hit


def _check_coefs(coefs) -> StepCoefficients:
    """``coefs`` as StepCoefficients of 7 finite-or-not host floats; a clear error otherwise."""
    n = len(StepCoefficients._fields)
    if isinstance(coefs, StepCoefficients):
        values = tuple(coefs)
    elif isinstance(coefs, (tuple, list)):
        if len(coefs) != n:
            raise ValueError(f"coefs must have {n} values {StepCoefficients._fields}, got "
                             f"{len(coefs)}")
        values = tuple(coefs)
    else:
        raise TypeError(f"coefs must be a StepCoefficients or a tuple/list of {n} floats, got "
                        f"{type(coefs).__name__}")
    for name, value in zip(StepCoefficients._fields, values):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
            continue  # a 0-d tensor reads as a float (a host sync, the caller's choice)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"coefs.{name} must be a real number, got {value!r}")
    return StepCoefficients(*(float(v) for v in values))


@_backend.profiled("fused_step")
def fused_step(x: torch.Tensor, y: torch.Tensor, coefs: StepCoefficients | tuple[float, ...],
               group: Group | str | None = None, *, u: torch.Tensor | None = None,
               v: torch.Tensor | None = None, noise: torch.Tensor | None = None,
               key: torch.Tensor | None = None, step: int = 0, noise_element: int | None = None,
               noise_group: Group | str | None = None, return_denoised: bool = True,
               backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One fused sampler step.

    Args:
        x: (B, ...) the state (σ form, x = x0 + σ ε).
        y: (|G|·B, ...) raw network outputs on the orbit, element-major (block k at g_k x), same
            dtype as x; (B, ...) when ``group`` is None.
        coefs: :class:`StepCoefficients` (c_skip, c_out, a, b, p, q, c), host floats.
        group: the symmetry group for frame averaging, or None.
        u, v: optional (B, ...) extra terms (weights p, q).
        noise: (B, ...) noise to use (e.g. drawn from a torch.Generator); else, when c != 0,
            Philox noise keyed by ``key`` (B, 2) int64 [seed, stream] (symfast.philox.noise_key)
            and ``step``.
        noise_element: transform the Philox noise by this element of ``noise_group`` (z ← g z).
        noise_group: the group ``noise_element`` indexes; default ``group``. Give it without
            ``group`` for a network that is equivariant by construction: one output per sample,
            no averaging, and the noise still transformed with the state.
        return_denoised: also return x̂0 (else None).
        backend: "reference", "cpu", "triton", or None/"auto".

    Returns:
        (x_next, denoised): (B, ...) each, x's dtype. Differentiable in x, y, u, v and a given
        noise tensor (the step is linear in each), on every backend.
    """
    _checks.tensor("x", x)
    _checks.tensor("y", y)
    _checks.floating("x", x)
    _checks.like("y (the model output)", y, "x", x)
    coefs = _check_coefs(coefs)
    group = get(group) if group is not None else get("trivial")
    noise_group = get(noise_group) if noise_group is not None else group
    order = len(group)
    group.check_input(x)
    noise_group.check_input(x)
    if x.dim() <= group.event_ndim:
        raise ValueError(f"x has shape {tuple(x.shape)}: needs a batch dim before the "
                         f"{group.event_ndim} dims group {group.name} acts on")
    batch = x.shape[0]
    expected = (order * batch,) + tuple(x.shape[1:])
    if tuple(y.shape) != expected:
        raise ValueError(f"the model output y has shape {tuple(y.shape)}, expected {expected} "
                         f"(|G| = {order} times the sample's shape {tuple(x.shape)})")
    for name, t in (("u", u), ("v", v), ("noise", noise)):
        _checks.tensor(name, t, optional=True)
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but the sample x has shape "
                             f"{tuple(x.shape)}")
        _checks.like(name, t, "x", x, dtype=False)
        _checks.floating(name, t, optional=True)
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 2**32:
        raise ValueError(f"step must be an int in [0, 2^32), got {step!r}")
    if coefs.c != 0.0 and noise is None:
        if key is None:
            raise ValueError("coefs.c != 0 needs noise= or key= (symfast.philox.noise_key)")
        if (not isinstance(key, torch.Tensor) or key.dtype != torch.int64
                or tuple(key.shape) != (batch, 2) or key.device != x.device):
            got = (f"{key.dtype} {tuple(key.shape)} on {key.device}" if isinstance(key, torch.Tensor)
                   else type(key).__name__)
            raise ValueError(f"key must be an int64 tensor of shape ({batch}, 2) on {x.device}, "
                             f"got {got}")
        key = key.contiguous()  # the kernels read (seed, stream) pairs as rows of 2
    if noise_element is not None and not (isinstance(noise_element, int)
                                          and not isinstance(noise_element, bool)
                                          and 0 <= noise_element < len(noise_group)):
        raise ValueError(f"noise_element must be an int in [0, {len(noise_group)}) for group "
                         f"{noise_group.name}, got {noise_element!r}")
    if order > 1 and not noise_group.same_elements(group):
        raise ValueError(f"noise_group is for a network equivariant by construction; with "
                         f"group={group.name} (frame averaging) the noise is transformed by it")
    backend = _dispatch.resolve(backend, x, _OP)
    if backend == "reference" or x.numel() == 0:
        # an empty x leaves the kernels no rows to split; the reference's torch ops keep the
        # empty outputs in autograd (empty_like cut them off: backward() failed)
        x_next, den = reference.fused_step(x, y, group, coefs, u, v, noise, key, step, noise_element,
                                           noise_group)
        return x_next, (den if return_denoised else None)

    transformed = noise_element is not None and coefs.c != 0.0 and noise is None
    if order == 1 and not transformed:
        n = math.prod(x.shape[1:])
        inverse_table = _identity_table(n, x.device)
        noise_table = None
    else:
        # the tables of both groups are over the dims the noise group acts on
        event_shape = tuple(x.shape[x.dim() - noise_group.event_ndim:])
        n = math.prod(event_shape)
        table = noise_group.tables(event_shape, x.device)[0]
        inverse_table = (_identity_table(n, x.device) if order == 1
                         else group.tables(event_shape, x.device)[1])
        noise_table = table[noise_element] if transformed else None
    rows = math.prod(x.shape[1:]) // n if n else 1
    m = batch * rows
    flat = [t.reshape(m, n) if t is not None else None for t in (u, v, noise)]
    x_next, den = _fused_step_call(x.reshape(m, n), y.reshape(order, m, n), inverse_table, *flat,
                                 key, noise_table, rows, step, list(coefs), return_denoised, backend)
    x_next = x_next.reshape(x.shape)
    return x_next, (den.reshape(x.shape) if return_denoised else None)
