"""Triton kernels for classifier selection (the CAB-CNN head; math in csrc/cpu/classifier_select.cpp).

Forward: one tiled GEMM scores = h·[gate_weight; weight]ᵀ + [gate_bias; bias], then a per-row
kernel for the gate softmax and the weighted contraction. Backward: a per-row kernel for
d scores, then GEMMs for grad h and the weight gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from symfast.kernels._scalars import scalar_pair, wide_scalar

# 32-wide tiles: tl.dot needs every block dim >= 16, and the interpreter (CPU tests) pays per
# program, so small enough to waste little on odd shapes, large enough to keep grids short.
_BLOCK_M = 32
_BLOCK_N = 32
_BLOCK_K = 32


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, bias_ptr, c_ptr, M, N, KD,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   HAS_BIAS: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c (M, N) = a (M, KD) @ b (KD, N) [+ bias (N,)], any strides, accumulated in ACC."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, KD, BLOCK_K):
        ks = k0 + rk
        # every offset in int64: a transposed view's strides make either index the large one
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * stride_am + ks[None, :].to(tl.int64) * stride_ak,
                    mask=(rm[:, None] < M) & (ks[None, :] < KD), other=0.0)
        b = tl.load(b_ptr + ks[:, None].to(tl.int64) * stride_bk + rn[None, :].to(tl.int64) * stride_bn,
                    mask=(ks[:, None] < KD) & (rn[None, :] < N), other=0.0)
        # "ieee": fp32 inputs must not drop to tf32 on tensor cores (1e-5 accuracy target);
        # the setting only concerns fp32 operands.
        if UPCAST:
            a = a.to(ACC)
            b = b.to(ACC)
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(ACC)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :].to(tl.int64) * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_row(s_ptr, K, C, inv_t, ACC: tl.constexpr, BLOCK_KC: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's row of scores -> (row offset, gate probabilities (BLOCK_KC,),
    logits (BLOCK_KC, BLOCK_C), their mask, k and c ranges)."""
    row_off = tl.program_id(0).to(tl.int64) * (K + K * C)
    kk = tl.arange(0, BLOCK_KC)
    cc = tl.arange(0, BLOCK_C)
    z = tl.load(s_ptr + row_off + kk, mask=kk < K, other=float("-inf")).to(ACC)
    # the max before the scaling: z / T overflows for a small temperature (see the cpu kernel)
    e = tl.exp((z - tl.max(z, axis=0)) * inv_t)
    g = e / tl.sum(e, axis=0)
    mask = (kk[:, None] < K) & (cc[None, :] < C)
    logits = tl.load(s_ptr + row_off + K + kk[:, None] * C + cc[None, :], mask=mask, other=0.0)
    return row_off, g, logits.to(ACC), mask, kk, cc


@triton.jit
def _mix_kernel(s_ptr, out_ptr, K, C, inv_t_hi, inv_t_lo, ACC: tl.constexpr, WIDE: tl.constexpr,
                BLOCK_KC: tl.constexpr, BLOCK_C: tl.constexpr):
    inv_t = wide_scalar(inv_t_hi, inv_t_lo, WIDE)
    _, g, logits, _, _, cc = _load_row(s_ptr, K, C, inv_t, ACC, BLOCK_KC, BLOCK_C)
    out = tl.sum(g[:, None] * logits, axis=0)
    row = tl.program_id(0).to(tl.int64)
    tl.store(out_ptr + row * C + cc, out.to(out_ptr.dtype.element_ty), mask=cc < C)


@triton.jit
def _mix_backward_kernel(s_ptr, dout_ptr, ds_ptr, K, C, inv_t_hi, inv_t_lo, ACC: tl.constexpr,
                         WIDE: tl.constexpr, BLOCK_KC: tl.constexpr, BLOCK_C: tl.constexpr):
    inv_t = wide_scalar(inv_t_hi, inv_t_lo, WIDE)
    row_off, g, logits, mask, kk, cc = _load_row(s_ptr, K, C, inv_t, ACC, BLOCK_KC, BLOCK_C)
    row = tl.program_id(0).to(tl.int64)
    dout = tl.load(dout_ptr + row * C + cc, mask=cc < C, other=0.0).to(ACC)
    dg = tl.sum(logits * dout[None, :], axis=1)
    dgate = g * (dg - tl.sum(g * dg, axis=0)) * inv_t
    tl.store(ds_ptr + row_off + kk, dgate.to(ds_ptr.dtype.element_ty), mask=kk < K)
    dlogits = g[:, None] * dout[None, :]
    tl.store(ds_ptr + row_off + K + kk[:, None] * C + cc[None, :],
             dlogits.to(ds_ptr.dtype.element_ty), mask=mask)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _interpreter_lacks_low_precision_dot(a: torch.Tensor) -> bool:
    """The interpreter (triton 3.9) multiplies bf16/fp16 tiles in tl.dot as raw integer bits
    (outputs ~1e10 for unit inputs), so there the tiles are upcast first; compiled on a GPU the
    dot stays low precision with fp32 accumulation."""
    return a.device.type == "cpu" and a.dtype in (torch.bfloat16, torch.float16)


def _matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a (M, KD) @ b (KD, N) [+ bias (N,)] -> (M, N) in out_dtype (default a's dtype);
    a and b may be strided views."""
    m, kd = a.shape
    n = b.shape[1]
    c = torch.empty((m, n), dtype=out_dtype or a.dtype, device=a.device)
    if c.numel():
        grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(n, _BLOCK_N))
        _matmul_kernel[grid](a, b, bias if bias is not None else c, c, m, n, kd,
                             a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                             c.stride(0), c.stride(1), HAS_BIAS=bias is not None,
                             ACC=_acc(a.dtype), UPCAST=_interpreter_lacks_low_precision_dot(a), BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
                             BLOCK_K=_BLOCK_K)
    return c


def _blocks(k: int, c: int) -> dict:
    return {"BLOCK_KC": triton.next_power_of_2(k), "BLOCK_C": triton.next_power_of_2(c)}


def forward(h: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor,
            weight: torch.Tensor, bias: torch.Tensor,
            temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out (B, C), scores (B, K + K·C) (pre-softmax gate scores, then the K·C logits).
    Scores are fp32 for bf16/fp16 inputs (the GEMM accumulates in fp32 anyway): the gate
    gradient g·(dg − Σ g dg) cancels, and bf16 scores cost ~2% there."""
    k, c, f = weight.shape
    stacked = torch.cat([gate_weight, weight.reshape(k * c, f)], dim=0)
    stacked_bias = torch.cat([gate_bias, bias.reshape(k * c)]).contiguous()
    scores = _matmul(h, stacked.t(), stacked_bias,
                     out_dtype=torch.promote_types(h.dtype, torch.float32))
    out = torch.empty((h.shape[0], c), dtype=h.dtype, device=h.device)
    if h.shape[0]:
        wide = h.dtype == torch.float64
        _mix_kernel[(h.shape[0],)](scores, out, k, c, *scalar_pair(1.0 / temperature, wide),
                                   ACC=_acc(h.dtype), WIDE=wide, **_blocks(k, c))
    return out, scores


def backward(grad_out: torch.Tensor, scores: torch.Tensor, h: torch.Tensor,
             gate_weight: torch.Tensor, weight: torch.Tensor, temperature: float):
    """-> grad h, grad gate_weight, grad gate_bias, grad weight, grad bias."""
    k, c, f = weight.shape
    grad_out, scores = grad_out.contiguous(), scores.contiguous()
    dscores = torch.empty_like(scores)
    if h.shape[0]:
        wide = h.dtype == torch.float64
        _mix_backward_kernel[(h.shape[0],)](scores, grad_out, dscores, k, c,
                                            *scalar_pair(1.0 / temperature, wide),
                                            ACC=_acc(h.dtype), WIDE=wide, **_blocks(k, c))
    stacked = torch.cat([gate_weight, weight.reshape(k * c, f)], dim=0)
    # The weight-gradient GEMMs run in the input dtype (tensor cores for bf16, fp32 accumulate);
    # the cancellation already happened in fp32 inside the row kernel.
    ds = dscores.to(h.dtype)
    grad_h = _matmul(ds, stacked)
    grad_gate_weight = _matmul(ds[:, :k].t(), h)
    grad_weight = _matmul(ds[:, k:].t(), h).view(k, c, f)
    dtype = h.dtype
    return (grad_h, grad_gate_weight, dscores[:, :k].sum(0).to(dtype), grad_weight,
            dscores[:, k:].sum(0).view(k, c).to(dtype))
