"""symfast: kernel-accelerated structure-preserving diffusion and attention classifiers."""
from __future__ import annotations

__version__ = "0.1.0"

from symfast import groups, nn, ops, schedules  # noqa: E402
from symfast.denoiser import Denoiser  # noqa: E402
from symfast.samplers import denoise, sample  # noqa: E402
from symfast.symmetrize import equivariance_error, symmetrize  # noqa: E402

__all__ = ["groups", "nn", "ops", "schedules", "symmetrize", "equivariance_error", "Denoiser", "sample",
           "denoise", "__version__"]

# The documented namespaces that import more (sklearn, safetensors, PIL, ...), reachable as
# attributes of the package without paying for them in `import symfast`.
_LAZY = ("models", "data", "integrations", "attention_dynamics", "metrics", "train", "demo",
         "samplers", "philox", "denoiser")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return importlib.import_module(f"symfast.{name}")
    raise AttributeError(f"module 'symfast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
