"""Drop-in replacements for other libraries' samplers.

- :mod:`symfast.integrations.diffusers`: diffusers schedulers (built on diffusers' SchedulerMixin
  and ConfigMixin, same class names, config keys and method signatures) that slot into a
  diffusers pipeline; importing it needs diffusers (the ``[integrations]`` extra).
- :mod:`symfast.integrations.k_diffusion`: k-diffusion-compatible sampling loops; it does not import
  k-diffusion, which is only needed to compare against. ``group=`` and ``seed=`` run them on
  symfast's sampler core (fused steps, frame averaging, Philox noise).
- ``equivariant(pipe, group)`` (in the diffusers module): frame averaging inside a diffusers
  pipeline, the orbit in batched UNet calls and the average + update in one fused op.
- :class:`PhiloxGenerator`: a seed per sample, for both libraries (the same images whatever the
  batch size, on CPU and GPU alike).

``import symfast`` and ``import symfast.integrations`` import neither library.
"""
from __future__ import annotations

from symfast.integrations._philox import PhiloxGenerator

__all__ = ["diffusers", "k_diffusion", "PhiloxGenerator"]
