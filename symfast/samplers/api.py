"""symfast.sample and symfast.denoise."""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np
import torch

from symfast.denoiser import Denoiser
from symfast.philox import noise_key
from symfast.samplers._noise import LATENT_STEP, NoiseSource, philox_normal
from symfast.samplers.loops import SAMPLERS, Callback


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")


def _check_denoiser(denoiser) -> None:
    if not isinstance(denoiser, Denoiser):
        hint = ""
        if isinstance(getattr(denoiser, "_orig_mod", None), Denoiser):  # torch.compile(denoiser)
            hint = ("; the samplers call the Denoiser's parts (its fused steps, schedule, group), "
                    "so compile its network instead: denoiser.model = torch.compile(denoiser.model)")
        raise TypeError(f"denoiser must be a symfast.Denoiser, got {type(denoiser).__name__}{hint}")


def _model_dtype(denoiser: Denoiser) -> torch.dtype:
    """The dtype of the network's floating parameters (float32 for a function or none)."""
    params = getattr(denoiser.model, "parameters", None)
    first = next((p for p in params() if p.is_floating_point()), None) if callable(params) else None
    return first.dtype if first is not None else torch.float32


def sampling_sigmas(denoiser: Denoiser, sampler: str, steps: int, spacing: str = "leading",
                    karras: bool = False) -> np.ndarray:
    """The host σ grid (steps + 1 values, last 0): the schedule's grid for ``sampler``
    (:meth:`symfast.schedules.Schedule.sampling_sigmas`)."""
    return denoiser.schedule.sampling_sigmas(sampler, steps, spacing, karras)


# samplers whose step extrapolates from the previous one (a tiny step before it blows up)
_MULTISTEP = ("dpmpp_2m",)


def denoise_sigmas(denoiser: Denoiser, sigma: float, sampler: str = "heun", steps: int = 40,
                   karras: bool = True) -> np.ndarray:
    """:func:`denoise`'s host σ grid: σ, then the values of the ``steps``-step grid below it
    (the EDM grid cut at σ with its first point replaced by σ, as SFBD's reference code does).
    For a multistep sampler (dpmpp_2m) a grid value closer to σ than half the grid's next step
    (in log σ) is left out: σ read back from float32 sits ~3e-8 above the grid value it came
    from, and a step that short threw DPM-Solver++(2M)'s extrapolation (weights ~1e7) off by
    0.3. One-step samplers take a short first step as it is."""
    full = sampling_sigmas(denoiser, sampler, steps, karras=karras)
    below = full[full < sigma]
    if (sampler in _MULTISTEP and len(below) >= 2 and below[1] > 0
            and math.log(sigma / below[0]) < 0.5 * math.log(below[0] / below[1])):
        below = below[1:]
    return np.concatenate([[sigma], below])


def _check_start(name: str, x: torch.Tensor) -> None:
    """A start state: a floating (B, ...) tensor with finite values (NaN would come out as the
    samples)."""
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must be (B, ...) with B >= 1, got shape {tuple(x.shape)}")
    # a meta tensor holds no values to check (sample(..., device="meta") runs on them)
    if x.device.type != "meta" and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds non-finite values")


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _check_callback(callback) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (called with k-diffusion's per-step dict) or "
                        f"None, got {type(callback).__name__}")


def sample(denoiser: Denoiser, x_T_or_shape: torch.Tensor | Sequence[int], sampler: str = "dpmpp_2m",
           steps: int = 50, seed: int | list[int] | torch.Tensor | None = None,
           generator: torch.Generator | None = None, callback: Callback = None,
           progress: bool = True, transform_noise: int | None = None, spacing: str = "leading",
           karras: bool = False, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None, **sampler_options) -> torch.Tensor:
    """Draw samples by integrating the reverse process from the σ grid's first value to 0: the
    schedule's largest σ on EDM and VE schedules and with ``spacing="trailing"``; diffusers'
    default "leading" spacing of a DDPM schedule starts lower (σ(t) at t = (steps−1)·⌊T/steps⌋:
    0.01 for one step, 61 for ten, against σ_max = 157), as diffusers' schedulers do.

    Args:
        denoiser: a :class:`symfast.Denoiser`.
        x_T_or_shape: unit-variance starting noise ε_T, (B, ...), or a shape to draw it for
            (Philox with ``seed`` at step 0, or ``generator``). The start state is σ₀·ε_T
            (√(σ₀²+1)·ε_T on a DDPM schedule, i.e. the VP x_T = ε_T, as diffusers).
        sampler: "ddpm", "ddim", "euler", "euler_ancestral", "euler_maruyama", "heun", "dpmpp_2m".
        steps: number of steps (≤ num_train_timesteps on a DDPM schedule).
        seed: int (one stream per sample index) or one int per sample (noise independent of the
            batch); used by stochastic samplers. Default 0.
        generator: a torch.Generator instead of Philox (parity with diffusers).
        callback: called once per step with k-diffusion's dict {"x": the state the step starts
            from, "i", "sigma", "sigma_hat" (σ after churn; host floats), "denoised": D(x, σ̂)}.
        progress: show a tqdm bar.
        transform_noise: apply group element k to every noise draw (equivariant sampling:
            sample(g_k·x_T, transform_noise=k) = g_k·sample(x_T)).
        spacing, karras: the σ grid (see :func:`sampling_sigmas`).
        device, dtype: where and in what dtype to draw x_T when a shape is given (default: the
            CPU; the dtype of the network's parameters, float32 for a plain function).
        sampler_options: eta= (ddim, euler_ancestral), s_churn=, s_tmin=, s_tmax=, s_noise= (heun).

    Returns:
        x0 samples, (B, ...).
    """
    _check_denoiser(denoiser)
    _check_sampler(sampler)
    _check_callback(callback)
    denoiser.schedule.check_steps(steps)
    sigmas = sampling_sigmas(denoiser, sampler, steps, spacing, karras)
    _check_generator(generator)
    if isinstance(x_T_or_shape, torch.Tensor):
        eps = x_T_or_shape
        _check_start("x_T", eps)
        if seed is not None and not isinstance(seed, int):
            noise_key(seed, eps.shape[0])  # validates the seed list against the batch
    else:
        dtype = _model_dtype(denoiser) if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if (not isinstance(x_T_or_shape, (tuple, list, torch.Size))
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in x_T_or_shape)):
            raise TypeError(f"x_T_or_shape must be a tensor or a shape (a tuple of ints), got "
                            f"{x_T_or_shape!r}")
        shape = tuple(x_T_or_shape)
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"shape must be (B, ...) with positive sizes, got {shape}")
        device = torch.device(device or "cpu")
        if generator is not None:
            eps = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
        else:
            key = noise_key(0 if seed is None else seed, shape[0], device)
            eps = philox_normal(key, LATENT_STEP, shape, dtype)
    sigma0 = float(sigmas[0])
    x = eps * denoiser.schedule.start_scale(sigma0)
    noise = NoiseSource(x, seed=seed, generator=generator, group=denoiser.group,
                        transform=transform_noise)
    return SAMPLERS[sampler](denoiser, x, sigmas, noise, callback=callback, progress=progress,
                             **sampler_options)


def denoise(denoiser: Denoiser, y: torch.Tensor, sigma: float, sampler: str = "heun",
            steps: int = 40, seed: int | list[int] | None = None,
            generator: torch.Generator | None = None, callback: Callback = None,
            progress: bool = False, karras: bool = True, **sampler_options) -> torch.Tensor:
    """The clean estimate of y = x0 + σ ε: the reverse process started at σ from y.

    The σ grid is the schedule's ``steps``-step grid (Karras ρ = 7 by default) truncated to the
    values below σ, with σ prepended (SFBD's backward step). With a group on the denoiser and a
    deterministic sampler, denoise(g·y) = g·denoise(y).
    y: (B, ...) -> (B, ...).
    """
    _check_denoiser(denoiser)
    _check_sampler(sampler)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    _check_start("y", y)
    _check_generator(generator)
    _check_callback(callback)
    if isinstance(sigma, (torch.Tensor, bool)) or not isinstance(sigma, numbers.Real):
        raise TypeError(f"sigma must be a host float, got {type(sigma).__name__}")
    sigma = float(sigma)
    denoiser.schedule.check_sigma(sigma)
    denoiser.schedule.check_steps(steps)
    sigmas = denoise_sigmas(denoiser, sigma, sampler, steps, karras)
    noise = NoiseSource(y, seed=seed, generator=generator, group=denoiser.group)
    return SAMPLERS[sampler](denoiser, y, sigmas, noise, callback=callback, progress=progress,
                             **sampler_options)
