"""Reference classifier selection (CAB-CNN head, the CAB-CNN paper): plain PyTorch, the specification.

K simple linear classifiers share the features h; a gate scores them, a softmax over the K
scores selects among them, and the output is the selection-weighted mix of their logits.
"""
from __future__ import annotations

import torch


def gate_softmax(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(scores / temperature) over the last dim, shifted by the max before the scaling:
    scores / temperature overflows for a small temperature (inf − inf = NaN), (s − max s) / T
    does not, and the gates tend to the argmax's one-hot."""
    return torch.softmax((scores - scores.amax(-1, keepdim=True).detach()) / temperature, dim=-1)


def classifier_select(h: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor,
                      weight: torch.Tensor, bias: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """logits (B, C) = Σ_k softmax_k((gate_weight h + gate_bias)/temperature) · (weight_k h + bias_k).

    h: (B, F); gate_weight: (K, F); gate_bias: (K,); weight: (K, C, F); bias: (K, C).
    bf16/fp16 inputs are computed in fp32 and the result rounded once to the input dtype: the
    gate gradient g·(dg − Σ g dg) cancels, and bf16 intermediates lose ~2% there.
    """
    dtype = h.dtype
    compute = torch.promote_types(dtype, torch.float32)
    h, gate_weight, gate_bias, weight, bias = (
        t.to(compute) for t in (h, gate_weight, gate_bias, weight, bias))
    gates = gate_softmax(h @ gate_weight.T + gate_bias, temperature)  # (B, K)
    logits = torch.einsum("bf,kcf->bkc", h, weight) + bias  # (B, K, C)
    return torch.einsum("bk,bkc->bc", gates, logits).to(dtype)
