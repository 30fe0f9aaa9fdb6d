"""The attention text classifier of Lu, Mao, Nayak (ICLR 2021), on symfast's attention_pool."""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from symfast.ops import _checks
from symfast.ops.attention_pool import attention_pool

HEADS = ("fc", "tc", "tl")


class AttentionClassifier(nn.Module):
    """Word w has an embedding v_w (also its value) and a key κ_w; one global query q scores the
    words, s_w = qᵀκ_w; the sentence vector v̄ = Σ_j softmax_j(s) v_{w_j} goes to a head:
    "fc" a fixed random linear map with unit diagonal, "tc" the same map trainable, "tl" two
    layers with ``hidden`` units. The paper's initialisation: keys 0, embeddings N(0, 1e-6²),
    query N(0, 0.3²) (trained only with ``train_query``); every parameter is drawn from
    ``generator`` when one is given.

    forward(tokens (B, L), lengths (B,) or None) -> logits (B, n_classes).
    """

    def __init__(self, vocab_size: int, d: int, d_k: int, n_classes: int, head: str = "fc",
                 train_query: bool = False, hidden: int = 10, mask_padding: bool = True,
                 backend: str | None = None, generator: torch.Generator | None = None):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d", d), ("d_k", d_k),
                            ("n_classes", n_classes), ("hidden", hidden)):
            _checks.positive_int(name, value)
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        # at construction: an int here would fail only later, inside torch or attention_pool
        _checks.flag("train_query", train_query)
        _checks.flag("mask_padding", mask_padding)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        _checks.backend_name(backend)
        self.head_kind, self.mask_padding, self.backend = head, mask_padding, backend
        self.embedding = nn.Parameter(torch.randn(vocab_size, d, generator=generator) * 1e-6)
        self.keys = nn.Parameter(torch.zeros(vocab_size, d_k))
        self.query = nn.Parameter(torch.randn(d_k, generator=generator) * 0.3,
                                  requires_grad=train_query)
        if head == "tl":
            # nn.Linear's own init draws from the global RNG: with a generator the layers are
            # made uninitialised (skip_init: no draw) and drawn from it, U(±1/sqrt(fan_in)) as
            # nn.Linear's; building the model then leaves the global stream where it was
            linear = nn.Linear if generator is None else functools.partial(nn.utils.skip_init, nn.Linear)
            self.head = nn.Sequential(linear(d, hidden), nn.ReLU(), linear(hidden, n_classes))
            if generator is not None:
                with torch.no_grad():
                    for layer in (self.head[0], self.head[2]):
                        bound = 1 / math.sqrt(layer.in_features)
                        layer.weight.uniform_(-bound, bound, generator=generator)
                        layer.bias.uniform_(-bound, bound, generator=generator)
        else:
            weight = torch.randn(n_classes, d, generator=generator) / d ** 0.5
            diagonal = torch.arange(min(n_classes, d))
            weight[diagonal, diagonal] = 1.0
            self.head = nn.utils.skip_init(nn.Linear, d, n_classes, bias=False)  # weight set here
            self.head.weight = nn.Parameter(weight, requires_grad=head == "tc")

    def pool(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None,
             return_weights: bool = False):
        """The sentence vectors v̄ (B, d), and the attention weights (B, L) when asked."""
        return attention_pool(tokens, lengths, self.embedding, self.keys, self.query,
                              mask_padding=self.mask_padding, return_weights=return_weights,
                              backend=self.backend)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None,
                return_weights: bool = False):
        if return_weights:
            pooled, weights = self.pool(tokens, lengths, True)
            return self.head(pooled), weights
        return self.head(self.pool(tokens, lengths))

    def scores(self) -> torch.Tensor:
        """s_w = qᵀκ_w for every word: (V,)."""
        return self.keys @ self.query
