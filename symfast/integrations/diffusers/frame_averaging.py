"""symfast's fused frame averaging inside a diffusers pipeline: ``equivariant(pipe, group="d4")``.

The pipeline's UNet is wrapped so that each call evaluates the whole orbit g_1 x, …, g_|G| x in one
batched call (:class:`OrbitUNet`; its output is the raw orbit output, (B·|G|, ...), sample-major: a
pipeline's batch operations, such as classifier-free guidance's ``chunk(2)``, split it by sample),
and the scheduler is replaced by one whose ``step`` takes that orbit output and does the orbit
average, x̂0, the update and the noise in one ``symfast::fused_step`` op. This holds where the
step is linear in the model output: DDIM, DDPM (fixed variances), Euler (steps without churn) and
Euler ancestral, when x̂0 is not clipped or thresholded. Everywhere else (Heun, DPM-Solver,
clipping, thresholding, learned variances, churn steps, any other diffusers scheduler) the step is
the scheduler's own, given the orbit average from one ``orbit_mean`` op. Either way the model's
output is averaged over the group, so an ODE scheduler's images are exactly equivariant:
pipeline(g·x_T) = g·pipeline(x_T).

diffusers' own schedulers are replaced by symfast's class of the same name where there is one (the
same numbers; see the package docstring), built from their config (save_pretrained records the
original class). A scheduler assigned to the pipeline after wrapping gets the orbit average from
the UNet instead of the orbit. :class:`LoopAveragedUNet` is the
plain way, a Python loop over the group elements, kept for comparisons (tests, the benchmark).
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Callable

import torch
from torch import nn

from symfast._symmetrize import _default_chunks
from symfast.ops import _checks
from symfast.groups import Group, get
from symfast.integrations._philox import PhiloxGenerator, repeat_for_orbit
from symfast.integrations.diffusers._base import randn
from symfast.ops.fused_step import fused_step
from symfast.ops.group_average import orbit, orbit_mean

__all__ = ["equivariant", "OrbitUNet", "LoopAveragedUNet", "orbit_scheduler"]


class _Delegating(nn.Module):
    """Wraps ``self.unet``; every attribute it does not have is read from the wrapped model, so
    pipelines see the UNet's ``config``, ``dtype``, ``device``, ``in_channels`` and the rest."""

    def __init__(self, unet: nn.Module, group: Group | str):
        super().__init__()
        if not callable(unet):
            raise TypeError(f"unet must be a diffusers UNet (or a callable model(sample, timestep)), got "
                            f"{type(unet).__name__}")
        self.unet = unet
        self.group = get(group)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "unet":
                raise
            return getattr(super().__getattr__("unet"), name)

    def _call(self, sample: torch.Tensor, timestep: Any, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
        """The wrapped model's main output and a function making its output type from a tensor."""
        out = self.unet(sample, timestep, *args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out, lambda y: y
        if isinstance(out, tuple):
            return out[0], lambda y: (y,)
        return out.sample, lambda y: type(out)(sample=y)


class OrbitUNet(_Delegating):
    """``unet`` on the whole orbit of its input: sample (B, ...) -> output (B·|G|, ...),
    sample-major: rows b·|G| + k are unet(g_k·sample[b]), so that what a pipeline does along the
    batch (classifier-free guidance: ``uncond, cond = out.chunk(2)``, then a linear combination)
    keeps each sample's rows together; element-major rows (block k at g_k) were split by group
    element there, silently wrong. Per-sample arguments (a (B,) timestep, class labels, encoder states)
    are tiled to the orbit batch. ``chunks``: the number of UNet calls the orbit is split into
    (None: chosen per device as :func:`symfast.symmetrize` does: one call on accelerators, calls of
    at least 16 images on CPU, where one call over a large orbit was slower per image)."""

    def __init__(self, unet: nn.Module, group: Group | str = "d4", chunks: int | None = None):
        super().__init__(unet, group)
        _checks.positive_int_or_none("chunks", chunks)
        self.chunks = chunks
        self._pipe: Callable[[], Any] | None = None  # set by equivariant(): a weak reference

    def _scheduler_takes_the_orbit(self) -> bool:
        """False when the pipeline :func:`equivariant` wrapped has since been given a scheduler of
        its own (``pipe.scheduler = X.from_config(...)``, diffusers' usual swap): the orbit is
        then averaged here, so any scheduler sees the frame-averaged output it expects."""
        pipe = self._pipe() if self._pipe is not None else None
        return pipe is None or isinstance(getattr(pipe, "scheduler", None), _OrbitStep)

    def forward(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(sample, torch.Tensor) or not sample.is_floating_point():
            raise TypeError(f"sample must be a floating-point tensor, got {getattr(sample, 'dtype', type(sample))}")
        batch, order = sample.shape[0], len(self.group)
        xs = orbit(sample, self.group)
        timestep, args, kwargs = repeat_for_orbit((timestep, args, kwargs), batch, order)
        n = xs.shape[0]
        size = -(-n // (self.chunks or _default_chunks(batch, order, sample.device)))
        outs, make = [], None
        for start in range(0, n, size):
            part = slice(start, start + size)
            # per-sample arguments are sliced with the orbit batch they now match
            t, a, kw = _slice_batch((timestep, args, kwargs), n, part)
            y, make = self._call(xs[part], t, a, kw)
            outs.append(y)
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)  # element-major, as orbit() made it
        if not self._scheduler_takes_the_orbit():
            return make(orbit_mean(y, self.group))
        return make(_swap_blocks(y, order, batch))


def _swap_blocks(y: torch.Tensor, blocks: int, rows: int) -> torch.Tensor:
    """(blocks·rows, ...) -> (rows·blocks, ...): row i of block j goes to row j of block i (between
    the orbit ops' element-major layout and the sample-major one pipelines see). One copy of the
    output per step, small against the UNet call that made it."""
    return y.unflatten(0, (blocks, rows)).transpose(0, 1).flatten(0, 1)


def _slice_batch(value: Any, n: int, part: slice) -> Any:
    if isinstance(value, torch.Tensor):
        return value[part] if value.dim() >= 1 and value.shape[0] == n else value
    if isinstance(value, dict):
        return {k: _slice_batch(v, n, part) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_slice_batch(v, n, part) for v in value)
    return value


class LoopAveragedUNet(_Delegating):
    """The plain frame average, for comparisons: 1/|G| Σ_k g_k⁻¹ unet(g_k x), a Python loop of |G|
    UNet calls; its output is shaped like the input, for the pipeline's own scheduler."""

    def forward(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        total, make = None, None
        for k in range(len(self.group)):
            y, make = self._call(self.group.act(sample, k), timestep, args, kwargs)
            y = self.group.act(y, self.group.inverse(k))
            total = y if total is None else total + y
        return make(total / len(self.group))


class _OrbitStep:
    """Marks the scheduler classes :func:`orbit_scheduler` makes (their ``step`` is :func:`_orbit_step`)."""

    _orbit_group: Group


def _orbit_step(self: Any, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any,
                **kwargs: Any) -> Any:
    """An orbit scheduler's ``step``: takes the orbit output (B·|G|, ...) of an :class:`OrbitUNet`
    (sample-major) and runs the average and the update as one fused op where the scheduler's ``_fused_update``
    describes the step, else averages (one op) and calls the scheduler's own step."""
    group = self._orbit_group
    if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
        raise TypeError(f"model_output and sample must be tensors, got {type(model_output).__name__} and "
                        f"{type(sample).__name__}")
    expected = (len(group) * sample.shape[0], *sample.shape[1:])
    if tuple(model_output.shape) != expected:
        raise ValueError(f"model_output has shape {tuple(model_output.shape)}; an equivariant scheduler "
                         f"takes the orbit output of an OrbitUNet, {expected} (|G| = {len(group)} times "
                         f"sample's batch)")
    model_output = _swap_blocks(model_output, sample.shape[0], len(group))  # element-major for the ops
    return_dict = kwargs.pop("return_dict", True)
    update = None
    if not args and hasattr(self, "_fused_update") and model_output.dtype == sample.dtype:
        update = self._fused_update(timestep, sample, kwargs)
    if update is None:
        return super(_OrbitStep, self).step(orbit_mean(model_output, group), timestep, sample, *args,
                                            return_dict=return_dict, **kwargs)
    noise: dict[str, Any] = {}
    if update.draws:
        # drawn as the scheduler's own step draws (same generator calls), so a seeded generator
        # gives the same images as the scheduler on the averaged output
        generator, given = kwargs.get("generator"), kwargs.get("variance_noise")
        if given is not None:
            noise = {"noise": given.to(device=sample.device, dtype=sample.dtype)}
        elif isinstance(generator, PhiloxGenerator):
            # drawn inside the fused op
            noise = {"key": generator.key(sample.shape[0], sample.device), "step": generator.next_step()}
        else:
            noise = {"noise": randn(tuple(sample.shape), generator, sample.device, sample.dtype)}
        if update.coefs.c == 0.0:
            noise = {}
    prev, x0 = fused_step(sample, model_output, update.coefs, group, **noise)
    return update.finish(prev, x0, return_dict)


_ORBIT_CLASSES: dict[tuple[type, Group], type] = {}


def orbit_scheduler(scheduler: Any, group: Group | str = "d4") -> Any:
    """A new scheduler with ``scheduler``'s config whose ``step`` takes an :class:`OrbitUNet`'s
    output (see :class:`_OrbitStep`); symfast's class of the same name replaces diffusers' own."""
    from diffusers.configuration_utils import ConfigMixin

    from symfast.integrations import diffusers as ours
    if not isinstance(scheduler, ConfigMixin) or not hasattr(scheduler, "step"):
        raise TypeError(f"scheduler must be a diffusers scheduler, got {type(scheduler).__name__}")
    source = type(scheduler)
    if isinstance(scheduler, _OrbitStep):
        raise ValueError("scheduler is already an equivariant (orbit) scheduler")
    group = get(group)
    base = getattr(ours, source.__name__, source) if source.__name__ in ours.__all__ else source
    # One class per (source class, group), holding both: a copy made the diffusers way,
    # type(s).from_config(s.config), is then the same equivariant scheduler (with the group on
    # the instance only, the copy had none and failed at its first step).
    cls = _ORBIT_CLASSES.get((source, group))
    if cls is None:
        # a leading underscore: symfast's Scheduler.__init_subclass__ leaves its module as is
        # step shows the base's signature: pipelines read it to decide whether to pass eta= and
        # generator= (StableDiffusionPipeline.prepare_extra_step_kwargs)
        step = functools.wraps(base.step)(_orbit_step)
        cls = _ORBIT_CLASSES[(source, group)] = type(
            f"_Orbit{base.__name__}", (_OrbitStep, base),
            {"step": step, "_orbit_group": group, "_orbit_source": source})  # source: what save_pretrained records
    return cls.from_config(scheduler.config)


def equivariant(pipe: Any, group: Group | str = "d4", *, chunks: int | None = None) -> Any:
    """Make a diffusers pipeline frame-averaged over ``group``, in place; returns ``pipe``.

    ``pipe.unet`` becomes an :class:`OrbitUNet` (the orbit in ``chunks`` batched calls, None:
    chosen per device; ``config``,
    ``dtype``, ``device`` read through) and ``pipe.scheduler`` an :func:`orbit_scheduler` of it.
    With an ODE scheduler (DDIM η = 0, Euler, Heun, DPM-Solver++) the images are exactly
    equivariant: the pipeline on g·x_T gives g applied to its images on x_T.

    ``pipe.save_pretrained`` saves the plain pipeline (the wrapped UNet's weights and the
    scheduler's own class), which ``DiffusionPipeline.from_pretrained`` loads; frame averaging is
    how the pipeline runs, not part of the model: call ``equivariant`` again after loading.
    """
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(pipe, "scheduler"):
        raise TypeError(f"pipe must be a diffusers pipeline with a unet and a scheduler, got {type(pipe).__name__}")
    if isinstance(unet, _Delegating):
        raise ValueError(f"pipe.unet is already wrapped ({type(unet).__name__})")
    group = get(group)
    orbit_unet = OrbitUNet(unet, group, chunks)
    pipe.scheduler = orbit_scheduler(pipe.scheduler, group)
    pipe.unet = orbit_unet
    orbit_unet._pipe = weakref.ref(pipe)
    pipe.save_pretrained = functools.partial(_save_plain, pipe, pipe.save_pretrained)
    return pipe


def _save_plain(pipe: Any, save: Any, *args: Any, **kwargs: Any) -> Any:
    """``save`` (the pipeline's own save_pretrained) with the plain UNet and scheduler in place:
    diffusers cannot save an OrbitUNet (it logs a warning, writes no weights and records the
    unet as (None, None)) and would record the private orbit scheduler class."""
    unet, scheduler = pipe.unet, pipe.scheduler
    # the class the orbit scheduler was made from (diffusers' own stays diffusers'); a scheduler
    # assigned since is saved as it is
    plain = (scheduler._orbit_source.from_config(scheduler.config) if isinstance(scheduler, _OrbitStep)
             else scheduler)
    # assigning a component also rewrites its (library, class) entry in pipe.config
    pipe.unet, pipe.scheduler = unet.unet if isinstance(unet, _Delegating) else unet, plain
    try:
        return save(*args, **kwargs)
    finally:
        pipe.unet, pipe.scheduler = unet, scheduler
