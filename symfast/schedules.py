"""Noise schedules, computed on the host exactly as diffusers / k-diffusion compute them.

Everything here is a host-side table (CPU torch tensors or numpy arrays): samplers read their
per-step coefficients from these as Python floats, so a sampling step never syncs with the device.

Conventions. Samplers run in the "σ form" of k-diffusion: the state is x = x0 + σ ε. A DDPM model
sees the variance-preserving input x_vp = √ᾱ x0 + √(1-ᾱ) ε = x / √(σ² + 1), with
σ = √((1 - ᾱ) / ᾱ).

Functions mirror diffusers' code paths (diffusers 0.42) so that its drop-ins can reuse them:
- :func:`betas`: ``linear``, ``scaled_linear``, ``squaredcos_cap_v2`` (alias ``cosine``), or trained
  betas, optionally rescaled to zero terminal SNR; float32 like diffusers.
- :func:`alphas_cumprod`, :func:`sigmas_from_alphas_cumprod`: float32.
- :func:`timesteps`: ``leading``, ``trailing``, ``linspace`` spacing (DDIM rounds linspace to int,
  Euler keeps it fractional: ``integer=``).
- :func:`sigma_to_t`: diffusers' log-σ interpolation back to a (fractional) timestep.
- :func:`karras_sigmas`: EDM/Karras σ (ρ = 7); :func:`ve_sigmas`: geometric VE σ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from symfast.ops import _checks

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")
SPACINGS = ("leading", "trailing", "linspace")


def _cosine_alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def betas(schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 1e-4,
          beta_end: float = 0.02, trained_betas: Sequence[float] | None = None,
          rescale_zero_terminal_snr: bool = False, max_beta: float = 0.999) -> torch.Tensor:
    """DDPM betas, (num_train_timesteps,) float32, as diffusers' schedulers build them."""
    if trained_betas is not None:
        out = torch.tensor(trained_betas, dtype=torch.float32)
    else:
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) \
                or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
        if schedule == "linear":
            out = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif schedule == "scaled_linear":
            out = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps,
                                 dtype=torch.float32) ** 2
        elif schedule in ("squaredcos_cap_v2", "cosine"):
            n = num_train_timesteps
            out = torch.tensor([min(1 - _cosine_alpha_bar((i + 1) / n) / _cosine_alpha_bar(i / n), max_beta)
                                for i in range(n)], dtype=torch.float32)
        else:
            raise ValueError(f"schedule must be one of {BETA_SCHEDULES}, got {schedule!r}")
    if rescale_zero_terminal_snr:
        out = _rescale_zero_terminal_snr(out)
    return out


def _rescale_zero_terminal_snr(b: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1 (diffusers' ``rescale_betas_zero_snr``)."""
    sqrt_ac = torch.cumprod(1.0 - b, dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = torch.cat([ac[0:1], ac[1:] / ac[:-1]])
    return 1 - alphas


def alphas_cumprod(b: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = Π_{s≤t} (1 - β_s), float32 (diffusers' order of operations)."""
    return torch.cumprod(1.0 - b, dim=0)


def sigmas_from_alphas_cumprod(ac: torch.Tensor) -> torch.Tensor:
    """σ_t = √((1 - ᾱ_t) / ᾱ_t), computed in ``ac``'s dtype like diffusers' Euler schedulers."""
    return ((1 - ac) / ac) ** 0.5


def timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading", steps_offset: int = 0,
              integer: bool = True, diffusers_arange: bool = False) -> np.ndarray:
    """Descending inference timesteps, diffusers' ``set_timesteps``.

    ``integer=True`` is DDIM/DDPM (int64; linspace rounded); ``integer=False`` is the Euler family
    (float32; linspace kept fractional). "trailing" gives exactly ``steps`` timesteps in
    [0, n − 1]; diffusers' own ``np.arange(n, 0, −n/steps)`` yields one more, ending in −1, for
    some step counts (61, 103, 121, ... of n = 1000: its float steps stop just above 0), which
    sends the grid back up to σ_max; ``diffusers_arange=True`` keeps that, for the diffusers
    drop-ins' exact parity.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if steps > num_train_timesteps:
        raise ValueError(f"steps={steps} exceeds the schedule's num_train_timesteps={num_train_timesteps}")
    n = num_train_timesteps
    if spacing == "linspace":
        if integer:
            return np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
        return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = n // steps
        out = (np.arange(0, steps) * ratio).round()[::-1].copy()
        out = out.astype(np.int64 if integer else np.float32)
        out += steps_offset
        return out
    if spacing == "trailing":
        ratio = n / steps
        grid = np.arange(n, 0, -ratio)
        grid = grid if diffusers_arange else grid[:steps]
        out = np.round(grid).astype(np.int64 if integer else np.float32)
        out -= 1
        return out
    raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")


def check_grid_options(spacing: Any, karras: Any) -> None:
    """ValueError/TypeError naming a spacing that is not one of SPACINGS or a karras that is not
    a bool (a typo'd spacing passed silently on continuous schedules, karras="no" meant True)."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if not isinstance(karras, bool):
        raise TypeError(f"karras must be True or False, got {karras!r}")


def sigma_to_t(sigma: np.ndarray | float, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep whose interpolated log σ is log ``sigma`` (diffusers' ``_sigma_to_t``)."""
    sigma = np.asarray(sigma)
    if log_sigmas.shape[0] == 1:  # one timestep, 0 (the interpolation below needs two: it gave -1)
        return np.zeros(sigma.shape)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0).astype(np.int64), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _check_grid(steps, sigma_min, sigma_max) -> None:
    """A grid's step count and finite noise levels (an inf sigma_max gave a grid of NaN)."""
    _checks.positive_int("steps", steps)
    _checks.finite_number("sigma_min", sigma_min, positive=True)
    _checks.finite_number("sigma_max", sigma_max, positive=True)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """EDM σ_i = (σ_max^{1/ρ} + i/(n-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ, descending, float64, no
    trailing zero (diffusers' ``_convert_to_karras``; k-diffusion's get_sigmas_karras without the 0)."""
    _check_grid(steps, sigma_min, sigma_max)
    _checks.finite_number("rho", rho, positive=True)
    # one step is σ_max alone, so a one-point range (a 1-step grid of a DDPM schedule) is valid
    if not (sigma_min < sigma_max or (steps == 1 and sigma_min <= sigma_max)):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    ramp = np.linspace(0, 1, steps)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def ve_sigmas(steps: int, sigma_min: float = 0.01, sigma_max: float = 50.0) -> np.ndarray:
    """Geometric VE σ from σ_max down to σ_min (Song et al. SMLD/VE-SDE), float64, no trailing 0."""
    _check_grid(steps, sigma_min, sigma_max)
    if not sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps))


def append_zero(sigmas: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(sigmas, dtype=np.float64), [0.0]])


# ---- schedule objects used by Denoiser and the samplers ---------------------------------------

class Schedule:
    """A noise process in σ form. Subclasses give the σ range, how the model is conditioned
    (:meth:`model_time`) and the default sampling σ grid (:meth:`sigmas`). What samplers and the
    Denoiser do differently per schedule is asked of the schedule (:meth:`input_scale`,
    :meth:`start_scale`, :meth:`sampling_sigmas`), never decided by its type."""

    # x_σ = x0 + σε is stored as the VP state x_σ / √(σ²+1) by the network's convention
    # (DDPM); v-prediction is defined only there.
    variance_preserving = False
    sigma_min: float
    sigma_max: float

    def sigmas(self, steps: int, **kwargs) -> np.ndarray:
        """Descending σ grid of ``steps`` values followed by 0: (steps + 1,) float64."""
        raise NotImplementedError

    def model_time(self, sigma: float) -> float:
        """The conditioning value the network is called with at noise level σ."""
        return float(sigma)

    def input_scale(self, sigma, sqrt=math.sqrt):
        """c_in of the eps / x0 / v parametrisations at σ: what the network's input x_σ is
        multiplied by (σ a host float with math.sqrt, or a tensor with torch.sqrt)."""
        return 1.0

    def start_scale(self, sigma0: float) -> float:
        """The factor that turns unit-variance noise ε_T into the sampler's start state at σ₀."""
        return sigma0

    def sampling_sigmas(self, sampler: str, steps: int, spacing: str = "leading",
                        karras: bool = False) -> np.ndarray:
        """The host σ grid a ``sampler`` runs on (steps + 1 values, last 0). ``spacing`` places
        a DDPM schedule's timesteps; a continuous schedule has none and takes only its default
        (an EDM schedule's grid is its ρ grid whatever ``karras`` says)."""
        check_grid_options(spacing, karras)
        return self.sigmas(steps, karras=karras)

    def training_levels(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ, t): the noise levels of a training batch, drawn from uniforms u: (B,) in [0, 1),
        and the network's conditioning t at them, both (B,) float32 on u's device."""
        raise NotImplementedError(f"{type(self).__name__} defines no training distribution of σ")

    def check_steps(self, steps: int) -> None:
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")

    def check_sigma(self, sigma: float) -> None:
        if not (self.sigma_min <= sigma <= self.sigma_max * (1 + 1e-6)):
            raise ValueError(f"sigma={sigma} is outside the schedule's range "
                             f"[{self.sigma_min:.6g}, {self.sigma_max:.6g}]")


@dataclass
class DDPMSchedule(Schedule):
    """Discrete DDPM (variance-preserving) schedule over ``num_train_timesteps`` timesteps.

    The network takes the VP input x / √(σ²+1) and the (fractional) timestep t with σ(t) = σ.
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    trained_betas: Sequence[float] | None = None
    rescale_zero_terminal_snr: bool = False
    variance_preserving = True

    def __post_init__(self) -> None:
        # a beta outside (0, 1) builds a σ table of NaN that fails far away, naming σ
        if self.trained_betas is None:
            for name in ("beta_start", "beta_end"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                    raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
        else:
            try:
                values = [float(b) for b in self.trained_betas]
            except (TypeError, ValueError):
                values = []
            if not values or not all(0 < b <= 1 for b in values):
                raise ValueError(f"trained_betas must be a non-empty sequence of numbers in (0, 1], "
                                 f"got {self.trained_betas!r}")
        self.betas = betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end,
                           self.trained_betas, self.rescale_zero_terminal_snr)
        self.num_train_timesteps = int(self.betas.shape[0])
        self.alphas_cumprod = alphas_cumprod(self.betas)
        ac = self.alphas_cumprod
        if self.rescale_zero_terminal_snr:
            # ᾱ_T = 0 by construction, σ_T = ∞: no sampler starts there. diffusers' Euler
            # schedulers set ᾱ_T = 2^-24 (σ_T ≈ 4096); the same here, for every sampler
            ac = ac.clone()
            ac[-1] = 2.0 ** -24
        self.sigma_table = sigmas_from_alphas_cumprod(ac).numpy()
        if not np.isfinite(self.sigma_table).all():
            first = int(np.argmin(np.isfinite(self.sigma_table)))
            source = "trained_betas" if self.trained_betas is not None else "beta_start and beta_end"
            raise ValueError(f"{source} make ᾱ underflow to 0 from t={first} (σ infinite there); "
                             f"use smaller betas or fewer num_train_timesteps")
        self.log_sigmas = np.log(self.sigma_table)
        # a dict, not a search of the table: model_time runs inside compiled steps
        self._table_time = {float(s): float(t) for t, s in enumerate(self.sigma_table)}
        self.sigma_min = float(self.sigma_table[0])
        self.sigma_max = float(self.sigma_table[-1])

    def check_steps(self, steps: int) -> None:
        super().check_steps(steps)
        if steps > self.num_train_timesteps:
            raise ValueError(f"steps={steps} exceeds the schedule's num_train_timesteps="
                             f"{self.num_train_timesteps}")

    def timesteps(self, steps: int, spacing: str = "leading", steps_offset: int = 0) -> np.ndarray:
        """Integer timesteps, descending (DDIM/DDPM)."""
        self.check_steps(steps)
        return timesteps(self.num_train_timesteps, steps, spacing, steps_offset, integer=True)

    def sigmas(self, steps: int, spacing: str = "leading", karras: bool = False,
               steps_offset: int = 0) -> np.ndarray:
        """σ at the inference timesteps (Euler's interpolation), or Karras σ over this range; then 0."""
        self.check_steps(steps)
        t = timesteps(self.num_train_timesteps, steps, spacing, steps_offset, integer=False)
        s = np.interp(t, np.arange(len(self.sigma_table)), self.sigma_table)
        if karras:
            s = karras_sigmas(steps, float(s[-1]), float(s[0]))
        return append_zero(s)

    def input_scale(self, sigma, sqrt=math.sqrt):
        """The VP input x_σ / √(σ²+1)."""
        return 1 / sqrt(sigma * sigma + 1)

    def start_scale(self, sigma0: float) -> float:
        """√(σ₀²+1): the start state is the VP x_T = ε_T, as in diffusers."""
        return math.sqrt(sigma0 * sigma0 + 1)

    def sampling_sigmas(self, sampler: str, steps: int, spacing: str = "leading",
                        karras: bool = False) -> np.ndarray:
        """DDIM/DDPM without Karras σ run on the integer timesteps with ᾱ → 1 at the end, like
        diffusers' DDIMScheduler (set_alpha_to_one=True); the rest on :meth:`sigmas`."""
        check_grid_options(spacing, karras)
        if sampler in ("ddim", "ddpm") and not karras:
            return np.concatenate([self.sigma_at(self.timesteps(steps, spacing)), [0.0]])
        return self.sigmas(steps, spacing=spacing, karras=karras)

    def sigma_at(self, t: int | np.ndarray) -> np.ndarray:
        return self.sigma_table[t].astype(np.float64)

    def model_time(self, sigma: float) -> float:
        """The timestep of a σ in the table (as training draws it and diffusers' DDPM/DDIM/Euler
        call the network), else the log-σ interpolation. With rescale_zero_terminal_snr the table
        is not monotone at its end (σ_T = 4096 < σ_{T-1}) and the interpolation gave σ_T the
        time 995.3, not T-1 = 999."""
        t = self._table_time.get(float(sigma))
        if t is not None:
            return t
        return float(sigma_to_t(np.float64(sigma), self.log_sigmas))

    def training_levels(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform integer timesteps t = ⌊u·T⌋ (DDPM), σ = σ(t); t is what the network sees."""
        t = (u.double() * self.num_train_timesteps).long().clamp_(max=self.num_train_timesteps - 1)
        table = torch.from_numpy(self.sigma_table).to(u.device)
        return table[t].float(), t.float()


def _check_sigma_range(schedule: Schedule, positive: tuple[str, ...]) -> None:
    """Each of ``positive`` a finite number > 0, and sigma_min < sigma_max."""
    for name in positive:
        _checks.finite_number(name, getattr(schedule, name), positive=True)
    if not schedule.sigma_min < schedule.sigma_max:
        raise ValueError(f"sigma_min={schedule.sigma_min} must be below sigma_max={schedule.sigma_max}")


@dataclass
class EDMSchedule(Schedule):
    """EDM (Karras et al. 2022): continuous σ in [σ_min, σ_max], Karras grid with ρ."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    p_mean: float = -1.2
    p_std: float = 1.2

    def __post_init__(self) -> None:
        _check_sigma_range(self, ("sigma_min", "sigma_max", "sigma_data", "rho", "p_std"))
        if isinstance(self.p_mean, bool) or not isinstance(self.p_mean, (int, float)) or not math.isfinite(self.p_mean):
            raise ValueError(f"p_mean must be a finite number, got {self.p_mean!r}")

    def training_levels(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """EDM's training σ ~ lognormal(P_mean, P_std), by the normal quantile of u."""
        log_sigma = self.p_mean + self.p_std * torch.special.ndtri(u.double().clamp(1e-12, 1 - 1e-12))
        return log_sigma.exp().float(), (log_sigma / 4).float()

    def sigmas(self, steps: int, **kwargs) -> np.ndarray:
        self.check_steps(steps)
        return append_zero(karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho))

    def model_time(self, sigma: float) -> float:
        """EDM's c_noise = ln(σ)/4."""
        return math.log(sigma) / 4


@dataclass
class VESchedule(Schedule):
    """Variance-exploding (SMLD / VE-SDE): geometric σ grid; the network is called with σ."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def __post_init__(self) -> None:  # sigma_min > sigma_max built, then failed where it was used
        _check_sigma_range(self, ("sigma_min", "sigma_max"))

    def training_levels(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-uniform σ over [σ_min, σ_max] (Song et al.'s VE training); t = σ."""
        log_sigma = math.log(self.sigma_min) + u.double() * math.log(self.sigma_max / self.sigma_min)
        sigma = log_sigma.exp().float()
        return sigma, sigma.clone()

    def sigmas(self, steps: int, karras: bool = False, **kwargs) -> np.ndarray:
        self.check_steps(steps)
        if karras:
            return append_zero(karras_sigmas(steps, self.sigma_min, self.sigma_max))
        return append_zero(ve_sigmas(steps, self.sigma_min, self.sigma_max))
