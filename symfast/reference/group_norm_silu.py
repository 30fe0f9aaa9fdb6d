"""Reference group_norm_silu: SiLU of a GroupNorm of x plus an optional per-channel shift."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm_silu(x: torch.Tensor, groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5,
                    shift: torch.Tensor | None = None) -> torch.Tensor:
    """z = silu(group_norm(x + shift[:, :, None, ...], groups, weight, bias, eps)).

    x: (B, C, *spatial); shift: (B, C) or None (added to every position of its channel);
    weight, bias: (C,) or None; groups divides C. Returns z: (B, C, *spatial).
    """
    if shift is not None:
        x = x + shift.reshape(tuple(shift.shape) + (1,) * (x.dim() - 2))
    if weight is None and bias is not None:
        # The same function; F.group_norm's backward with a bias but no weight fails in
        # torch 2.13 ("tensor does not have a device").
        weight = torch.ones_like(bias)
    # torch.group_norm, the op F.group_norm calls after a check that refuses a batch of one
    # sample whose groups hold one value each (valid here: the result is silu(bias))
    return F.silu(torch.group_norm(x, groups, weight, bias, eps, torch.backends.cudnn.enabled))
