"""symfast: kernel-accelerated structure-preserving diffusion and attention classifiers."""
from __future__ import annotations

__version__ = "0.1.0"

from symfast import groups, nn, ops, schedules  # noqa: E402
from symfast.denoiser import Denoiser  # noqa: E402
from symfast.samplers import denoise, sample  # noqa: E402
from symfast.symmetrize import equivariance_error, symmetrize  # noqa: E402

__all__ = ["groups", "nn", "ops", "schedules", "symmetrize", "equivariance_error", "Denoiser", "sample",
           "denoise", "__version__"]
