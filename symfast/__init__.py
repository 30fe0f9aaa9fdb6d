"""symfast: kernel-accelerated structure-preserving diffusion and attention classifiers."""
from __future__ import annotations

__version__ = "0.1.0"

# Everything is imported on first use (PEP 562): `import symfast` costs nothing beyond itself, so
# the `symfast` command answers --help without importing torch, and `symfast.train` does not pay
# for sklearn or safetensors until it is used. `from symfast import Denoiser` works as before.
_ATTRIBUTES = {
    "Denoiser": "symfast.denoiser",
    "sample": "symfast.samplers",
    "denoise": "symfast.samplers",
    "symmetrize": "symfast._symmetrize",
    "equivariance_error": "symfast._symmetrize",
}
_MODULES = ("groups", "nn", "ops", "schedules", "models", "data", "integrations",
            "attention_dynamics", "metrics", "train", "demo", "samplers", "philox", "denoiser",
            "profiling")

__all__ = ["groups", "nn", "ops", "schedules", "symmetrize", "equivariance_error", "Denoiser", "sample",
           "denoise", "__version__"]


def __getattr__(name: str):
    import importlib

    if name in _ATTRIBUTES:
        return getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"symfast.{name}")
    raise AttributeError(f"module 'symfast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ATTRIBUTES) | set(_MODULES))
