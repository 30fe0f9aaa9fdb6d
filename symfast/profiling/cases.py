"""The benchmark cases of every public op: inputs at three sizes (small, the README's, large)
and how each backend runs them. ``symfast bench all`` and ``symfast profile op`` share them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from symfast.profiling import costs

SIZES = ("small", "readme", "large")
BACKENDS = ("reference", "compile", "cpu", "triton")


@dataclass
class Case:
    """One op at one size and dtype: ``call(backend)`` runs it once; ``cost`` is its floor."""

    op: str
    size: str
    shape: str
    args: tuple
    kwargs: dict
    cost: costs.Cost

    def function(self, backend: str) -> Callable[[], object]:
        """A zero-argument call of the op on this case's inputs with ``backend`` ("compile":
        torch.compile of the reference backend)."""
        import symfast.ops as ops

        fn = getattr(ops, self.op)
        args, kwargs = self.args, self.kwargs
        if backend == "compile":
            # dynamo caches compiled frames per code object, and every case compiles this one
            # lambda: past its recompile limit it would silently run eager. A benchmark times
            # one case at a time, so the previous cases' compiled code can go.
            torch._dynamo.reset()
            compiled = torch.compile(lambda *a, **k: fn(*a, backend="reference", **k))
            return lambda: compiled(*args, **kwargs)
        return lambda: fn(*args, backend=backend, **kwargs)


def _rand(gen: torch.Generator, shape, dtype, device, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)


def _label(shape) -> str:
    return "x".join(map(str, shape))


# (small, README's, large) for each op; the README's are the shapes of its performance table.
_IMAGE = {"small": (8, 3, 32, 32), "readme": (64, 3, 64, 64), "large": (16, 4, 128, 128)}
_GNS = {"small": (8, 32, 16, 16), "readme": (64, 96, 32, 32), "large": (64, 128, 64, 64)}
_CONV = {"small": (8, 16, 16), "readme": (32, 64, 32), "large": (32, 128, 32)}  # B, C, H=W
_ATTN = {"small": (32, 16, 1000, 32, 16), "readme": (256, 64, 50_000, 128, 64),
         "large": (1024, 128, 50_000, 128, 64)}  # B, L, V, d, d_k
_SELECT = {"small": (64, 64, 4, 10), "readme": (512, 512, 16, 50),
           "large": (2048, 1024, 16, 100)}  # B, F, K, C


def _orbit(size, dtype, device, gen):
    x = _rand(gen, _IMAGE[size], dtype, device)
    return (x, "d4"), {}, _label(x.shape)


def _orbit_mean(size, dtype, device, gen):
    b, *rest = _IMAGE[size]
    y = _rand(gen, (8 * b, *rest), dtype, device)
    return (y, "d4"), {}, _label(y.shape)


def _fused_step(size, dtype, device, gen):
    from symfast.ops import StepCoefficients

    b, *rest = _IMAGE[size]
    x = _rand(gen, (b, *rest), dtype, device)
    y = _rand(gen, (8 * b, *rest), dtype, device)
    # a DDIM step (no noise) in sigma form, as the sampler's own step
    coefs = StepCoefficients(1.0, -0.5, 0.9, 0.1)
    return (x, y, coefs, "d4"), {"return_denoised": False}, _label(x.shape)


def _group_norm_silu(size, dtype, device, gen):
    shape = _GNS[size]
    x = _rand(gen, shape, dtype, device)
    c = shape[1]
    weight, bias = _rand(gen, (c,), dtype, device), _rand(gen, (c,), dtype, device)
    shift = _rand(gen, shape[:2], dtype, device, 0.1)
    return (x, 8, weight, bias, 1e-5, shift), {}, _label(shape)


def _tied_conv2d(size, dtype, device, gen):
    from symfast.groups import get
    from symfast.reference.tied_conv2d import kernel_orbits

    b, c, h = _CONV[size]
    orbits = kernel_orbits(get("d4"), (3, 3))
    x = _rand(gen, (b, c, h, h), dtype, device)
    weight = _rand(gen, (c, c, orbits.count), dtype, device, (9 * c) ** -0.5)
    bias = _rand(gen, (c,), dtype, device)
    return (x, weight, bias, 3, "d4", 1, 1), {}, f"{_label(x.shape)} {c}->{c} 3x3"


def _attention_pool(size, dtype, device, gen):
    b, length, v, d, dk = _ATTN[size]
    tokens = torch.randint(0, v, (b, length), generator=gen).to(device)
    lengths = torch.randint(length // 2, length + 1, (b,), generator=gen).to(device)
    return ((tokens, lengths, _rand(gen, (v, d), dtype, device, 0.1),
             _rand(gen, (v, dk), dtype, device, 0.1), _rand(gen, (dk,), dtype, device)), {},
            f"B={b} L={length} V={v} d={d} dk={dk}")


def _classifier_select(size, dtype, device, gen):
    b, f, k, c = _SELECT[size]
    return ((_rand(gen, (b, f), dtype, device), _rand(gen, (k, f), dtype, device, f ** -0.5),
             _rand(gen, (k,), dtype, device), _rand(gen, (k, c, f), dtype, device, f ** -0.5),
             _rand(gen, (k, c), dtype, device)), {}, f"B={b} F={f} K={k} C={c}")


BUILDERS = {"orbit": _orbit, "orbit_mean": _orbit_mean, "fused_step": _fused_step,
            "group_norm_silu": _group_norm_silu, "tied_conv2d": _tied_conv2d,
            "attention_pool": _attention_pool, "classifier_select": _classifier_select}
OPS = tuple(BUILDERS)


def check_op(op: str, argument: str = "op") -> str:
    if op not in BUILDERS:
        raise ValueError(f"{argument}={op!r} is not a symfast op; choose from {', '.join(OPS)}")
    return op


def check_size(size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"size={size!r} must be one of {', '.join(SIZES)}")
    return size


def make_case(op: str, size: str, dtype: torch.dtype, device: torch.device | str,
              seed: int = 0) -> Case:
    """``op``'s inputs at ``size`` in ``dtype`` on ``device``."""
    check_op(op)
    check_size(size)
    gen = torch.Generator().manual_seed(seed)
    args, kwargs, shape = BUILDERS[op](size, dtype, torch.device(device), gen)
    cost = costs.call_cost(op, args, kwargs)
    return Case(op, size, shape, args, kwargs, cost)
