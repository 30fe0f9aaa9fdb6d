"""Where a sampler's noise comes from: counter-based Philox (default) or a torch.Generator."""
from __future__ import annotations

from typing import Any

import torch

from symfast.groups import Group
from symfast.ops.fused_step import StepCoefficients, fused_step
from symfast.philox import noise_key


# the Philox step symfast.sample draws its starting noise ε_T at (sampler steps use 1, 2, ...);
# PhiloxGenerator.latents is the same draw
LATENT_STEP = 2**32 - 1


def philox_normal(key: torch.Tensor, step: int, shape: tuple[int, ...],
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Philox unit normals keyed by ``key`` (B, 2) [seed, stream] and ``step``: (B, ...) on the
    key's device, the same numbers as symfast.philox.sample_noise, drawn by the fused step op's
    kernel (c = 1 and nothing else: the op returns its noise)."""
    coefs = StepCoefficients(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    blank = torch.zeros(shape, dtype=dtype, device=key.device)
    return fused_step(blank, blank, coefs, key=key, step=step, return_denoised=False)[0]


class NoiseSource:
    """Noise for step ``i`` of a sampler.

    Philox (``seed`` given): keyed by (seed, i, stream, element), drawn inside the fused step, so
    a sample's noise depends only on its seed (and, for one int seed, its index in the batch).
    Generator (``generator`` given): torch.randn(generator=...) per step, for parity with diffusers.
    ``transform`` (a group element index) applies g to every noise draw, for equivariant
    stochastic sampling: sampling from g·x_T with transform=k equals g·(sampling from x_T).
    """

    def __init__(self, x: torch.Tensor, seed: int | list[int] | torch.Tensor | None = None,
                 generator: torch.Generator | None = None, group: Group | None = None,
                 transform: int | None = None):
        if seed is not None and generator is not None:
            raise ValueError("pass seed= or generator=, not both")
        if transform is not None:
            if group is None:
                raise ValueError("transform_noise needs a denoiser with a group")
            if not isinstance(transform, int) or not 0 <= transform < len(group):
                raise ValueError(f"transform_noise must be an int in [0, {len(group)}), got {transform!r}")
        self.shape = tuple(x.shape)
        self.dtype, self.device = x.dtype, x.device
        self.generator = generator
        self.group, self.transform = group, transform
        self.key = None
        self._zeros = None
        if generator is None:
            self.key = noise_key(0 if seed is None else seed, x.shape[0], x.device)

    def kwargs(self, i: int) -> dict[str, Any]:
        """Noise keywords for symfast.ops.fused_step at step i."""
        if self.key is not None:
            return {"key": self.key, "step": i, "noise_element": self.transform}
        return {"noise": self.draw(i)}

    def unused(self, i: int) -> None:
        """Step i draws no noise (its scale is 0). Philox noise is keyed by the step, and the
        generator's draws follow symfast's own samplers, so nothing is drawn; a source that must
        keep in step with another library's draws overrides this."""

    def draw(self, i: int) -> torch.Tensor:
        """The noise tensor of step i, (B, ...) in the state's dtype, moved by ``transform``."""
        z = self._normal(i)
        return self.group.act(z, self.transform) if self.transform is not None else z

    def _normal(self, i: int) -> torch.Tensor:
        """Step i's unit normals before any transform."""
        if self.key is not None:
            return philox_normal(self.key, i, self.shape, self.dtype)
        return torch.randn(self.shape, generator=self.generator, dtype=self.dtype, device=self.device)

    def add(self, x: torch.Tensor, i: int, scale: float) -> torch.Tensor:
        """x + scale · (the noise of step i): one fused op when the noise is untransformed Philox
        (the op reads x and a zero model output and writes the sum), else draw and add."""
        if self.key is not None and self.transform is None:
            if self._zeros is None:
                self._zeros = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            coefs = StepCoefficients(0.0, 0.0, 1.0, 0.0, 0.0, 0.0, float(scale))
            return fused_step(x, self._zeros, coefs, key=self.key, step=i, return_denoised=False)[0]
        return x + self.draw(i) * scale
