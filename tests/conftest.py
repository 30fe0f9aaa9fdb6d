import os

import math

import torch

# Triton kernels run on CPU tensors only through the interpreter, which must be chosen before
# triton is imported; on a CUDA machine the same tests run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from symfast import _backend  # noqa: E402


def available_backends() -> list[str]:
    backends = ["reference", "cpu"]
    if _backend.triton_status()[0]:
        backends.append("triton")
    return backends


@pytest.fixture(params=available_backends())
def backend(request):
    return request.param


def device_for(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖/‖ref‖ in float64; NaN anywhere makes it NaN (which fails any ≤ check).
    Values beyond 1e150 are first scaled down by a power of two (exactly), so that their norms,
    whose squares would overflow float64 (inf/inf made a NaN of two close tensors), stay finite;
    other values are not touched, so an error against a zero ``ref`` stays absolute / 1e-300."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.numel() and ref64.numel():
        big = float(torch.maximum(out64.abs().max(), ref64.abs().max()))
        if 1e150 < big < float("inf"):
            scale = 2.0 ** (math.frexp(big)[1])
            out64, ref64 = out64 / scale, ref64 / scale
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300))


TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}
