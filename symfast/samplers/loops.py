"""The samplers, as short k-diffusion-style loops over a host σ grid.

Every sampler takes ``(denoiser, x, sigmas, noise, callback, progress)``: x is the state at
σ = sigmas[0] in σ form (x = x0 + σ ε), sigmas a descending host array ending in 0, noise a
:class:`~symfast.samplers._noise.NoiseSource`, progress whether to show a tqdm bar (None: tqdm
decides). Each step's elementwise work (orbit average, x̂0,
the update, the noise) is one fused op called through ``denoiser.step(x, σ, a, b, ...)``, which
returns x_next = a·x + b·D(x, σ) + p·u + q·v + c·z. All coefficients are host floats.
The callback gets k-diffusion's dict {"x", "i", "sigma", "sigma_hat", "denoised"} once per step,
with k-diffusion's meaning: x is the state the step starts from (at σ̂ = sigma_hat, after any
churn) and denoised D(x, σ̂); not the state the step returns.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import trange

from symfast.samplers._core import ancestral_split, churn_gamma, churn_levels, dpmpp_2m
from symfast.samplers._noise import NoiseSource

Callback = Callable[[dict], None] | None


def _report(callback: Callback, x, i, sigma, sigma_hat, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _steps(sigmas, progress: bool | None) -> Iterable[int]:
    """The step indices of a σ grid, under a tqdm bar if ``progress`` (None: tqdm's own choice, a
    bar only when stderr is a terminal, as k-diffusion's default ``disable=None``)."""
    return trange(len(sigmas) - 1, disable=None if progress is None else not progress)


def ddim_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(σ_down, σ_up) of a DDIM step in σ form. DDIM's std s = η √((1−ᾱ')/(1−ᾱ)) √(1−ᾱ/ᾱ') with
    ᾱ = 1/(1+σ²); dividing the VP update by √ᾱ' gives noise σ_up = s/√ᾱ' and direction σ_down.
    η = 1 is DDPM's ancestral (posterior) step."""
    if sigma_next == 0.0 or eta == 0.0:
        return sigma_next, 0.0
    ac, ac_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    s = eta * math.sqrt((1 - ac_next) / (1 - ac)) * math.sqrt(1 - ac / ac_next)
    up = s / math.sqrt(ac_next)
    return math.sqrt(max(sigma_next**2 - up**2, 0.0)), up


@torch.no_grad()
def sample_euler(denoiser, x, sigmas: np.ndarray, noise: NoiseSource, callback: Callback = None,
                 progress: bool = True, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0):
    """Euler on the probability-flow ODE, x ← x + (σ' − σ̂)(x − D)/σ̂, with EDM's churn (σ̂ = σ
    without it)."""
    return _karras_loop(denoiser, x, sigmas, noise, callback, progress, s_churn, s_tmin, s_tmax, s_noise,
                        heun=False)


def _check_option(name: str, value, high: float = math.inf, infinite: bool = False) -> None:
    """A sampler option: a real number in [0, high] (finite unless ``infinite``), or a
    ValueError naming it (a NaN would reach the samples, a string the arithmetic)."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value)
            or not 0 <= value <= high or (math.isinf(value) and not infinite)):
        bound = "" if high == math.inf else f", at most {high:g}"
        raise ValueError(f"{name} must be a {'' if infinite else 'finite '}number >= 0{bound}, "
                         f"got {value!r}")


def _karras_loop(denoiser, x, sigmas, noise, callback, progress, s_churn, s_tmin, s_tmax, s_noise, heun):
    """EDM's Algorithm 2: churn to σ̂, then an Euler step, and with ``heun`` the trapezoidal
    correction (Euler on the last step, to σ = 0)."""
    for name, value in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_noise", s_noise)):
        _check_option(name, value)
    _check_option("s_tmax", s_tmax, infinite=True)
    n = len(sigmas) - 1
    for i in _steps(sigmas, progress):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        gamma = churn_gamma(s, n, s_churn, s_tmin, s_tmax)
        s_hat, churn_std = churn_levels(s, gamma)
        if gamma > 0:
            x = noise.add(x, i + 1, s_noise * churn_std)
        dt = s_next - s_hat
        if not heun or s_next == 0.0:
            r = s_next / s_hat
            x_next, den = denoiser.step(x, s_hat, r, 1 - r)
        else:
            # stage 1: x2 = x + dt·(x − D)/σ̂
            x2, den = denoiser.step(x, s_hat, 1 + dt / s_hat, -dt / s_hat)
            # stage 2: x + dt/2·[(x − D)/σ̂ + (x2 − D2)/σ']
            h1, h2 = dt / (2 * s_hat), dt / (2 * s_next)
            x_next, _ = denoiser.step(x2, s_next, h2, -h2, p=1 + h1, u=x, q=-h1, v=den,
                                      return_denoised=False)
        _report(callback, x, i, s, s_hat, den)
        x = x_next
    return x


def _ancestral_loop(denoiser, x, sigmas, noise, callback, progress, split, s_noise=1.0):
    for i in _steps(sigmas, progress):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        down, up = split(s, s_next)
        r = down / s
        if not up:
            noise.unused(i + 1)
        x_next, den = denoiser.step(x, s, r, 1 - r, c=up * s_noise,
                                    noise=noise.kwargs(i + 1) if up else None)
        _report(callback, x, i, s, s, den)
        x = x_next
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, noise: NoiseSource, callback: Callback = None,
                           progress: bool = True, eta: float = 1.0, s_noise: float = 1.0):
    """Euler ancestral: Euler to σ_down, then noise of std s_noise·σ_up."""
    _check_option("eta", eta)
    _check_option("s_noise", s_noise)
    return _ancestral_loop(denoiser, x, sigmas, noise, callback, progress,
                           lambda s, n: ancestral_split(s, n, eta), s_noise)


@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, noise: NoiseSource, callback: Callback = None,
                progress: bool = True, eta: float = 0.0):
    """DDIM (Song et al.) with 0 ≤ η ≤ 1; η = 0 is deterministic (and equals Euler in σ form),
    η = 1 is DDPM's posterior step. Above 1 the noise would exceed the next level σ' (diffusers
    returns NaN there)."""
    _check_option("eta", eta, high=1.0)
    return _ancestral_loop(denoiser, x, sigmas, noise, callback, progress,
                           lambda s, n: ddim_split(s, n, eta))


@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, noise: NoiseSource, callback: Callback = None,
                progress: bool = True):
    """DDPM ancestral sampling: the posterior q(x_{t'} | x_t, x̂0) each step (= DDIM with η = 1)."""
    return sample_ddim(denoiser, x, sigmas, noise, callback, progress, eta=1.0)


@torch.no_grad()
def sample_euler_maruyama(denoiser, x, sigmas, noise: NoiseSource, callback: Callback = None,
                          progress: bool = True):
    """Euler–Maruyama on the reverse VP-SDE dx = [−½βx − β∇log p] dt + √β dW̄.

    In VP variables x_vp = x/√(1+σ²), with β the discrete β of the jump (1 − ᾱ/ᾱ') and the score
    −(x_vp − √ᾱ x̂0)/(1 − ᾱ): x_vp' = x_vp + ½β x_vp + β·score + √β z, mapped back to σ form. The
    last step (σ' = 0) returns x̂0.
    """
    for i in _steps(sigmas, progress):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        if s_next == 0.0:
            x_next, den = denoiser.step(x, s, 0.0, 1.0)
        else:
            ac, ac_next = 1 / (1 + s * s), 1 / (1 + s_next * s_next)
            beta = 1 - ac / ac_next
            scale = math.sqrt(ac) / math.sqrt(ac_next)  # √ᾱ to go to VP, 1/√ᾱ' to come back
            a = scale * (1 + beta / 2 - beta / (1 - ac))
            b = scale * beta / (1 - ac)
            x_next, den = denoiser.step(x, s, a, b, c=math.sqrt(beta / ac_next), noise=noise.kwargs(i + 1))
        _report(callback, x, i, s, s, den)
        x = x_next
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, noise: NoiseSource, callback: Callback = None,
                progress: bool = True, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float("inf"), s_noise: float = 1.0):
    """EDM's Heun sampler (Karras et al. 2022, Algorithm 2) with stochastic churn."""
    return _karras_loop(denoiser, x, sigmas, noise, callback, progress, s_churn, s_tmin, s_tmax, s_noise,
                        heun=True)


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, noise: NoiseSource, callback: Callback = None,
                    progress: bool = True):
    """DPM-Solver++(2M) (Lu et al. 2022), k-diffusion's sample_dpmpp_2m. sigmas: no value
    repeated."""
    # a repeated σ is a step of h = 0, which a neighbouring step's r = h_prev / h or 1 / (2r)
    # divides by; a rise runs (a zero-terminal-SNR table ends σ_{T-1} > σ_T, and a trailing grid
    # of many steps starts σ_T, σ_{T-1}), as in diffusers
    repeated = [float(s) for s, s_next in zip(sigmas[:-1], sigmas[1:]) if s == s_next]
    if repeated:
        raise ValueError(f"sigmas must not repeat a value for dpmpp_2m (a step of length 0), got "
                         f"{repeated[0]} twice in {[float(s) for s in sigmas]}")
    old_den = None
    for i in _steps(sigmas, progress):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        if s_next == 0.0:
            x_new, den = denoiser.step(x, s, 0.0, 1.0)
        else:
            # t = −log σ (negation is exact, so h and r are the same floats as from log σ)
            t_prev = -math.log(float(sigmas[i - 1])) if old_den is not None else None
            c = dpmpp_2m(t_prev, -math.log(s), -math.log(s_next))
            phi = -c.expm1_neg_h
            if old_den is None:
                x_new, den = denoiser.step(x, s, s_next / s, phi)
            else:
                # p = −φ/(2r) rather than −φ·c_old: the same float as before the core was shared
                x_new, den = denoiser.step(x, s, s_next / s, phi * c.c_new, p=-phi / (2 * c.r), u=old_den)
        _report(callback, x, i, s, s, den)
        x, old_den = x_new, den
    return x


SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "euler_maruyama": sample_euler_maruyama,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}
