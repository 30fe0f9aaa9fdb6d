"""Public classifier_select op (the CAB-CNN head): checks, the backend switch, registration.

``symfast::classifier_select`` returns the mixed logits and the raw scores
(B, K + K·C) = [gate scores | K·C class logits], biases included, in fp32 for bf16/fp16
inputs (as the reference computes them); the backward
(``symfast::classifier_select_backward``) reuses the scores instead of redoing the GEMM.
"""
from __future__ import annotations

import torch

from symfast import _backend
from symfast.ops import _checks, _dispatch
from symfast.reference import classifier_select as reference

_OP = "classifier_select"


@_dispatch.forwarding(_OP, cpu="classifier_select_fwd_cpu", triton="forward")
def _select_impl(h: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor,
                 weight: torch.Tensor, bias: torch.Tensor, temperature: float,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, C) and the scores (B, K + K·C) the backward reuses."""


def _select_fake(h, gate_weight, gate_bias, weight, bias, temperature, backend):
    k, c, _ = weight.shape
    return (h.new_empty((h.shape[0], c)),
            h.new_empty((h.shape[0], k + k * c), dtype=torch.promote_types(h.dtype, torch.float32)))


@_dispatch.forwarding(_OP, cpu="classifier_select_bwd_cpu", triton="backward")
def _select_backward_impl(grad_out: torch.Tensor, scores: torch.Tensor, h: torch.Tensor,
                          gate_weight: torch.Tensor, weight: torch.Tensor, temperature: float,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor]:
    """Gradients of h, gate_weight, gate_bias, weight and bias."""


def _select_backward_fake(grad_out, scores, h, gate_weight, weight, temperature, backend):
    k, c, _ = weight.shape
    return (torch.empty_like(h, memory_format=torch.contiguous_format),
            torch.empty_like(gate_weight, memory_format=torch.contiguous_format),
            gate_weight.new_empty((k,)),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty((k, c)))


_select_backward_op = _dispatch.custom_op("symfast::classifier_select_backward",
                                          _select_backward_impl, _select_backward_fake)


def _setup_context(ctx, inputs, output):
    h, gate_weight, _, weight, _, temperature, backend = inputs
    ctx.save_for_backward(h, gate_weight, weight, output[1])
    ctx.temperature, ctx.backend = temperature, backend
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no (B, K + K·C) zero tensor for the unused scores grad


def _make_backward(backward_op):
    """The backward, through the backward custom op (or its impl when eager)."""
    def backward(ctx, grad_out, _grad_scores):
        if grad_out is None:
            return (None,) * 7
        h, gate_weight, weight, scores = ctx.saved_tensors
        grads = backward_op(grad_out.contiguous(), scores, h, gate_weight, weight,
                            ctx.temperature, ctx.backend)
        return (*grads, None, None)
    return backward


_select_op, _select_eager = _dispatch.kernel_op(
    "symfast::classifier_select", _select_impl, _select_fake, _setup_context, _make_backward,
    _select_backward_op, _select_backward_impl)


_MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max


def check_temperature(temperature) -> None:
    """A finite temperature the kernels can divide by (modules check it at construction)."""
    _checks.real("temperature", temperature)
    if not (0 < float(temperature) < float("inf")):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    # the kernels scale by 1/temperature in fp32: below this it is inf and every gate NaN
    if float(temperature) < _MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {_MIN_TEMPERATURE:.3g} (1 / the largest fp32), "
                         f"got {temperature}")


def _check(h, gate_weight, gate_bias, weight, bias, temperature) -> None:
    named = {"h": h, "gate_weight": gate_weight, "gate_bias": gate_bias, "weight": weight,
             "bias": bias}
    for name, t in named.items():
        _checks.floating(name, t)
        _checks.like(name, t, "h", h)
    if h.dim() != 2:
        raise ValueError(f"h must be (B, F), got shape {tuple(h.shape)}")
    f = h.shape[1]
    if gate_weight.dim() != 2 or gate_weight.shape[1] != f or gate_weight.shape[0] < 1:
        raise ValueError(f"gate_weight must be (K, {f}) with K >= 1, got shape {tuple(gate_weight.shape)}")
    k = gate_weight.shape[0]
    if gate_bias.shape != (k,):
        raise ValueError(f"gate_bias must be ({k},), got shape {tuple(gate_bias.shape)}")
    if weight.dim() != 3 or weight.shape[0] != k or weight.shape[2] != f or weight.shape[1] < 1:
        raise ValueError(f"weight must be ({k}, C, {f}) with C >= 1, got shape {tuple(weight.shape)}")
    c = weight.shape[1]
    if bias.shape != (k, c):
        raise ValueError(f"bias must be ({k}, {c}), got shape {tuple(bias.shape)}")
    check_temperature(temperature)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def triton_tile_fits(k: int, c: int) -> bool:
    """Whether the Triton kernels' one (next_power_of_2(K), next_power_of_2(C)) tile of a row's
    logits stays within Triton's 2^20 values per tensor (ImageNet-21k's C = 21843 with K = 64 did
    not compile)."""
    return _pow2(k) * _pow2(c) <= 2**20


@_backend.profiled("classifier_select")
def classifier_select(h: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor,
                      weight: torch.Tensor, bias: torch.Tensor, temperature: float = 1.0, *,
                      backend: str | None = None) -> torch.Tensor:
    """Attention over K classifiers: logits (B, C) =
    Σ_k softmax_k((gate_weight h + gate_bias)/temperature) · (weight_k h + bias_k).

    h: (B, F); gate_weight: (K, F); gate_bias: (K,); weight: (K, C, F); bias: (K, C).
    Differentiable in every tensor argument. ``backend``: "reference", "cpu", "triton", or
    None/"auto" for the fastest for h's device. Under torch.autocast every tensor is cast to
    autocast's dtype first, as F.linear's inputs are (autocast does not cast a custom op's).
    """
    h, gate_weight, gate_bias, weight, bias = _backend.cast_for_autocast(h, gate_weight, gate_bias, weight, bias)
    _check(h, gate_weight, gate_bias, weight, bias, temperature)
    requested, backend = backend, _dispatch.resolve(backend, h, _OP)
    if backend == "triton" and not triton_tile_fits(*weight.shape[:2]):
        if requested == "triton":
            k, c = weight.shape[:2]
            raise ValueError(f"backend='triton' holds a row's K x C logits in one tile of "
                             f"next_power_of_2(K) x next_power_of_2(C) values, at most 2^20 for "
                             f"Triton's compiler; K={k}, C={c} need {_pow2(k) * _pow2(c)}: use "
                             f"backend='reference' (or None, which does so for such sizes)")
        backend = "reference"
    if backend == "reference":
        return reference.classifier_select(h, gate_weight, gate_bias, weight, bias, temperature)
    out, _ = _select_eager(h, gate_weight, gate_bias, weight, bias, float(temperature), backend)
    return out
