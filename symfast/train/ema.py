"""EDM's exponential moving average of the weights, by half-life in images, with ramp-up.

After each optimiser step, every EMA copy moves towards the weights with
β = 0.5 ** (batch / max(h, 1e-8)), where h is the half-life in images, capped at ``rampup · nimg``
(nimg: the images seen before the step) while ramping up, as NVlabs/edm's training_loop.py does. Several half-lives can be
tracked at once; the first is the one sampling uses. The update is one ``torch._foreach_lerp_``
per copy over all floating-point parameters; buffers are copied.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn


class EMA:
    """EMA copies of ``model``, one per half-life (in images). ``models[i]`` is a frozen copy in
    eval mode with no gradients."""

    def __init__(self, model: nn.Module, halflife_images: Sequence[float], rampup: float | None = 0.05):
        halflife_images = tuple(float(h) for h in halflife_images)
        if not halflife_images or not all(h > 0 for h in halflife_images):
            raise ValueError(f"halflife_images must be positive numbers, got {halflife_images!r}")
        if rampup is not None and not rampup > 0:
            raise ValueError(f"rampup must be > 0 or None, got {rampup!r}")
        self.halflife_images = halflife_images
        self.rampup = rampup
        self.models = []
        for _ in halflife_images:
            ema = copy.deepcopy(model).eval().requires_grad_(False)
            self.models.append(ema)
        self._source = [p for p in model.parameters() if p.is_floating_point()]
        self._source_buffers = list(model.buffers())
        # The copies' tensors, listed once: loading a state dict copies into them in place, and
        # walking the module tree per step took longer than the lerp itself (~115 tensors).
        self._targets = [[p for p in ema.parameters() if p.is_floating_point()] for ema in self.models]
        self._target_buffers = [list(ema.buffers()) for ema in self.models]

    def beta(self, index: int, nimg: int, batch: int) -> float:
        """The decay of copy ``index`` for a step of ``batch`` images after ``nimg`` images."""
        halflife = self.halflife_images[index]
        if self.rampup is not None:
            halflife = min(halflife, nimg * self.rampup)
        return 0.5 ** (batch / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, nimg: int, batch: int) -> None:
        """Move every copy towards the current weights."""
        for i, (target, buffers) in enumerate(zip(self._targets, self._target_buffers)):
            torch._foreach_lerp_(target, self._source, 1.0 - self.beta(i, nimg, batch))
            for dst, src in zip(buffers, self._source_buffers):
                dst.copy_(src)

    @torch.no_grad()
    def reset(self) -> None:
        """Copy the current weights into every EMA (a restart, as SFBD's fine-tuning rounds do)."""
        for ema in self.models:
            for dst, src in zip(ema.parameters(), self._source):
                dst.copy_(src)
            for dst, src in zip(ema.buffers(), self._source_buffers):
                dst.copy_(src)

    def tensors(self) -> list[torch.Tensor]:
        """Every copy's floating-point parameters and its buffers."""
        return [t for target, buffers in zip(self._targets, self._target_buffers)
                for t in target + buffers]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every copy's state dict, keys ``ema.<index>.<name>``."""
        return {f"ema.{i}.{k}": v for i, ema in enumerate(self.models) for k, v in ema.state_dict().items()}
