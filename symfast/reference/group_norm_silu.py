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
    # Written out (not torch.group_norm, which computes x·scale + (bias − mean·scale)): x − mean
    # is then exactly 0 in a group of one element, so z = silu(bias) there as the spec says,
    # where torch's form leaves ~2^-24·|x|/sqrt(eps). In fp32 (fp64 for fp64), as the kernels.
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, c = x.shape[:2]
    per_group = (c // groups) * x[0, 0].numel() if b and c else 0
    xg = x.to(acc).reshape(b, groups, per_group)
    d = xg - xg.mean(-1, keepdim=True)
    xhat = (d * torch.rsqrt((d * d).mean(-1, keepdim=True) + eps)).reshape(x.shape)
    channel = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        xhat = xhat * weight.to(acc).reshape(channel)
    if bias is not None:
        xhat = xhat + bias.to(acc).reshape(channel)
    return F.silu(xhat).to(x.dtype)
