"""diffusers-compatible schedulers: same class names, config keys and method signatures.

Swap one in for diffusers' own (``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``)
and a pipeline produces the same images. Importing this module does not import diffusers.

How they differ inside: every per-step coefficient is computed once, on the host, when the schedule
is set (and once per distinct ``eta`` / churn setting), into lists of Python floats; ``step`` only
indexes those lists and does elementwise tensor math, so it never reads a device tensor. The
coefficients are computed with float32 CPU tensor arithmetic in the same order as diffusers (torch's
CPU ``sqrt``/``log``/``exp`` are not correctly rounded, so emulating them any other way would drift by
an ulp), and the elementwise updates keep diffusers' order of operations: given the same model outputs
and generator, results agree with diffusers to rounding.

The step index is taken from ``timestep`` on the first ``step``/``scale_model_input`` after
``set_timesteps`` (like diffusers' ``_init_step_index``) and then advanced by one per call; DDPM and
DDIM also look a plain Python/numpy ``timestep`` up directly, so out-of-order loops over integers
behave as in diffusers.

Not supported (raise ValueError): dynamic thresholding, learned variances, DPM-Solver order 3,
Lu lambdas, flow sigmas, beta sigmas, dynamic shifting.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from symfast import schedules

__all__ = [
    "SchedulerOutput",
    "DDPMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
]

_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclass
class SchedulerOutput:
    """Output of ``step``: ``prev_sample`` (B, C, H, W) and the model's estimate of x0."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    def to_tuple(self) -> tuple:
        return tuple(v for v in (self.prev_sample, self.pred_original_sample) if v is not None)

    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


class SchedulerConfig(dict):
    """Read-only config with attribute access, like diffusers' ``FrozenDict``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a scheduler config is read-only; build a new scheduler with from_config(config, key=value)")

    __setitem__ = __delitem__ = __setattr__ = update = pop = popitem = setdefault = clear = _readonly

    def __reduce__(self) -> tuple:
        return (SchedulerConfig, (dict(self),))


def _randn(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None,
           device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise drawn exactly as diffusers' ``randn_tensor``: a CPU generator draws on
    the CPU and the result moves to ``device``; a list gives one generator per sample."""
    rand_device = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if gen_type != device.type:
            if gen_type != "cpu":
                raise ValueError(f"generator is on {gen_type}, which cannot produce noise for {device}")
            rand_device = torch.device("cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"generator: a list of {len(generator)} generators for a batch of {shape[0]}")
        one = (1, *shape[1:])
        return torch.cat([torch.randn(one, generator=g, device=rand_device, dtype=dtype) for g in generator]).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


def _check_same_shape(model_output: torch.Tensor, sample: torch.Tensor) -> None:
    if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
        raise TypeError(f"model_output and sample must be tensors, got {type(model_output).__name__} and "
                        f"{type(sample).__name__}")
    if model_output.shape != sample.shape:
        raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample has shape "
                         f"{tuple(sample.shape)}; they must match")


def _as_number(timestep: Any) -> float:
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() != 1:
            raise ValueError(f"timestep must be a single value, got a tensor of shape {tuple(timestep.shape)}")
        return float(timestep.reshape(()).cpu())
    return float(timestep)


def _broadcast(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars as a (B, 1, 1, ...) tensor matching ``like``."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.ndim - 1)))


class _Scheduler:
    """Config handling, step-index bookkeeping and host tables shared by all drop-ins."""

    order = 1
    # diffusers pipelines look these up on the scheduler class
    _compatibles: list[str] = []

    def _register_config(self, frame_locals: dict[str, Any]) -> None:
        params = inspect.signature(type(self).__init__).parameters
        values = {k: frame_locals[k] for k in self._config_keys()}
        if values.get("trained_betas") is not None:
            values["trained_betas"] = [float(b) for b in values["trained_betas"]]
        # diffusers' marker for "left at this class's default": another scheduler built from this
        # config uses its own default for these keys instead (e.g. DDPM's 'leading' vs Euler's 'linspace')
        defaults = [k for k, v in values.items() if v is params[k].default or v == params[k].default]
        object.__setattr__(self, "_config", SchedulerConfig(_class_name=type(self).__name__,
                                                            _use_default_values=defaults, **values))

    @property
    def config(self) -> SchedulerConfig:
        return self._config

    @classmethod
    def _config_keys(cls) -> list[str]:
        params = inspect.signature(cls.__init__).parameters
        return [name for name in params if name != "self"]

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False,
                    **kwargs: Any):
        """Build from a diffusers config (``pipe.scheduler.config``, a FrozenDict or a dict).

        Keys this scheduler does not know (another scheduler's, ``_class_name``, ...) are ignored, as
        diffusers does; ``kwargs`` override the config.
        """
        if config is None:
            config = {}
        if hasattr(config, "config") and not isinstance(config, Mapping):
            config = config.config
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping (a diffusers config or dict), got {type(config).__name__}")
        keys = cls._config_keys()
        skip = set(config.get("_use_default_values", ())) if config.get("_class_name") != cls.__name__ else set()
        init = {k: v for k, v in config.items() if k in keys and k not in skip}
        unused = {}
        for k, v in kwargs.items():
            if k in keys:
                init[k] = v
            else:
                unused[k] = v
        scheduler = cls(**init)
        return (scheduler, unused) if return_unused_kwargs else scheduler

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ---- schedule tables -------------------------------------------------------------------

    def _train_schedule(self) -> None:
        cfg = self.config
        if cfg.prediction_type not in self._prediction_types():
            raise ValueError(f"prediction_type must be one of {self._prediction_types()}, got {cfg.prediction_type!r}")
        if cfg.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2") and cfg.trained_betas is None:
            raise ValueError(f"beta_schedule must be 'linear', 'scaled_linear' or 'squaredcos_cap_v2', "
                             f"got {cfg.beta_schedule!r}")
        if cfg.timestep_spacing not in schedules.SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {schedules.SPACINGS}, got {cfg.timestep_spacing!r}")
        if cfg.get("thresholding", False):
            raise ValueError("thresholding=True (dynamic thresholding) is not supported by symfast's drop-ins")
        self.betas = schedules.betas(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end,
                                     cfg.trained_betas, cfg.get("rescale_betas_zero_snr", False))
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = schedules.alphas_cumprod(self.betas)

    def _prediction_types(self) -> tuple[str, ...]:
        return _PREDICTION_TYPES

    def _reset_index(self) -> None:
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._cache: dict[Any, Any] = {}

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: Any, schedule_timesteps: Any = None) -> int:
        """Position of ``timestep`` in the schedule (the second one if it occurs twice, as diffusers)."""
        value = _as_number(timestep)
        table = self._host_timesteps if schedule_timesteps is None else [float(t) for t in schedule_timesteps]
        hits = [i for i, t in enumerate(table) if t == value]
        if not hits:
            raise ValueError(f"timestep {value} is not in this schedule's timesteps")
        return hits[1] if len(hits) > 1 else hits[0]

    def _init_step_index(self, timestep: Any) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def _current_index(self, timestep: Any, by_value: bool = False) -> int:
        if by_value and isinstance(timestep, (int, float, np.integer, np.floating)):
            self._step_index = self.index_for_timestep(timestep)
        elif self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= self._num_steps():
            raise ValueError(f"step called {self._step_index + 1} times but the schedule has only "
                             f"{self._num_steps()} steps; call set_timesteps again")
        return self._step_index

    def _num_steps(self) -> int:
        return len(self._host_timesteps)

    def _timestep_indices(self, timesteps: torch.Tensor) -> list[int]:
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps.reshape(-1).tolist()]
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * timesteps.reshape(-1).shape[0]


def _clip(x0: torch.Tensor, config: SchedulerConfig) -> torch.Tensor:
    if config.get("clip_sample", False):
        return x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    return x0


class _DiscreteScheduler(_Scheduler):
    """DDPM / DDIM: variance-preserving updates indexed by integer timesteps."""

    init_noise_sigma = 1.0

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def _x0(self, model_output: torch.Tensor, sample: torch.Tensor, sqrt_a: float, sqrt_b: float) -> torch.Tensor:
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (sample - sqrt_b * model_output) / sqrt_a
        if kind == "sample":
            return model_output
        return sqrt_a * sample - sqrt_b * model_output

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """√ᾱ_t x0 + √(1-ᾱ_t) ε, with ``timesteps`` (B,) integer training timesteps."""
        ac = self.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
        timesteps = timesteps.to(original_samples.device)
        shape = (-1, *([1] * (original_samples.ndim - 1)))
        sqrt_alpha_prod = (ac[timesteps] ** 0.5).flatten().reshape(shape)
        sqrt_one_minus_alpha_prod = ((1 - ac[timesteps]) ** 0.5).flatten().reshape(shape)
        return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """v = √ᾱ_t ε - √(1-ᾱ_t) x0, the v-prediction training target."""
        ac = self.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
        timesteps = timesteps.to(sample.device)
        shape = (-1, *([1] * (sample.ndim - 1)))
        sqrt_alpha_prod = (ac[timesteps] ** 0.5).flatten().reshape(shape)
        sqrt_one_minus_alpha_prod = ((1 - ac[timesteps]) ** 0.5).flatten().reshape(shape)
        return sqrt_alpha_prod * noise - sqrt_one_minus_alpha_prod * sample

    def _set_host_timesteps(self, timesteps: np.ndarray, device: Any) -> None:
        self.timesteps = torch.from_numpy(np.ascontiguousarray(timesteps)).to(device)
        self._host_timesteps = [float(t) for t in timesteps]
        self._reset_index()


class DDPMScheduler(_DiscreteScheduler):
    """DDPM ancestral sampling (Ho et al. 2020), diffusers' ``DDPMScheduler``."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Any = None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        self._register_config(locals())
        if variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
            raise ValueError(f"variance_type must be 'fixed_small', 'fixed_small_log' or 'fixed_large', "
                             f"got {variance_type!r}")
        self._train_schedule()
        self.one = torch.tensor(1.0)
        self.variance_type = variance_type
        self.custom_timesteps = False
        self.num_inference_steps: int | None = None
        self._set_host_timesteps(np.arange(0, num_train_timesteps)[::-1].copy(), None)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None) -> None:
        """Inference timesteps (descending) from ``num_inference_steps`` and the config's spacing,
        or an explicit descending list ``timesteps``."""
        cfg = self.config
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass only one of num_inference_steps and timesteps")
        if timesteps is not None:
            timesteps = [int(t) for t in timesteps]
            if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
                raise ValueError(f"timesteps must be strictly descending, got {timesteps}")
            if not 0 <= timesteps[-1] or timesteps[0] >= cfg.num_train_timesteps:
                raise ValueError(f"timesteps must lie in [0, {cfg.num_train_timesteps}), got {timesteps}")
            self.custom_timesteps = True
            self.num_inference_steps = None
            table = np.array(timesteps, dtype=np.int64)
        else:
            if num_inference_steps is None:
                raise ValueError("pass num_inference_steps or timesteps")
            table = schedules.timesteps(cfg.num_train_timesteps, num_inference_steps, cfg.timestep_spacing,
                                        cfg.steps_offset, integer=True)
            self.custom_timesteps = False
            self.num_inference_steps = num_inference_steps
        self._set_host_timesteps(table, device)

    def _tables(self) -> dict[str, list[float]]:
        if "coeffs" in self._cache:
            return self._cache["coeffs"]
        t = torch.tensor([int(v) for v in self._host_timesteps])
        prev = torch.cat([t[1:], torch.tensor([-1])])
        ac = self.alphas_cumprod
        alpha_prod_t = ac[t]
        alpha_prod_t_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], self.one)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
        if self.variance_type == "fixed_small":
            noise_std = variance ** 0.5
        elif self.variance_type == "fixed_small_log":
            noise_std = torch.stack([torch.exp(0.5 * torch.log(v)) for v in variance])
        else:
            noise_std = current_beta_t ** 0.5
        tables = {
            "t": t.tolist(),
            "sqrt_a": (alpha_prod_t ** 0.5).tolist(),
            "sqrt_b": (beta_prod_t ** 0.5).tolist(),
            "c_x0": (alpha_prod_t_prev ** 0.5 * current_beta_t / beta_prod_t).tolist(),
            "c_sample": (current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t).tolist(),
            "noise_std": noise_std.tolist(),
        }
        self._cache["coeffs"] = tables
        return tables

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> SchedulerOutput | tuple:
        """One ancestral step from ``timestep`` to the previous one. model_output, sample: (B, C, H, W)."""
        _check_same_shape(model_output, sample)
        i = self._current_index(timestep, by_value=True)
        c = self._tables()
        pred_original_sample = _clip(self._x0(model_output, sample, c["sqrt_a"][i], c["sqrt_b"][i]), self.config)
        prev_sample = c["c_x0"][i] * pred_original_sample + c["c_sample"][i] * sample
        if c["t"][i] > 0:
            noise = _randn(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + c["noise_std"][i] * noise
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        i = self.index_for_timestep(timestep)
        return int(self._host_timesteps[i + 1]) if i + 1 < len(self._host_timesteps) else -1


class DDIMScheduler(_DiscreteScheduler):
    """DDIM (Song et al. 2021) with η ≥ 0, diffusers' ``DDIMScheduler``."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Any = None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        self._register_config(locals())
        self._train_schedule()
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.num_inference_steps: int | None = None
        self._set_host_timesteps(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64), None)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``num_inference_steps`` descending integer timesteps with the config's spacing."""
        cfg = self.config
        table = schedules.timesteps(cfg.num_train_timesteps, num_inference_steps, cfg.timestep_spacing,
                                    cfg.steps_offset, integer=True)
        self.num_inference_steps = num_inference_steps
        self._set_host_timesteps(table, device)

    def _tables(self, eta: float) -> dict[str, list[float]]:
        key = ("coeffs", eta)
        if key in self._cache:
            return self._cache[key]
        t = torch.tensor([int(v) for v in self._host_timesteps])
        prev = t - self.config.num_train_timesteps // self.num_inference_steps
        ac = self.alphas_cumprod
        alpha_prod_t = ac[t]
        alpha_prod_t_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], self.final_alpha_cumprod)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        variance = beta_prod_t_prev / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = eta * variance ** 0.5
        tables = {
            "sqrt_a": (alpha_prod_t ** 0.5).tolist(),
            "sqrt_b": (beta_prod_t ** 0.5).tolist(),
            "sqrt_a_prev": (alpha_prod_t_prev ** 0.5).tolist(),
            "c_eps": ((1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5).tolist(),
            "std": std_dev_t.tolist(),
        }
        self._cache[key] = tables
        return tables

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True) -> SchedulerOutput | tuple:
        """One DDIM step; η = 0 is deterministic, η = 1 is DDPM-like. model_output, sample: (B, C, H, W)."""
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        _check_same_shape(model_output, sample)
        if not eta >= 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if variance_noise is not None and generator is not None:
            raise ValueError("pass only one of generator and variance_noise")
        i = self._current_index(timestep, by_value=True)
        c = self._tables(float(eta))
        sqrt_a, sqrt_b = c["sqrt_a"][i], c["sqrt_b"][i]
        kind = self.config.prediction_type
        pred_original_sample = self._x0(model_output, sample, sqrt_a, sqrt_b)
        if kind == "epsilon":
            pred_epsilon = model_output
        elif kind == "sample":
            pred_epsilon = (sample - sqrt_a * pred_original_sample) / sqrt_b
        else:
            pred_epsilon = sqrt_a * model_output + sqrt_b * sample
        pred_original_sample = _clip(pred_original_sample, self.config)
        if use_clipped_model_output:
            pred_epsilon = (sample - sqrt_a * pred_original_sample) / sqrt_b
        prev_sample = c["sqrt_a_prev"][i] * pred_original_sample + c["c_eps"][i] * pred_epsilon
        if eta > 0:
            if variance_noise is None:
                variance_noise = _randn(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + c["std"][i] * variance_noise
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class _SigmaScheduler(_Scheduler):
    """The Euler / Heun family: the state is x = x0 + σ ε and the model sees x / √(σ² + 1)."""

    def _train_sigmas(self) -> np.ndarray:
        if self.config.get("rescale_betas_zero_snr", False):
            # diffusers' choice: the terminal ᾱ would be 0 (σ = ∞), so it is set to 2^-24
            self.alphas_cumprod[-1] = 2 ** (-24)
        return schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod).numpy()

    def _set_sigmas(self, sigmas: np.ndarray, timesteps: np.ndarray | torch.Tensor, device: Any) -> None:
        self.sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.from_numpy(np.asarray(timesteps).astype(np.float32))
        self.timesteps = timesteps.to(device=device, dtype=torch.float32)
        self._host_timesteps = self.timesteps.cpu().tolist()
        self._host_sigmas = self.sigmas.tolist()
        self._input_scale = ((self.sigmas ** 2 + 1) ** 0.5).tolist()
        self._reset_index()

    def _spaced_timesteps(self, num_inference_steps: int, num_train_timesteps: int | None = None) -> np.ndarray:
        cfg = self.config
        return schedules.timesteps(num_train_timesteps or cfg.num_train_timesteps, num_inference_steps,
                                   cfg.timestep_spacing, cfg.steps_offset, integer=False)

    def _sigma_range(self, in_sigmas: np.ndarray) -> tuple[float, float]:
        sigma_min, sigma_max = self.config.get("sigma_min"), self.config.get("sigma_max")
        return (float(in_sigmas[-1]) if sigma_min is None else sigma_min,
                float(in_sigmas[0]) if sigma_max is None else sigma_max)

    def _karras(self, in_sigmas: np.ndarray, num_inference_steps: int) -> np.ndarray:
        return schedules.karras_sigmas(num_inference_steps, *self._sigma_range(in_sigmas))

    def _exponential(self, in_sigmas: np.ndarray, num_inference_steps: int) -> np.ndarray:
        return schedules.ve_sigmas(num_inference_steps, *self._sigma_range(in_sigmas))

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise: σ_max, or √(σ_max² + 1) for leading spacing."""
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return float(max_sigma)
        return float((max_sigma ** 2 + 1) ** 0.5)

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """x / √(σ² + 1): the variance-preserving input the network was trained on."""
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        return sample / self._input_scale[self._step_index]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x0 + σ ε at the σ of each of ``timesteps`` (B,), which must be in ``self.timesteps``."""
        sigma = _broadcast([self._host_sigmas[i] for i in self._timestep_indices(timesteps)], original_samples)
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

    def _v_coefficients(self, sigmas: torch.Tensor) -> tuple[list[float], list[float]]:
        return (-sigmas / (sigmas ** 2 + 1) ** 0.5).tolist(), (sigmas ** 2 + 1).tolist()


class EulerDiscreteScheduler(_SigmaScheduler):
    """Euler steps on the probability-flow ODE in σ (Karras et al. 2022, Alg. 2), with optional churn."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Any = None, prediction_type: str = "epsilon",
                 interpolation_type: str = "linear", use_karras_sigmas: bool | None = False,
                 use_exponential_sigmas: bool | None = False, use_beta_sigmas: bool | None = False,
                 sigma_min: float | None = None, sigma_max: float | None = None, timestep_spacing: str = "linspace",
                 timestep_type: str = "discrete", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 final_sigmas_type: str = "zero"):
        self._register_config(locals())
        if use_beta_sigmas:
            raise ValueError("use_beta_sigmas=True is not supported by symfast's drop-ins")
        if use_karras_sigmas and use_exponential_sigmas:
            raise ValueError("use only one of use_karras_sigmas and use_exponential_sigmas")
        if interpolation_type not in ("linear", "log_linear"):
            raise ValueError(f"interpolation_type must be 'linear' or 'log_linear', got {interpolation_type!r}")
        if timestep_type not in ("discrete", "continuous"):
            raise ValueError(f"timestep_type must be 'discrete' or 'continuous', got {timestep_type!r}")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        self._train_schedule()
        train_sigmas = self._train_sigmas()
        self.use_karras_sigmas = use_karras_sigmas
        self.num_inference_steps: int | None = None
        self.is_scale_input_called = False
        sigmas = np.concatenate([train_sigmas[::-1], [0.0]])
        self._set_sigmas(sigmas, self._continuous_or(np.arange(num_train_timesteps)[::-1].astype(np.float32),
                                                     torch.from_numpy(sigmas.astype(np.float32))), None)

    def _continuous_or(self, timesteps: np.ndarray, sigmas: torch.Tensor) -> np.ndarray | torch.Tensor:
        if self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction":
            return torch.stack([0.25 * s.log() for s in sigmas[:-1]])
        return timesteps

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[float] | None = None, sigmas: list[float] | None = None) -> None:
        """σ grid for ``num_inference_steps`` (spacing, interpolation, Karras/exponential per config), or
        from explicit descending ``timesteps`` or ``sigmas`` (the latter including the final σ)."""
        cfg = self.config
        if sum(v is not None for v in (num_inference_steps, timesteps, sigmas)) != 1:
            raise ValueError("pass exactly one of num_inference_steps, timesteps and sigmas")
        if timesteps is not None and (cfg.use_karras_sigmas or cfg.use_exponential_sigmas):
            raise ValueError("timesteps cannot be combined with use_karras_sigmas/use_exponential_sigmas")
        train_sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod).numpy()
        log_sigmas = np.log(train_sigmas)
        if sigmas is not None:
            grid = np.array(sigmas).astype(np.float32)
            table = np.array([schedules.sigma_to_t(s, log_sigmas) for s in grid[:-1]])
            self.num_inference_steps = len(grid) - 1
        else:
            if timesteps is not None:
                table = np.array(timesteps).astype(np.float32)
                num_inference_steps = len(table)
            else:
                table = self._spaced_timesteps(num_inference_steps)
            self.num_inference_steps = num_inference_steps
            if cfg.interpolation_type == "linear":
                grid = np.interp(table, np.arange(0, len(train_sigmas)), train_sigmas)
            else:
                grid = torch.linspace(np.log(train_sigmas[-1]), np.log(train_sigmas[0]),
                                      num_inference_steps + 1).exp().numpy()
            if cfg.use_karras_sigmas or cfg.use_exponential_sigmas:
                convert = self._karras if cfg.use_karras_sigmas else self._exponential
                grid = convert(grid, num_inference_steps)
                table = np.array([schedules.sigma_to_t(s, log_sigmas) for s in grid])
            if cfg.final_sigmas_type == "sigma_min":
                last = float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
            else:
                last = 0.0
            grid = np.concatenate([grid, [last]]).astype(np.float32)
        self._set_sigmas(grid, self._continuous_or(np.asarray(table).astype(np.float32), torch.from_numpy(grid)),
                         device)

    def _tables(self, s_churn: float, s_tmin: float, s_tmax: float) -> dict[str, list[float]]:
        key = ("coeffs", s_churn, s_tmin, s_tmax)
        if key in self._cache:
            return self._cache[key]
        sigmas = self.sigmas
        n = len(sigmas) - 1
        gammas = [min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= s <= s_tmax else 0.0
                  for s in self._host_sigmas[:n]]
        sigma = sigmas[:n]
        sigma_hat = torch.stack([sigma[i] * (g + 1) for i, g in enumerate(gammas)])
        c_out, c_in2 = self._v_coefficients(sigma)
        tables = {
            "gamma": gammas,
            "sigma_hat": sigma_hat.tolist(),
            "churn_std": ((sigma_hat ** 2 - sigma ** 2) ** 0.5).tolist(),
            "dt": (sigmas[1:] - sigma_hat).tolist(),
            "c_out": c_out,
            "c_in2": c_in2,
        }
        self._cache[key] = tables
        return tables

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: torch.Generator | None = None, return_dict: bool = True) -> SchedulerOutput | tuple:
        """One Euler step from σ_i to σ_{i+1}. model_output, sample: (B, C, H, W)."""
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError("timestep must be one of scheduler.timesteps, not an integer index")
        _check_same_shape(model_output, sample)
        i = self._current_index(timestep)
        c = self._tables(float(s_churn), float(s_tmin), float(s_tmax))
        sample = sample.to(torch.float32)
        sigma_hat = c["sigma_hat"][i]
        if c["gamma"][i] > 0:
            noise = _randn(model_output.shape, generator, model_output.device, model_output.dtype)
            sample = sample + noise * s_noise * c["churn_std"][i]
        pred_original_sample = self._x0_sigma(model_output, sample, sigma_hat, c["c_out"][i], c["c_in2"][i])
        derivative = (sample - pred_original_sample) / sigma_hat
        prev_sample = (sample + derivative * c["dt"][i]).to(model_output.dtype)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class EulerAncestralDiscreteScheduler(_SigmaScheduler):
    """Euler ancestral: an Euler step down to σ_down, then fresh noise of size σ_up."""

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Any = None, prediction_type: str = "epsilon",
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        self._register_config(locals())
        self._train_schedule()
        train_sigmas = self._train_sigmas()
        self.num_inference_steps: int | None = None
        self.is_scale_input_called = False
        self._set_sigmas(np.concatenate([train_sigmas[::-1], [0.0]]),
                         np.arange(num_train_timesteps)[::-1].astype(np.float32), None)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """σ at ``num_inference_steps`` spaced timesteps (linear interpolation), then 0."""
        table = self._spaced_timesteps(num_inference_steps)
        train_sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod).numpy()
        grid = np.interp(table, np.arange(0, len(train_sigmas)), train_sigmas)
        self.num_inference_steps = num_inference_steps
        self._set_sigmas(np.concatenate([grid, [0.0]]).astype(np.float32), table, device)

    def _tables(self) -> dict[str, list[float]]:
        if "coeffs" in self._cache:
            return self._cache["coeffs"]
        sigma_from, sigma_to = self.sigmas[:-1], self.sigmas[1:]
        sigma_up = (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
        sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
        c_out, c_in2 = self._v_coefficients(sigma_from)
        tables = {"sigma_up": sigma_up.tolist(), "dt": (sigma_down - sigma_from).tolist(), "c_out": c_out,
                  "c_in2": c_in2}
        self._cache["coeffs"] = tables
        return tables

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> SchedulerOutput | tuple:
        """One ancestral step from σ_i to σ_{i+1}. model_output, sample: (B, C, H, W).

        ``prediction_type='sample'`` (x0) is supported here although diffusers' version raises for it.
        """
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError("timestep must be one of scheduler.timesteps, not an integer index")
        _check_same_shape(model_output, sample)
        i = self._current_index(timestep)
        c = self._tables()
        sigma = self._host_sigmas[i]
        sample = sample.to(torch.float32)
        pred_original_sample = self._x0_sigma(model_output, sample, sigma, c["c_out"][i], c["c_in2"][i])
        derivative = (sample - pred_original_sample) / sigma
        prev_sample = sample + derivative * c["dt"][i]
        noise = _randn(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = (prev_sample + noise * c["sigma_up"][i]).to(model_output.dtype)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class HeunDiscreteScheduler(_SigmaScheduler):
    """Heun's second-order method in σ (Karras et al. 2022): two model calls per σ interval."""

    order = 2

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "linear", trained_betas: Any = None, prediction_type: str = "epsilon",
                 use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, clip_sample: bool = False, clip_sample_range: float = 1.0,
                 timestep_spacing: str = "linspace", steps_offset: int = 0):
        self._register_config(locals())
        if use_exponential_sigmas or use_beta_sigmas:
            raise ValueError("use_exponential_sigmas / use_beta_sigmas are not supported by symfast's Heun drop-in")
        self._train_schedule()
        self.use_karras_sigmas = use_karras_sigmas
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      num_train_timesteps: int | None = None, timesteps: list[float] | None = None) -> None:
        """σ grid with every interior σ repeated (one entry per model call), then 0."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        if timesteps is not None and self.config.use_karras_sigmas:
            raise ValueError("timesteps cannot be combined with use_karras_sigmas")
        if timesteps is not None:
            table = np.array(timesteps, dtype=np.float32)
            num_inference_steps = len(table)
        else:
            table = self._spaced_timesteps(num_inference_steps, num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        train_sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod).numpy()
        log_sigmas = np.log(train_sigmas)
        grid = np.interp(table, np.arange(0, len(train_sigmas)), train_sigmas)
        if self.config.use_karras_sigmas:
            grid = self._karras(grid, num_inference_steps)
            table = np.array([schedules.sigma_to_t(s, log_sigmas) for s in grid])
        grid = torch.from_numpy(np.concatenate([grid, [0.0]]).astype(np.float32))
        doubled = torch.cat([grid[:1], grid[1:-1].repeat_interleave(2), grid[-1:]])
        table = torch.from_numpy(np.asarray(table))
        self._set_sigmas(doubled.numpy(), torch.cat([table[:1], table[1:].repeat_interleave(2)]), device)
        self.prev_derivative: torch.Tensor | None = None
        self.dt: float | None = None
        self.sample: torch.Tensor | None = None

    @property
    def state_in_first_order(self) -> bool:
        return self.dt is None

    def _tables(self) -> dict[str, list[float]]:
        if "coeffs" in self._cache:
            return self._cache["coeffs"]
        sigmas = self.sigmas
        c_out, c_in2 = self._v_coefficients(sigmas)
        tables = {"dt": (sigmas[1:] - sigmas[:-1]).tolist(), "c_out": c_out, "c_in2": c_in2}
        self._cache["coeffs"] = tables
        return tables

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """First call: Euler predictor from σ_i to σ_{i+1}; second call: the trapezoidal corrector.
        model_output, sample: (B, C, H, W)."""
        _check_same_shape(model_output, sample)
        i = self._current_index(timestep)
        c = self._tables()
        first = self.state_in_first_order
        # the σ the model was just evaluated at: the interval's start on the first call, its end on
        # the second; the doubled σ table puts both at index i
        sigma_input = self._host_sigmas[i]
        pred_original_sample = self._x0_sigma(model_output, sample, sigma_input, c["c_out"][i], c["c_in2"][i])
        pred_original_sample = _clip(pred_original_sample, self.config)
        if first:
            derivative = (sample - pred_original_sample) / sigma_input
            self.prev_derivative, self.dt, self.sample = derivative, c["dt"][i], sample
            prev_sample = sample + derivative * self.dt
        else:
            derivative = (sample - pred_original_sample) / sigma_input
            derivative = (self.prev_derivative + derivative) / 2
            prev_sample = self.sample + derivative * self.dt
            self.prev_derivative, self.dt, self.sample = None, None, None
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


_DPM_ALGORITHMS = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")


class DPMSolverMultistepScheduler(_Scheduler):
    """DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022), orders 1 and 2, ODE and SDE variants."""

    init_noise_sigma = 1.0

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
        self._register_config(locals())
        unsupported = {"use_exponential_sigmas": use_exponential_sigmas, "use_beta_sigmas": use_beta_sigmas,
                       "use_lu_lambdas": use_lu_lambdas, "use_flow_sigmas": use_flow_sigmas,
                       "use_dynamic_shifting": use_dynamic_shifting}
        for name, value in unsupported.items():
            if value:
                raise ValueError(f"{name}=True is not supported by symfast's DPMSolverMultistepScheduler")
        if variance_type is not None:
            raise ValueError(f"variance_type={variance_type!r} (learned variances) is not supported")
        if solver_order not in (1, 2):
            raise ValueError(f"solver_order must be 1 or 2, got {solver_order!r}")
        if algorithm_type not in _DPM_ALGORITHMS:
            raise ValueError(f"algorithm_type must be one of {_DPM_ALGORITHMS}, got {algorithm_type!r}")
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and final_sigmas_type == "zero":
            raise ValueError(f"final_sigmas_type='zero' needs a dpmsolver++ algorithm_type, got {algorithm_type!r}; "
                             "use final_sigmas_type='sigma_min'")
        self._train_schedule()
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2 ** (-24)
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps,
                                                      dtype=np.float32)[::-1].copy())
        self._host_timesteps = self.timesteps.tolist()
        self.model_outputs: list[torch.Tensor | None] = [None] * solver_order
        self.lower_order_nums = 0
        self._reset_index()

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      mu: float | None = None, timesteps: list[int] | None = None) -> None:
        """Integer timesteps (spacing over the λ-clipped range) and their σ, or Karras σ, then the final σ."""
        cfg = self.config
        if mu is not None:
            raise ValueError("mu (dynamic shifting) is not supported")
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        if timesteps is not None and cfg.use_karras_sigmas:
            raise ValueError("timesteps cannot be combined with use_karras_sigmas")
        if timesteps is not None:
            table = np.array(timesteps).astype(np.int64)
        else:
            if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
            clipped_idx = torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped)
            last_timestep = int(cfg.num_train_timesteps - clipped_idx)
            table = self._dpm_spacing(num_inference_steps, last_timestep)
        train_sigmas = schedules.sigmas_from_alphas_cumprod(self.alphas_cumprod).numpy()
        log_sigmas = np.log(train_sigmas)
        if cfg.use_karras_sigmas:
            flipped = np.flip(train_sigmas).copy()
            sigma_min = flipped[-1].item()
            sigma_max = flipped[0].item()
            grid = schedules.karras_sigmas(num_inference_steps, sigma_min, sigma_max)
            table = np.array([schedules.sigma_to_t(s, log_sigmas) for s in grid])
            if cfg.beta_schedule != "squaredcos_cap_v2":
                table = table.round()
        else:
            grid = np.interp(table, np.arange(0, len(train_sigmas)), train_sigmas)
        if cfg.final_sigmas_type == "sigma_min":
            last = float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
        else:
            last = 0.0
        self.sigmas = torch.from_numpy(np.concatenate([grid, [last]]).astype(np.float32))
        self.timesteps = torch.from_numpy(np.asarray(table)).to(device=device, dtype=torch.int64)
        self._host_timesteps = [float(t) for t in self.timesteps.cpu().tolist()]
        self.num_inference_steps = len(table)
        self.model_outputs = [None] * cfg.solver_order
        self.lower_order_nums = 0
        self._reset_index()

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

    def index_for_timestep(self, timestep: Any, schedule_timesteps: Any = None) -> int:
        try:
            return super().index_for_timestep(timestep, schedule_timesteps)
        except ValueError:
            # diffusers' choice for a timestep outside the schedule: the last step
            return len(self._host_timesteps) - 1

    def _alpha_sigma(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_t = 1 / (sigma ** 2 + 1) ** 0.5
        return alpha_t, sigma * alpha_t

    def _tables(self) -> dict[str, list]:
        """Per step i: the model-output conversion at σ_i, and the first- and second-order update
        coefficients from σ_i to σ_{i+1} as (c_sample, c_d0, c_d1, c_noise, 1/r0)."""
        if "coeffs" in self._cache:
            return self._cache["coeffs"]
        cfg = self.config
        algo, midpoint = cfg.algorithm_type, cfg.solver_type == "midpoint"
        alpha, sigma = self._alpha_sigma(self.sigmas)
        lam = torch.stack([torch.log(a) - torch.log(s) for a, s in zip(alpha, sigma)])
        first, second = [], []
        n = len(self.sigmas) - 1
        for i in range(n):
            a_t, s_t, a_s, s_s = alpha[i + 1], sigma[i + 1], alpha[i], sigma[i]
            h = lam[i + 1] - lam[i]
            first.append(self._update_coefficients(algo, True, a_t, s_t, a_s, s_s, h))
            if i >= 1:
                h_0 = lam[i] - lam[i - 1]
                r0 = h_0 / h
                coeffs = self._update_coefficients(algo, midpoint, a_t, s_t, a_s, s_s, h)
                second.append((*coeffs, float(1.0 / r0)))
            else:
                second.append(None)
        tables = {"alpha": alpha.tolist(), "sigma": sigma.tolist(), "first": first, "second": second}
        self._cache["coeffs"] = tables
        return tables

    @staticmethod
    def _update_coefficients(algo: str, midpoint: bool, a_t: torch.Tensor, s_t: torch.Tensor, a_s: torch.Tensor,
                             s_s: torch.Tensor, h: torch.Tensor) -> tuple[float, float, float, float]:
        """x_t = c_sample·x_s + c_d0·D0 + c_d1·D1 + c_noise·z, each coefficient computed in float32 in
        diffusers' order (the first-order update uses only c_sample, c_d0 and c_noise). ``midpoint``
        picks the second-order variant."""
        if algo == "dpmsolver++":
            c_d0 = -(a_t * (torch.exp(-h) - 1.0))
            c_d1 = -(0.5 * (a_t * (torch.exp(-h) - 1.0))) if midpoint else a_t * ((torch.exp(-h) - 1.0) / h + 1.0)
            out = (s_t / s_s, c_d0, c_d1, torch.zeros(()))
        elif algo == "dpmsolver":
            c_d0 = -(s_t * (torch.exp(h) - 1.0))
            c_d1 = -(0.5 * (s_t * (torch.exp(h) - 1.0))) if midpoint else -(s_t * ((torch.exp(h) - 1.0) / h - 1.0))
            out = (a_t / a_s, c_d0, c_d1, torch.zeros(()))
        elif algo == "sde-dpmsolver++":
            c_d0 = a_t * (1 - torch.exp(-2.0 * h))
            c_d1 = (0.5 * (a_t * (1 - torch.exp(-2.0 * h))) if midpoint
                    else a_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0))
            out = (s_t / s_s * torch.exp(-h), c_d0, c_d1, s_t * torch.sqrt(1.0 - torch.exp(-2 * h)))
        else:
            c_d0 = -(2.0 * (s_t * (torch.exp(h) - 1.0)))
            c_d1 = -(s_t * (torch.exp(h) - 1.0)) if midpoint else -(2.0 * (s_t * ((torch.exp(h) - 1.0) / h - 1.0)))
            out = (a_t / a_s, c_d0, c_d1, s_t * torch.sqrt(torch.exp(2 * h) - 1.0))
        return tuple(float(v) for v in out)

    def convert_model_output(self, model_output: torch.Tensor, *args: Any, sample: torch.Tensor | None = None,
                             **kwargs: Any) -> torch.Tensor:
        """The model output as x0 (dpmsolver++ variants) or ε (dpmsolver variants) at the current σ."""
        if sample is None:
            if len(args) > 1:
                sample = args[1]
            else:
                raise ValueError("sample is required")
        c = self._tables()
        i = self._step_index
        alpha_t, sigma_t = c["alpha"][i], c["sigma"][i]
        kind = self.config.prediction_type
        if self.config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            if kind == "epsilon":
                return (sample - sigma_t * model_output) / alpha_t
            if kind == "sample":
                return model_output
            return alpha_t * sample - sigma_t * model_output
        if kind == "epsilon":
            return model_output
        if kind == "sample":
            return (sample - alpha_t * model_output) / sigma_t
        return alpha_t * model_output + sigma_t * sample

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """One multistep update from σ_i to σ_{i+1}. model_output, sample: (B, C, H, W).

        Like diffusers, ``return_dict=False`` gives ``(prev_sample,)``; the returned object also carries
        ``pred_original_sample`` for the dpmsolver++ variants (their converted model output is x0).
        """
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        _check_same_shape(model_output, sample)
        i = self._current_index(timestep)
        cfg = self.config
        n = len(self._host_timesteps)
        lower_order_final = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                            or cfg.final_sigmas_type == "zero")
        lower_order_second = i == n - 2 and cfg.lower_order_final and n < 15
        converted = self.convert_model_output(model_output, sample=sample)
        self.model_outputs = self.model_outputs[1:] + [converted]
        sample = sample.to(torch.float32)
        noise = None
        if cfg.algorithm_type.startswith("sde"):
            if variance_noise is None:
                noise = _randn(model_output.shape, generator, model_output.device, torch.float32)
            else:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
        c = self._tables()
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            c_sample, c_d0, _, c_noise = c["first"][i]
            prev_sample = c_sample * sample + c_d0 * converted
        else:
            c_sample, c_d0, c_d1, c_noise, inv_r0 = c["second"][i]
            m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
            d1 = inv_r0 * (m0 - m1)
            prev_sample = c_sample * sample + c_d0 * m0 + c_d1 * d1
        if noise is not None:
            prev_sample = prev_sample + c_noise * noise
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        x0 = converted if cfg.algorithm_type.endswith("++") else None
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def scale_model_input(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """α_t x0 + σ_t ε at the σ of each of ``timesteps`` (B,)."""
        sigma = _broadcast([float(self.sigmas[i]) for i in self._timestep_indices(timesteps)], original_samples)
        alpha_t, sigma_t = self._alpha_sigma(sigma)
        return alpha_t * original_samples + sigma_t * noise
