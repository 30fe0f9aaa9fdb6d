"""How every symfast op turns ``backend=`` into a running kernel: one resolution, one way to reach a
kernel, one eager fast path, one compile-safety mechanism.

A public op checks its arguments (symfast/ops/_checks.py), calls :func:`resolve`, runs its
reference for "reference" and otherwise its ``torch.library`` custom op through :func:`kernel_op`
(eager: an autograd.Function around the implementation; compiled: the custom op with its fake).
Inside a custom op's implementation :func:`kernel` (or :func:`kernels`) reaches the cpu or triton
kernel.

Compile safety: what a process can run (is the CPU extension built and loadable, is triton
importable, is the interpreter on) does not change while it lives, so :func:`_decide` is marked
as a constant result. Dynamo then calls it once at trace time instead of tracing the extension
loader, and the backend choice folds into the graph under ``fullgraph=True``. Everything else in
:func:`resolve` is plain Python dynamo traces.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as _forward_ad

from symfast import _backend
from symfast.ops import _checks

_ERRORS = {"ValueError": ValueError, "RuntimeError": RuntimeError}
_DECIDED: dict[tuple[str, str, str], tuple[str, str, str]] = {}


def _cpu_loaded(op: str) -> bool:
    from symfast._ext import load_cpu_kernels

    return load_cpu_kernels(op)


def _decide(op: str, backend: str, device: str) -> tuple[str, str, str]:
    """(backend to run, error class name, message) for a valid ``backend`` name ("auto" for
    None) and a tensor on ``device``; the error is "" when the backend can run."""
    key = (op, backend, device)
    hit = _DECIDED.get(key)
    if hit is None:
        hit = _DECIDED[key] = _decide_uncached(op, backend, device)
    return hit


# What torch.compiler.assume_constant_result does (it sets this attribute), without the import of
# torch._dynamo that it makes: that import alone took 4.7 of `import symfast`'s 9 s here.
# Every fullgraph=True compile of an op (tests/test_dispatch.py) relies on it.
_decide._dynamo_marked_constant = True


def _decide_uncached(op: str, backend: str, device: str) -> tuple[str, str, str]:
    from symfast._ext import load_errors

    kind = torch.device(device).type
    if backend == "auto":
        if kind == "cpu":
            return ("cpu" if _cpu_loaded(op) else "reference"), "", ""
        if kind == "cuda" and _backend.triton_status()[0]:
            return "triton", "", ""
        return "reference", "", ""
    if backend == "cpu":
        if kind != "cpu":
            return "", "ValueError", f"backend='cpu' needs CPU tensors; got a tensor on {device}"
        if not _cpu_loaded(op):
            return "", "RuntimeError", (f"symfast CPU kernel {op!r} is unavailable: "
                                        f"{load_errors.get(op)}")
    if backend == "triton":
        ok, why = _backend.triton_status()
        if not ok:
            return "", "RuntimeError", f"backend='triton' is unavailable: {why}"
        if kind not in ("cpu", "cuda"):
            return "", "ValueError", (f"backend='triton' needs CUDA tensors (or CPU ones under "
                                      f"TRITON_INTERPRET=1); got a tensor on {device}")
        if kind == "cpu" and not _backend.triton_interpret():
            return "", "ValueError", (
                "backend='triton' got CPU tensors; run on a CUDA device, or set "
                "TRITON_INTERPRET=1 before importing triton to use the interpreter")
    return backend, "", ""


def resolve(backend: str | None, tensor: torch.Tensor, op: str) -> str:
    """Validate ``backend`` and turn None/"auto" into the fastest backend for ``tensor``'s device;
    for "cpu" the extension of ``op`` is loaded here (or the call refused with why)."""
    _checks.backend_name(backend)
    resolved, error, message = _decide(op, backend or "auto", str(tensor.device))
    if error:
        raise _ERRORS[error](message)
    return resolved


def kernels(op: str, backend: str):
    """Where ``op``'s kernels for ``backend`` live: ``torch.ops.symfast`` for "cpu" (the op's
    extension loaded first: a custom op may be called directly, without :func:`resolve`) or the
    module ``symfast.kernels.<op>`` of Triton launchers for "triton" (imported on first use:
    importing triton is slow)."""
    if backend == "cpu":
        _, error, message = _decide(op, "cpu", "cpu")  # loads the extension, or says why not
        if error:
            raise _ERRORS[error](message)
        return torch.ops.symfast
    if backend == "triton":
        return importlib.import_module(f"symfast.kernels.{op}")
    raise ValueError(f"backend must be 'cpu' or 'triton' for symfast::{op}'s kernels, "
                     f"got {backend!r}")


_CPU_KERNELS: dict[str, Any] = {}


def cpu_kernel(op: str, name: str) -> Callable[..., Any]:
    """``torch.ops.symfast.<name>.default``, the one overload of a cpu kernel of ``op``, found
    once per process: calling the overload packet instead resolves the overload from the
    arguments on every call (8 us of a 45 us (1, 32, 16, 16) tied convolution here)."""
    run = _CPU_KERNELS.get(name)
    if run is None:
        run = _CPU_KERNELS[name] = getattr(kernels(op, "cpu"), name).default
    return run


def kernel(op: str, backend: str, *, cpu: str, triton: str) -> Callable[..., Any]:
    """The kernel of ``op`` for ``backend``: :func:`cpu_kernel` ``cpu`` or
    ``symfast.kernels.<op>.<triton>``."""
    if backend == "cpu":
        return cpu_kernel(op, cpu)
    return getattr(kernels(op, backend), triton)


def forwarding(op: str, *, cpu: str, triton: str):
    """Decorator for the implementation of a custom op whose kernels take exactly its arguments
    but the last, ``backend``, in order: the decorated function's signature is the op's schema,
    and its body is replaced by the call of :func:`kernel`."""
    def wrap(signature: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(signature)
        def impl(*args):
            out = kernel(op, args[-1], cpu=cpu, triton=triton)(*args[:-1])
            return tuple(out) if isinstance(out, list) else out  # a tuple schema wants a tuple
        # torch.library evaluates string annotations in the globals of the function it is given:
        # resolve them here, in the op module's
        impl.__signature__ = inspect.signature(signature, eval_str=True)
        del impl.__wrapped__  # nothing may unwrap to the bodiless signature and call it
        return impl
    return wrap


def custom_op(name: str, impl: Callable[..., Any], fake: Callable[..., Any]):
    """``torch.library`` op ``name`` ("symfast::<op>") made from ``impl`` (its schema from impl's
    annotations), with ``fake`` as its fake implementation for torch.compile."""
    op = torch.library.custom_op(name, mutates_args=())(impl)
    op.register_fake(fake)
    return op


def _through_custom_op() -> bool:
    """Whether a call must go through the torch.library custom op rather than the eager fast
    path: torch.compile tracing, a TorchDispatchMode (FakeTensorMode, so torch.export and shape
    inference; FlopCounterMode), a torch.func transform (grad, vmap, jvp) or forward-mode AD.
    Those see the op and its registered fake, autograd and vmap rules, or refuse it naming it;
    the fast path would hand them the raw kernel (no fake rule) or an autograd.Function with no
    forward derivative, whose tangents came out zero. Three C-level flag reads per call."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._functorch.peek_interpreter_stack() is not None
            or _forward_ad._current_level >= 0)


def _transform_route(name: str, inputs: tuple) -> bool:
    """Under a torch.func transform or forward-mode AD: refuse what no op has a rule for, and say
    whether the op must run its eager autograd.Function (a torch.func grad transform: grad, vjp,
    jacrev; torch's custom-op autograd has no setup_context, which functorch requires) rather
    than the custom op (vmap alone: torch loops over the batch).
    Refused, naming the op: forward mode (torch.func.jvp / jacfwd / hessian, forward_ad), which
    torch would run with a zero tangent, silently; vmap together with grad (per-sample
    gradients), which has neither rule."""
    if torch.compiler.is_dynamo_compiling():
        return False
    keys = {i.key() for i in torch._C._functorch.get_interpreter_stack() or ()}
    kinds = torch._C._functorch.TransformType
    dual = _forward_ad._current_level >= 0 and any(
        isinstance(t, torch.Tensor) and _forward_ad.unpack_dual(t).tangent is not None for t in inputs)
    if kinds.Jvp in keys or dual:
        raise NotImplementedError(
            f"{name} has no forward-mode derivative (torch.func.jvp, jacfwd, hessian, "
            f"torch.autograd.forward_ad); use backend='reference' for those, or reverse mode "
            f"(torch.func.grad, jacrev, vjp)")
    if kinds.Grad in keys and kinds.Vmap in keys:
        raise NotImplementedError(
            f"{name} under torch.func.vmap together with grad (e.g. per-sample gradients) is not "
            f"supported; use backend='reference', or loop over the samples")
    return kinds.Grad in keys


class _NotTwice(torch.autograd.Function):
    """Identity on the gradients an op's backward computed, whose own backward fails naming the
    op. Its inputs also take the op's inputs that require grad, so differentiating a gradient
    with respect to any of them (autograd.grad(gx, w), gradgradcheck) reaches the error."""

    generate_vmap_rule = True  # torch.func.jacrev vmaps the backward over the cotangents

    @staticmethod
    def forward(message, count, *tensors):
        return tuple(t.detach() if t is not None else None for t in tensors[:count])

    @staticmethod
    def setup_context(ctx, inputs, output):  # new style: functorch's grad calls it
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def _once_differentiable(backward: Callable[..., Any], name: str) -> Callable[..., Any]:
    """torch's once_differentiable, but a double backward through it always fails, naming the
    op. torch's re-roots the gradients at fresh leaves, and only when an incoming gradient
    requires grad: a gradient penalty's second derivative with respect to the op's inputs came
    back None (allow_unused), 0 (materialize_grads) or "not used in the graph", not the error."""
    message = (f"{name}'s backward is not differentiable (no double backward); use "
               f"backend='reference' for higher-order gradients")

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():  # create_graph=False: nothing will differentiate these
            return outputs
        outs = outputs if isinstance(outputs, tuple) else (outputs,)
        links = [t for t in (*ctx.graph_inputs, *grads) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not links:
            return outputs
        guarded = _NotTwice.apply(message, len(outs), *outs, *links)
        return guarded if isinstance(outputs, tuple) else guarded[0]
    return wrapper


def autograd_function(name: str, forward: Callable[..., Any], setup_context: Callable[..., None],
                      backward: Callable[..., Any], *,
                      generate_vmap_rule: bool = False) -> Callable[..., Any]:
    """``apply`` of an autograd.Function made of ``forward(*inputs)``, ``setup_context(ctx,
    inputs, output)`` and ``backward(ctx, *grads)``, in two styles: old-style (ctx in forward)
    for eager calls, since a new-style Function's apply binds its arguments to forward's
    signature with inspect on every call (measured 61 against 21 us per apply of one Function),
    and new-style under torch.func transforms, which take no other (they call setup_context).
    ``generate_vmap_rule``: forward and backward are plain torch code torch.func.vmap can run."""

    def eager_forward(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    eager = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(eager_forward), "backward": staticmethod(backward)})
    transformed = type(name + "Transformed", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "generate_vmap_rule": generate_vmap_rule})

    def apply(*inputs):
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return transformed.apply(*inputs)
        return eager.apply(*inputs)
    return apply


def kernel_op(name: str, impl: Callable[..., Any], fake: Callable[..., Any],
              setup_context: Callable[..., None] | None = None,
              make_backward: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
              backward_op: Callable[..., Any] | None = None,
              backward_impl: Callable[..., Any] | None = None, *,
              differentiable_backward: bool = False):
    """The custom op ``name`` (see :func:`custom_op`), its autograd registered when
    ``make_backward`` is given, and the function public ops call it through: (op, call).

    ``make_backward(fn)`` builds the backward from the function that computes the gradients:
    the custom op ``backward_op`` for torch.compile, the plain ``backward_impl`` for eager calls.

    Eager calls skip the custom op's Python dispatch: a ``torch.library.custom_op`` call goes
    through schema defaults, the dispatcher, a redispatch and the op's own autograd wrapper, all
    in Python: measured ~90 us per call for symfast::tied_conv2d and ~270 us per
    forward+backward for symfast::classifier_select, against a few us for an autograd.Function.
    ``call`` runs ``impl`` directly when no input needs a gradient, ``impl``, ``setup_context``
    and the eager backward in an autograd.Function when one does, and the custom op whenever
    torch.compile is tracing (it must see the op, with its fake implementation).
    ``differentiable_backward``: the eager backward is itself differentiable (double backward).
    """
    custom = custom_op(name, impl, fake)
    if make_backward is None:
        def call_plain(*inputs):
            if _through_custom_op():
                _transform_route(name, inputs)  # no autograd here: the custom op either way
                return custom(*inputs)
            return impl(*inputs)
        return custom, call_plain

    custom.register_autograd(make_backward(backward_op), setup_context=setup_context)
    eager_backward = make_backward(backward_impl)
    label = f"symfast.{custom._name}.backward"

    def backward(ctx, *grads):
        if torch.autograd._profiler_enabled():  # a profile names the op's eager backward
            with torch.profiler.record_function(label):
                return eager_backward(ctx, *grads)
        return eager_backward(ctx, *grads)

    chosen_backward = backward if differentiable_backward else _once_differentiable(backward, name)

    def full_setup_context(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        if not differentiable_backward:
            # the inputs a double backward must reach (see _once_differentiable); these ops
            # save their large inputs anyway, the rest are parameters or small
            ctx.graph_inputs = tuple(t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad)

    apply = autograd_function("_Eager", impl, full_setup_context, chosen_backward)

    def call(*inputs):
        if _through_custom_op():
            if not _transform_route(name, inputs):
                return custom(*inputs)
            return apply(*inputs)  # the new-style Function: a torch.func grad transform
        if not torch.is_grad_enabled() or not any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            return impl(*inputs)
        return apply(*inputs)

    return custom, call
