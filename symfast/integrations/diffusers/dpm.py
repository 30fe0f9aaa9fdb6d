"""DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022): orders 1-3, ODE and SDE variants.

Like diffusers', the step index comes from the first ``timestep`` after ``set_timesteps`` (the last
step if it is not in the schedule) and then advances one per call. Every update coefficient is
computed once per schedule, on the host, in diffusers' float32 order.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from symfast import schedules
from symfast.integrations.diffusers._base import (Scheduler, broadcast, check_same_shape, inference_steps, randn)

_ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
# configs of DEIS / UniPC name these; diffusers' DPM-Solver maps them to its own (so a pipeline can
# switch schedulers by from_config), and so does this one
_ALGORITHM_ALIASES = {"deis": "dpmsolver++"}
_SOLVER_ALIASES = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}
_LEARNED = ("learned", "learned_range")
# a DDPM config switched to DPM-Solver carries one of these; like diffusers, they mean "not learned"
_FIXED_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha_t = 1 / (sigma ** 2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


def _coefficients(algo: str, order: int, midpoint: bool, a_t: torch.Tensor, s_t: torch.Tensor, a_s: torch.Tensor,
                  s_s: torch.Tensor, h: torch.Tensor) -> tuple[float, ...]:
    """x_t = c_sample·x_s + c_d0·D0 + c_d1·D1 + c_d2·D2 + c_noise·z, each coefficient computed in float32
    in diffusers' order (a - b·X is written a + (-b)·X, which rounds the same). Order 1 uses
    c_sample, c_d0, c_noise; order 2 adds c_d1 (the midpoint or Heun form); order 3 adds c_d2."""
    em, ep = torch.exp(-h), torch.exp(h)
    if algo == "dpmsolver++":
        c_sample, c_d0, c_noise = s_t / s_s, -(a_t * (em - 1.0)), torch.zeros(())
        if order == 2 and midpoint:
            c_d1 = -(0.5 * (a_t * (em - 1.0)))
        else:
            c_d1 = a_t * ((em - 1.0) / h + 1.0)
        c_d2 = -(a_t * ((em - 1.0 + h) / h ** 2 - 0.5))
    elif algo == "dpmsolver":
        c_sample, c_d0, c_noise = a_t / a_s, -(s_t * (ep - 1.0)), torch.zeros(())
        if order == 2 and midpoint:
            c_d1 = -(0.5 * (s_t * (ep - 1.0)))
        else:
            c_d1 = -(s_t * ((ep - 1.0) / h - 1.0))
        c_d2 = -(s_t * ((ep - 1.0 - h) / h ** 2 - 0.5))
    elif algo == "sde-dpmsolver++":
        e2 = torch.exp(-2.0 * h)
        c_sample, c_d0, c_noise = s_t / s_s * em, a_t * (1 - e2), s_t * torch.sqrt(1.0 - torch.exp(-2 * h))
        if order == 2 and midpoint:
            c_d1 = 0.5 * (a_t * (1 - e2))
        else:
            c_d1 = a_t * ((1.0 - e2) / (-2.0 * h) + 1.0)
        c_d2 = a_t * ((1.0 - e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
    else:  # sde-dpmsolver (orders 1 and 2 only, as in diffusers)
        c_sample, c_noise = a_t / a_s, s_t * torch.sqrt(torch.exp(2 * h) - 1.0)
        c_d0 = -(2.0 * (s_t * (ep - 1.0)))
        c_d1 = -(s_t * (ep - 1.0)) if midpoint else -(2.0 * (s_t * ((ep - 1.0) / h - 1.0)))
        c_d2 = torch.zeros(())
    return tuple(float(v) for v in (c_sample, c_d0, c_d1, c_d2, c_noise))


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022), diffusers' ``DPMSolverMultistepScheduler``."""

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Any = None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint", lower_order_final: bool = True,
                 euler_at_final: bool = False, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_lu_lambdas: bool = False, use_flow_sigmas: bool = False,
                 flow_shift: float = 1.0, final_sigmas_type: str = "zero", lambda_min_clipped: float = -float("inf"),
                 variance_type: str | None = None, timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential"):
        for name, value in (("use_flow_sigmas", use_flow_sigmas), ("use_dynamic_shifting", use_dynamic_shifting)):
            if value:
                raise ValueError(f"{name}=True (flow-matching sigmas) is not supported by symfast's "
                                 "DPMSolverMultistepScheduler; use diffusers' own")
        self._check_one_sigma_grid()
        if use_lu_lambdas and self._sigma_grid_kind() is not None:
            raise ValueError(f"use_lu_lambdas=True cannot be combined with use_{self._sigma_grid_kind()}_sigmas=True")
        if variance_type not in (None, *_LEARNED, *_FIXED_VARIANCES):
            raise ValueError(f"variance_type must be None, 'learned' or 'learned_range' (or one of DDPM's "
                             f"{_FIXED_VARIANCES}, which mean no learned variance), got {variance_type!r}")
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        if algorithm_type in _ALGORITHM_ALIASES:
            algorithm_type = _ALGORITHM_ALIASES[algorithm_type]
            self.register_to_config(algorithm_type=algorithm_type)
        if algorithm_type not in _ALGORITHMS:
            raise ValueError(f"algorithm_type must be one of {_ALGORITHMS}, got {algorithm_type!r}")
        if solver_order == 3 and algorithm_type == "sde-dpmsolver":
            raise ValueError("solver_order=3 is not defined for algorithm_type='sde-dpmsolver' (diffusers has no "
                             "third-order update for it); use solver_order <= 2 or 'sde-dpmsolver++'")
        if solver_type in _SOLVER_ALIASES:
            solver_type = _SOLVER_ALIASES[solver_type]
            self.register_to_config(solver_type=solver_type)
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and final_sigmas_type == "zero":
            raise ValueError(f"final_sigmas_type='zero' needs a dpmsolver++ algorithm_type, got {algorithm_type!r}; "
                             "use final_sigmas_type='sigma_min'")
        self._train_schedule()
        if rescale_betas_zero_snr:
            # diffusers' choice: the terminal ᾱ would be 0 (σ = ∞), so it is set to 2^-24
            self.alphas_cumprod[-1] = 2 ** (-24)
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self._set_timesteps_table(torch.from_numpy(
            np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()))
        self.model_outputs: list[torch.Tensor | None] = [None] * solver_order
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      mu: float | None = None, timesteps: list[int] | None = None) -> None:
        """Integer timesteps (spacing over the λ-clipped range) and their σ, or a Karras / exponential /
        beta / Lu-λ grid, then the final σ."""
        num_inference_steps = inference_steps(num_inference_steps)
        cfg = self.config
        if mu is not None:
            raise ValueError("mu (dynamic shifting) is not supported by symfast's DPMSolverMultistepScheduler")
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        kind = "lu" if cfg.use_lu_lambdas else self._sigma_grid_kind()
        if timesteps is not None and kind is not None:
            raise ValueError(f"timesteps cannot be combined with use_{kind}_{'lambdas' if kind == 'lu' else 'sigmas'}")
        if timesteps is not None:
            table = np.array(timesteps).astype(np.int64)
        else:
            if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
            clipped_idx = torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped)
            table = self._dpm_spacing(num_inference_steps, int(cfg.num_train_timesteps - clipped_idx))
        train_sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod).numpy()
        log_sigmas = np.log(train_sigmas)
        if kind is None:
            grid = np.interp(table, np.arange(0, len(train_sigmas)), train_sigmas)
        else:
            if kind == "lu":
                grid = np.exp(self._convert_to_lu(np.flip(log_sigmas.copy()), num_inference_steps))
            else:
                grid = self._convert_sigmas(kind, np.flip(train_sigmas).copy(), num_inference_steps)
            table = np.array([schedules.sigma_to_t(s, log_sigmas) for s in grid])
            # diffusers rounds these two grids' timesteps (except on the cosine schedule) and truncates
            # the exponential and beta grids' when casting to int64
            if kind in ("karras", "lu") and cfg.beta_schedule != "squaredcos_cap_v2":
                table = table.round()
        self.sigmas = torch.from_numpy(np.concatenate([grid, [self._final_sigma()]]).astype(np.float32))
        self._set_timesteps_table(torch.from_numpy(np.asarray(table)), device, torch.int64)
        self.num_inference_steps = len(table)
        self.model_outputs = [None] * cfg.solver_order
        self.lower_order_nums = 0

    @staticmethod
    def _convert_to_lu(in_lambdas: np.ndarray, num_inference_steps: int) -> np.ndarray:
        """diffusers' ``_convert_to_lu``: n values uniform between the ends of ``in_lambdas`` (ρ = 1)."""
        lambda_min, lambda_max = in_lambdas[-1].item(), in_lambdas[0].item()
        rho = 1.0
        ramp = np.linspace(0, 1, num_inference_steps)
        min_inv_rho, max_inv_rho = lambda_min ** (1 / rho), lambda_max ** (1 / rho)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho

    def _dpm_spacing(self, n: int, last_timestep: int) -> np.ndarray:
        """diffusers' DPM-Solver spacing: n+1 points with the last dropped (linspace, leading)."""
        cfg = self.config
        if cfg.timestep_spacing == "linspace":
            return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        if cfg.timestep_spacing == "leading":
            step_ratio = last_timestep // (n + 1)
            out = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
            return out + cfg.steps_offset
        step_ratio = cfg.num_train_timesteps / n
        return np.arange(last_timestep, 0, -step_ratio).round().copy().astype(np.int64) - 1

    def _timestep_not_in_schedule(self, value: float) -> int:
        return len(self._host_table()) - 1  # diffusers' choice: the last step

    def _sigma_to_alpha_sigma_t(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _alpha_sigma(sigma)

    def _tables(self) -> dict[str, list]:
        """Per step i: α and σ at σ_i, and the update coefficients from σ_i to σ_{i+1} for each order
        (with 1/r0, and for order 3 also 1/r1, r0/(r0+r1), 1/(r0+r1))."""
        if "coeffs" in self._cache:
            return self._cache["coeffs"]
        cfg = self.config
        algo, midpoint = cfg.algorithm_type, cfg.solver_type == "midpoint"
        alpha, sigma = _alpha_sigma(self.sigmas)
        lam = torch.stack([torch.log(a) - torch.log(s) for a, s in zip(alpha, sigma)])
        orders: list[list[tuple | None]] = [[], [], []]
        for i in range(len(self.sigmas) - 1):
            a_t, s_t, a_s, s_s = alpha[i + 1], sigma[i + 1], alpha[i], sigma[i]
            h = lam[i + 1] - lam[i]
            orders[0].append(_coefficients(algo, 1, midpoint, a_t, s_t, a_s, s_s, h))
            orders[1].append(None)
            orders[2].append(None)
            if i >= 1:
                r0 = (lam[i] - lam[i - 1]) / h
                orders[1][i] = (*_coefficients(algo, 2, midpoint, a_t, s_t, a_s, s_s, h), float(1.0 / r0))
                if i >= 2 and algo != "sde-dpmsolver":
                    r1 = (lam[i - 1] - lam[i - 2]) / h
                    orders[2][i] = (*_coefficients(algo, 3, midpoint, a_t, s_t, a_s, s_s, h), float(1.0 / r0),
                                    float(1.0 / r1), float(r0 / (r0 + r1)), float(1.0 / (r0 + r1)))
        tables = {"alpha": alpha.tolist(), "sigma": sigma.tolist(), "orders": orders}
        self._cache["coeffs"] = tables
        return tables

    def _update_inputs(self, order: int, args: tuple, sample: torch.Tensor | None,
                       noise: torch.Tensor | None) -> tuple[torch.Tensor, tuple]:
        """diffusers' update-method arguments: ``sample`` (or the deprecated third positional argument,
        after timestep and prev_timestep, which have no effect), and this step's coefficients."""
        if sample is None:
            if len(args) > 2:
                sample = args[2]
            else:
                raise ValueError("sample is required")
        if self._step_index is None:
            raise ValueError("the step index is not set: call step (or set_begin_index) first")
        coefficients = self._tables()["orders"][order - 1][self._step_index]
        if coefficients is None:
            raise ValueError(f"an order-{order} update needs {order - 1} earlier step(s); this is step "
                             f"{self._step_index}")
        if noise is None and self.config.algorithm_type.startswith("sde"):
            raise ValueError(f"noise is required for algorithm_type={self.config.algorithm_type!r}")
        return sample, coefficients

    @staticmethod
    def _with_noise(x_t: torch.Tensor, c_noise: float, noise: torch.Tensor | None) -> torch.Tensor:
        return x_t if noise is None else x_t + c_noise * noise

    def dpm_solver_first_order_update(self, model_output: torch.Tensor, *args: Any, sample: torch.Tensor | None = None,
                                      noise: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """DPM-Solver(++) order 1 (DDIM) from σ_i to σ_{i+1}, i the current step index."""
        sample, (c_sample, c_d0, _, _, c_noise) = self._update_inputs(1, args, sample, noise)
        return self._with_noise(c_sample * sample + c_d0 * model_output, c_noise, noise)

    def multistep_dpm_solver_second_order_update(self, model_output_list: list[torch.Tensor], *args: Any,
                                                 sample: torch.Tensor | None = None,
                                                 noise: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Order 2 from the last two converted model outputs."""
        sample, (c_sample, c_d0, c_d1, _, c_noise, inv_r0) = self._update_inputs(2, args, sample, noise)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        x_t = c_sample * sample + c_d0 * m0 + c_d1 * (inv_r0 * (m0 - m1))
        return self._with_noise(x_t, c_noise, noise)

    def multistep_dpm_solver_third_order_update(self, model_output_list: list[torch.Tensor], *args: Any,
                                                sample: torch.Tensor | None = None,
                                                noise: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Order 3 from the last three converted model outputs."""
        sample, coefficients = self._update_inputs(3, args, sample, noise)
        c_sample, c_d0, c_d1, c_d2, c_noise, inv_r0, inv_r1, w1, inv_r01 = coefficients
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        d1_0, d1_1 = inv_r0 * (m0 - m1), inv_r1 * (m1 - m2)
        d1 = d1_0 + w1 * (d1_0 - d1_1)
        d2 = inv_r01 * (d1_0 - d1_1)
        return self._with_noise(c_sample * sample + c_d0 * m0 + c_d1 * d1 + c_d2 * d2, c_noise, noise)

    def convert_model_output(self, model_output: torch.Tensor, *args: Any, sample: torch.Tensor | None = None,
                             **kwargs: Any) -> torch.Tensor:
        """The model output as x0 (dpmsolver++ variants) or ε (dpmsolver variants) at the current σ."""
        if sample is None:
            if len(args) > 1:
                sample = args[1]
            else:
                raise ValueError("sample is required")
        cfg = self.config
        c = self._tables()
        i = self._step_index
        alpha_t, sigma_t = c["alpha"][i], c["sigma"][i]
        kind = cfg.prediction_type
        if kind == "epsilon" and cfg.variance_type in _LEARNED:
            # the model's variance channels follow its ε channels; diffusers keeps the first 3,
            # which is the same wherever it works (3-channel samples)
            model_output = model_output[:, :sample.shape[1]]
        if cfg.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            if kind == "epsilon":
                x0_pred = (sample - sigma_t * model_output) / alpha_t
            elif kind == "sample":
                x0_pred = model_output
            else:
                x0_pred = alpha_t * sample - sigma_t * model_output
            return self._threshold_sample(x0_pred) if cfg.thresholding else x0_pred
        if kind == "epsilon":
            epsilon = model_output
        elif kind == "sample":
            epsilon = (sample - alpha_t * model_output) / sigma_t
        else:
            epsilon = alpha_t * model_output + sigma_t * sample
        if cfg.thresholding:
            x0_pred = self._threshold_sample((sample - sigma_t * epsilon) / alpha_t)
            epsilon = (sample - alpha_t * x0_pred) / sigma_t
        return epsilon

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """One multistep update from σ_i to σ_{i+1}. model_output, sample: (B, C, H, W)
        ((B, 2C, H, W) with a learned variance_type). Returns diffusers' ``SchedulerOutput``
        (``prev_sample`` only), or ``(prev_sample,)``."""
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        check_same_shape(model_output, sample, 2 if self.config.variance_type in _LEARNED else 1)
        i = self._counter_index(timestep)
        cfg = self.config
        n = len(self._host_table())
        lower_order_final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                            or cfg.final_sigmas_type == "zero")
        lower_order_second = i == n - 2 and cfg.lower_order_final and n < 15
        converted = self.convert_model_output(model_output, sample=sample)
        self.model_outputs = self.model_outputs[1:] + [converted]
        sample = sample.to(torch.float32)
        noise = None
        if cfg.algorithm_type.startswith("sde"):
            if variance_noise is None:
                noise = randn(converted.shape, generator, model_output.device, torch.float32)
            else:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self.dpm_solver_first_order_update(converted, sample=sample, noise=noise)
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev_sample = self.multistep_dpm_solver_second_order_update(self.model_outputs, sample=sample, noise=noise)
        else:
            prev_sample = self.multistep_dpm_solver_third_order_update(self.model_outputs, sample=sample, noise=noise)
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        # the converted output's dtype, as diffusers: x0 from an fp16 output (autocast) and fp32
        # latents is fp32, and casting to the raw output's dtype put the latents in fp16
        prev_sample = prev_sample.to(converted.dtype)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """α_t x0 + σ_t ε at the σ of each of ``timesteps`` (B,)."""
        sigma = broadcast([float(self.sigmas[i]) for i in self._timestep_indices(timesteps)], original_samples)
        alpha_t, sigma_t = _alpha_sigma(sigma)
        return alpha_t * original_samples + sigma_t * noise
