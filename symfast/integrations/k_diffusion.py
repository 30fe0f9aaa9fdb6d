"""k-diffusion-compatible samplers: same names, signatures and callback dicts as
``k_diffusion.sampling``; importing this module does not import k-diffusion.

``model(x, sigma * s_in, **extra_args)`` is a denoiser D(x, σ) -> x̂0 on the σ-form state
x = x0 + σ ε, x: (B, ...), sigmas: (n + 1,) descending and usually ending in 0.

The σ table is copied to the host once before the loop and every per-step coefficient is computed
there, with 0-d tensor arithmetic in the σ table's dtype in k-diffusion's order of operations (torch's
CPU transcendentals are not correctly rounded, so this is what reproduces k-diffusion to rounding);
the loop does elementwise tensor math with those Python floats and never reads a device tensor.

One deliberate difference: k-diffusion's Euler/Heun draw ``randn_like(x)`` on every step even when
``s_churn == 0`` makes that noise unused, and Euler ancestral draws noise when ``eta == 0``; these
draw only when the noise can change the result, so outputs match but the global RNG state afterwards
may differ in those cases.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import trange

__all__ = ["get_sigmas_karras", "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m"]


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """Karras et al. (2022) σ: (n + 1,) float32, descending from sigma_max to sigma_min, then 0.

    Computed in float32 like k-diffusion (``symfast.schedules.karras_sigmas`` is the float64 form
    diffusers uses, which differs in the last bits).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])]).to(device)


def _host_sigmas(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"x and sigmas must be tensors, got {type(x).__name__} and {type(sigmas).__name__}")
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
    host = sigmas.detach().cpu()
    if not torch.isfinite(host).all() or (host < 0).any():
        raise ValueError(f"sigmas must be finite and >= 0, got {host.tolist()}")
    return host


def _denoise(model: Callable, x: torch.Tensor, sigma: float, s_in: torch.Tensor, extra_args: dict,
             ) -> torch.Tensor:
    denoised = model(x, sigma * s_in, **extra_args)
    if denoised.shape != x.shape:
        raise ValueError(f"model returned shape {tuple(denoised.shape)} for an input of shape {tuple(x.shape)}")
    return denoised


def _churn_tables(host: torch.Tensor, s_churn: float, s_tmin: float, s_tmax: float
                  ) -> tuple[list[float], list[float], list[float]]:
    """Per step: γ_i, σ̂_i = σ_i (γ_i + 1) and the churn noise scale √(σ̂_i² − σ_i²) (Karras Alg. 2)."""
    n = len(host) - 1
    gammas = [min(s_churn / n, 2 ** 0.5 - 1) if s_tmin <= s <= s_tmax else 0.0 for s in host[:-1].tolist()]
    sigma_hat = torch.stack([host[i] * (g + 1) for i, g in enumerate(gammas)])
    churn = (sigma_hat ** 2 - host[:-1] ** 2) ** 0.5
    return gammas, sigma_hat.tolist(), churn.tolist()


def _karras_loop(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None,
                 callback: Callable | None, disable: bool | None, s_churn: float, s_tmin: float, s_tmax: float,
                 s_noise: float, heun: bool) -> torch.Tensor:
    extra_args = {} if extra_args is None else extra_args
    host = _host_sigmas(x, sigmas)
    gammas, sigma_hat, churn = _churn_tables(host, s_churn, s_tmin, s_tmax)
    sigma = host.tolist()
    n = len(sigma) - 1
    s_in = x.new_ones([x.shape[0]])
    for i in trange(n, disable=disable):
        if s_churn > 0:
            eps = torch.randn_like(x) * s_noise
            if gammas[i] > 0:
                x = x + eps * churn[i]
        denoised = _denoise(model, x, sigma_hat[i], s_in, extra_args)
        d = (x - denoised) / sigma_hat[i]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i] * (gammas[i] + 1),
                      "denoised": denoised})
        dt = float(host[i + 1] - sigma_hat[i])
        if not heun or sigma[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = _denoise(model, x_2, sigma[i + 1], s_in, extra_args)
            d_2 = (x_2 - denoised_2) / sigma[i + 1]
            d_prime = (d + d_2) / 2
            x = x + d_prime * dt
    return x


@torch.no_grad()
def sample_euler(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callable | None = None, disable: bool | None = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    """Euler steps on the probability-flow ODE with optional churn (Karras et al. 2022, Alg. 2).
    x: (B, ...) noise at sigmas[0]; returns the sample at sigmas[-1]."""
    return _karras_loop(model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise, heun=False)


@torch.no_grad()
def sample_heun(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callable | None = None, disable: bool | None = None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 2), Euler on the last step to σ = 0.
    x: (B, ...) noise at sigmas[0]; returns the sample at sigmas[-1]."""
    return _karras_loop(model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise, heun=True)


@torch.no_grad()
def sample_euler_ancestral(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                           callback: Callable | None = None, disable: bool | None = None, eta: float = 1.0,
                           s_noise: float = 1.0, noise_sampler: Callable | None = None) -> torch.Tensor:
    """Ancestral sampling with Euler steps: step down to σ_down, add noise of size σ_up.
    ``noise_sampler(sigma, sigma_next)`` returns noise shaped like x (default: ``randn_like(x)``)."""
    extra_args = {} if extra_args is None else extra_args
    host = _host_sigmas(x, sigmas)
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    noise_sampler = (lambda sigma, sigma_next: torch.randn_like(x)) if noise_sampler is None else noise_sampler
    sigma = host.tolist()
    n = len(sigma) - 1
    dt, sigma_up = [], []
    for i in range(n):
        s_from, s_to = host[i], host[i + 1]
        if not eta:
            down, up = s_to, 0.0
        else:
            up = min(s_to, eta * (s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2) ** 0.5)
            down = (s_to ** 2 - up ** 2) ** 0.5
        dt.append(float(down - s_from))
        sigma_up.append(float(up))
    s_in = x.new_ones([x.shape[0]])
    for i in trange(n, disable=disable):
        denoised = _denoise(model, x, sigma[i], s_in, extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        d = (x - denoised) / sigma[i]
        x = x + d * dt[i]
        if sigma[i + 1] > 0 and sigma_up[i] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up[i]
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                    callback: Callable | None = None, disable: bool | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in t = −log σ: a second-order multistep in the data
    prediction, first order on the first step and on the step to σ = 0."""
    extra_args = {} if extra_args is None else extra_args
    host = _host_sigmas(x, sigmas)
    if (host[:-1] <= 0).any():
        raise ValueError(f"sigmas must be > 0 except the last, got {host.tolist()}")
    sigma = host.tolist()
    n = len(sigma) - 1
    t = [-torch.log(s) for s in host]
    ratio, expm1, c_new, c_old = [], [], [], []
    for i in range(n):
        h = t[i + 1] - t[i]
        ratio.append(float(torch.exp(-t[i + 1]) / torch.exp(-t[i])))
        expm1.append(float(torch.expm1(-h)))
        if i > 0:
            r = (t[i] - t[i - 1]) / h
            c_new.append(float(1 + 1 / (2 * r)))
            c_old.append(float(1 / (2 * r)))
        else:
            c_new.append(1.0)
            c_old.append(0.0)
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in trange(n, disable=disable):
        denoised = _denoise(model, x, sigma[i], s_in, extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if old_denoised is None or sigma[i + 1] == 0:
            x = ratio[i] * x - expm1[i] * denoised
        else:
            denoised_d = c_new[i] * denoised - c_old[i] * old_denoised
            x = ratio[i] * x - expm1[i] * denoised_d
        old_denoised = denoised
    return x

