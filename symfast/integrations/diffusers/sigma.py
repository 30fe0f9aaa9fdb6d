"""Euler, Euler ancestral and Heun: the σ-form state x = x0 + σ ε, the model seeing x / √(σ² + 1).

As in diffusers, these find the first ``timestep`` in the schedule and then advance a step counter,
ignoring the timesteps later calls pass (``set_begin_index`` fixes the start instead). Per-step
coefficients are computed once per schedule (and per churn setting), on the host, in diffusers'
float32 order; ``step`` indexes them and does elementwise math.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteSchedulerOutput

from symfast import schedules
from symfast.integrations.diffusers._base import (FusedUpdate, Scheduler, broadcast, check_same_shape,
                                                  inference_steps, randn)
from symfast.ops.fused_step import StepCoefficients
from symfast.samplers._core import ancestral_split, churn_gamma, churn_levels, pow_half


def _reject_index(timestep: Any) -> None:
    if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
        raise ValueError("timestep must be one of scheduler.timesteps, not an integer index")


class _SigmaScheduler(Scheduler):
    """Shared by Euler, Euler ancestral and Heun: the training σ, the inference σ grid, input scaling."""

    def _train_sigmas(self) -> np.ndarray:
        if self._option("rescale_betas_zero_snr", False):
            # diffusers' choice: the terminal ᾱ would be 0 (σ = ∞), so it is set to 2^-24
            self.alphas_cumprod[-1] = 2 ** (-24)
        return schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod).numpy()

    def _init_sigmas(self, timesteps: np.ndarray | torch.Tensor) -> None:
        """The full training grid, as diffusers' constructors set it."""
        self._check_one_sigma_grid()
        self._train_schedule()
        train_sigmas = self._train_sigmas()
        self.num_inference_steps: int | None = None
        self.is_scale_input_called = False
        sigmas = np.concatenate([train_sigmas[::-1], [0.0]])
        self._set_sigmas(sigmas, timesteps if timesteps is not None else
                         np.arange(self.config.num_train_timesteps)[::-1].astype(np.float32), None)

    def _set_sigmas(self, sigmas: np.ndarray | torch.Tensor, timesteps: np.ndarray | torch.Tensor, device: Any) -> None:
        self.sigmas = torch.as_tensor(np.asarray(sigmas, dtype=np.float32) if not isinstance(sigmas, torch.Tensor)
                                      else sigmas, dtype=torch.float32).cpu()
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.from_numpy(np.asarray(timesteps).astype(np.float32))
        self._set_timesteps_table(timesteps.cpu(), device, torch.float32)
        self._host_sigmas = self.sigmas.tolist()
        self._input_scale = ((self.sigmas ** 2 + 1) ** 0.5).tolist()

    def _spaced_grid(self, num_inference_steps: int, timesteps: list[float] | None = None,
                     num_train_timesteps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, σ) for the config's spacing (or the given timesteps), linearly interpolated in
        the training σ and then replaced by the config's Karras/exponential/beta grid; no final σ."""
        cfg = self.config
        if timesteps is not None:
            table = np.array(timesteps, dtype=np.float32)
        else:
            table = schedules.timesteps(num_train_timesteps or cfg.num_train_timesteps, num_inference_steps,
                                        cfg.timestep_spacing, cfg.steps_offset, integer=False,
                                        diffusers_arange=True)
        train_sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod).numpy()
        if self._option("interpolation_type", "linear") == "log_linear":
            grid = torch.linspace(np.log(train_sigmas[-1]), np.log(train_sigmas[0]),
                                  num_inference_steps + 1).exp().numpy()
        else:
            grid = np.interp(table, np.arange(0, len(train_sigmas)), train_sigmas)
        kind = self._sigma_grid_kind()
        if kind is not None:
            log_sigmas = np.log(train_sigmas)
            grid = self._convert_sigmas(kind, grid, num_inference_steps)
            table = np.array([schedules.sigma_to_t(s, log_sigmas) for s in grid])
        return table, grid

    def _check_custom_timesteps(self, timesteps: Any) -> None:
        kind = self._sigma_grid_kind()
        if timesteps is not None and kind is not None:
            raise ValueError(f"timesteps cannot be combined with use_{kind}_sigmas=True")

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """Standard deviation of the initial noise (a 0-d tensor, as diffusers'): σ_max, or
        √(σ_max² + 1) for leading spacing."""
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma ** 2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """x / √(σ² + 1): the variance-preserving input the network was trained on."""
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        return sample / self._input_scale[self._step_index]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x0 + σ ε at the σ of each of ``timesteps`` (B,), which must be in ``self.timesteps``."""
        sigma = broadcast([self._host_sigmas[i] for i in self._timestep_indices(timesteps)], original_samples)
        return original_samples + noise * sigma

    def _x0_sigma(self, model_output: torch.Tensor, sample: torch.Tensor, sigma_eps: float,
                  c_out: float, c_in2: float) -> torch.Tensor:
        """x0 from the model output: ε (scaled by σ̂), v (c_out = -σ/√(σ²+1), c_in2 = σ²+1) or x0."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return sample - sigma_eps * model_output
        if kind == "v_prediction":
            return model_output * c_out + sample / c_in2
        return model_output

    def _x0_form(self, sigma: float, c_out: float, c_in2: float) -> tuple[float, float]:
        """(c_skip, c_out) with x0 = c_skip·x + c_out·(model output), :meth:`_x0_sigma`'s x0."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return 1.0, -sigma
        if kind == "v_prediction":
            return 1 / c_in2, c_out
        return 0.0, 1.0

    def _euler_update(self, i: int, sigma: float, dt: float, c: dict[str, list[float]], noise_std: float,
                      draws: bool, output: type) -> FusedUpdate:
        """x + (x − x̂0)/σ·dt + noise_std·z = (1 + dt/σ)·x − (dt/σ)·x̂0 + noise_std·z, then step i + 1."""
        c_skip, c_out = self._x0_form(sigma, c["c_out"][i], c["c_in2"][i])
        r = dt / sigma
        coefs = StepCoefficients(c_skip, c_out, 1 + r, -r, 0.0, 0.0, noise_std)

        def finish(prev: torch.Tensor, x0: torch.Tensor, return_dict: bool) -> Any:
            self._step_index = i + 1
            return output(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)
        return FusedUpdate(coefs, draws, finish)

    @staticmethod
    def _v_coefficients(sigmas: torch.Tensor) -> dict[str, list[float]]:
        return {"c_out": (-sigmas / (sigmas ** 2 + 1) ** 0.5).tolist(), "c_in2": (sigmas ** 2 + 1).tolist()}


class EulerDiscreteScheduler(_SigmaScheduler):
    """Euler steps on the probability-flow ODE in σ (Karras et al. 2022, Alg. 2), with optional churn."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Any = None, prediction_type: str = "epsilon",
                 interpolation_type: str = "linear", use_karras_sigmas: bool | None = False,
                 use_exponential_sigmas: bool | None = False, use_beta_sigmas: bool | None = False,
                 sigma_min: float | None = None, sigma_max: float | None = None, timestep_spacing: str = "linspace",
                 timestep_type: str = "discrete", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 final_sigmas_type: str = "zero"):
        if interpolation_type not in ("linear", "log_linear"):
            raise ValueError(f"interpolation_type must be 'linear' or 'log_linear', got {interpolation_type!r}")
        if timestep_type not in ("discrete", "continuous"):
            raise ValueError(f"timestep_type must be 'discrete' or 'continuous', got {timestep_type!r}")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas
        self._init_sigmas(None)
        if self._continuous():
            self._set_sigmas(self.sigmas, self._continuous_timesteps(self.sigmas), None)

    def _continuous(self) -> bool:
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    @staticmethod
    def _continuous_timesteps(sigmas: torch.Tensor) -> torch.Tensor:
        return torch.stack([0.25 * s.log() for s in sigmas[:-1]])

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[float] | None = None, sigmas: list[float] | None = None) -> None:
        """σ grid for ``num_inference_steps`` (spacing, interpolation, Karras/exponential/beta per config),
        or from explicit descending ``timesteps`` or ``sigmas`` (the latter including the final σ)."""
        num_inference_steps = inference_steps(num_inference_steps)
        if sum(v is not None for v in (num_inference_steps, timesteps, sigmas)) != 1:
            raise ValueError("pass exactly one of num_inference_steps, timesteps and sigmas")
        self._check_custom_timesteps(timesteps)
        if timesteps is not None and self._continuous():
            raise ValueError("timesteps cannot be combined with timestep_type='continuous' and v_prediction")
        if sigmas is not None:
            log_sigmas = np.log(schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod).numpy())
            grid = np.array(sigmas).astype(np.float32)
            table = np.array([schedules.sigma_to_t(s, log_sigmas) for s in grid[:-1]])
            self.num_inference_steps = len(grid) - 1
        else:
            if num_inference_steps is None:
                num_inference_steps = len(timesteps)
            self.num_inference_steps = num_inference_steps
            table, grid = self._spaced_grid(num_inference_steps, timesteps)
            grid = np.concatenate([grid, [self._final_sigma()]]).astype(np.float32)
        sigma_t = torch.from_numpy(grid)
        self._set_sigmas(sigma_t, self._continuous_timesteps(sigma_t) if self._continuous()
                         else np.asarray(table).astype(np.float32), device)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """√ᾱ ε - √(1-ᾱ) x0 with ᾱ taken, as diffusers' Euler does, at each timestep's position in the
        inference schedule (not at the timestep itself)."""
        _reject_index(timesteps)
        indices = [self.index_for_timestep(t, self._host_table()) for t in timesteps.reshape(-1).tolist()]
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = self._sqrt_alpha_sigma(sample, indices)
        return sqrt_alpha_prod * noise - sqrt_one_minus_alpha_prod * sample

    def _coefficients(self, s_churn: float, s_tmin: float, s_tmax: float) -> dict[str, list[float]]:
        key = (s_churn, s_tmin, s_tmax)
        if key in self._cache:
            return self._cache[key]
        sigmas = self.sigmas
        n = len(sigmas) - 1
        gammas = [churn_gamma(s, n, s_churn, s_tmin, s_tmax) for s in self._host_sigmas[:n]]
        sigma = sigmas[:n]
        levels = [churn_levels(sigma[i], g, pow_half) for i, g in enumerate(gammas)]
        sigma_hat = torch.stack([h for h, _ in levels])
        c = {"gamma": gammas, "sigma_hat": sigma_hat.tolist(), "churn_std": [float(std) for _, std in levels],
             "dt": (sigmas[1:] - sigma_hat).tolist(), **self._v_coefficients(sigma)}
        self._cache[key] = c
        return c

    def _fused_update(self, timestep: Any, sample: torch.Tensor, kwargs: dict[str, Any]) -> FusedUpdate | None:
        """Euler without churn at this step (churn adds noise before the model call: not fused)."""
        if set(kwargs) - {"s_churn", "s_tmin", "s_tmax", "s_noise", "generator"}:
            return None
        _reject_index(timestep)
        i = self._counter_index(timestep)
        c = self._coefficients(float(kwargs.get("s_churn", 0.0)), float(kwargs.get("s_tmin", 0.0)),
                               float(kwargs.get("s_tmax", float("inf"))))
        if c["gamma"][i] > 0:
            return None
        return self._euler_update(i, c["sigma_hat"][i], c["dt"][i], c, 0.0, False, EulerDiscreteSchedulerOutput)

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: torch.Generator | None = None,
             return_dict: bool = True) -> EulerDiscreteSchedulerOutput | tuple:
        """One Euler step from σ_i to σ_{i+1}. model_output, sample: (B, C, H, W)."""
        _reject_index(timestep)
        check_same_shape(model_output, sample)
        i = self._counter_index(timestep)
        c = self._coefficients(float(s_churn), float(s_tmin), float(s_tmax))
        sample = sample.to(torch.float32)
        sigma_hat = c["sigma_hat"][i]
        if c["gamma"][i] > 0:
            noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            sample = sample + noise * s_noise * c["churn_std"][i]
        pred_original_sample = self._x0_sigma(model_output, sample, sigma_hat, c["c_out"][i], c["c_in2"][i])
        derivative = (sample - pred_original_sample) / sigma_hat
        prev_sample = (sample + derivative * c["dt"][i]).to(model_output.dtype)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class EulerAncestralDiscreteScheduler(_SigmaScheduler):
    """Euler ancestral: an Euler step down to σ_down, then fresh noise of size σ_up."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Any = None, prediction_type: str = "epsilon",
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        self._init_sigmas(None)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """σ at ``num_inference_steps`` spaced timesteps (linear interpolation), then 0."""
        num_inference_steps = inference_steps(num_inference_steps)
        table, grid = self._spaced_grid(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self._set_sigmas(np.concatenate([grid, [0.0]]).astype(np.float32), table, device)

    def _coefficients(self) -> dict[str, list[float]]:
        if "coeffs" in self._cache:
            return self._cache["coeffs"]
        sigma_from, sigma_to = self.sigmas[:-1], self.sigmas[1:]
        # diffusers' float32 ops in its order; the clamp σ_up ≤ σ' (k-diffusion's) changes nothing
        # unless rounding put σ_up above σ', where diffusers' σ_down would be √(negative) = NaN
        sigma_down, sigma_up = ancestral_split(sigma_from, sigma_to, 1.0, pow_half, torch.minimum)
        c = {"sigma_up": sigma_up.tolist(), "dt": (sigma_down - sigma_from).tolist(),
             **self._v_coefficients(sigma_from)}
        self._cache["coeffs"] = c
        return c

    def _fused_update(self, timestep: Any, sample: torch.Tensor, kwargs: dict[str, Any]) -> FusedUpdate | None:
        """Euler to σ_down plus σ_up·z (drawn on every step, as ``step`` does)."""
        if set(kwargs) - {"generator"}:
            return None
        _reject_index(timestep)
        i = self._counter_index(timestep)
        c = self._coefficients()
        return self._euler_update(i, self._host_sigmas[i], c["dt"][i], c, c["sigma_up"][i], True,
                                  EulerAncestralDiscreteSchedulerOutput)

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None,
             return_dict: bool = True) -> EulerAncestralDiscreteSchedulerOutput | tuple:
        """One ancestral step from σ_i to σ_{i+1}. model_output, sample: (B, C, H, W).

        ``prediction_type='sample'`` (x0) is supported here although diffusers' version raises for it.
        """
        _reject_index(timestep)
        check_same_shape(model_output, sample)
        i = self._counter_index(timestep)
        c = self._coefficients()
        sigma = self._host_sigmas[i]
        sample = sample.to(torch.float32)
        pred_original_sample = self._x0_sigma(model_output, sample, sigma, c["c_out"][i], c["c_in2"][i])
        derivative = (sample - pred_original_sample) / sigma
        prev_sample = sample + derivative * c["dt"][i]
        noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = (prev_sample + noise * c["sigma_up"][i]).to(model_output.dtype)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev_sample,
                                                     pred_original_sample=pred_original_sample)


class HeunDiscreteScheduler(_SigmaScheduler):
    """Heun's second-order method in σ (Karras et al. 2022): two model calls per σ interval."""

    order = 2
    beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2", "exp")

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "linear", trained_betas: Any = None, prediction_type: str = "epsilon",
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, clip_sample: bool = False, clip_sample_range: float = 1.0,
                 timestep_spacing: str = "linspace", steps_offset: int = 0):
        self._check_one_sigma_grid()
        self._train_schedule()
        self.use_karras_sigmas = use_karras_sigmas
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      num_train_timesteps: int | None = None, timesteps: list[float] | None = None) -> None:
        """σ grid with every interior σ repeated (one entry per model call), then 0."""
        num_inference_steps = inference_steps(num_inference_steps)
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        self._check_custom_timesteps(timesteps)
        if num_inference_steps is None:
            num_inference_steps = len(timesteps)
        self.num_inference_steps = num_inference_steps
        table, grid = self._spaced_grid(num_inference_steps, timesteps, num_train_timesteps)
        grid = torch.from_numpy(np.concatenate([grid, [0.0]]).astype(np.float32))
        doubled = torch.cat([grid[:1], grid[1:-1].repeat_interleave(2), grid[-1:]])
        table = torch.from_numpy(np.asarray(table))
        self._set_sigmas(doubled, torch.cat([table[:1], table[1:].repeat_interleave(2)]), device)
        self.prev_derivative: torch.Tensor | None = None
        self.dt: float | None = None
        self.sample: torch.Tensor | None = None

    @property
    def state_in_first_order(self) -> bool:
        return self.dt is None

    def _coefficients(self) -> dict[str, list[float]]:
        if "coeffs" in self._cache:
            return self._cache["coeffs"]
        sigmas = self.sigmas
        c = {"dt": (sigmas[1:] - sigmas[:-1]).tolist(), **self._v_coefficients(sigmas)}
        self._cache["coeffs"] = c
        return c

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True) -> HeunDiscreteSchedulerOutput | tuple:
        """First call: Euler predictor from σ_i to σ_{i+1}; second call: the trapezoidal corrector.
        model_output, sample: (B, C, H, W)."""
        check_same_shape(model_output, sample)
        i = self._counter_index(timestep)
        c = self._coefficients()
        # the σ the model was just evaluated at: the interval's start on the first call, its end on
        # the second; the doubled σ table puts both at index i
        sigma_input = self._host_sigmas[i]
        pred_original_sample = self._x0_sigma(model_output, sample, sigma_input, c["c_out"][i], c["c_in2"][i])
        pred_original_sample = self._clip_or_threshold(pred_original_sample)
        derivative = (sample - pred_original_sample) / sigma_input
        if self.state_in_first_order:
            self.prev_derivative, self.dt, self.sample = derivative, c["dt"][i], sample
            prev_sample = sample + derivative * self.dt
        else:
            derivative = (self.prev_derivative + derivative) / 2
            prev_sample = self.sample + derivative * self.dt
            self.prev_derivative, self.dt, self.sample = None, None, None
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return HeunDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
