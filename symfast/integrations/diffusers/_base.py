"""What the six drop-ins share: diffusers' SchedulerMixin/ConfigMixin base, the training schedule,
dynamic thresholding, the σ grids, and host lookups of the timestep a caller passes."""
from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from symfast import schedules
from symfast.integrations._philox import PhiloxGenerator
from symfast.ops.fused_step import StepCoefficients

PUBLIC_MODULE = "symfast.integrations.diffusers"
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# the σ grids a config can ask for (its `use_<name>_sigmas` flag); at most one may be set
SIGMA_GRIDS = ("karras", "exponential", "beta")


def check_same_shape(model_output: Any, sample: Any, channel_factor: int = 1) -> None:
    """model_output must be a tensor shaped like sample, with ``channel_factor`` times its channels
    when the model also predicts a variance."""
    if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
        raise TypeError(f"model_output and sample must be tensors, got {type(model_output).__name__} and "
                        f"{type(sample).__name__}")
    if not model_output.is_floating_point() or not sample.is_floating_point():
        # integer tensors ran the steps in integer arithmetic: zeros, silently
        raise TypeError(f"model_output and sample must be floating-point tensors, got "
                        f"{model_output.dtype} and {sample.dtype}")
    shapes = {tuple(sample.shape)}
    if channel_factor != 1 and sample.ndim >= 2:
        shapes.add((sample.shape[0], sample.shape[1] * channel_factor, *sample.shape[2:]))
    if tuple(model_output.shape) not in shapes:
        raise ValueError(f"model_output has shape {tuple(model_output.shape)} but sample has shape "
                         f"{tuple(sample.shape)}; they must match")


def broadcast(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars as a (B, 1, 1, ...) tensor matching ``like``."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.ndim - 1)))


def randn(shape: tuple[int, ...], generator: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Noise drawn by diffusers' own ``randn_tensor``, so a seeded generator gives diffusers' noise;
    a :class:`~symfast.integrations.PhiloxGenerator` gives its next counter-based draw instead."""
    if isinstance(generator, PhiloxGenerator):
        return generator.randn(tuple(shape), dtype, device)
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


class FusedUpdate(NamedTuple):
    """A step that is linear in the model output, for the fused orbit step (``equivariant``):
    x_next = a·x + b·x̂0 + c·z with x̂0 = c_skip·x + c_out·(model output), all in ``coefs``;
    ``draws``: the scheduler's own step draws noise here (so the generator advances alike);
    ``finish(prev_sample, pred_original_sample, return_dict)`` advances the scheduler's state and
    builds its output."""

    coefs: StepCoefficients
    draws: bool
    finish: Callable[[torch.Tensor, torch.Tensor, bool], Any]


def inference_steps(n: Any) -> Any:
    """A 0-d integer tensor as an int (diffusers' sigma schedulers take one); anything else as
    given, checked where it is used."""
    if isinstance(n, torch.Tensor) and n.dim() == 0 and not n.is_floating_point() and n.dtype != torch.bool:
        return int(n)
    return n


@functools.cache
def _parameters(cls: type) -> frozenset[str]:
    """The names ``cls.__init__`` takes (register_to_config keeps the signature)."""
    return frozenset(inspect.signature(cls.__init__).parameters)


class Scheduler(SchedulerMixin, ConfigMixin):
    """diffusers' scheduler base plus the bookkeeping the drop-ins share.

    Subclasses decorate ``__init__`` with diffusers' ``@register_to_config``, so config handling,
    ``save_pretrained``/``from_pretrained``/``from_config`` and ``_use_default_values`` are diffusers' own.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    beta_schedules: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # pipe.save_pretrained records (cls.__module__, cls.__name__) in model_index.json and
        # DiffusionPipeline.from_pretrained imports that module: record the public path, not the
        # private submodule, so saved pipelines survive a reshuffle of this package
        if not cls.__name__.startswith("_") and cls.__module__.startswith(PUBLIC_MODULE + "."):
            cls.__module__ = PUBLIC_MODULE

    @classmethod
    def _get_compatibles(cls) -> list[type]:
        """diffusers' compatibles, with symfast's class wherever symfast has one of that name."""
        import diffusers

        from symfast.integrations import diffusers as ours
        names = sorted(set([cls.__name__] + cls._compatibles))
        return [getattr(ours, n, None) or getattr(diffusers, n) for n in names
                if hasattr(ours, n) or hasattr(diffusers, n)]

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """diffusers' ``from_config``; also takes a scheduler (its ``.config``) and rejects non-mappings."""
        if isinstance(config, ConfigMixin):
            config = config.config
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"config must be a dict or a diffusers FrozenDict, got {type(config).__name__}")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _option(self, name: str, default: Any = None) -> Any:
        """The config's ``name`` if this class takes it, else ``default``: diffusers' classes read
        only their own parameters, and ``from_config(other.config)`` leaves another class's keys
        in ``.config`` (DPM-Solver's use_karras_sigmas gave Euler a Karras σ, which diffusers'
        Euler a, having no such option, ignores)."""
        return self.config.get(name, default) if name in _parameters(type(self)) else default

    def _fused_update(self, timestep: Any, sample: torch.Tensor, kwargs: dict[str, Any]) -> FusedUpdate | None:
        """This step as a :class:`FusedUpdate`, or None where it is not linear in the model output
        (clipping, thresholding, learned variances, churn, multistep state): then ``equivariant``
        averages the orbit and calls ``step``."""
        return None

    # ---- training schedule -----------------------------------------------------------------

    def _train_schedule(self) -> None:
        """betas, alphas, alphas_cumprod (float32, diffusers' arithmetic) after validating the config."""
        cfg = self.config
        if cfg.prediction_type not in self._prediction_types():
            raise ValueError(f"prediction_type must be one of {self._prediction_types()}, got {cfg.prediction_type!r}")
        if cfg.trained_betas is None and cfg.beta_schedule not in self.beta_schedules:
            raise ValueError(f"beta_schedule must be one of {self.beta_schedules} for {type(self).__name__}, "
                             f"got {cfg.beta_schedule!r}")
        if self._option("timestep_spacing", "linspace") not in schedules.SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {schedules.SPACINGS}, got {cfg.timestep_spacing!r}")
        n = cfg.num_train_timesteps
        if cfg.trained_betas is None and cfg.beta_schedule in ("exp", "laplace"):
            from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
            self.betas = betas_for_alpha_bar(n, alpha_transform_type=cfg.beta_schedule)
        elif cfg.trained_betas is None and cfg.beta_schedule == "sigmoid":
            self.betas = torch.sigmoid(torch.linspace(-6, 6, n)) * (cfg.beta_end - cfg.beta_start) + cfg.beta_start
        else:
            self.betas = schedules.betas(cfg.beta_schedule, n, cfg.beta_start, cfg.beta_end, cfg.trained_betas)
        if self._option("rescale_betas_zero_snr", False):
            self.betas = schedules._rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = schedules.alphas_cumprod(self.betas)

    def _prediction_types(self) -> tuple[str, ...]:
        return PREDICTION_TYPES

    def _check_one_sigma_grid(self) -> None:
        chosen = [name for name in SIGMA_GRIDS if self._option(f"use_{name}_sigmas", False)]
        if len(chosen) > 1:
            raise ValueError(f"only one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas may be "
                             f"True, got {', '.join(f'use_{c}_sigmas' for c in chosen)}")
        if "beta" in chosen:
            try:
                import scipy.stats  # noqa: F401
            except ImportError as e:
                raise ImportError("use_beta_sigmas=True needs scipy (pip install scipy), as diffusers' does") from e

    def _sigma_grid_kind(self) -> str | None:
        return next((name for name in SIGMA_GRIDS if self._option(f"use_{name}_sigmas", False)), None)

    def _convert_sigmas(self, kind: str, in_sigmas: np.ndarray, n: int) -> np.ndarray:
        """diffusers' ``_convert_to_karras/_exponential/_beta``: n σ from in_sigmas[0] (or the config's
        sigma_max) down to in_sigmas[-1] (or sigma_min), float64."""
        # diffusers reads these with hasattr(self.config, ...): also another class's keys
        sigma_min, sigma_max = self.config.get("sigma_min"), self.config.get("sigma_max")
        sigma_min = float(in_sigmas[-1]) if sigma_min is None else sigma_min
        sigma_max = float(in_sigmas[0]) if sigma_max is None else sigma_max
        if kind == "karras":
            return schedules.karras_sigmas(n, sigma_min, sigma_max)
        if kind == "exponential":
            return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))
        import scipy.stats
        return np.array([sigma_min + ppf * (sigma_max - sigma_min)
                         for ppf in [scipy.stats.beta.ppf(t, 0.6, 0.6) for t in 1 - np.linspace(0, 1, n)]])

    # diffusers' private names for the same conversions (some user code calls them)
    def _convert_to_karras(self, in_sigmas: Any, num_inference_steps: int) -> np.ndarray:
        return self._convert_sigmas("karras", np.asarray(in_sigmas), num_inference_steps)

    def _convert_to_exponential(self, in_sigmas: Any, num_inference_steps: int) -> np.ndarray:
        return self._convert_sigmas("exponential", np.asarray(in_sigmas), num_inference_steps)

    def _convert_to_beta(self, in_sigmas: Any, num_inference_steps: int) -> np.ndarray:
        return self._convert_sigmas("beta", np.asarray(in_sigmas), num_inference_steps)

    @staticmethod
    def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
        return schedules.sigma_to_t(sigma, log_sigmas)

    def _sqrt_alpha_sigma(self, like: torch.Tensor, indices: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """√ᾱ and √(1-ᾱ) at ``indices`` (into alphas_cumprod), shaped (B, 1, ...) like ``like``."""
        ac = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        if isinstance(indices, torch.Tensor):
            indices = indices.to(like.device)
        shape = (-1, *([1] * (like.ndim - 1)))
        return (ac[indices] ** 0.5).flatten().reshape(shape), ((1 - ac[indices]) ** 0.5).flatten().reshape(shape)

    def _final_sigma(self) -> float:
        if self.config.final_sigmas_type == "sigma_min":
            return float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
        return 0.0

    # ---- dynamic thresholding (Imagen; DeepFloyd IF's configs) -----------------------------

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """Clamp x0 to ±s per sample, s the ``dynamic_thresholding_ratio`` quantile of |x0| clamped to
        [1, sample_max_value], then divide by s. Data-dependent, so it runs on the device (diffusers' code)."""
        dtype = sample.dtype
        batch_size, channels, *remaining_dims = sample.shape
        if dtype not in (torch.float32, torch.float64):
            sample = sample.float()  # quantile needs float; clamp has no CPU half kernel
        sample = sample.reshape(batch_size, channels * int(np.prod(remaining_dims)))
        s = torch.quantile(sample.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = torch.clamp(s, min=1, max=self.config.sample_max_value).unsqueeze(1)
        sample = torch.clamp(sample, -s, s) / s
        return sample.reshape(batch_size, channels, *remaining_dims).to(dtype)

    def _clip_or_threshold(self, x0: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if self._option("thresholding", False):
            return self._threshold_sample(x0)
        if self._option("clip_sample", False):
            return x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0

    # ---- timesteps and the step index ------------------------------------------------------

    def _set_timesteps_table(self, timesteps: torch.Tensor, device: Any = None, dtype: torch.dtype | None = None) -> None:
        """Install ``self.timesteps`` (``timesteps``, a CPU tensor, moved to ``device``) and its host copy,
        taken before the move so that nothing is read back from the device; reset the step index and
        the coefficient cache."""
        timesteps = timesteps.to(dtype=dtype) if dtype is not None else timesteps
        host = timesteps.tolist()
        self.timesteps = timesteps = timesteps.to(device)
        self._host_copy = (timesteps, timesteps._version, host)
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._cache: dict[Any, Any] = {}

    def _host_table(self) -> list:
        """``self.timesteps`` as a host list, copied when the schedule installs it (no device read);
        read again when the user replaced the table (``scheduler.timesteps = timesteps[4:]``, as
        img2img code does) or wrote into it: a stale copy stepped from the old timesteps."""
        table, version, host = self._host_copy
        if self.timesteps is not table or table._version != version:
            host = self.timesteps.tolist()
            self._host_copy = (self.timesteps, self.timesteps._version, host)
        return host

    def _host_value(self, timestep: Any) -> float | int:
        """The value of ``timestep`` without reading the device when it is an element of
        ``self.timesteps`` (a loop ``for t in scheduler.timesteps`` yields views into that table: their
        offset gives the index into the host copy; the shared version counter shows whether the table
        was written since). Any other tensor is read."""
        if not isinstance(timestep, torch.Tensor):
            if isinstance(timestep, (np.ndarray, np.generic)):
                return timestep.item()
            return timestep
        if timestep.numel() != 1:
            raise ValueError(f"timestep must be a single value, got a tensor of shape {tuple(timestep.shape)}")
        table = getattr(self, "timesteps", None)
        if (isinstance(table, torch.Tensor) and table.ndim == 1 and timestep.device == table.device
                and timestep.dtype == table.dtype
                and timestep.untyped_storage().data_ptr() == table.untyped_storage().data_ptr()):
            host = self._host_table()
            offset = timestep.storage_offset() - table.storage_offset()
            stride = table.stride(0)
            if stride > 0 and offset % stride == 0 and 0 <= offset // stride < len(host):
                return host[offset // stride]
        return timestep.reshape(()).item()

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: Any, schedule_timesteps: Any = None) -> int:
        """Position of ``timestep`` in the schedule; the second one if it occurs twice (diffusers' rule,
        so img2img that starts mid-schedule does not skip a σ)."""
        value = self._host_value(timestep) if schedule_timesteps is None else float(timestep)
        table = self._host_table() if schedule_timesteps is None else [float(t) for t in schedule_timesteps]
        hits = [i for i, t in enumerate(table) if t == value]
        if not hits:
            return self._timestep_not_in_schedule(value)
        return hits[1] if len(hits) > 1 else hits[0]

    def _timestep_not_in_schedule(self, value: float) -> int:
        raise ValueError(f"timestep {value} is not in this schedule's timesteps")

    def _init_step_index(self, timestep: Any) -> None:
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def _counter_index(self, timestep: Any) -> int:
        """diffusers' σ-scheduler rule: the first call after ``set_timesteps`` finds ``timestep`` in the
        schedule, later calls advance a counter and ignore the timestep they are given."""
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self._host_table()):
            # the index, not a call count: a repeated first timestep starts at its second entry
            raise ValueError(f"step is past the end of the schedule: this call would take entry "
                             f"{self._step_index} of {len(self._host_table())}; call set_timesteps again")
        return self._step_index

    def _timestep_indices(self, timesteps: torch.Tensor) -> list[int]:
        """Schedule positions for add_noise's (B,) timesteps, by diffusers' rules."""
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps.reshape(-1).tolist()]
        index = self._step_index if self._step_index is not None else self._begin_index
        return [index] * timesteps.reshape(-1).shape[0]
