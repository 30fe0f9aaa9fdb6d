"""What the module fuzz tests (tests/test_fuzz_modules.py, tests/test_fuzz_models.py) share.

A module is run on the same weights and inputs with the backend under test in the drawn dtype
(``got``), with the reference backend in that dtype (``ref``), with the reference backend in
float64 (``exact``), and twice more so with the references' intermediates perturbed
(``perturbed``). The spec, per output and gradient:

* NaN/inf exactly where the reference in the same dtype has them (a NaN in an input spreads the
  same way through every backend, and a backend that makes one where the reference does not is
  a silent wrong answer);
* elsewhere no further from float64 than ``SLACK`` times the larger of the reference's own
  error and the perturbed runs' distance from float64, plus ``TOL[dtype]`` (conftest.py; 1e-5
  for fp32, 1e-2 for bf16/fp16, 1e-12 for fp64), which any backend may add.

A network's rounding errors grow with depth and conditioning for every implementation alike,
hence the reference's own error as the yardstick. It is one draw of that rounding, though, and
where an output sums terms that cancel exactly it can be a lucky one: the component of a
GroupNorm's input gradient along each group's mean is zero in exact arithmetic, and every
parameter gradient upstream of a per-group shift (a UNet's time embedding) is made of it. (The
cpu group_norm_silu backward once left the rounding of its group term there, up to 8x torch's
at the tail of ill-conditioned draws; test_fuzz_unet[cpu] found it at 2,000 examples, and the
kernel now makes that sum 0 up to elementwise rounding, tests/test_group_norm_silu.py.) The
perturbed runs put the rounding each op's contract allows into the references' softmax and
normalisations
(``_perturbed_intermediates`` of tests/test_fuzz_ops.py, the op fuzz suite's conditioning model:
relative perturbations of the working precision, and u times the terms of a normalisation's
input gradient), so an output's allowance is what the ops' own specs admit there.

The op fuzz suite also holds the budget (``SYMFAST_FUZZ_EXAMPLES``), the hypothesis settings,
and the tensor layouts this suite reuses.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from hypothesis import note

from conftest import TOL, rel_err
from test_fuzz_ops import _perturbed_intermediates

SLACK = 4.0


def _finite_parts(got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, name: str):
    """The backend's and the reference's NaN/inf patterns agree; the elements finite in both
    references (same dtype and float64), as float64 on the CPU."""
    got, ref, exact = (t.detach().cpu() for t in (got, ref, exact))
    assert tuple(got.shape) == tuple(ref.shape) == tuple(exact.shape), (
        f"{name}: shapes {tuple(got.shape)}, reference {tuple(ref.shape)}, float64 {tuple(exact.shape)}")
    assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype}, the reference gives {ref.dtype}"
    finite_got, finite_ref = torch.isfinite(got), torch.isfinite(ref)
    mismatch = int((finite_got != finite_ref).sum())
    assert mismatch == 0, (f"{name}: {mismatch} of {got.numel()} elements are finite in one of "
                           f"the backend and the reference only")
    return finite_ref & torch.isfinite(exact)


def close_to_reference(name: str, got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor,
                       dtype: torch.dtype, perturbed: list) -> None:
    """``got`` (backend under test) against ``ref`` (reference backend, same dtype), ``exact``
    (reference backend, float64) and ``perturbed`` (float64 runs with the references'
    intermediates perturbed), as the module docstring specifies."""
    keep = _finite_parts(got, ref, exact, name)
    if not bool(keep.any()):
        return

    def err(t: torch.Tensor) -> float:
        return rel_err(t.detach().cpu()[keep], exact.detach().cpu()[keep])

    err_got, err_ref = err(got), err(ref)
    err_pert = max((err(p) for p in perturbed), default=0.0)
    allowed = SLACK * max(err_ref, err_pert) + TOL[dtype]
    note(f"{name}: rel_err {err_got:.3g}, the reference's {err_ref:.3g}, perturbed {err_pert:.3g} "
         f"({dtype})")
    assert err_got <= allowed, (
        f"{name}: rel_err {err_got:.3g} from float64; the reference's own {err_ref:.3g}, the "
        f"perturbed references' {err_pert:.3g} ({dtype}; allowed {allowed:.3g})")


def close_in_total(name: str, got: dict, ref: dict, exact: dict, dtype: torch.dtype,
                   perturbed: list) -> None:
    """A module's parameter gradients ({parameter: gradient}) compared as one vector, each
    parameter's NaN/inf pattern on its own."""
    assert got.keys() == ref.keys() == exact.keys()
    for k in exact:
        _finite_parts(got[k], ref[k], exact[k], f"{name} {k}")

    def flat(d: dict) -> torch.Tensor:
        return torch.cat([d[k].detach().reshape(-1) for k in exact])

    close_to_reference(name, flat(got), flat(ref), flat(exact), dtype, [flat(p) for p in perturbed])


def rounding_sensitivity(run: Callable[[], torch.Tensor]) -> float:
    """How far ``run()``, a float64 computation on the reference backend, moves when its softmax
    and normalisations are perturbed at float64's working precision (the conditioning model of
    :func:`run_three`): what the rounding of another summation order can become through this
    computation at this input. The larger of two perturbed runs."""
    base = run()
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(2):
        with _perturbed_intermediates(2.0 ** -52, gen):
            worst = max(worst, rel_err(run(), base))
    return worst


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
    """``run(backend, compute)`` -> {name: tensor, or {parameter: gradient}}, inputs and weights
    :func:`rounded` to ``dtype`` and computed in ``compute``: the backend under test and the
    reference in ``dtype``, the reference in float64, and the float64 reference twice with its
    intermediates perturbed by the kernels' working precision (2^-24 below float64), compared
    name by name."""
    got = run(backend, dtype)
    ref = run("reference", dtype)
    exact = run("reference", torch.float64)
    u = 2.0 ** -52 if dtype == torch.float64 else 2.0 ** -24
    gen = torch.Generator().manual_seed(0)
    perturbed = []
    for _ in range(2):
        with _perturbed_intermediates(u, gen):
            perturbed.append(run("reference", torch.float64))
    assert got.keys() == ref.keys() == exact.keys()
    for name in got:
        compare = close_in_total if isinstance(got[name], dict) else close_to_reference
        compare(name, got[name], ref[name], exact[name], dtype, [p[name] for p in perturbed])
