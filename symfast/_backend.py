"""Backend names, availability and the `backend=` switch shared by every op."""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("reference", "cpu", "triton")


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """(available, reason if not). Triton runs CUDA tensors compiled, and CPU tensors only
    under TRITON_INTERPRET=1, which must be set before triton is first imported."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton not importable ({type(exc).__name__}: {exc})"
    return True, ""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _cpu_kernels_available(op: str) -> bool:
    # Constant for a process: lets torch.compile fold the backend choice instead of tracing the
    # extension loader.
    from symfast._ext import load_cpu_kernels

    return load_cpu_kernels(op)


# What torch.compiler.assume_constant_result does (it sets this attribute), without the import of
# torch._dynamo that it makes: that import alone took 4.7 of `import symfast`'s 9 s here.
# tests/test_group_average.py compiles ops with fullgraph=True, which fails if this is not honoured.
_cpu_kernels_available._dynamo_marked_constant = True


def resolve(backend: str | None, tensor: torch.Tensor, op: str) -> str:
    """Validate ``backend`` and turn None/"auto" into the fastest backend for ``tensor``."""
    from symfast._ext import load_errors

    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    if backend in (None, "auto"):
        if tensor.device.type == "cpu":
            return "cpu" if _cpu_kernels_available(op) else "reference"
        if tensor.device.type == "cuda" and triton_status()[0]:
            return "triton"
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, None or 'auto'; got {backend!r}")
    if backend == "cpu":
        if tensor.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors; got a tensor on {tensor.device}")
        if not _cpu_kernels_available(op):
            raise RuntimeError(f"symfast CPU kernel {op!r} is unavailable: {load_errors.get(op)}")
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"backend='triton' is unavailable: {why}")
        if tensor.device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' needs CUDA tensors (or CPU ones under "
                             f"TRITON_INTERPRET=1); got a tensor on {tensor.device}")
        if tensor.device.type == "cpu" and not triton_interpret():
            raise ValueError(
                "backend='triton' got CPU tensors; run on a CUDA device, or set "
                "TRITON_INTERPRET=1 before importing triton to use the interpreter"
            )
    return backend


# Where profiled calls report their arguments while a profiler runs (symfast.profiling sets it),
# so a profile can turn each op's time into bytes/s and flops/s.
op_call_sink = None


def profiled(op: str):
    """Decorator of every public op: under a running torch.profiler the call is recorded as
    ``symfast.<op>`` (a record_function range) and reported to ``op_call_sink``. Without a
    profiler it costs one flag check. Under torch.compile it steps aside (dynamo drops
    record_function ranges); compiled code shows the custom ops as ``symfast::<name>`` events."""
    label = f"symfast.{op}"

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():
                return fn(*args, **kwargs)
            if op_call_sink is not None:
                op_call_sink(op, args, kwargs)
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)
        return call
    return wrap
