"""Drop-in replacements for other libraries' samplers.

- :mod:`symfast.integrations.diffusers`: diffusers schedulers (built on diffusers' SchedulerMixin
  and ConfigMixin, same class names, config keys and method signatures) that slot into a
  diffusers pipeline; importing it needs diffusers (the ``[integrations]`` extra).
- :mod:`symfast.integrations.k_diffusion`: k-diffusion-compatible sampling loops; it does not import
  k-diffusion, which is only needed to compare against.

``import symfast`` and ``import symfast.integrations`` import neither library.
"""
from __future__ import annotations

__all__ = ["diffusers", "k_diffusion"]
