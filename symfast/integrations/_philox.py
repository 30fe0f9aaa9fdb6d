"""Philox noise for diffusers and k-diffusion users: one seed per sample, the same images whatever the
batch. Importing this module imports neither library."""
from __future__ import annotations

from typing import Callable

import torch

from symfast.philox import noise_key
from symfast.samplers._noise import LATENT_STEP, philox_normal


def _check_shape(shape, minimum: int) -> tuple[int, ...]:
    """(B, ...) as a tuple of ints >= ``minimum``, or a ValueError naming shape (int() truncated
    a size of 2.5 to 2)."""
    if isinstance(shape, (tuple, list, torch.Size)) and len(shape) >= 1 and all(
            isinstance(s, int) and not isinstance(s, bool) and s >= minimum for s in shape):
        return tuple(shape)
    raise ValueError(f"shape must be (B, ...), a tuple of ints >= {minimum}, got {shape!r}")


class PhiloxGenerator:
    """Counter-based noise in place of a ``torch.Generator``.

    ``seed``: one int per sample (a sample's noise is then independent of the batch it is in: the
    same seeds in batches of 4, 2 or 1 give the same images), or one int for the batch (sample i
    draws stream i). Every draw advances a step counter; draw k of a run is keyed by
    (seed, k, stream, element), the numbers of :func:`symfast.philox.sample_noise`, drawn by the
    fused step op on the noise's device, so CPU and GPU agree.

    Use it as ``generator=`` of symfast's diffusers schedulers (their ``step``), as k-diffusion's
    ``noise_sampler`` (:meth:`noise_sampler`), and for starting noise (:meth:`latents`).
    """

    def __init__(self, seed: int | list[int] | tuple[int, ...] | torch.Tensor,
                 device: torch.device | str = "cpu"):
        if isinstance(seed, (list, tuple, torch.Tensor)) and len(seed) == 0:
            raise ValueError("seed must be an int or a non-empty list of ints (one per sample), got []")
        noise_key(seed, len(seed) if isinstance(seed, (list, tuple, torch.Tensor)) else 1)  # validates
        self.seed = seed
        self.device = torch.device(device)
        self.draws = 0
        self._keys: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"PhiloxGenerator(seed={self.seed!r}, draws={self.draws})"

    def manual_seed(self, seed: int | list[int] | tuple[int, ...] | torch.Tensor) -> "PhiloxGenerator":
        """Restart with ``seed`` (torch.Generator's spelling)."""
        self.__init__(seed, self.device)
        return self

    def key(self, batch: int, device: torch.device | str) -> torch.Tensor:
        """(batch, 2) int64 [seed, stream] rows on ``device`` (symfast.philox.noise_key)."""
        device = torch.device(device)
        hit = self._keys.get((batch, device))
        if hit is None:
            hit = self._keys[(batch, device)] = noise_key(self.seed, batch, device)
        return hit

    def next_step(self) -> int:
        """The Philox step of the next draw (1, 2, ...), counted as drawn."""
        self.draws += 1
        return self.draws

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> torch.Tensor:
        """The next draw: unit normals of ``shape`` (B, ...)."""
        shape = _check_shape(shape, 0)
        key = self.key(shape[0], self.device if device is None else device)
        return philox_normal(key, self.next_step(), shape, dtype)

    def latents(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
        """Starting noise ε_T of ``shape``: the x_T symfast.sample draws for the same seed; does not
        advance the step counter."""
        shape = _check_shape(shape, 1)
        key = self.key(shape[0], self.device if device is None else device)
        return philox_normal(key, LATENT_STEP, shape, dtype)

    def noise_sampler(self, x: torch.Tensor) -> Callable[[object, object], torch.Tensor]:
        """k-diffusion's ``noise_sampler(sigma, sigma_next)``: the next draw, shaped like x."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        return lambda sigma, sigma_next: self.randn(tuple(x.shape), x.dtype, x.device)


def repeat_for_orbit(value, batch: int, order: int):
    """An extra model argument for the orbit batch (|G|·B, element-major): tensors whose first dim is
    the batch are tiled |G| times (a conditioning per sample goes with each of its transforms);
    dicts, lists and tuples are followed; anything else (a shared timestep, None) is kept."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 1 and value.shape[0] == batch and order > 1:
            return value.repeat(order, *([1] * (value.dim() - 1)))
        return value
    if isinstance(value, dict):
        return {k: repeat_for_orbit(v, batch, order) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(repeat_for_orbit(v, batch, order) for v in value)
    return value
