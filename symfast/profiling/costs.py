"""Each symfast op's floor: the bytes it must move and the flops it must do, from its arguments.

A memory-bound op cannot beat (bytes read + written) / copy bandwidth, a compute-bound one
flops / GEMM throughput; :meth:`MachineLimits.floor_seconds` takes the larger, so any timing turns
into a share of the machine's limit (the roofline). The models count what the op's output and
inputs force, not what a kernel happens to do: re-reads, index tables and scratch are overhead.
Backward costs (``backward=True``) count one forward plus one backward.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from symfast.groups import get


@dataclass(frozen=True)
class Cost:
    bytes: float
    flops: float

    @property
    def bound(self) -> str:
        """Which roof the model puts the op under (flops per byte above ~10 is compute on CPUs
        and GPUs alike; symfast's ops sit far on one side or the other)."""
        return "compute" if self.flops > 10 * self.bytes else "memory"

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.bytes + other.bytes, self.flops + other.flops)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def orbit(x, group, backend=None, *, out=None, backward=False) -> Cost:
    """Reads x once, writes |G| transformed copies (into ``out`` or a fresh tensor: the same
    bytes); backward is orbit_mean of the gradient."""
    g = len(get(group))
    moved = (1 + g) * _nbytes(x)
    return Cost(moved * (2 if backward else 1), 0.0)


def orbit_mean(y, group, backend=None, *, backward=False) -> Cost:
    """Reads the |G| blocks once, writes their mean (|G| times smaller)."""
    g = len(get(group))
    moved = _nbytes(y) + _nbytes(y) // g
    return Cost(moved * (2 if backward else 1), float(y.numel()))


def fused_step(x, y, coefs, group=None, *, u=None, v=None, noise=None, return_denoised=True,
               **_) -> Cost:
    """Reads y (all |G| blocks), x and the optional u, v, noise; writes x_next (and x̂0).
    A handful of flops per element of y: memory-bound."""
    writes = _nbytes(x) * (2 if return_denoised else 1)
    return Cost(_nbytes(y, x, u, v, noise) + writes, 2.0 * y.numel())


def group_norm_silu(x, groups, weight=None, bias=None, eps=1e-5, shift=None, backend=None, *,
                    backward=False) -> Cost:
    """Forward: x read once, z written once. Backward: x and grad_z read, grad_x written."""
    n = _nbytes(x)
    return Cost(n * (5 if backward else 2), 10.0 * x.numel() * (2 if backward else 1))


def tied_conv2d(x, weight, bias, kernel_size, group, stride=1, padding=0, backend=None, *,
                backward=False) -> Cost:
    """Tying leaves R values per (O, C) pair (R kernel orbits: D4 3x3 has 3), and a convolution
    with a tied kernel is R stencil sums of the input followed by a GEMM over R: the floor is
    2·B·O·C·R·Ho·Wo flops, not the dense 2·B·O·C·kh·kw·Ho·Wo (which a tied kernel beats).
    Backward adds grad-input and grad-weight, each as many."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    b, c, h, w = x.shape
    o, r = weight.shape[0], weight.shape[2]
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    flops = 2.0 * b * o * c * r * ho * wo
    moved = _nbytes(x, weight, bias) + b * o * ho * wo * x.element_size()
    return Cost(moved * (3 if backward else 1), flops * (3 if backward else 1))


def attention_pool(tokens, lengths, embedding, keys, query, mask_padding=True, return_weights=False,
                   backend=None, *, backward=False) -> Cost:
    """Forward: the gathered embedding and key rows of the positions the output depends on
    (sum(lengths) of the B·L when padding is masked), (d + d_k) values each, read once, and
    pooled (B, d) written. Backward also writes the dense gradient tables, V·(d + d_k)."""
    b, length = tokens.shape
    v, d = embedding.shape
    dk = keys.shape[1]
    es = embedding.element_size()
    # the op reads lengths on the host to check them already: one more read syncs nothing new.
    # Lengths without values (meta tensors) count every position, an upper bound.
    readable = lengths is not None and lengths.device.type != "meta"
    used = int(lengths.sum()) if mask_padding and readable else b * length
    moved = _nbytes(tokens, lengths) + es * (used * (d + dk) + b * d)
    flops = 2.0 * used * (d + dk)
    if backward:
        moved += es * v * (d + dk)
        flops *= 2
    return Cost(moved, flops)


def classifier_select(h, gate_weight, gate_bias, weight, bias, temperature=1.0, backend=None, *,
                      backward=False) -> Cost:
    """One GEMM of h (B, F) against the stacked (K + K·C, F) weights; backward two more
    (grad h and grad W), as large."""
    b, f = h.shape
    k, c = weight.shape[0], weight.shape[1]
    flops = 2.0 * b * f * (k + k * c)
    moved = _nbytes(h, gate_weight, gate_bias, weight, bias) + b * c * h.element_size()
    return Cost(moved * (3 if backward else 1), flops * (3 if backward else 1))


MODELS: dict[str, Callable[..., Cost]] = {
    "orbit": orbit, "orbit_mean": orbit_mean, "fused_step": fused_step,
    "group_norm_silu": group_norm_silu, "tied_conv2d": tied_conv2d,
    "attention_pool": attention_pool, "classifier_select": classifier_select,
}


def call_cost(op: str, args: tuple, kwargs: dict[str, Any]) -> Cost | None:
    """The cost of one call ``symfast.ops.<op>(*args, **kwargs)``, or None when the op has no
    model or the arguments do not bind (the call itself will raise the error that names them)."""
    model = MODELS.get(op)
    if model is None:
        return None
    try:
        inspect.signature(model).bind(*args, **kwargs)
        return model(*args, **kwargs)
    except (TypeError, ValueError, AttributeError, IndexError, KeyError):
        return None
