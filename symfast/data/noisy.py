"""Noisy observations of a clean dataset (SFBD's data): y = x + τ ε with ε fixed per image, and a
seeded split into the few images seen clean and the many seen only noisy.

The noise of image i is Philox normals keyed by (seed, i): the same y every epoch, every run and
every process, whichever subset or batch it is read in, without storing it.
"""
from __future__ import annotations

import operator

import torch

from symfast.data.images import ImageTensorDataset
from symfast.ops import _checks
from symfast.philox import seeded_generator

# The Philox step at which the observation noise is drawn (a fixed counter: one draw per image).
_NOISE_STEP = 0


def _check_indices(name: str, indices, n: int) -> torch.Tensor:
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.is_floating_point() \
            or indices.dtype == torch.bool:
        got = (f"shape {tuple(indices.shape)} dtype {indices.dtype}"
               if isinstance(indices, torch.Tensor) else type(indices).__name__)
        raise TypeError(f"{name} must be a 1-d integer tensor, got {got}")
    indices = indices.to("cpu", torch.int64)
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise ValueError(f"{name} must lie in [0, {n}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    return indices


class NoisyDataset(torch.utils.data.Dataset):
    """y_i = x_i + τ ε_i for the images x_i of ``dataset``, ε_i ~ N(0, I) fixed by (seed, i).

    Args:
        dataset: an ImageTensorDataset (images (N, C, H, W)).
        tau: the noise level τ > 0 (a standard deviation, in the images' units).
        seed: the noise seed, an int in [0, 2^63).
        indices: optional (M,) positions into ``dataset``: the noisy set is then those images, in
            that order (the noise of each is still keyed by its index in ``dataset``).

    ``get_batch(positions)`` returns noisy images; ``clean_batch(positions)`` the clean ones they
    came from (known here because the data are made here: for evaluation only).
    """

    def __init__(self, dataset: ImageTensorDataset, tau: float, seed: int = 0,
                 indices: torch.Tensor | None = None):
        if not isinstance(dataset, ImageTensorDataset):
            raise TypeError(f"dataset must be an ImageTensorDataset, got {type(dataset).__name__}")
        _checks.finite_number("tau", tau, positive=True)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")
        self.dataset, self.tau, self.seed = dataset, float(tau), seed
        if indices is None:
            indices = torch.arange(len(dataset), dtype=torch.int64)
        self.indices = _check_indices("indices", indices, len(dataset))
        if len(self.indices) == 0:
            raise ValueError("indices must select at least one image")

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.dataset.shape

    def noise(self, positions: torch.Tensor) -> torch.Tensor:
        """The unit noise ε of the images at ``positions``: (B, C, H, W) float32."""
        from symfast.samplers._noise import philox_normal
        source = self.indices[_check_indices("positions", positions, len(self))]
        key = torch.stack([torch.full_like(source, self.seed), source], dim=1)
        return philox_normal(key, _NOISE_STEP, (len(source),) + tuple(self.shape))

    def clean_batch(self, positions: torch.Tensor) -> torch.Tensor:
        """The clean images x behind the noisy ones at ``positions``."""
        positions = _check_indices("positions", positions, len(self))
        return self.dataset.get_batch(self.indices[positions])

    def get_batch(self, positions: torch.Tensor) -> torch.Tensor:
        """Noisy images y = x + τ ε at ``positions``: (B, C, H, W) float32."""
        return self.clean_batch(positions) + self.tau * self.noise(positions)

    def __getitem__(self, i: int) -> torch.Tensor:
        # a sequence's index: negative from the end, IndexError past it (so iteration stops)
        n = len(self)
        index = operator.index(i)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for {n} images")
        return self.get_batch(torch.tensor([index % n]))[0]

    def __repr__(self) -> str:
        return f"NoisyDataset({self.dataset.name}, tau={self.tau:g}, n={len(self)}, seed={self.seed})"


def clean_split(n: int, clean_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded split of range(n): (clean, noisy) sorted index tensors, round(clean_fraction·n)
    clean (at least 1), the rest noisy. clean_fraction in (0, 1]."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(clean_fraction, bool) or not isinstance(clean_fraction, (int, float)) \
            or not 0 < clean_fraction <= 1:
        raise ValueError(f"clean_fraction must be in (0, 1], got {clean_fraction!r}")
    n_clean = min(n, max(1, round(clean_fraction * n)))
    order = torch.randperm(n, generator=seeded_generator(seed))
    return order[:n_clean].sort().values, order[n_clean:].sort().values
