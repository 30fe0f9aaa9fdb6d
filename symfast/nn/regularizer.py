"""The equivariance regulariser (Reg): ‖F(x_t) − g⁻¹ F_target(g x_t)‖² with one random g per sample."""
from __future__ import annotations

from typing import Callable

import torch

from symfast.groups import Group, get
from symfast._symmetrize import _main_tensor


def act_per_sample(x: torch.Tensor, index: torch.Tensor, group: Group) -> torch.Tensor:
    """Apply g_{index[b]} to sample b. x: (B, ...), index: (B,) int64 on the CPU."""
    out = torch.empty_like(x)
    for k in torch.unique(index).tolist():
        rows = (index == k).nonzero().squeeze(1).to(x.device)
        out[rows] = group.act(x[rows], k)
    return out


@torch.no_grad()
def equivariance_target(target: Callable[..., torch.Tensor], x_t: torch.Tensor,
                        sigma: torch.Tensor | float, group: Group, index: torch.Tensor) -> torch.Tensor:
    """g_b⁻¹ F_target(g_b x_t[b], σ) for every sample b, with g_b = element ``index[b]``, under
    no_grad (the regulariser's stop-gradient). x_t: (B, ...), index: (B,) int64 on the CPU."""
    target_out = _main_tensor(target(act_per_sample(x_t, index, group), sigma))
    inverse = torch.tensor([group.inverse(k) for k in index.tolist()], dtype=torch.int64)
    return act_per_sample(target_out, inverse, group)


def equivariance_loss(model: Callable[..., torch.Tensor], x_t: torch.Tensor,
                      sigma: torch.Tensor | float, group: Group | str,
                      target: Callable[..., torch.Tensor] | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean over samples and elements of (F(x_t, σ) − g⁻¹ F_target(g x_t, σ))², with g drawn
    uniformly and independently per sample.

    x_t: (B, C, H, W); sigma: scalar or (B,) (invariant, passed to both calls unchanged).
    ``target``: the frozen EMA model; None uses ``model`` itself. The target branch runs under
    no_grad (stop-gradient), so gradients reach ``model`` through F(x_t) only.
    ``generator``: a CPU torch.Generator for the choice of g.
    (:meth:`symfast.Denoiser.loss` with ``reg_weight`` adds the same term to the training loss,
    sharing F(x_t) with the denoising loss.)
    """
    group = get(group)
    if not isinstance(x_t, torch.Tensor) or not x_t.is_floating_point() or x_t.dim() < 1:
        raise TypeError(f"x_t must be a floating-point tensor with a batch dim, got "
                        f"{getattr(x_t, 'dtype', type(x_t).__name__)}")
    group.check_input(x_t, "x_t")
    if x_t.shape[0] == 0:  # the mean over no samples is NaN, which would poison a training loss
        raise ValueError(f"x_t must hold at least one sample, got shape {tuple(x_t.shape)}")
    index = torch.randint(len(group), (x_t.shape[0],), generator=generator)
    pulled_back = equivariance_target(target or model, x_t, sigma, group, index)
    out = _main_tensor(model(x_t, sigma))  # a tuple or diffusers output, as symmetrize takes
    return (out - pulled_back).pow(2).mean()
