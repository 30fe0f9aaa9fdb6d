"""Public attention_pool op: checks, the backend switch, torch.library registration.

``symfast::attention_pool`` returns (pooled, weights) with the weights in the accumulation dtype
(fp32, or fp64 for fp64 tables), saved for the backward ``symfast::attention_pool_backward``,
which returns dense gradient tables for the embedding and keys and the query's gradient.
"""
from __future__ import annotations

from typing import Optional

import torch

from symfast import _backend
from symfast.reference import attention_pool as reference

_OP = "attention_pool"
_CPU_OPS = {"forward": "attention_pool_fwd_cpu", "backward": "attention_pool_bwd_cpu"}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(tokens: torch.Tensor, lengths: Optional[torch.Tensor], embedding: torch.Tensor,
                 keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Validate the arguments of :func:`attention_pool`; returns lengths (all L when None)."""
    for name, t in (("tokens", tokens), ("embedding", embedding), ("keys", keys), ("query", query)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens must be an integer (int64) tensor of word ids, got {tokens.dtype}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (B, L), got {tuple(tokens.shape)}")
    b, l = tokens.shape
    if l == 0:
        raise ValueError(f"tokens must have at least one position, got shape {tuple(tokens.shape)}")
    if not embedding.is_floating_point():
        raise TypeError(f"embedding must be a floating-point tensor, got {embedding.dtype}")
    if keys.dtype != embedding.dtype or query.dtype != embedding.dtype:
        raise TypeError(f"embedding, keys and query must share a dtype, got {embedding.dtype}, "
                        f"{keys.dtype}, {query.dtype}")
    if embedding.dim() != 2:
        raise ValueError(f"embedding must have shape (V, d), got {tuple(embedding.shape)}")
    v = embedding.shape[0]
    if keys.dim() != 2 or keys.shape[0] != v:
        raise ValueError(f"keys must have shape ({v}, d_k) to match embedding's V = {v}, got "
                         f"{tuple(keys.shape)}")
    if query.dim() != 1 or query.shape[0] != keys.shape[1]:
        raise ValueError(f"query must have shape ({keys.shape[1]},) to match keys, got "
                         f"{tuple(query.shape)}")
    for name, t in (("tokens", tokens), ("keys", keys), ("query", query)):
        if t.device != embedding.device:
            raise ValueError(f"{name} is on {t.device} but embedding is on {embedding.device}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= v):
        raise IndexError(f"tokens holds ids in [{int(tokens.min())}, {int(tokens.max())}], "
                         f"outside the vocabulary [0, {v})")
    if lengths is None:
        return torch.full((b,), l, dtype=torch.int64, device=tokens.device)
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"lengths must be a torch.Tensor or None, got {type(lengths).__name__}")
    if lengths.dtype not in (torch.int64, torch.int32) or lengths.shape != (b,):
        raise ValueError(f"lengths must be an integer tensor of shape ({b},), got {lengths.dtype} "
                         f"of shape {tuple(lengths.shape)}")
    if lengths.device != tokens.device:
        raise ValueError(f"lengths is on {lengths.device} but tokens is on {tokens.device}")
    if b and (lengths.min() < 1 or lengths.max() > l):
        raise ValueError(f"lengths must lie in [1, L = {l}], got values in "
                         f"[{int(lengths.min())}, {int(lengths.max())}]")
    return lengths


def _run(backend: str, direction: str, *args):
    """Run the cpu or triton kernel for ``direction`` ("forward" or "backward")."""
    if backend == "cpu":
        _backend.resolve("cpu", args[4] if direction == "backward" else args[2], _OP)
        return getattr(torch.ops.symfast, _CPU_OPS[direction])(*args)
    if backend == "triton":
        from symfast.kernels import attention_pool as triton_kernels
        return getattr(triton_kernels, direction)(*args)
    raise ValueError(f"backend must be 'cpu' or 'triton' for symfast::attention_pool, got {backend!r}")


@torch.library.custom_op("symfast::attention_pool", mutates_args=())
def _attention_pool_op(tokens: torch.Tensor, lengths: torch.Tensor, embedding: torch.Tensor,
                       keys: torch.Tensor, query: torch.Tensor, mask_padding: bool,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(backend, "forward", tokens, lengths, embedding, keys, query, mask_padding)


@_attention_pool_op.register_fake
def _(tokens, lengths, embedding, keys, query, mask_padding, backend):
    b, l = tokens.shape
    return (embedding.new_empty((b, embedding.shape[1])),
            embedding.new_empty((b, l), dtype=_acc_dtype(embedding.dtype)))


@torch.library.custom_op("symfast::attention_pool_backward", mutates_args=())
def _attention_pool_backward_op(
        grad_pooled: torch.Tensor, grad_weights: Optional[torch.Tensor], tokens: torch.Tensor,
        lengths: torch.Tensor, embedding: torch.Tensor, keys: torch.Tensor, query: torch.Tensor,
        weights: torch.Tensor, mask_padding: bool, need_embedding: bool, need_keys: bool,
        need_query: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run(backend, "backward", grad_pooled, grad_weights, tokens, lengths, embedding, keys,
                query, weights, mask_padding, need_embedding, need_keys, need_query)


@_attention_pool_backward_op.register_fake
def _(grad_pooled, grad_weights, tokens, lengths, embedding, keys, query, weights, mask_padding,
      need_embedding, need_keys, need_query, backend):
    v, d = embedding.shape
    dk = keys.shape[1]
    return (embedding.new_empty((v if need_embedding else 0, d)),
            embedding.new_empty((v if need_keys else 0, dk)),
            embedding.new_empty((dk if need_query else 0,)))


def _setup_context(ctx, inputs, output):
    tokens, lengths, embedding, keys, query, mask_padding, backend = inputs
    ctx.save_for_backward(tokens, lengths, embedding, keys, query, output[1])
    ctx.mask_padding, ctx.backend = mask_padding, backend


def _backward(ctx, grad_pooled, grad_weights):
    tokens, lengths, embedding, keys, query, weights = ctx.saved_tensors
    need = ctx.needs_input_grad
    if grad_pooled is None:
        grad_pooled = embedding.new_zeros((tokens.shape[0], embedding.shape[1]))
    grad_embedding, grad_keys, grad_query = _attention_pool_backward_op(
        grad_pooled.contiguous(), grad_weights, tokens, lengths, embedding, keys, query, weights,
        ctx.mask_padding, need[2], need[3], need[4], ctx.backend)
    return (None, None, grad_embedding if need[2] else None, grad_keys if need[3] else None,
            grad_query if need[4] else None, None, None)


_attention_pool_op.register_autograd(_backward, setup_context=_setup_context)


@_backend.profiled("attention_pool")
def attention_pool(tokens: torch.Tensor, lengths: Optional[torch.Tensor], embedding: torch.Tensor,
                   keys: torch.Tensor, query: torch.Tensor, mask_padding: bool = True,
                   return_weights: bool = False, *, backend: str | None = None):
    """Attention pooling with one global query (Lu, Mao, Nayak, ICLR 2021).

    pooled (B, d) = Σ_j softmax_j(queryᵀ keys[tokens[b, j]]) · embedding[tokens[b, j]].

    tokens: (B, L) int64 word ids in [0, V); lengths: (B,) in [1, L], or None for all L;
    embedding: (V, d); keys: (V, d_k); query: (d_k,). With ``mask_padding`` (default) the softmax
    runs over positions j < lengths[b] only; with False over all L positions, padding included, as
    the paper's code does. Returns pooled (B, d), and the weights (B, L) too when
    ``return_weights``; both in embedding's dtype. Differentiable in embedding, keys and query
    (the table gradients are dense).

    ``backend``: "reference", "cpu", "triton", or None/"auto" for the fastest for the device.
    """
    lengths = check_inputs(tokens, lengths, embedding, keys, query)
    if not isinstance(mask_padding, bool):
        raise TypeError(f"mask_padding must be a bool, got {type(mask_padding).__name__}")
    backend = _backend.resolve(backend, embedding, _OP)
    if backend == "reference":
        pooled, weights = reference.attention_pool(tokens, lengths, embedding, keys, query,
                                                   mask_padding)
    else:
        pooled, weights = _attention_pool_op(tokens.long().contiguous(), lengths.long().contiguous(),
                                             embedding, keys, query, mask_padding, backend)
        weights = weights.to(embedding.dtype)
    return (pooled, weights) if return_weights else pooled
