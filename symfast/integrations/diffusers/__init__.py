"""diffusers schedulers built on diffusers' own ``SchedulerMixin``/``ConfigMixin``: same class names,
config keys, method signatures, output classes and attribute types, so one swaps in for diffusers'
(``pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)``) and a pipeline produces the same
images; ``save_pretrained``/``from_pretrained``/``from_config`` are diffusers' own.

``pipe.save_pretrained`` records this package as the scheduler's library in model_index.json, and
``DiffusionPipeline.from_pretrained`` loads the symfast class back (DDIMPipeline's constructor is the
exception: it converts any scheduler to diffusers' own DDIMScheduler; assign ``pipe.scheduler`` after
loading). Importing this package imports diffusers (``import symfast`` and ``import symfast.integrations`` do not).

How they differ inside: every update coefficient is computed on the host, once per schedule (σ
schedulers, DPM-Solver) or once per timestep (DDPM, DDIM, which use the timestep each call is given),
into Python floats, with float32 CPU tensor arithmetic in diffusers' order (torch's CPU
``sqrt``/``log``/``exp`` are not correctly rounded, so emulating them any other way would drift by an
ulp); ``step`` only does elementwise tensor math in diffusers' order of operations, so given the same
model outputs and generator the results agree with diffusers to rounding. A timestep taken from
``scheduler.timesteps`` is looked up in a host copy of that table, so ``step`` reads no device tensor.

- ``discrete``: DDPMScheduler, DDIMScheduler
- ``sigma``: EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler
- ``dpm``: DPMSolverMultistepScheduler
- ``frame_averaging``: ``equivariant(pipe, group="d4")``, frame averaging inside a pipeline, the orbit
  averaged and the update done by one fused op

``generator=`` of every ``step`` also takes a :class:`PhiloxGenerator` (a seed per sample: the same
images whatever the batch size, on CPU and GPU alike).

Refused with a ValueError naming the option: DPM-Solver ``use_flow_sigmas``, ``use_dynamic_shifting``
(and ``mu``), and ``solver_order=3`` with ``algorithm_type='sde-dpmsolver'`` (undefined in diffusers too);
DDPM ``variance_type='fixed_large_log'`` (diffusers' step turns every sample into NaN with it).
Deliberate differences: Euler ancestral accepts ``prediction_type='sample'`` (diffusers' raises), and
DPM-Solver with a learned variance keeps the model's first C channels (diffusers' keeps 3, the same for
3-channel samples).
"""
from __future__ import annotations

try:
    import diffusers as _diffusers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by a test that hides diffusers
    raise ImportError("symfast.integrations.diffusers needs the 'diffusers' package "
                      "(pip install diffusers, or pip install symfast[integrations])") from e

# DiffusionPipeline.from_pretrained loads a component recorded as [library, class] by looking the base
# classes it knows (SchedulerMixin, ModelMixin, ...) up in that library's module and picking the load
# method of the one the class derives from; this package is the library saved pipelines name
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

from symfast.integrations.diffusers.discrete import DDIMScheduler, DDPMScheduler
from symfast.integrations.diffusers.dpm import DPMSolverMultistepScheduler
from symfast.integrations.diffusers.frame_averaging import LoopAveragedUNet, OrbitUNet, equivariant, orbit_scheduler
from symfast.integrations._philox import PhiloxGenerator
from symfast.integrations.diffusers.sigma import (EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                                                  HeunDiscreteScheduler)

__all__ = [
    "DDPMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "equivariant",
    "orbit_scheduler",
    "OrbitUNet",
    "LoopAveragedUNet",
    "PhiloxGenerator",
]
