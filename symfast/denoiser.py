"""One denoiser interface D(x, σ) -> x̂0 over the parametrisations people train with.

The state is in σ form, x = x0 + σ ε (see symfast/schedules.py). The network F is called as
``model(c_in · x, t)`` with t = ``schedule.model_time(σ)`` broadcast to the batch, and

    D(x, σ) = c_skip(σ) · x + c_out(σ) · F

| prediction | c_skip | c_out | c_in |
|---|---|---|---|
| "eps" | 1 | −σ | 1/√(σ²+1) (DDPM), 1 (VE) |
| "x0" | 0 | 1 | as eps |
| "v" (VP) | 1/(σ²+1) | −σ/√(σ²+1) | 1/√(σ²+1) |
| "edm" | σd²/(σ²+σd²) | σ·σd/√(σ²+σd²) | 1/√(σ²+σd²) |

With ``group=``, D is frame-averaged: D̄(x) = 1/|G| Σ_k g_k⁻¹ D(g_k x) — the same as wrapping the
model with :func:`symfast.symmetrize`, done here by running the model on the orbit and letting
the fused step op average the raw outputs, since c_skip and c_out are scalars.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from symfast.groups import Group, get
from symfast.ops.fused_step import StepCoefficients, fused_step
from symfast.ops.group_average import orbit
from symfast.reference.group_average import orbit as reference_orbit
from symfast.schedules import DDPMSchedule, EDMSchedule, Schedule, VESchedule
from symfast.symmetrize import _default_chunks, _main_tensor

PREDICTIONS = ("eps", "x0", "v", "edm")


class Denoiser(nn.Module):
    """D(x, σ) -> x̂0 for a network trained with ``prediction`` on ``schedule``.

    Args:
        model: ``model(x_in, t)`` with x_in: (B, ...) and t: (B,) float32; returns a tensor shaped
            like x_in (or a diffusers output with ``.sample``).
        prediction: "eps", "x0", "v" (VP v-prediction) or "edm" (EDM preconditioning).
        schedule: a :class:`~symfast.schedules.Schedule`; default EDMSchedule() for "edm",
            DDPMSchedule() otherwise.
        group: a symmetry group (or its name) to frame-average over, or None.
        sigma_data: σ_data for "edm" (default: the schedule's, else 0.5).
        chunks: model calls per orbit (None: chosen per device, as in symmetrize).
        backend: backend of the orbit and fused-step ops.
    """

    def __init__(self, model: nn.Module | Callable, prediction: str = "eps",
                 schedule: Schedule | None = None, group: Group | str | None = None,
                 sigma_data: float | None = None, chunks: int | None = None,
                 backend: str | None = None):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if schedule is None:
            schedule = EDMSchedule() if prediction == "edm" else DDPMSchedule()
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a symfast.schedules.Schedule, got {type(schedule).__name__}")
        if prediction == "v" and not isinstance(schedule, DDPMSchedule):
            raise ValueError("prediction='v' is defined for variance-preserving (DDPMSchedule) schedules")
        if chunks is not None and (not isinstance(chunks, int) or chunks < 1):
            raise ValueError(f"chunks must be a positive int or None, got {chunks!r}")
        self.model = model
        self.prediction = prediction
        self.schedule = schedule
        self.group = get(group) if group is not None else None
        self.sigma_data = float(sigma_data if sigma_data is not None
                                else getattr(schedule, "sigma_data", 0.5))
        self.chunks = chunks
        self.backend = backend

    def coefficients(self, sigma: float) -> tuple[float, float, float, float]:
        """(c_skip, c_out, c_in, model time) at noise level σ, host floats."""
        s = float(sigma)
        t = self.schedule.model_time(s)
        if self.prediction == "edm":
            sd = self.sigma_data
            denom = s * s + sd * sd
            return sd * sd / denom, s * sd / math.sqrt(denom), 1 / math.sqrt(denom), t
        c_in = 1 / math.sqrt(s * s + 1) if isinstance(self.schedule, DDPMSchedule) else 1.0
        if self.prediction == "eps":
            return 1.0, -s, c_in, t
        if self.prediction == "x0":
            return 0.0, 1.0, c_in, t
        return 1 / (s * s + 1), -s / math.sqrt(s * s + 1), c_in, t

    def orbit_outputs(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Raw network outputs at the (scaled) orbit of x: (|G|·B, ...), element-major."""
        _, _, c_in, t = self.coefficients(sigma)
        x_in = x * c_in
        if self.group is not None:
            x_in = (reference_orbit(x_in, self.group) if torch.compiler.is_compiling()
                    else orbit(x_in, self.group, backend=self.backend))
        n = x_in.shape[0]
        order = len(self.group) if self.group is not None else 1
        chunks = self.chunks or (_default_chunks(x.shape[0], order, x.device) if order > 1 else 1)
        size = -(-n // chunks)
        outs = []
        for i in range(0, n, size):
            part = x_in[i:i + size]
            tt = torch.full((part.shape[0],), t, dtype=torch.float32, device=x.device)
            outs.append(_main_tensor(self.model(part, tt)))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        if y.shape != x_in.shape:
            raise ValueError(f"the model output has shape {tuple(y.shape)} but the sample it was "
                             f"given has shape {tuple(x_in.shape)}")
        return y.to(x.dtype)

    def step(self, x: torch.Tensor, sigma: float, a: float, b: float, *, p: float = 0.0,
             q: float = 0.0, c: float = 0.0, u: torch.Tensor | None = None,
             v: torch.Tensor | None = None, noise: dict[str, Any] | None = None,
             return_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One fused step: x_next = a·x + b·D(x, σ) + p·u + q·v + c·z (see symfast.ops.fused_step);
        ``noise`` holds the noise keywords of fused_step (noise=, key=, step=, noise_element=)."""
        y = self.orbit_outputs(x, sigma)
        c_skip, c_out, _, _ = self.coefficients(sigma)
        coefs = StepCoefficients(c_skip, c_out, a, b, p, q, c)
        return fused_step(x, y, coefs, self.group, u=u, v=v, return_denoised=return_denoised,
                          backend=self.backend, **(noise or {}))

    def forward(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """x: (B, ...) -> x̂0: (B, ...)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if isinstance(sigma, torch.Tensor):
            raise TypeError("sigma must be a host float (a tensor would force a device sync)")
        return self.step(x, sigma, 0.0, 1.0, return_denoised=False)[0]


__all__ = ["Denoiser", "PREDICTIONS", "DDPMSchedule", "EDMSchedule", "VESchedule"]
