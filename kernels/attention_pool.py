"""Triton kernels for attention_pool: one program per sentence forward; backward in two passes,
score gradients per sentence, then one program per vocabulary row writing that row of the dense
gradient tables from a sorted (CSR) list of the positions holding the token: one writer per row,
so no atomics and a result that does not depend on scheduling."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_BLOCK_D = 128
_BLOCK_L = 32


@triton.jit
def _chunk(tokens_ptr, b, L, n, l0, BLOCK_L: tl.constexpr):
    """Positions l0 .. l0 + BLOCK_L of sentence b: offsets, which are in the sentence (< L),
    which take part in the softmax (< n), and their token ids."""
    offs_l = l0 + tl.arange(0, BLOCK_L)
    valid = offs_l < n
    return offs_l, offs_l < L, valid, tl.load(tokens_ptr + b * L + offs_l, mask=valid, other=0)


@triton.jit
def _length(lengths_ptr, b, L, MASK: tl.constexpr):
    if MASK:
        n = tl.load(lengths_ptr + b)
    else:
        n = L
    return n


@triton.jit
def _weighted_rows(w_row_ptr, tokens_ptr, table_ptr, b, L, n, offs_c, COLS,
                   BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    """Σ over the positions l < n of sentence b of w[l] · table[token l, offs_c] (w: the
    sentence's row of per-position weights), in chunks of BLOCK_L positions."""
    cmask = offs_c < COLS
    acc = tl.zeros(offs_c.shape, dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        offs_l, inside, valid, tok = _chunk(tokens_ptr, b, L, n, l0, BLOCK_L)
        w = tl.load(w_row_ptr + offs_l, mask=valid, other=0.0)
        rows = tl.load(table_ptr + tok[:, None] * COLS + offs_c[None, :],
                       mask=valid[:, None] & cmask[None, :], other=0.0).to(ACC)
        acc += tl.sum(w[:, None] * rows, axis=0)
    return acc


# A sentence is walked in chunks of at most _BLOCK_L positions (a loop, not one tile of
# next_power_of_2(L)): with the whole sentence in one [BLOCK_L, BLOCK_D] tile, a 512-token
# sentence took ptxas 80-120 s per dtype to compile for sm_90 (tests/triton_gpu_compile.py), a
# stall at the first call of every power-of-two length. The passes over a sentence hand their
# per-position values (scores, then weights; score gradients) on through the (B, L) output row,
# written by some threads and read by others: a barrier separates the passes.
@triton.jit
def _forward_kernel(tokens_ptr, lengths_ptr, emb_ptr, keys_ptr, query_ptr, pooled_ptr, weights_ptr,
                    L, D, DK, MASK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DK: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n = _length(lengths_ptr, b, L, MASK)
    row = weights_ptr + b * L
    # scores, and their maximum over the positions that take part
    top = tl.full([BLOCK_L], float("-inf"), ACC)
    for l0 in range(0, L, BLOCK_L):
        offs_l, inside, valid, tok = _chunk(tokens_ptr, b, L, n, l0, BLOCK_L)
        scores = tl.zeros([BLOCK_L], dtype=ACC)
        for k0 in range(0, DK, BLOCK_DK):
            offs_k = k0 + tl.arange(0, BLOCK_DK)
            kmask = offs_k < DK
            q = tl.load(query_ptr + offs_k, mask=kmask, other=0.0).to(ACC)
            kv = tl.load(keys_ptr + tok[:, None] * DK + offs_k[None, :],
                         mask=valid[:, None] & kmask[None, :], other=0.0).to(ACC)
            scores += tl.sum(kv * q[None, :], axis=1)
        scores = tl.where(valid, scores, float("-inf"))
        top = tl.maximum(top, scores)
        tl.store(row + offs_l, scores, mask=inside)
    top_all = tl.max(top, axis=0)
    tl.debug_barrier()
    # exp(score - max) in place of the scores, and their sum; then divided by the sum
    total = tl.zeros([BLOCK_L], dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        scores = tl.load(row + offs_l, mask=offs_l < n, other=float("-inf"))
        e = tl.where(offs_l < n, tl.exp(scores - top_all), 0.0)
        total += e
        tl.store(row + offs_l, e, mask=offs_l < L)
    total_all = tl.sum(total, axis=0)
    tl.debug_barrier()
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        e = tl.load(row + offs_l, mask=offs_l < L, other=0.0)
        tl.store(row + offs_l, e / total_all, mask=offs_l < L)
    tl.debug_barrier()
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        out = _weighted_rows(row, tokens_ptr, emb_ptr, b, L, n, offs_d, D, BLOCK_L, ACC)
        tl.store(pooled_ptr + b * D + offs_d, out.to(pooled_ptr.dtype.element_ty), mask=offs_d < D)


@triton.jit
def _score_grad_kernel(grad_pooled_ptr, grad_weights_ptr, tokens_ptr, lengths_ptr, emb_ptr,
                       keys_ptr, weights_ptr, ds_ptr, query_partial_ptr, L, D, DK,
                       MASK: tl.constexpr, HAS_GW: tl.constexpr, NEED_Q: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
                       ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n = _length(lengths_ptr, b, L, MASK)
    row = ds_ptr + b * L
    # d weights (into the ds row), and their mean under the weights
    mean = tl.zeros([BLOCK_L], dtype=ACC)
    for l0 in range(0, L, BLOCK_L):
        offs_l, inside, valid, tok = _chunk(tokens_ptr, b, L, n, l0, BLOCK_L)
        a = tl.load(weights_ptr + b * L + offs_l, mask=valid, other=0.0)
        da = tl.zeros([BLOCK_L], dtype=ACC)
        if HAS_GW:
            da += tl.load(grad_weights_ptr + b * L + offs_l, mask=valid, other=0.0).to(ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            dmask = offs_d < D
            g = tl.load(grad_pooled_ptr + b * D + offs_d, mask=dmask, other=0.0).to(ACC)
            v = tl.load(emb_ptr + tok[:, None] * D + offs_d[None, :],
                        mask=valid[:, None] & dmask[None, :], other=0.0).to(ACC)
            da += tl.sum(v * g[None, :], axis=1)
        mean += a * da
        tl.store(row + offs_l, da, mask=inside)
    mean_all = tl.sum(mean, axis=0)
    tl.debug_barrier()
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        a = tl.load(weights_ptr + b * L + offs_l, mask=offs_l < n, other=0.0)
        da = tl.load(row + offs_l, mask=offs_l < L, other=0.0)
        tl.store(row + offs_l, a * (da - mean_all), mask=offs_l < L)
    if NEED_Q:
        tl.debug_barrier()
        for k0 in range(0, DK, BLOCK_DK):
            offs_k = k0 + tl.arange(0, BLOCK_DK)
            acc = _weighted_rows(row, tokens_ptr, keys_ptr, b, L, n, offs_k, DK, BLOCK_L, ACC)
            tl.store(query_partial_ptr + b * DK + offs_k, acc, mask=offs_k < DK)


@triton.jit
def _table_grad_kernel(offsets_ptr, order_ptr, grad_pooled_ptr, weights_ptr, ds_ptr, query_ptr,
                       grad_emb_ptr, grad_keys_ptr, L, D, DK, NEED_E: tl.constexpr,
                       NEED_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
                       ACC: tl.constexpr):
    v = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    lo = tl.load(offsets_ptr + v)
    hi = tl.load(offsets_ptr + v + 1)
    offs_d = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    total = tl.zeros([1], dtype=ACC)
    for p in range(lo, hi):
        pos = tl.load(order_ptr + p)
        if NEED_E:
            g = tl.load(grad_pooled_ptr + (pos // L) * D + offs_d, mask=dmask, other=0.0).to(ACC)
            acc += tl.load(weights_ptr + pos).to(ACC) * g
        if NEED_K:
            total += tl.load(ds_ptr + pos).to(ACC)
    if NEED_E:
        tl.store(grad_emb_ptr + v * D + offs_d, acc.to(grad_emb_ptr.dtype.element_ty), mask=dmask)
    if NEED_K:
        # The key row is (Σ ds) q, written once by the row's first d-chunk program.
        if chunk == 0:
            for k0 in range(0, DK, BLOCK_DK):
                offs_k = k0 + tl.arange(0, BLOCK_DK)
                kmask = offs_k < DK
                q = tl.load(query_ptr + offs_k, mask=kmask, other=0.0).to(ACC)
                # a word in no sentence has gradient exactly 0, even where q holds inf or NaN
                row = tl.where(hi > lo, tl.sum(total, axis=0) * q, 0.0)
                tl.store(grad_keys_ptr + v * DK + offs_k,
                         row.to(grad_keys_ptr.dtype.element_ty), mask=kmask)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(l: int, d: int, dk: int) -> tuple[int, int, int]:
    # at least 1: a block of 0 is a loop step of 0 (d = 0 or d_k = 0 are valid, empty inputs)
    return (min(_BLOCK_L, triton.next_power_of_2(max(l, 1))),
            min(_BLOCK_D, triton.next_power_of_2(max(d, 1))),
            min(_BLOCK_D, triton.next_power_of_2(max(dk, 1))))


def forward(tokens: torch.Tensor, lengths: torch.Tensor, embedding: torch.Tensor,
            keys: torch.Tensor, query: torch.Tensor,
            mask_padding: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """pooled (B, d) in embedding's dtype and weights (B, L) in the accumulation dtype.
    Arguments are validated by symfast.ops.attention_pool (token ids in range, lengths in [1, L])."""
    tokens, lengths = tokens.contiguous(), lengths.contiguous()
    embedding, keys, query = embedding.contiguous(), keys.contiguous(), query.contiguous()
    (b, l), d, dk = tokens.shape, embedding.shape[1], keys.shape[1]
    acc_dtype = torch.float64 if embedding.dtype == torch.float64 else torch.float32
    pooled = torch.empty((b, d), dtype=embedding.dtype, device=embedding.device)
    weights = torch.empty((b, l), dtype=acc_dtype, device=embedding.device)
    if b:
        block_l, block_d, block_dk = _blocks(l, d, dk)
        _forward_kernel[(b,)](tokens, lengths, embedding, keys, query, pooled, weights, l, d, dk,
                              MASK=mask_padding, BLOCK_L=block_l, BLOCK_D=block_d,
                              BLOCK_DK=block_dk, ACC=_acc(embedding.dtype))
    return pooled, weights


def backward(grad_pooled: torch.Tensor, grad_weights: Optional[torch.Tensor], tokens: torch.Tensor,
             lengths: torch.Tensor, embedding: torch.Tensor, keys: torch.Tensor,
             query: torch.Tensor, weights: torch.Tensor, mask_padding: bool, need_embedding: bool,
             need_keys: bool, need_query: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_embedding (V, d), grad_keys (V, d_k), grad_query (d_k,)); a table not needed comes
    back with 0 rows."""
    tokens, lengths = tokens.contiguous(), lengths.contiguous()
    embedding, keys, query = embedding.contiguous(), keys.contiguous(), query.contiguous()
    grad_pooled, weights = grad_pooled.contiguous(), weights.contiguous()
    (b, l), (v, d), dk = tokens.shape, embedding.shape, keys.shape[1]
    dev, dtype, acc_dtype = embedding.device, embedding.dtype, weights.dtype
    acc = _acc(dtype)
    block_l, block_d, block_dk = _blocks(l, d, dk)
    ds = torch.empty((b, l), dtype=acc_dtype, device=dev)
    query_partial = torch.empty((b, dk), dtype=acc_dtype, device=dev)
    has_gw = grad_weights is not None
    if b and (need_keys or need_query):
        _score_grad_kernel[(b,)](grad_pooled, grad_weights.contiguous() if has_gw else weights,
                                 tokens, lengths, embedding, keys, weights, ds, query_partial,
                                 l, d, dk, MASK=mask_padding, HAS_GW=has_gw, NEED_Q=need_query,
                                 BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_DK=block_dk, ACC=acc)
    grad_query = (query_partial.sum(0).to(dtype) if need_query
                  else torch.empty((0,), dtype=dtype, device=dev))
    grad_embedding = torch.empty((v if need_embedding else 0, d), dtype=dtype, device=dev)
    grad_keys = torch.empty((v if need_keys else 0, dk), dtype=dtype, device=dev)
    if v and (need_embedding or need_keys):
        # CSR of the valid positions by token: padding positions sort to the end under key V.
        flat = tokens.reshape(-1)
        if mask_padding:
            positions = torch.arange(l, device=dev)
            flat = torch.where((positions[None, :] < lengths[:, None]).reshape(-1), flat, v)
        order = torch.sort(flat, stable=True).indices
        # index_add_, not bincount: CUDA's bincount reads max/min of its input on the host (a
        # device sync per backward call)
        counts = torch.zeros(v + 1, dtype=torch.int64, device=dev).index_add_(
            0, flat, torch.ones_like(flat))[:v]
        offsets = torch.zeros(v + 1, dtype=torch.int64, device=dev)
        offsets[1:] = torch.cumsum(counts, 0)
        # one d-chunk at least: the first chunk's programs also write the key rows
        _table_grad_kernel[(v, max(1, triton.cdiv(d, block_d)))](
            offsets, order, grad_pooled, weights, ds, query, grad_embedding, grad_keys, l, d, dk,
            NEED_E=need_embedding, NEED_K=need_keys, BLOCK_D=block_d, BLOCK_DK=block_dk, ACC=acc)
    return grad_embedding, grad_keys, grad_query
