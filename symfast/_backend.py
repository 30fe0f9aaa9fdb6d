"""Backend names and availability, and the profiling decorator of every public op."""
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


# resolve() (the `backend=` switch itself) lives in symfast/ops/_dispatch.py with the rest of the
# op dispatch.


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


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, or ValueError naming it when it cannot run here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device name (cpu or cuda)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: symfast runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch finds no CUDA device here "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    return dev


@functools.cache
def _cpu_low_precision_gemm(dtype: torch.dtype) -> bool:
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.cpu._is_amx_fp16_supported()


def matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to run a matrix product of ``dtype`` operands in: fp32 for bf16/fp16 on a CPU
    without arithmetic in them (AVX2, AVX-512 without BF16), whose at::bmm then ran a scalar
    loop: (64, 192, 64) @ (64, 64, 256) took 424 ms in bf16, 14.5 ms widened to fp32 and rounded
    once (more accurate too); elsewhere ``dtype`` itself."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not _cpu_low_precision_gemm(dtype):
        return torch.float32
    return dtype


def cast_for_autocast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` in autocast's dtype when autocast is on for the first one's device, as
    nn.Conv2d / nn.Linear cast theirs (autocast does not cast a custom op's inputs); else as
    they are. None entries (an absent bias) stay None."""
    if not autocast_on(tensors[0]):
        return tensors
    dtype = torch.get_autocast_dtype(tensors[0].device.type)
    return tuple(t if t is None else t.to(dtype) for t in tensors)


def autocast_on(t: object) -> bool:
    """Whether ``t`` is a tensor on a device where torch.autocast is on now (is_autocast_enabled
    raises for devices without autocast, such as meta)."""
    return (isinstance(t, torch.Tensor) and torch.amp.is_autocast_available(t.device.type)
            and torch.is_autocast_enabled(t.device.type))
