"""Public classifier_select op (the CAB-CNN head): checks, the backend switch, registration.

``symfast::classifier_select`` returns the mixed logits and the raw scores
(B, K + K·C) = [gate scores | K·C class logits], biases included, in fp32 for bf16/fp16
inputs (as the reference computes them); the backward
(``symfast::classifier_select_backward``) reuses the scores instead of redoing the GEMM.
"""
from __future__ import annotations

import numbers

import torch

from symfast import _backend
from symfast.ops._eager import eager_op
from symfast.reference import classifier_select as reference

_OP = "classifier_select"


def _forward(backend, h, gate_weight, gate_bias, weight, bias, temperature):
    if backend == "cpu":
        _backend.resolve("cpu", h, _OP)  # loads the extension on first use
        return torch.ops.symfast.classifier_select_fwd_cpu(h, gate_weight, gate_bias, weight,
                                                           bias, temperature)
    if backend == "triton":
        from symfast.kernels import classifier_select as triton_kernels
        return triton_kernels.forward(h, gate_weight, gate_bias, weight, bias, temperature)
    raise ValueError(f"backend must be 'cpu' or 'triton' for symfast::classifier_select, got {backend!r}")


def _backward(grad_out, scores, h, gate_weight, weight, temperature, backend):
    if backend == "cpu":
        _backend.resolve("cpu", h, _OP)
        return torch.ops.symfast.classifier_select_bwd_cpu(grad_out, scores, h, gate_weight,
                                                           weight, temperature)
    if backend == "triton":
        from symfast.kernels import classifier_select as triton_kernels
        return triton_kernels.backward(grad_out, scores, h, gate_weight, weight, temperature)
    raise ValueError(f"backend must be 'cpu' or 'triton' for symfast::classifier_select, got {backend!r}")


def _select_impl(h: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor,
                 weight: torch.Tensor, bias: torch.Tensor, temperature: float,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    out, scores = _forward(backend, h, gate_weight, gate_bias, weight, bias, temperature)
    return out, scores


_select_op = torch.library.custom_op("symfast::classifier_select", mutates_args=())(_select_impl)


@_select_op.register_fake
def _(h, gate_weight, gate_bias, weight, bias, temperature, backend):
    k, c, _ = weight.shape
    return (h.new_empty((h.shape[0], c)),
            h.new_empty((h.shape[0], k + k * c), dtype=torch.promote_types(h.dtype, torch.float32)))


@torch.library.custom_op("symfast::classifier_select_backward", mutates_args=())
def _select_backward_op(grad_out: torch.Tensor, scores: torch.Tensor, h: torch.Tensor,
                        gate_weight: torch.Tensor, weight: torch.Tensor, temperature: float,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor, torch.Tensor]:
    return tuple(_backward(grad_out, scores, h, gate_weight, weight, temperature, backend))


@_select_backward_op.register_fake
def _(grad_out, scores, h, gate_weight, weight, temperature, backend):
    k, c, _ = weight.shape
    return (torch.empty_like(h, memory_format=torch.contiguous_format),
            torch.empty_like(gate_weight, memory_format=torch.contiguous_format),
            gate_weight.new_empty((k,)),
            torch.empty_like(weight, memory_format=torch.contiguous_format),
            weight.new_empty((k, c)))


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


_select_op.register_autograd(_make_backward(_select_backward_op), setup_context=_setup_context)
_select_eager = eager_op(_select_op, _select_impl, _setup_context, _make_backward(_backward))


_MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max


def _check(h, gate_weight, gate_bias, weight, bias, temperature) -> None:
    named = {"h": h, "gate_weight": gate_weight, "gate_bias": gate_bias, "weight": weight,
             "bias": bias}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != h.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but h has {h.dtype}; all must match")
        if t.device != h.device:
            raise ValueError(f"{name} is on {t.device} but h is on {h.device}")
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
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not (0 < float(temperature) < float("inf")):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    # the kernels scale by 1/temperature in fp32: below this it is inf and every gate NaN
    if float(temperature) < _MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {_MIN_TEMPERATURE:.3g} (1 / the largest fp32), "
                         f"got {temperature}")


@_backend.profiled("classifier_select")
def classifier_select(h: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor,
                      weight: torch.Tensor, bias: torch.Tensor, temperature: float = 1.0, *,
                      backend: str | None = None) -> torch.Tensor:
    """Attention over K classifiers: logits (B, C) =
    Σ_k softmax_k((gate_weight h + gate_bias)/temperature) · (weight_k h + bias_k).

    h: (B, F); gate_weight: (K, F); gate_bias: (K,); weight: (K, C, F); bias: (K, C).
    Differentiable in every tensor argument. ``backend``: "reference", "cpu", "triton", or
    None/"auto" for the fastest for h's device.
    """
    _check(h, gate_weight, gate_bias, weight, bias, temperature)
    backend = _backend.resolve(backend, h, _OP)
    if backend == "reference":
        return reference.classifier_select(h, gate_weight, gate_bias, weight, bias, temperature)
    out, _ = _select_eager(h, gate_weight, gate_bias, weight, bias, float(temperature), backend)
    return out
