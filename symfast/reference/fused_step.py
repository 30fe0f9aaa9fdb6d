"""Reference for symfast::fused_step: one sampler step's elementwise work, in plain PyTorch.

Given the state x (B, ...) and the raw network outputs on the orbit y (|G|·B, ...) (block k is the
output at g_k x, the layout ``orbit`` produces), with host coefficients:

    ȳ        = 1/|G| Σ_k g_k⁻¹ y_k                   (frame averaging of the raw output)
    denoised = c_skip · x + c_out · ȳ                 (x̂0; the score is (denoised − x)/σ²)
    x_next   = a · x + b · denoised + p · u + q · v + c · z

u, v are optional extra tensors (the previous x̂0 of DPM-Solver++(2M), the first Heun stage), and z
is the noise: a given tensor (the torch.Generator path), or Philox noise keyed by
(seed, step, stream, element) (see symfast/philox.py; float64 normals for float64 inputs),
optionally transformed by the group element ``noise_element`` (z ← g z) for equivariant stochastic
sampling. Arithmetic is in float32 (float64 for float64 inputs), in the order written above, and the
result is cast to x's dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from symfast import philox
from symfast.groups import Group
from symfast.reference.group_average import orbit_mean


class StepCoefficients(NamedTuple):
    """Host floats of one fused step (see the module docstring)."""

    c_skip: float = 1.0
    c_out: float = 0.0
    a: float = 0.0
    b: float = 0.0
    p: float = 0.0
    q: float = 0.0
    c: float = 0.0


def fused_step(x: torch.Tensor, y: torch.Tensor, group: Group, coefs: StepCoefficients,
               u: torch.Tensor | None = None, v: torch.Tensor | None = None,
               noise: torch.Tensor | None = None, key: torch.Tensor | None = None, step: int = 0,
               noise_element: int | None = None, noise_group: Group | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, ...), y: (|G|·B, ...), u/v/noise: (B, ...), key: (B, 2) int64 [seed, stream].
    ``noise_element`` indexes ``noise_group`` (default ``group``).
    Returns (x_next, denoised), both (B, ...) in x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    c_skip, c_out, a, b, p, q, c = coefs
    y_bar = orbit_mean(y.to(acc), group)
    xf = x.to(acc)
    denoised = c_skip * xf + c_out * y_bar
    x_next = a * xf + b * denoised
    if u is not None:
        x_next = x_next + p * u.to(acc)
    if v is not None:
        x_next = x_next + q * v.to(acc)
    if c != 0.0:
        if noise is None:
            z = philox.sample_noise(key, step, tuple(x.shape), acc)
            if noise_element is not None:
                z = (noise_group or group).act(z, noise_element)
        else:
            z = noise
        x_next = x_next + c * z.to(acc)
    return x_next.to(x.dtype), denoised.to(x.dtype)
