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
    scores = keys[tokens].to(acc) @ query.to(acc)
    if mask_padding:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        scores = scores.masked_fill(positions[None, :] >= lengths[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1)


def attention_pool(tokens: torch.Tensor, lengths: torch.Tensor, embedding: torch.Tensor,
                   keys: torch.Tensor, query: torch.Tensor,
                   mask_padding: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """pooled (B, d) = Σ_j softmax_j(queryᵀ keys[tokens[b, j]]) · embedding[tokens[b, j]], and
    the weights (B, L); both in embedding's dtype.

    tokens: (B, L) int; lengths: (B,); embedding: (V, d); keys: (V, d_k); query: (d_k,).
    """
    weights = attention_scores(tokens, lengths, keys, query, mask_padding)
    pooled = torch.einsum("bl,bld->bd", weights, embedding[tokens].to(weights.dtype))
    return pooled.to(embedding.dtype), weights.to(embedding.dtype)
