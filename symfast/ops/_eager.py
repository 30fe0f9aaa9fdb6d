"""Eager calls of a custom op without the custom op's Python dispatch.

A ``torch.library.custom_op`` call goes through schema defaults, the dispatcher, a redispatch and
the op's own autograd wrapper, all in Python: measured ~90 us per call for symfast::tied_conv2d
and ~270 us per forward+backward for symfast::classifier_select, against a few us for an
autograd.Function. ``eager_op`` runs the op's own implementation, setup_context and backward in
an autograd.Function instead, and hands over to the custom op whenever torch.compile is tracing
(it must see the op, with its fake implementation).
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def eager_op(custom_op, impl: Callable[..., Any], setup_context: Callable[..., None],
             backward: Callable[..., Any]) -> Callable[..., Any]:
    """``custom_op``'s equivalent for eager calls. ``impl`` is the function the custom op was
    made from; ``setup_context`` and ``backward`` are the ones given to ``register_autograd``."""

    label = f"symfast.{custom_op._name}.backward"

    class _Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, *grads):
            if torch.autograd._profiler_enabled():  # a profile names the op's eager backward
                with torch.profiler.record_function(label):
                    return backward(ctx, *grads)
            return backward(ctx, *grads)

    def call(*inputs):
        if torch.compiler.is_compiling():
            return custom_op(*inputs)
        if not torch.is_grad_enabled() or not any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            return impl(*inputs)
        return _Eager.apply(*inputs)

    return call
