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


def _once_differentiable(backward: Callable[..., Any], name: str) -> Callable[..., Any]:
    """torch's once_differentiable, but a double backward through it always fails, naming the
    op. torch's marks the gradients as non-differentiable only when an incoming gradient requires
    grad: with a constant one (grad(f(x)·v, x, create_graph=True)) the input gradient silently
    lost its dependence on the weight, and a gradient penalty its weight term."""
    from torch._C import _functions

    message = (f"{name}'s backward is not differentiable (no double backward); use "
               f"backend='reference' for higher-order gradients").encode()

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():  # create_graph=False: nothing will differentiate these
            return outputs
        outs = outputs if isinstance(outputs, tuple) else (outputs,)
        fail = _functions.DelayedError(message, len(outs))

        def tracked(t):
            if t is None:
                return t
            t = t.detach()
            t.requires_grad = True
            return t
        return fail(*[tracked(t) for t in outs])
    return wrapper


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
            return custom(*inputs) if torch.compiler.is_compiling() else impl(*inputs)
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

    class _Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup_context(ctx, inputs, output)
            return output

        backward = staticmethod(chosen_backward)

    def call(*inputs):
        if torch.compiler.is_compiling():
            return custom(*inputs)
        if not torch.is_grad_enabled() or not any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            return impl(*inputs)
        return _Eager.apply(*inputs)

    return custom, call
