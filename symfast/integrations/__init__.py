"""Drop-in replacements for other libraries' samplers.

- :mod:`symfast.integrations.diffusers`: diffusers-compatible schedulers (same class names, config
  keys and method signatures) that slot into a diffusers pipeline.
- :mod:`symfast.integrations.k_diffusion`: k-diffusion-compatible sampling loops.

Neither module imports the library it replaces; the real packages are only needed to compare
against (the ``[integrations]`` extra).
"""
from __future__ import annotations

__all__ = ["diffusers", "k_diffusion"]
