"""Evaluation: how close a model's samples are to a reference set, and how close a denoiser is to
the exact one where the exact one is known (the Gaussian mixture of symfast.data).

``frechet_distance`` compares two sets in a feature space: by default that of
:func:`digit_features`, a small digit classifier shipped with the package (trained by
experiments/train_digit_features.py; no download); ``features="pixels"`` uses the pixels
themselves, and any callable images -> (N, D) another space.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from symfast.data.images import GaussianMixture
from symfast.groups import get as get_group


DIGIT_FEATURES = Path(__file__).resolve().parent / "assets" / "digit_features.safetensors"


class DigitClassifier(nn.Module):
    """The digit classifier whose penultimate activations are symfast's default FD features:
    two 3×3 conv + ReLU + 2×2 max-pool stages (16, 32 channels) on 16×16 single-channel images in
    [-1, 1] (other sizes are resized bilinearly), a 64-unit ReLU layer (the features) and a
    10-way linear head."""

    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.hidden = nn.Linear(32 * 4 * 4, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) in [-1, 1] -> (N, 64)."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"the digit features take single-channel images (N, 1, H, W), got "
                             f"shape {tuple(x.shape)}; pass features='pixels' or a callable")
        if x.shape[-2:] != (16, 16):
            x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > 16)
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.hidden(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10)."""
        return self.head(self.features(x))


@functools.lru_cache(maxsize=1)
def _shipped_classifier() -> DigitClassifier:
    from safetensors.torch import load_file

    if not DIGIT_FEATURES.exists():
        raise FileNotFoundError(f"the shipped digit classifier {DIGIT_FEATURES} is missing (make it "
                                f"with python experiments/train_digit_features.py)")
    model = DigitClassifier()
    model.load_state_dict(load_file(str(DIGIT_FEATURES)))
    return model.eval().requires_grad_(False)


def digit_features(images: torch.Tensor) -> torch.Tensor:
    """The shipped digit classifier's 64 penultimate features of images (N, 1, H, W) in [-1, 1]
    (computed in fp32 on the CPU, in batches)."""
    model = _shipped_classifier()
    x = images.detach().float().cpu()
    with torch.no_grad():
        return torch.cat([model.features(x[i:i + 1024]) for i in range(0, len(x), 1024)])


def _features(images: torch.Tensor, features, name: str) -> np.ndarray:
    if not isinstance(images, torch.Tensor) or images.dim() < 2 or not images.is_floating_point():
        got = (f"shape {tuple(images.shape)} dtype {images.dtype}" if isinstance(images, torch.Tensor)
               else type(images).__name__)
        raise TypeError(f"{name} must be a floating tensor (N, ...), got {got}")
    if images.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 images, got {images.shape[0]}")
    if features is None:
        features = digit_features
    elif features == "pixels":
        features = lambda x: x.flatten(1)  # noqa: E731
    elif not callable(features):
        raise TypeError(f"features must be None (the digit features), 'pixels' or a callable, "
                        f"got {features!r}")
    with torch.no_grad():
        f = features(images)
    if not isinstance(f, torch.Tensor) or f.shape[:1] != images.shape[:1] or f.dim() != 2:
        got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ValueError(f"features must map {name} ({images.shape[0]} images) to a tensor "
                         f"({images.shape[0]}, D), got {got}")
    f = f.detach().double().cpu().numpy()
    if not np.isfinite(f).all():
        raise ValueError(f"{name} has non-finite values (or features)")
    return f


def frechet_distance(samples: torch.Tensor, reference: torch.Tensor,
                     features: Callable[[torch.Tensor], torch.Tensor] | str | None = None) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) between Gaussians fitted to the features
    of ``samples`` and ``reference`` (N, ...): :func:`digit_features` when ``features`` is None
    (single-channel images in [-1, 1]), the pixels for "pixels", else ``features(images)``.
    The value depends on the set sizes (its bias shrinks as 1/N): compare at fixed sizes."""
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
    distance = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)
    return max(distance, 0.0)  # a squared distance: rounding took FD(x, x) to -3e-5


def equivariant_fd(samples: torch.Tensor, reference: torch.Tensor, group,
                   features: Callable[[torch.Tensor], torch.Tensor] | str | None = None) -> dict:
    """The Fréchet distance of g·samples to ``reference`` for every element g of ``group``, and
    its spread (max − min), as the structure-preserving paper reports it: a model whose samples
    are distributed G-invariantly has spread ≈ 0 (up to the FD's sampling noise) against a
    G-invariant reference. Returns {"fd": [per element], "spread": float}."""
    group = get_group(group)
    group.check_input(samples, "samples")
    fds = [frechet_distance(group.act(samples, k), reference, features) for k in range(len(group))]
    return {"fd": fds, "spread": max(fds) - min(fds)}


def _draws_noise(run_with_generator: Callable[[torch.Generator], object], device: torch.device) -> bool:
    """Whether a sampler run draws noise: it is given a generator, and drawing advances its state
    (exact, unlike comparing two seeds' samples, which nondeterministic kernels can tell apart)."""
    generator = torch.Generator(device=device).manual_seed(0)
    before = generator.get_state()
    run_with_generator(generator)
    return not torch.equal(generator.get_state(), before)


def sampler_equivariance(denoiser, group, sampler: str, x_T_or_shape: torch.Tensor | Sequence[int],
                         steps: int = 18, seed: int = 0, **sample_options) -> float:
    """max over g of ‖S(g x_T) − g S(x_T)‖ / ‖S(x_T)‖ for the sampler S = symfast.sample(denoiser,
    ·, sampler, steps, seed) from the unit starting noise ``x_T`` (or noise of that shape drawn
    from ``seed``). A stochastic sampler's noise is transformed with the state (``transform_noise``
    = g's index in the denoiser's group, which ``group`` may be a subgroup of) when the denoiser has
    a group; with a deterministic sampler (the default) no noise is drawn, so any denoiser can be
    measured over any group. 0 (up to rounding) means the sampler is exactly equivariant."""
    from symfast.samplers import sample

    group = get_group(group)
    if isinstance(x_T_or_shape, torch.Tensor):
        x_T = x_T_or_shape
    else:
        x_T = torch.randn(tuple(x_T_or_shape), generator=torch.Generator().manual_seed(seed))
    group.check_input(x_T, "x_T")

    own = getattr(denoiser, "group", None)
    # transform_noise indexes the denoiser's group, not the measured one: c2's rotation by 180° is
    # d4's element 2, flip_h's flip d4's element 4
    in_own = group.indices_in(own, x_T.shape[1:]) if own is not None else [None] * len(group)

    def run(x, transform, generator=None):
        return sample(denoiser, x, sampler=sampler, steps=steps, seed=seed if generator is None else None,
                      generator=generator, progress=False, transform_noise=transform,
                      **sample_options).double()

    missing = [k for k, j in enumerate(in_own) if j is None]
    # a deterministic sampler draws no noise, so elements outside the denoiser's group are measured
    # too; a stochastic one cannot move its noise by them
    if own is not None and missing and _draws_noise(lambda g: run(x_T, None, generator=g), x_T.device):
        raise ValueError(f"group {group.name}'s element {missing[0]} is not an element of the denoiser's "
                         f"group {own.name}, so the {sampler!r} sampler's noise cannot be transformed "
                         f"with the state: measure a stochastic sampler over a subgroup of "
                         f"{own.name}, or use a deterministic sampler")

    base = run(x_T, in_own[0])  # the identity, drawn as the transformed runs draw
    norm = base.norm().clamp_min(torch.finfo(torch.float64).tiny)
    # a one-element group has nothing to compare: exactly equivariant
    return max((float((run(group.act(x_T, k), in_own[k]) - group.act(base, k)).norm() / norm)
                for k in range(1, len(group))), default=0.0)


def posterior_mse(denoiser, mixture: GaussianMixture, sigmas: Sequence[float], n: int = 1024,
                  seed: int = 0) -> list[float]:
    """Per σ: the mean squared error of ``denoiser(x + σε, σ)`` against the exact posterior mean
    E[x | x + σε] of the mixture, over ``n`` fresh samples x (seeded). ``denoiser``: a
    :class:`symfast.Denoiser` or any callable (y, σ) -> x̂0."""
    if not isinstance(mixture, GaussianMixture):
        raise TypeError(f"mixture must be a symfast.data.GaussianMixture, got {type(mixture).__name__}")
    x0 = mixture.sample(n, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    # where the network lives: a ``device`` the callable declares, else its parameters' (a
    # Denoiser's model, or the denoiser itself as a module); a plain function or a module without
    # parameters runs where the samples are
    network = getattr(denoiser, "model", denoiser)
    params = network.parameters() if isinstance(network, torch.nn.Module) else iter(())
    device = getattr(denoiser, "device", None)
    device = torch.device(device) if device is not None else next(iter(params), x0).device
    errors = []
    with torch.no_grad():
        for sigma in sigmas:
            y = x0 + float(sigma) * torch.randn(x0.shape, generator=gen)
            got = denoiser(y.to(device), float(sigma)).cpu()
            errors.append(float((got - mixture.posterior_mean(y, float(sigma))).pow(2).mean()))
    return errors
