"""The sampler arithmetic shared by ``symfast.sample``, the diffusers schedulers and the k-diffusion
samplers, written once: EDM's churn γ and σ̂, the ancestral split (σ_down, σ_up) and the
DPM-Solver++(2M) terms.

Each function takes host floats (``symfast.sample`` and every fused path, with ``math``'s
functions) or float32 tensors (the diffusers and k-diffusion drop-ins, with torch's, so they keep
upstream's float32 rounding: torch's CPU transcendentals are not correctly rounded, so only the same
ops in the same order reproduce upstream to the bit). Where upstream combines these terms in an
order of its own, the caller keeps that order (documented there): the k-diffusion DPM-Solver++(2M)
update, and diffusers' DPM-Solver, which works in λ = log α − log σ for all its algorithm types and
orders (symfast/integrations/diffusers/dpm.py).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

SQRT2_MINUS_1 = 2 ** 0.5 - 1  # EDM's cap on γ: σ̂ ≤ √2 σ


def pow_half(t: Any) -> Any:
    """t ** 0.5, upstream's spelling of √ on float32 tensors (torch computes it as sqrt)."""
    return t ** 0.5


def churn_gamma(sigma: float, steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """EDM's γ_i (Karras et al. 2022, Alg. 2): min(S_churn/N, √2 − 1) for σ_i in [S_tmin, S_tmax],
    else 0. ``sigma`` is a host float."""
    return min(s_churn / steps, SQRT2_MINUS_1) if s_tmin <= sigma <= s_tmax else 0.0


def churn_levels(sigma: Any, gamma: float, sqrt: Callable[[Any], Any] = math.sqrt) -> tuple[Any, Any]:
    """(σ̂, the churn noise's std): σ̂ = σ(γ + 1) and √(σ̂² − σ²)."""
    sigma_hat = sigma * (gamma + 1)
    return sigma_hat, sqrt(sigma_hat ** 2 - sigma ** 2)


def ancestral_split(sigma: Any, sigma_next: Any, eta: float = 1.0, sqrt: Callable[[Any], Any] = math.sqrt,
                    minimum: Callable[[Any, Any], Any] = min) -> tuple[Any, Any]:
    """(σ_down, σ_up) of an ancestral step, k-diffusion's get_ancestral_step:
    σ_up = min(σ', η √(σ'² (σ² − σ'²) / σ²)), σ_down = √(σ'² − σ_up²); (σ', 0) when η = 0 or σ' = 0.
    ``minimum``: ``torch.minimum`` for a table of steps."""
    if not eta or (isinstance(sigma_next, float) and sigma_next == 0.0):
        return sigma_next, 0.0
    up = sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
    up = minimum(sigma_next, eta * up)
    return sqrt(sigma_next ** 2 - up ** 2), up


class Dpmpp2m(NamedTuple):
    """DPM-Solver++(2M) from σ_i to σ_{i+1} in t = −log σ: h = t_{i+1} − t_i, ``expm1_neg_h`` =
    expm1(−h), r = (t_i − t_{i−1})/h (None on the first step), and the weights of
    D_i' = (1 + 1/(2r)) D_i − 1/(2r) D_{i−1}; the update is x' = (σ_{i+1}/σ_i) x − expm1(−h) D_i'."""

    h: Any
    expm1_neg_h: Any
    r: Any
    c_new: Any
    c_old: Any


def dpmpp_2m(t_prev: Any, t: Any, t_next: Any, expm1: Callable[[Any], Any] = math.expm1) -> Dpmpp2m:
    """The :class:`Dpmpp2m` terms; ``t_prev`` None on the first step (first order)."""
    h = t_next - t
    if t_prev is None:
        return Dpmpp2m(h, expm1(-h), None, 1.0, 0.0)
    r = (t - t_prev) / h
    return Dpmpp2m(h, expm1(-h), r, 1 + 1 / (2 * r), 1 / (2 * r))
