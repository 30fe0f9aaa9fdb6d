"""Evaluation: how close a model's samples are to a reference set, and how close a denoiser is to
the exact one where the exact one is known (the Gaussian mixture of symfast.data).

``frechet_distance`` compares two sets in a feature space: by default the images' pixels
themselves (the shipped digit feature network of the evaluation issue is not there yet); pass
``features`` (a callable images -> (N, D)) for another.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from symfast.data.images import GaussianMixture


def _features(images: torch.Tensor, features: Callable | None, name: str) -> np.ndarray:
    if not isinstance(images, torch.Tensor) or images.dim() < 2 or not images.is_floating_point():
        got = (f"shape {tuple(images.shape)} dtype {images.dtype}" if isinstance(images, torch.Tensor)
               else type(images).__name__)
        raise TypeError(f"{name} must be a floating tensor (N, ...), got {got}")
    if images.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 images, got {images.shape[0]}")
    with torch.no_grad():
        f = features(images) if features is not None else images.flatten(1)
    f = f.detach().double().cpu().numpy()
    if not np.isfinite(f).all():
        raise ValueError(f"{name} has non-finite values (or features)")
    return f


def frechet_distance(samples: torch.Tensor, reference: torch.Tensor,
                     features: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) between Gaussians fitted to the features
    of ``samples`` and ``reference`` (N, ...) (pixels when ``features`` is None)."""
    a, b = _features(samples, features, "samples"), _features(reference, features, "reference")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"samples and reference have {a.shape[1]} and {b.shape[1]} features")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # tr((Σa Σb)^½) = Σ √eig(√Σa Σb √Σa), with √Σa from the symmetric eigendecomposition:
    # real and stable where scipy's sqrtm of the non-symmetric product is not.
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def posterior_mse(denoiser, mixture: GaussianMixture, sigmas: Sequence[float], n: int = 1024,
                  seed: int = 0) -> list[float]:
    """Per σ: the mean squared error of ``denoiser(x + σε, σ)`` against the exact posterior mean
    E[x | x + σε] of the mixture, over ``n`` fresh samples x (seeded)."""
    if not isinstance(mixture, GaussianMixture):
        raise TypeError(f"mixture must be a symfast.data.GaussianMixture, got {type(mixture).__name__}")
    x0 = mixture.sample(n, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    device = next(iter(denoiser.model.parameters())).device
    errors = []
    with torch.no_grad():
        for sigma in sigmas:
            y = x0 + float(sigma) * torch.randn(x0.shape, generator=gen)
            got = denoiser(y.to(device), float(sigma)).cpu()
            errors.append(float((got - mixture.posterior_mean(y, float(sigma))).pow(2).mean()))
    return errors
