"""DDPM and DDIM: variance-preserving updates indexed by integer timesteps.

Like diffusers', ``step`` uses the timestep it is given on every call (any integer in
[0, num_train_timesteps)), so skipping or repeating timesteps behaves as in diffusers. The update
coefficients for a (timestep, previous timestep[, η]) are computed once, on the host, with float32
CPU tensor arithmetic in diffusers' order, and cached; ``step`` then only does elementwise math.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

from symfast import schedules
from symfast.integrations.diffusers._base import (FusedUpdate, Scheduler, check_same_shape, inference_steps, randn)
from symfast.ops.fused_step import StepCoefficients

_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


class _DiscreteScheduler(Scheduler):
    """DDPM / DDIM shared parts: x0 from the model output, add_noise, get_velocity, the timestep table."""

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def _set_integer_timesteps(self, table: np.ndarray, device: Any) -> None:
        self._set_timesteps_table(torch.from_numpy(np.ascontiguousarray(table)), device)

    def _integer_timestep(self, timestep: Any) -> int:
        value = self._host_value(timestep)
        if isinstance(value, bool) or not float(value).is_integer():
            raise TypeError(f"timestep must be an integer training timestep, got {timestep!r}")
        value = int(value)
        if not 0 <= value < self.config.num_train_timesteps:
            raise ValueError(f"timestep must lie in [0, {self.config.num_train_timesteps}), got {value}")
        return value

    def _x0_eps(self, model_output: torch.Tensor, sample: torch.Tensor, sqrt_a: float,
                sqrt_b: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x0, ε) from the model output, diffusers' formulas (ε only where diffusers forms it)."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (sample - sqrt_b * model_output) / sqrt_a, model_output
        if kind == "sample":
            return model_output, (sample - sqrt_a * model_output) / sqrt_b
        return sqrt_a * sample - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """√ᾱ_t x0 + √(1-ᾱ_t) ε, with ``timesteps`` (B,) integer training timesteps."""
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = self._sqrt_alpha_sigma(original_samples, timesteps)
        return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """v = √ᾱ_t ε - √(1-ᾱ_t) x0, the v-prediction training target."""
        sqrt_alpha_prod, sqrt_one_minus_alpha_prod = self._sqrt_alpha_sigma(sample, timesteps)
        return sqrt_alpha_prod * noise - sqrt_one_minus_alpha_prod * sample

    def _alpha_prods(self, t: int, prev_t: int, final: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.alphas_cumprod[t], self.alphas_cumprod[prev_t] if prev_t >= 0 else final

    def _x0_form(self, sqrt_a: float, sqrt_b: float) -> tuple[float, float]:
        """(c_skip, c_out) with x0 = c_skip·x + c_out·(model output), :meth:`_x0_eps`'s x0."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return 1 / sqrt_a, -sqrt_b / sqrt_a
        if kind == "sample":
            return 0.0, 1.0
        return sqrt_a, -sqrt_b

    def _nonlinear(self) -> bool:
        return bool(self._option("clip_sample", False) or self._option("thresholding", False))


class DDPMScheduler(_DiscreteScheduler):
    """DDPM ancestral sampling (Ho et al. 2020), diffusers' ``DDPMScheduler``."""

    beta_schedules = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Any = None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        if variance_type == "fixed_large_log":
            raise ValueError("variance_type='fixed_large_log' is not supported: diffusers' DDPMScheduler.step "
                             "scales its noise by √(log β) < 0, so every sample becomes NaN; use 'fixed_large'")
        if variance_type not in _VARIANCE_TYPES and variance_type is not None:
            # diffusers treats any other value as 'fixed_small' (its own tests pass 'other'), and a
            # DPM-Solver config switched to DDPM carries None; warn rather than refuse a config diffusers loads
            warnings.warn(f"variance_type={variance_type!r} is not one of {_VARIANCE_TYPES}; it is treated as "
                          "'fixed_small', as diffusers does", stacklevel=2)
        self._train_schedule()
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.variance_type = variance_type
        self.custom_timesteps = False
        self.num_inference_steps: int | None = None
        self._set_integer_timesteps(np.arange(0, num_train_timesteps)[::-1].copy(), None)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None) -> None:
        """Inference timesteps (descending) from ``num_inference_steps`` and the config's spacing,
        or an explicit descending list ``timesteps``."""
        num_inference_steps = inference_steps(num_inference_steps)
        cfg = self.config
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass only one of num_inference_steps and timesteps")
        if timesteps is not None:
            timesteps = [int(t) for t in timesteps]
            if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
                raise ValueError(f"timesteps must be strictly descending, got {timesteps}")
            if not timesteps or timesteps[-1] < 0 or timesteps[0] >= cfg.num_train_timesteps:
                raise ValueError(f"timesteps must lie in [0, {cfg.num_train_timesteps}), got {timesteps}")
            self.custom_timesteps = True
            self.num_inference_steps = None
            table = np.array(timesteps, dtype=np.int64)
        else:
            if num_inference_steps is None:
                raise ValueError("pass num_inference_steps or timesteps")
            table = schedules.timesteps(cfg.num_train_timesteps, num_inference_steps, cfg.timestep_spacing,
                                        cfg.steps_offset, integer=True, diffusers_arange=True)
            self.custom_timesteps = False
            self.num_inference_steps = num_inference_steps
        self._set_integer_timesteps(table, device)

    def _previous_value(self, t: int) -> int:
        """diffusers' rule: the next entry of the schedule (first match of t), -1 after the last; t - 1
        before set_timesteps."""
        if not (self.custom_timesteps or self.num_inference_steps):
            return t - 1
        table = self._host_table()
        if t not in table:
            raise ValueError(f"timestep {t} is not in this schedule's timesteps {table}")
        i = table.index(t)
        return int(table[i + 1]) if i + 1 < len(table) else -1

    def previous_timestep(self, timestep: int | torch.Tensor) -> int | torch.Tensor:
        """The timestep after ``timestep``: a tensor once a schedule is set (diffusers' types), else t - 1."""
        if not (self.custom_timesteps or self.num_inference_steps):
            return timestep - 1
        t = self._integer_timestep(timestep)
        table = self._host_table()
        if t not in table:
            raise ValueError(f"timestep {t} is not in this schedule's timesteps {table}")
        i = table.index(t)
        return torch.tensor(-1) if i == len(table) - 1 else self.timesteps[i + 1]

    def _get_variance(self, t: int, predicted_variance: torch.Tensor | None = None,
                      variance_type: str | None = None) -> torch.Tensor:
        """diffusers' ``_get_variance``: the posterior variance at t in the form ``variance_type`` names."""
        t = self._integer_timestep(t)
        alpha_prod_t, alpha_prod_t_prev = self._alpha_prods(t, self._previous_value(t), self.one)
        current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
        variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
        variance_type = variance_type or self.config.variance_type
        if variance_type == "fixed_small_log":
            return torch.exp(0.5 * torch.log(variance))
        if variance_type == "fixed_large":
            return current_beta_t
        if variance_type == "fixed_large_log":
            return torch.log(current_beta_t)
        if variance_type == "learned":
            return predicted_variance
        if variance_type == "learned_range":
            frac = (predicted_variance + 1) / 2
            return frac * torch.log(current_beta_t) + (1 - frac) * torch.log(variance)
        return variance

    def _coefficients(self, t: int) -> dict[str, float]:
        """Host coefficients of the step from t, computed once per t in diffusers' float32 order."""
        prev_t = self._previous_value(t)
        key = (t, prev_t)
        if key in self._cache:
            return self._cache[key]
        alpha_prod_t, alpha_prod_t_prev = self._alpha_prods(t, prev_t, self.one)
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
        kind = self.variance_type
        if kind in ("learned", "learned_range"):
            noise_std = float("nan")  # depends on the model's predicted variance; formed in step
        elif kind == "fixed_small_log":
            noise_std = float(self._get_variance(t))
        else:
            noise_std = float(self._get_variance(t) ** 0.5)
        c = {
            "sqrt_a": float(alpha_prod_t ** 0.5),
            "sqrt_b": float(beta_prod_t ** 0.5),
            "c_x0": float(alpha_prod_t_prev ** 0.5 * current_beta_t / beta_prod_t),
            "c_sample": float(current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t),
            "noise_std": noise_std,
            "min_log": float(torch.log(variance)),
            "max_log": float(torch.log(current_beta_t)),
        }
        self._cache[key] = c
        return c

    def _fused_update(self, timestep: Any, sample: torch.Tensor, kwargs: dict[str, Any]) -> FusedUpdate | None:
        """x_prev = c_sample·x + c_x0·x̂0 + std·z (z drawn for t > 0)."""
        if self._nonlinear() or self.variance_type in ("learned", "learned_range") or set(kwargs) - {"generator"}:
            return None
        t = self._integer_timestep(timestep)
        c = self._coefficients(t)
        c_skip, c_out = self._x0_form(c["sqrt_a"], c["sqrt_b"])
        coefs = StepCoefficients(c_skip, c_out, c["c_sample"], c["c_x0"], 0.0, 0.0, c["noise_std"] if t > 0 else 0.0)

        def finish(prev: torch.Tensor, x0: torch.Tensor, return_dict: bool) -> DDPMSchedulerOutput | tuple:
            return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)
        return FusedUpdate(coefs, t > 0, finish)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> DDPMSchedulerOutput | tuple:
        """One ancestral step from ``timestep`` to the previous one. model_output, sample: (B, C, H, W)
        (model_output (B, 2C, H, W) for the learned variance types: ε then the variance)."""
        learned = self.variance_type in ("learned", "learned_range")
        check_same_shape(model_output, sample, 2 if learned else 1)
        t = self._integer_timestep(timestep)
        c = self._coefficients(t)
        predicted_variance = None
        if learned:
            if model_output.shape[1] != 2 * sample.shape[1]:
                raise ValueError(f"variance_type={self.variance_type!r} needs model_output with twice sample's "
                                 f"{sample.shape[1]} channels (prediction, then variance), got {model_output.shape[1]}")
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        pred_original_sample, _ = self._x0_eps(model_output, sample, c["sqrt_a"], c["sqrt_b"])
        pred_original_sample = self._clip_or_threshold(pred_original_sample)
        prev_sample = c["c_x0"] * pred_original_sample + c["c_sample"] * sample
        if t > 0:
            noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            if self.variance_type == "learned_range":
                frac = (predicted_variance + 1) / 2
                log_variance = frac * c["max_log"] + (1 - frac) * c["min_log"]
                prev_sample = prev_sample + torch.exp(0.5 * log_variance) * noise
            elif self.variance_type == "learned":
                prev_sample = prev_sample + predicted_variance ** 0.5 * noise
            else:
                prev_sample = prev_sample + c["noise_std"] * noise
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class DDIMScheduler(_DiscreteScheduler):
    """DDIM (Song et al. 2021) with η ≥ 0, diffusers' ``DDIMScheduler``."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Any = None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        self._train_schedule()
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self._set_integer_timesteps(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64), None)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``num_inference_steps`` descending integer timesteps with the config's spacing."""
        num_inference_steps = inference_steps(num_inference_steps)
        cfg = self.config
        table = schedules.timesteps(cfg.num_train_timesteps, num_inference_steps, cfg.timestep_spacing,
                                    cfg.steps_offset, integer=True, diffusers_arange=True)
        self.num_inference_steps = num_inference_steps
        self._set_integer_timesteps(table, device)

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        """diffusers' ``_get_variance``: (1-ᾱ_prev)/(1-ᾱ_t)·(1-ᾱ_t/ᾱ_prev), the η = 1 variance."""
        alpha_prod_t, alpha_prod_t_prev = self._alpha_prods(int(timestep), int(prev_timestep),
                                                            self.final_alpha_cumprod)
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        return (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)

    def _coefficients(self, t: int, eta: float) -> dict[str, float]:
        """Host coefficients of the step from t (to t - T/n, diffusers' rule) at η, computed once."""
        key = (t, self.num_inference_steps, eta)
        if key in self._cache:
            return self._cache[key]
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t, alpha_prod_t_prev = self._alpha_prods(t, prev_t, self.final_alpha_cumprod)
        std_dev_t = eta * self._get_variance(t, prev_t) ** 0.5
        c = {
            "sqrt_a": float(alpha_prod_t ** 0.5),
            "sqrt_b": float((1 - alpha_prod_t) ** 0.5),
            "sqrt_a_prev": float(alpha_prod_t_prev ** 0.5),
            "c_eps": float((1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5),
            "std": float(std_dev_t),
        }
        self._cache[key] = c
        return c

    def _fused_update(self, timestep: Any, sample: torch.Tensor, kwargs: dict[str, Any]) -> FusedUpdate | None:
        """x_prev = √ᾱ'·x̂0 + c_ε·ε̂ + std·z with ε̂ = (x − √ᾱ·x̂0)/√(1−ᾱ), i.e. a = c_ε/√(1−ᾱ),
        b = √ᾱ' − c_ε·√ᾱ/√(1−ᾱ) (the same ε̂ diffusers forms, for every prediction type, once x̂0
        is not clipped)."""
        if self._nonlinear() or set(kwargs) - {"eta", "use_clipped_model_output", "generator", "variance_noise"}:
            return None
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        eta = kwargs.get("eta", 0.0)
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if kwargs.get("variance_noise") is not None and kwargs.get("generator") is not None:
            raise ValueError("pass only one of generator and variance_noise")
        c = self._coefficients(self._integer_timestep(timestep), float(eta))
        sqrt_a, sqrt_b = c["sqrt_a"], c["sqrt_b"]
        c_skip, c_out = self._x0_form(sqrt_a, sqrt_b)
        a = c["c_eps"] / sqrt_b
        coefs = StepCoefficients(c_skip, c_out, a, c["sqrt_a_prev"] - a * sqrt_a, 0.0, 0.0,
                                 c["std"] if eta > 0 else 0.0)

        def finish(prev: torch.Tensor, x0: torch.Tensor, return_dict: bool) -> DDIMSchedulerOutput | tuple:
            return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0) if return_dict else (prev, x0)
        return FusedUpdate(coefs, eta > 0, finish)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True) -> DDIMSchedulerOutput | tuple:
        """One DDIM step from ``timestep`` to ``timestep - T/n``; η = 0 is deterministic, η = 1 is
        DDPM-like. model_output, sample: (B, C, H, W)."""
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        check_same_shape(model_output, sample)
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if variance_noise is not None and generator is not None:
            raise ValueError("pass only one of generator and variance_noise")
        c = self._coefficients(self._integer_timestep(timestep), float(eta))
        sqrt_a, sqrt_b = c["sqrt_a"], c["sqrt_b"]
        pred_original_sample, pred_epsilon = self._x0_eps(model_output, sample, sqrt_a, sqrt_b)
        pred_original_sample = self._clip_or_threshold(pred_original_sample)
        if use_clipped_model_output:
            pred_epsilon = (sample - sqrt_a * pred_original_sample) / sqrt_b
        prev_sample = c["sqrt_a_prev"] * pred_original_sample + c["c_eps"] * pred_epsilon
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + c["std"] * variance_noise
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
