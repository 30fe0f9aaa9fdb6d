"""Reference orbit / orbit_mean, written with the group's own actions (torch.rot90, flip, ...)."""
from __future__ import annotations

import torch

from symfast.groups import Group


def orbit(x: torch.Tensor, group: Group, out: torch.Tensor | None = None) -> torch.Tensor:
    """x: (B, ...) -> (|G|·B, ...), element-major: block k is g_k x; written into ``out`` when
    given (checked by symfast.ops.orbit)."""
    group.check_input(x)
    if x.dim() == group.event_ndim:
        raise ValueError(f"x has shape {tuple(x.shape)}: needs a batch dim before the "
                         f"{group.event_ndim} dims group {group.name} acts on")
    blocks = [group.elements[k](x) for k in range(len(group))]
    for k, block in enumerate(blocks):
        group.check_image(k, x, block)
    return torch.cat(blocks, dim=0) if out is None else torch.cat(blocks, dim=0, out=out)


def orbit_mean(y: torch.Tensor, group: Group) -> torch.Tensor:
    """y: (|G|·B, ...) -> (B, ...) = 1/|G| Σ_k g_k⁻¹ y_k, y_k = y[k·B:(k+1)·B]."""
    group.check_input(y, "y")
    n = len(group)
    if y.dim() == group.event_ndim or y.shape[0] % n != 0:
        raise ValueError(f"y has shape {tuple(y.shape)}: its first dim must be a multiple of "
                         f"|G| = {n} (group {group.name})")
    # summed in fp32 for fp16/bf16 (as the kernels do): |G| fp16 blocks near 65504/|G| overflow
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    blocks = y.to(acc).chunk(n, dim=0)
    total = group.elements[group.inverse(0)](blocks[0])
    for k in range(1, n):
        total = total + group.elements[group.inverse(k)](blocks[k])
    return (total / n).to(y.dtype)
