"""Frame averaging: make any model equivariant, and measure how equivariant a function is."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from symfast.groups import Group, get
from symfast.ops import _checks
from symfast.ops.group_average import orbit, orbit_mean


def _default_chunks(batch: int, order: int, device: torch.device) -> int:
    """One call over the whole orbit on accelerators. On CPU, one call per group element (the
    caller's own batch size), merged up to 16 images for tiny batches. Measured on the 2-core
    machine (benchmarks/bench_symmetrize.py, diffusers UNet2DModel 1.1M params, 32x32, D4 FA of a
    batch of 16): 12.6 ms per image in one call of 128, 11.2 in 2 calls of 64, 10.4 in 4 of 32,
    9.9 in 8 of 16; a single call took 9.2-11.9 ms per image at batch 16-64 but 13.5 at 128."""
    if device.type != "cpu":
        return 1
    per_call = max(batch, 16)
    return max(1, min(order, (order * batch) // per_call))


def _repeat_arg(arg: Any, batch: int, order: int) -> Any:
    if isinstance(arg, torch.Tensor) and arg.dim() > 0 and arg.shape[0] == batch:
        return arg.repeat((order,) + (1,) * (arg.dim() - 1))
    return arg


def _main_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):  # diffusers outputs
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}; expected a tensor, a tuple whose "
                    f"first item is a tensor, or an object with a .sample tensor")


class Symmetrized(nn.Module):
    """D̄(x, *args) = 1/|G| Σ_g g⁻¹ model(g x, *args). See :func:`symmetrize`."""

    def __init__(self, model: nn.Module | Callable, group: Group | str, chunks: int | None = None,
                 backend: str | None = None):
        super().__init__()
        _checks.positive_int_or_none("chunks", chunks)
        _checks.backend_name(backend)
        self.model = model
        self.group = get(group)
        self.chunks = chunks
        self.backend = backend

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """x: (B, ...); tensor args with leading dim B are repeated over the orbit, others are
        passed as they are. Returns the orbit-averaged model output, shaped like x."""
        order = len(self.group)
        batch = x.shape[0]
        xs = orbit(x, self.group, backend=self.backend)
        args = tuple(_repeat_arg(a, batch, order) for a in args)
        kwargs = {k: _repeat_arg(v, batch, order) for k, v in kwargs.items()}
        chunks = self.chunks or _default_chunks(batch, order, x.device)
        if chunks == 1 or xs.shape[0] == 0:  # an empty orbit is one (empty) call
            ys = _main_tensor(self.model(xs, *args, **kwargs))
        else:
            size = -(-xs.shape[0] // chunks)

            def part(a: Any, i: int) -> Any:
                return a[i:i + size] if isinstance(a, torch.Tensor) and a.dim() > 0 \
                    and a.shape[0] == xs.shape[0] else a

            outs = [_main_tensor(self.model(xs[i:i + size], *(part(a, i) for a in args),
                                            **{k: part(v, i) for k, v in kwargs.items()}))
                    for i in range(0, xs.shape[0], size)]
            ys = torch.cat(outs, dim=0)
        if ys.shape[0] != xs.shape[0]:
            raise ValueError(f"the model returned batch {ys.shape[0]} for an orbit batch of {xs.shape[0]}")
        return orbit_mean(ys, self.group, backend=self.backend)


def symmetrize(model: nn.Module | Callable, group: Group | str, chunks: int | None = None,
               backend: str | None = None) -> Symmetrized:
    """Wrap ``model`` so that it is exactly equivariant under ``group`` (frame averaging).

    The orbit of the input is built by the orbit kernel, the model runs on it in ``chunks`` batched
    calls (None: chosen per device, see ``_default_chunks``), and the outputs are averaged by the
    orbit_mean kernel.
    """
    return Symmetrized(model, group, chunks=chunks, backend=backend)


@torch.no_grad()
def equivariance_error(f: Callable[[torch.Tensor], Any], x: torch.Tensor, group: Group | str) -> float:
    """max_k ‖f(g_k x) − g_k f(x)‖ / ‖f(x)‖ over the group's elements (f's output must be acted
    on by the same group, e.g. an image-to-image map). NaN when any output is not finite: an
    error that cannot be measured is not small."""
    group = get(group)
    fx = _main_tensor(f(x))
    group.check_input(fx, "f(x)")
    if not torch.isfinite(fx).all():
        return math.nan
    # float64 throughout: float32 rounding hid a float64 model's errors below 1e-8, and the
    # squared norm of outputs above ~1e19 overflowed float32 (inf/inf: NaN, and 0 for k = 0)
    norm = torch.linalg.vector_norm(fx.double()).clamp_min(torch.finfo(torch.float64).tiny)
    worst = 0.0
    for k in range(len(group)):
        fgx = _main_tensor(f(group.act(x, k)))
        if not torch.isfinite(fgx).all():
            return math.nan
        diff = fgx.double() - group.act(fx, k).double()
        worst = max(worst, float(torch.linalg.vector_norm(diff) / norm))
    return worst
