"""What the module fuzz tests (tests/test_fuzz_modules.py, tests/test_fuzz_models.py) share.

A module is run three ways on the same weights and inputs: with the backend under test in the
drawn dtype (``got``), with the reference backend in that dtype (``ref``) and with the reference
backend in float64 (``exact``). The spec, per output and gradient:

* NaN/inf exactly where the reference in the same dtype has them (a NaN in an input spreads the
  same way through every backend, and a backend that makes one where the reference does not is
  a silent wrong answer);
* elsewhere no further from float64 than ``SLACK`` times the reference's own error plus
  ``TOL[dtype]``: a network's rounding errors grow with depth and conditioning for every
  implementation alike, so the reference's own error in that dtype is the yardstick, and TOL
  (conftest.py; 1e-5 for fp32, 1e-2 for bf16/fp16, 1e-12 for fp64) is what any backend may add.

The op fuzz suite (tests/test_fuzz_ops.py) holds the budget (``SYMFAST_FUZZ_EXAMPLES``), the
hypothesis settings, and the tensor layouts this suite reuses.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from hypothesis import note

from conftest import TOL, rel_err

SLACK = 4.0


def _finite_parts(got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, name: str):
    got, ref, exact = (t.detach().cpu() for t in (got, ref, exact))
    assert tuple(got.shape) == tuple(ref.shape) == tuple(exact.shape), (
        f"{name}: shapes {tuple(got.shape)}, reference {tuple(ref.shape)}, float64 {tuple(exact.shape)}")
    assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype}, the reference gives {ref.dtype}"
    finite_got, finite_ref = torch.isfinite(got), torch.isfinite(ref)
    mismatch = int((finite_got != finite_ref).sum())
    assert mismatch == 0, (f"{name}: {mismatch} of {got.numel()} elements are finite in one of "
                           f"the backend and the reference only")
    keep = finite_ref & torch.isfinite(exact)
    return got[keep], ref[keep], exact[keep]


def close_to_reference(name: str, got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor,
                       dtype: torch.dtype) -> None:
    """``got`` (backend under test) against ``ref`` (reference backend, same dtype) and ``exact``
    (reference backend, float64), as the module docstring specifies."""
    got, ref, exact = _finite_parts(got, ref, exact, name)
    if exact.numel() == 0:
        return
    err_got, err_ref = rel_err(got, exact), rel_err(ref, exact)
    note(f"{name}: rel_err {err_got:.3g}, the reference's {err_ref:.3g} ({dtype})")
    assert err_got <= SLACK * err_ref + TOL[dtype], (
        f"{name}: rel_err {err_got:.3g} from float64, the reference's own {err_ref:.3g} "
        f"({dtype}; allowed {SLACK:g}x that + {TOL[dtype]:g})")


def close_in_total(name: str, got: dict, ref: dict, exact: dict, dtype: torch.dtype,
                   share: float = 1e-3) -> None:
    """A module's parameter gradients ({parameter: gradient}) compared as one vector, of the
    parameters whose exact gradient is at least ``share`` of the largest one's norm; the others
    only for NaN/inf where the reference has them.

    A gradient that is zero by cancellation (a bias before a GroupNorm of one channel per group,
    which the mean subtraction removes, and every parameter feeding only into it) comes out as
    the rounding of the terms that cancel, in every backend: its size depends on how the formula
    is arranged more than on accuracy (found at 400 examples: torch's GroupNorm backward left
    such a sum at 1e-7, symfast's fused one at 1.8e-5, the sum of its three terms' errors, each
    within 2x of torch's), so there is nothing to compare it with."""
    assert got.keys() == ref.keys() == exact.keys()
    norms = {k: float(exact[k].detach().double().norm()) for k in exact}
    floor = share * max(norms.values(), default=0.0)
    kept = [k for k in exact if norms[k] > floor]
    for k in exact:
        _finite_parts(got[k], ref[k], exact[k], f"{name} {k}")
    note(f"{name}: {len(kept)} of {len(exact)} compared (exact norm > {floor:.3g})")
    if kept:
        close_to_reference(name, *(torch.cat([d[k].detach().reshape(-1) for k in kept])
                                   for d in (got, ref, exact)), dtype)


def rounded(t: torch.Tensor, dtype: torch.dtype, compute: torch.dtype) -> torch.Tensor:
    """``t`` rounded to the tested ``dtype``, then held in ``compute`` (the float64 run computes
    exactly on the values the tested dtype holds)."""
    return t.to(dtype).to(compute)


def with_backend(module: torch.nn.Module, backend: str, dtype: torch.dtype,
                 compute: torch.dtype) -> torch.nn.Module:
    """A copy of ``module`` with its weights :func:`rounded` to ``dtype`` and held in ``compute``,
    whose every submodule with a ``backend`` attribute uses ``backend``."""
    out = copy.deepcopy(module).to(dtype).to(compute)
    for m in out.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return out


def grads(outputs: torch.Tensor, inputs: list, seed: torch.Tensor) -> list:
    """d<outputs, seed>/d inputs (zeros where unused)."""
    if not outputs.requires_grad:
        return [torch.zeros_like(i) for i in inputs]
    found = torch.autograd.grad(outputs, inputs, seed, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(found, inputs)]


def run_three(run: Callable[[str, torch.dtype], dict], backend: str, dtype: torch.dtype) -> None:
    """``run(backend, compute)`` -> {name: tensor, or {parameter: gradient}}, inputs and weights :func:`rounded` to ``dtype``
    and computed in ``compute``: the backend under test and the reference in ``dtype``, and the
    reference in float64, compared name by name."""
    got = run(backend, dtype)
    ref = run("reference", dtype)
    exact = run("reference", torch.float64)
    assert got.keys() == ref.keys() == exact.keys()
    for name in got:
        compare = close_in_total if isinstance(got[name], dict) else close_to_reference
        compare(name, got[name], ref[name], exact[name], dtype)
