"""Public attention_pool op: checks, the backend switch, torch.library registration.

``symfast::attention_pool`` returns (pooled, weights) with the weights in the accumulation dtype
(fp32, or fp64 for fp64 tables), saved for the backward ``symfast::attention_pool_backward``,
which returns dense gradient tables for the embedding and keys and the query's gradient.
"""
from __future__ import annotations

from typing import Optional

import torch

from symfast import _backend
from symfast.groups import under_dispatch_mode
from symfast.ops import _checks, _dispatch
from symfast.reference import attention_pool as reference

_OP = "attention_pool"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(tokens: torch.Tensor, lengths: Optional[torch.Tensor], embedding: torch.Tensor,
                 keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Validate the types and shapes of :func:`attention_pool`'s arguments; returns lengths (all L
    when None). Their values: :func:`check_values`, or the cpu kernels, which check them in the
    pass that reads them with the same errors (four torch reductions less per call)."""
    _checks.integer_tensor("tokens", tokens, "word ids")
    _checks.floating("embedding", embedding)
    _checks.floating("keys", keys)
    _checks.floating("query", query)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (B, L), got {tuple(tokens.shape)}")
    b, l = tokens.shape
    if l == 0:
        raise ValueError(f"tokens must have at least one position, got shape {tuple(tokens.shape)}")
    _checks.like("keys", keys, "embedding", embedding, device=False)
    _checks.like("query", query, "embedding", embedding, device=False)
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
        _checks.like(name, t, "embedding", embedding, dtype=False)
    if lengths is not None:
        _checks.tensor("lengths", lengths, optional=True)
        if lengths.dtype not in (torch.int64, torch.int32):  # a type mistake, as for tokens
            raise TypeError(f"lengths must be an integer tensor (int64 or int32) of shape ({b},), "
                            f"got {lengths.dtype}")
        if lengths.shape != (b,):
            raise ValueError(f"lengths must be an integer tensor of shape ({b},), got shape "
                             f"{tuple(lengths.shape)}")
        _checks.like("lengths", lengths, "tokens", tokens, dtype=False)
    if lengths is None:
        return torch.full((b,), l, dtype=torch.int64, device=tokens.device)
    return lengths


def check_values(tokens: torch.Tensor, lengths: Optional[torch.Tensor], v: int) -> None:
    """Token ids in [0, v) (IndexError) and lengths in [1, L] (ValueError)."""
    b, l = tokens.shape
    if torch.compiler.is_compiling():
        # reading the values on the host would break the graph: the same refusal as assertions
        # in the graph (the Triton kernels index with the ids unchecked)
        torch._assert_async((tokens >= 0).all() & (tokens < v).all(),
                            f"tokens holds ids outside the vocabulary [0, {v})")
        if lengths is not None:
            torch._assert_async((lengths >= 1).all() & (lengths <= l).all(),
                                f"lengths must lie in [1, L = {l}]")
    elif tokens.device.type != "meta" and not under_dispatch_mode():
        # meta tensors hold no values (they run the reference), nor do FakeTensorMode's
        # One host read for all the range checks (each read is a device sync on a GPU); the
        # values for the message only when one fails.
        bad_tokens = (tokens.min() < 0) | (tokens.max() >= v) if tokens.numel() else None
        bad_lengths = ((lengths.min() < 1) | (lengths.max() > l)
                       if lengths is not None and b else None)
        flags = [f for f in (bad_tokens, bad_lengths) if f is not None]
        if flags and bool(torch.stack(flags).any()):
            if bad_tokens is not None and bad_tokens:
                raise IndexError(f"tokens holds ids in [{int(tokens.min())}, {int(tokens.max())}], "
                                 f"outside the vocabulary [0, {v})")
            raise ValueError(f"lengths must lie in [1, L = {l}], got values in "
                             f"[{int(lengths.min())}, {int(lengths.max())}]")


@_dispatch.forwarding(_OP, cpu="attention_pool_fwd_cpu", triton="forward")
def _forward_impl(tokens: torch.Tensor, lengths: torch.Tensor, embedding: torch.Tensor,
                  keys: torch.Tensor, query: torch.Tensor, mask_padding: bool,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """pooled (B, d) and the softmax weights (B, L) in the accumulation dtype."""


def _forward_fake(tokens, lengths, embedding, keys, query, mask_padding, backend):
    b, l = tokens.shape
    return (embedding.new_empty((b, embedding.shape[1])),
            embedding.new_empty((b, l), dtype=_acc_dtype(embedding.dtype)))


@_dispatch.forwarding(_OP, cpu="attention_pool_bwd_cpu", triton="backward")
def _backward_impl(
        grad_pooled: torch.Tensor, grad_weights: Optional[torch.Tensor], tokens: torch.Tensor,
        lengths: torch.Tensor, embedding: torch.Tensor, keys: torch.Tensor, query: torch.Tensor,
        weights: torch.Tensor, mask_padding: bool, need_embedding: bool, need_keys: bool,
        need_query: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense gradients of embedding and keys, and query's; empty where not needed."""


def _backward_fake(grad_pooled, grad_weights, tokens, lengths, embedding, keys, query, weights,
                   mask_padding, need_embedding, need_keys, need_query, backend):
    v, d = embedding.shape
    dk = keys.shape[1]
    return (embedding.new_empty((v if need_embedding else 0, d)),
            embedding.new_empty((v if need_keys else 0, dk)),
            embedding.new_empty((dk if need_query else 0,)))


_attention_pool_backward_op = _dispatch.custom_op("symfast::attention_pool_backward",
                                                  _backward_impl, _backward_fake)


def _setup_context(ctx, inputs, output):
    tokens, lengths, embedding, keys, query, mask_padding, backend = inputs
    ctx.save_for_backward(tokens, lengths, embedding, keys, query, output[1])
    ctx.mask_padding, ctx.backend = mask_padding, backend


def _make_backward(backward_fn):
    """The backward, through the backward op (the custom op, or its impl when eager)."""
    def backward(ctx, grad_pooled, grad_weights):
        tokens, lengths, embedding, keys, query, weights = ctx.saved_tensors
        need = ctx.needs_input_grad
        if grad_pooled is None:
            grad_pooled = embedding.new_zeros((tokens.shape[0], embedding.shape[1]))
        grad_embedding, grad_keys, grad_query = backward_fn(
            grad_pooled.contiguous(), grad_weights, tokens, lengths, embedding, keys, query,
            weights, ctx.mask_padding, need[2], need[3], need[4], ctx.backend)
        return (None, None, grad_embedding if need[2] else None, grad_keys if need[3] else None,
                grad_query if need[4] else None, None, None)
    return backward


_attention_pool_op, _attention_pool_eager = _dispatch.kernel_op(
    "symfast::attention_pool", _forward_impl, _forward_fake, _setup_context, _make_backward,
    _attention_pool_backward_op, _backward_impl)


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
    given_lengths = lengths
    lengths = check_inputs(tokens, lengths, embedding, keys, query)
    _checks.flag("mask_padding", mask_padding)
    backend = _dispatch.resolve(backend, embedding, _OP)
    if backend != "cpu" or torch.compiler.is_compiling():  # compiled: the fake kernel reads none
        check_values(tokens, given_lengths, embedding.shape[0])
    if backend == "reference":
        pooled, weights = reference.attention_pool(tokens, lengths, embedding, keys, query,
                                                   mask_padding)
    else:
        pooled, weights = _attention_pool_eager(tokens.long().contiguous(), lengths.long().contiguous(),
                                             embedding, keys, query, mask_padding, backend)
        weights = weights.to(embedding.dtype)
    return (pooled, weights) if return_weights else pooled
