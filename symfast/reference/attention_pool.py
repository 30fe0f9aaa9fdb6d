"""Reference attention pooling (Lu, Mao, Nayak, ICLR 2021): gather, softmax, einsum.

One global query q scores every word of a sentence through its key, s_j = qᵀ keys[w_j]; the
sentence vector is the softmax-weighted sum of the words' embeddings (which are also the values).
"""
from __future__ import annotations

import torch


def attention_scores(tokens: torch.Tensor, lengths: torch.Tensor, keys: torch.Tensor,
                     query: torch.Tensor, mask_padding: bool = True) -> torch.Tensor:
    """Softmax weights (B, L) in the accumulation dtype (fp32 for fp32/bf16/fp16, fp64 for fp64).

    tokens: (B, L) int; lengths: (B,); keys: (V, d_k); query: (d_k,). With ``mask_padding``
    positions j >= lengths[b] get weight 0; without it the softmax runs over all L positions
    (the padding token then takes part, as in the paper's code).
    """
    acc = torch.float64 if keys.dtype == torch.float64 else torch.float32
    # the table is cast before the gather, so the gather's backward adds a repeated word's
    # gradients in the accumulation dtype (as the kernels do), not in bf16/fp16
    gathered = keys.to(acc)[tokens]
    if mask_padding:
        masked = padding_mask(tokens, lengths)
        # zeroed first: a NaN key there would reach the query's gradient through 0·NaN
        scores = gathered.masked_fill(masked[..., None], 0.0) @ query.to(acc)
        scores = scores.masked_fill(masked, float("-inf"))
    else:
        scores = gathered @ query.to(acc)
    return torch.softmax(scores, dim=-1)


def padding_mask(tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, L) bool, True at the positions j >= lengths[b] (past a sentence's end)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    return positions[None, :] >= lengths[:, None]


def attention_pool(tokens: torch.Tensor, lengths: torch.Tensor, embedding: torch.Tensor,
                   keys: torch.Tensor, query: torch.Tensor,
                   mask_padding: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """pooled (B, d) = Σ_j softmax_j(queryᵀ keys[tokens[b, j]]) · embedding[tokens[b, j]], and
    the weights (B, L); both in embedding's dtype. With ``mask_padding`` the positions
    j >= lengths[b] take no part at all: not in the softmax, not in the sum (so an inf or NaN in
    a padding word's embedding or key changes nothing, and gets gradient 0).

    tokens: (B, L) int; lengths: (B,); embedding: (V, d); keys: (V, d_k); query: (d_k,).
    """
    weights = attention_scores(tokens, lengths, keys, query, mask_padding)
    values = embedding.to(weights.dtype)[tokens]  # cast first, as the keys above
    if mask_padding:
        # masked positions take no part: weight 0 times an inf/NaN embedding would be NaN
        values = values.masked_fill(padding_mask(tokens, lengths)[..., None], 0.0)
    pooled = torch.einsum("bl,bld->bd", weights, values)
    return pooled.to(embedding.dtype), weights.to(embedding.dtype)
