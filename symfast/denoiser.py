"""One denoiser interface D(x, σ) -> x̂0 over the parametrisations people train with.

The state is in σ form, x = x0 + σ ε (see symfast/schedules.py). The network F is called as
``model(c_in · x, t)`` with t = ``schedule.model_time(σ)`` broadcast to the batch, and

    D(x, σ) = c_skip(σ) · x + c_out(σ) · F

| prediction | c_skip | c_out | c_in |
|---|---|---|---|
| "eps" | 1 | −σ | 1/√(σ²+1) (DDPM), 1 (VE) |
| "x0" | 0 | 1 | as eps |
| "v" (VP) | 1/(σ²+1) | −σ/√(σ²+1) | 1/√(σ²+1) |
| "edm" | σd²/(σ²+σd²) | σ·σd/√(σ²+σd²) | 1/√(σ²+σd²) |

With ``group=``, D is frame-averaged: D̄(x) = 1/|G| Σ_k g_k⁻¹ D(g_k x) — the same as wrapping the
model with :func:`symfast.symmetrize`, done here by running the model on the orbit and letting
the fused step op average the raw outputs, since c_skip and c_out are scalars. A network that is
equivariant by construction (an EquivariantUNet) needs no averaging: ``frame_average=False`` (the
default when ``model.group`` is that group or contains it) calls it once per step, and the group is still
used to transform the noise of stochastic samplers (``transform_noise=``).

Noise conditioning: the network receives t = ``schedule.model_time(σ)`` (ln σ / 4 for EDM, the
timestep for DDPM, σ for VE) and embeds it itself; the Denoiser alone turns σ into c_in, c_skip,
c_out and t, at sampling and in :meth:`Denoiser.loss` alike.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from symfast.groups import Group, get
from symfast.ops.fused_step import StepCoefficients, fused_step
from symfast.nn.regularizer import equivariance_target
from symfast.ops import _checks
from symfast.ops.group_average import orbit, orbit_mean
from symfast.schedules import DDPMSchedule, EDMSchedule, Schedule, VESchedule
from symfast._symmetrize import _default_chunks, _main_tensor

PREDICTIONS = ("eps", "x0", "v", "edm")


def _sole_user(t: torch.Tensor) -> bool:
    """Is ``t`` the only tensor using its storage (no view of it alive anywhere)? False where
    this torch cannot say."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return False
    # t's own reference, and the one of the storage object untyped_storage() returns
    return use_count(t.untyped_storage()._cdata) == 2


class LossTerms(NamedTuple):
    """Per-sample training losses, (B,) each: ``total`` = ``dsm`` + λ·``reg`` (``reg`` None
    without the regulariser), at the noise levels ``sigma``."""

    total: torch.Tensor
    dsm: torch.Tensor
    reg: torch.Tensor | None
    sigma: torch.Tensor


def _check_output(out: torch.Tensor, x_in: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        got = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"the model output must be a floating tensor, got {got}")
    if out.shape != x_in.shape:
        raise ValueError(f"the model output has shape {tuple(out.shape)} but the sample it was "
                         f"given has shape {tuple(x_in.shape)}")


class Denoiser(nn.Module):
    """D(x, σ) -> x̂0 for a network trained with ``prediction`` on ``schedule``.

    Args:
        model: ``model(x_in, t)`` with x_in: (B, ...) and t: (B,) float32; returns a tensor shaped
            like x_in (or a diffusers output with ``.sample``).
        prediction: "eps", "x0", "v" (VP v-prediction) or "edm" (EDM preconditioning).
        schedule: a :class:`~symfast.schedules.Schedule`; default EDMSchedule() for "edm",
            DDPMSchedule() otherwise.
        group: the symmetry group (or its name) the denoiser is equivariant under, or None.
        frame_average: average over ``group`` (|G| network calls per step). None: True unless
            the network declares itself equivariant under ``group`` or a group containing it
            (``model.group``, as EquivariantUNet does). False: one call per step; the network must be equivariant
            itself, and the group serves stochastic samplers' noise transform.
        sigma_data: σ_data for "edm" (default: the schedule's, else 0.5); refused for the other
            predictions, which do not use it, and where it differs from the schedule's.
        chunks: model calls per orbit (None: chosen per device, as in symmetrize).
        backend: backend of the orbit and fused-step ops.
    """

    def __init__(self, model: nn.Module | Callable, prediction: str = "eps",
                 schedule: Schedule | None = None, group: Group | str | None = None,
                 sigma_data: float | None = None, chunks: int | None = None,
                 backend: str | None = None, frame_average: bool | None = None):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if schedule is None:
            schedule = EDMSchedule() if prediction == "edm" else DDPMSchedule()
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a symfast.schedules.Schedule, got {type(schedule).__name__}")
        if prediction == "v" and not schedule.variance_preserving:
            raise ValueError("prediction='v' is defined for variance-preserving (DDPMSchedule) schedules")
        if not callable(model):
            raise TypeError(f"model must be callable (an nn.Module or a function of (x, t)), got "
                            f"{type(model).__name__}")
        _checks.positive_int_or_none("chunks", chunks)
        _checks.backend_name(backend)
        self.model = model
        self.prediction = prediction
        self.schedule = schedule
        self.group = get(group) if group is not None else None
        if frame_average is not None and not isinstance(frame_average, bool):
            raise TypeError(f"frame_average must be a bool or None, got {frame_average!r}")
        if frame_average is None:
            declared = getattr(model, "group", None)
            # a network equivariant under a group is so under each of its subgroups (a d4 network
            # needs no c4 averaging)
            frame_average = self.group is not None and not (
                isinstance(declared, Group) and self.group.within(declared))
        if frame_average and self.group is None:
            raise ValueError("frame_average=True needs group=")
        self.frame_average = frame_average
        if sigma_data is not None:
            _checks.finite_number("sigma_data", sigma_data, positive=True)
            # silently unused otherwise, or silently differing from the schedule's
            if prediction != "edm":
                raise ValueError(f"sigma_data is EDM's preconditioning (prediction='edm'); "
                                 f"prediction={prediction!r} does not use it")
            declared = getattr(schedule, "sigma_data", None)
            if declared is not None and float(declared) != float(sigma_data):
                raise ValueError(f"sigma_data={sigma_data} differs from the schedule's "
                                 f"sigma_data={declared}: give it to one of the two")
        self.sigma_data = float(sigma_data if sigma_data is not None
                                else getattr(schedule, "sigma_data", 0.5))
        self.chunks = chunks
        self.backend = backend

    def _scalings(self, s, sqrt) -> tuple:
        """(c_skip, c_out, c_in) at σ = s: host floats (sqrt=math.sqrt) or tensors (torch.sqrt)."""
        if self.prediction == "edm":
            sd = self.sigma_data
            denom = s * s + sd * sd
            return sd * sd / denom, s * sd / sqrt(denom), 1 / sqrt(denom)
        c_in = self.schedule.input_scale(s, sqrt)
        if self.prediction == "eps":
            return 1.0, -s, c_in
        if self.prediction == "x0":
            return 0.0, 1.0, c_in
        return 1 / (s * s + 1), -s / sqrt(s * s + 1), c_in

    def coefficients(self, sigma: float) -> tuple[float, float, float, float]:
        """(c_skip, c_out, c_in, model time) at noise level σ, host floats."""
        s = _checks.real("sigma", sigma)
        if not (0 < s < math.inf):
            # σ = 0 is the clean data, where a sampler stops instead of calling the network
            raise ValueError(f"sigma must be finite and > 0, got {sigma}")
        return (*self._scalings(s, math.sqrt), self.schedule.model_time(s))

    @property
    def averaging_group(self) -> Group | None:
        """The group the outputs are frame-averaged over (None without averaging)."""
        return self.group if self.frame_average else None

    def orbit_outputs(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Raw network outputs at the (scaled) orbit of x: (|G|·B, ...), element-major; (B, ...)
        without frame averaging."""
        _checks.floating("x", x)
        _, _, c_in, t = self.coefficients(sigma)
        x_in = x * c_in
        group = self.averaging_group
        buffer = None
        if group is not None:
            buffer = self._take_orbit_buffer(x_in, len(group))
            x_in = orbit(x_in, group, backend=self.backend, out=buffer)
        n = x_in.shape[0]
        order = len(group) if group is not None else 1
        chunks = self.chunks or (_default_chunks(x.shape[0], order, x.device) if order > 1 else 1)
        size = max(1, -(-n // chunks))
        outs = []
        for i in range(0, max(n, 1), size):  # an empty batch is one call on it, as for the model
            part = x_in[i:i + size]
            tt = torch.full((part.shape[0],), t, dtype=torch.float32, device=x.device)
            outs.append(_main_tensor(self.model(part, tt)))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        _check_output(y, x_in)
        if buffer is not None:
            self._orbit_buffers.append(buffer)
        return y.to(x.dtype)

    def _take_orbit_buffer(self, x_in: torch.Tensor, order: int) -> torch.Tensor | None:
        """The tensor the orbit of x_in is written into: the previous step's when nothing else
        still uses it, else a fresh one (None where a fresh tensor from orbit itself is needed).

        Sampling is a loop of steps whose orbits have one shape: reusing the |G|·B buffer spares
        an allocation per step, which beyond malloc's reuse threshold (32 MB) is a fresh mapping
        whose pages fault in on every call. A buffer is reused only when the one tensor kept here
        is the sole user of its memory: the network's output may alias its input, the network
        may keep its input, an earlier step's result may still be held; any such view keeps the
        storage's count up and the step writes a fresh buffer instead. Not while autograd records
        (the saved inputs must stay as they were) or torch.compile traces (it sees a fresh
        tensor), and on CPU only (CUDA's caching allocator already hands the previous step's
        block back); a different shape, dtype, device or inference mode takes a fresh one. The
        denoiser keeps the last buffer between sampling runs."""
        if (x_in.device.type != "cpu" or torch.is_grad_enabled()
                or torch.compiler.is_compiling()):
            return None
        pool = self.__dict__.setdefault("_orbit_buffers", [])
        shape = (order * x_in.shape[0],) + tuple(x_in.shape[1:])
        while pool:
            buffer = pool.pop()  # one atomic step: two threads never take the same buffer
            if (tuple(buffer.shape) == shape and buffer.dtype == x_in.dtype
                    and buffer.device == x_in.device
                    and buffer.is_inference() == torch.is_inference_mode_enabled()
                    and _sole_user(buffer)):
                return buffer
        return torch.empty(shape, dtype=x_in.dtype, device=x_in.device)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_orbit_buffers", None)  # scratch memory, not state: copies skip it
        return state

    def step(self, x: torch.Tensor, sigma: float, a: float, b: float, *, p: float = 0.0,
             q: float = 0.0, c: float = 0.0, u: torch.Tensor | None = None,
             v: torch.Tensor | None = None, noise: dict[str, Any] | None = None,
             return_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One fused step: x_next = a·x + b·D(x, σ) + p·u + q·v + c·z (see symfast.ops.fused_step);
        ``noise`` holds the noise keywords of fused_step (noise=, key=, step=, noise_element=)."""
        y = self.orbit_outputs(x, sigma)
        c_skip, c_out, _, _ = self.coefficients(sigma)
        coefs = StepCoefficients(c_skip, c_out, a, b, p, q, c)
        return fused_step(x, y, coefs, self.averaging_group, u=u, v=v,
                          return_denoised=return_denoised, backend=self.backend,
                          noise_group=self.group, **(noise or {}))

    def network(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The raw network output F(x_in, t), frame-averaged when the denoiser averages:
        x_in: (B, ...) the scaled input c_in·x, t: (B,) -> (B, ...). Differentiable."""
        group = self.averaging_group
        if group is None:
            return _main_tensor(self.model(x_in, t))
        xs = orbit(x_in, group, backend=self.backend)
        ys = _main_tensor(self.model(xs, t.repeat(len(group))))
        return orbit_mean(ys.to(x_in.dtype), group, backend=self.backend)

    def loss(self, x0: torch.Tensor, sigma: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, *, t: torch.Tensor | None = None,
             generator: torch.Generator | None = None, reduction: str = "mean",
             reg_weight: float = 0.0, reg_target: nn.Module | Callable | None = None,
             reg_elements: torch.Tensor | None = None) -> torch.Tensor | LossTerms:
        """Denoising score matching in σ form: for x = x0 + σ ε,

            loss(σ) = ‖F(c_in x, t) − (x0 − c_skip x)/c_out‖² = ‖D(x, σ) − x0‖² / c_out²,

        the mean over the non-batch dims. With "edm" this is EDM's loss with its weighting
        (σ² + σ_d²)/(σ σ_d)² = 1/c_out²; on a DDPM schedule "eps", "v" and "x0" it is the usual
        ε, v (√ᾱ ε − √(1−ᾱ) x0) and x0 regression. σ is drawn by ``schedule.training_levels``
        when not given: lognormal(P_mean, P_std) for EDM, uniform integer timesteps for DDPM.

        Args:
            x0: (B, ...) clean data.
            sigma: (B,) noise levels (or None to draw them); t: (B,) the network's conditioning
                at them (default: ``schedule.model_time`` of each σ).
            noise: (B, ...) unit normal ε (default: drawn with ``generator``).
            reduction: "mean" (a scalar) or "none" (:class:`LossTerms` of per-sample losses).
            reg_weight: λ of the equivariance regulariser (Reg): adds
                λ·‖F(x_in) − g⁻¹ F_target(g x_in)‖² with g = ``reg_elements`` (B,) of the
                denoiser's group (default: drawn with ``generator``) and F_target = ``reg_target``
                (the frozen EMA network; default the network itself) under no_grad.
        """
        if not isinstance(x0, torch.Tensor) or not x0.is_floating_point() or x0.dim() < 2:
            raise TypeError(f"x0 must be a floating-point (B, ...) tensor, got "
                            f"{tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__}")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if x0.shape[0] == 0:
            raise ValueError("x0 must hold at least one sample (a mean over none is NaN)")
        batch, device = x0.shape[0], x0.device
        # the loss in float32, or float64 for a float64 model (it was float32 for every dtype)
        acc = torch.promote_types(x0.dtype, torch.float32)
        if sigma is None:
            if t is not None:
                raise ValueError("t is the conditioning at given noise levels: pass sigma= with it")
            u = torch.rand(batch, generator=generator, dtype=torch.float64,
                           device=generator.device if generator is not None else "cpu")
            sigma, t = self.schedule.training_levels(u.to(device))
        else:
            sigma = torch.as_tensor(sigma, device=device).to(acc).reshape(-1)
            sigma = sigma.expand(batch) if sigma.numel() == 1 else sigma
            if sigma.shape != (batch,):
                raise ValueError(f"sigma must be a scalar or ({batch},), got {tuple(sigma.shape)}")
            if not bool(((sigma > 0) & (sigma < math.inf)).all()):  # NaN fails both
                raise ValueError(f"sigma must be finite and > 0, got {sigma.tolist()}")
            if t is None:
                t = torch.tensor([self.schedule.model_time(float(v)) for v in sigma.cpu()],
                                 dtype=torch.float32, device=device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                                device=generator.device if generator is not None else device).to(device)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but x0 has {tuple(x0.shape)}")
        view = (batch,) + (1,) * (x0.dim() - 1)
        c_skip, c_out, c_in = self._scalings(sigma.to(acc).reshape(view), torch.sqrt)
        x = x0 + sigma.reshape(view).to(x0.dtype) * noise
        # the network's input in x0's dtype: a float32 c_in promoted a bf16/fp16 model's input
        # to float32, which its weights then refused
        x_in = x * (c_in.to(x.dtype) if isinstance(c_in, torch.Tensor) else c_in)  # 1.0 on VE/EDM eps
        out = self.network(x_in, t)
        _check_output(out, x_in)
        out = out.to(acc)
        target = (x0.to(acc) - c_skip * x.to(acc)) / c_out
        dsm = (out - target).pow(2).flatten(1).mean(1)
        reg = None
        if reg_weight:
            if self.group is None:
                raise ValueError("reg_weight needs a denoiser with a group")
            if reg_elements is None:
                reg_elements = torch.randint(len(self.group), (batch,), generator=generator,
                                             device=generator.device if generator is not None else "cpu")
            pulled = equivariance_target(reg_target if reg_target is not None else self.model,
                                         x_in, t, self.group, reg_elements.cpu())
            reg = (out - pulled.to(acc)).pow(2).flatten(1).mean(1)
        total = dsm if reg is None else dsm + reg_weight * reg
        if reduction == "mean":
            return total.mean()
        return LossTerms(total, dsm, reg, sigma)

    def forward(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """x: (B, ...) -> x̂0: (B, ...)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if isinstance(sigma, torch.Tensor):
            raise TypeError("sigma must be a host float (a tensor would force a device sync)")
        return self.step(x, sigma, 0.0, 1.0, return_denoised=False)[0]


__all__ = ["Denoiser", "LossTerms", "PREDICTIONS", "DDPMSchedule", "EDMSchedule", "VESchedule"]
