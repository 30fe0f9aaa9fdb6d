"""k-diffusion-compatible samplers: same names, signatures and callback dicts as
``k_diffusion.sampling``; importing this module does not import k-diffusion.

``model(x, sigma * s_in, **extra_args)`` is a denoiser D(x, σ) -> x̂0 on the σ-form state
x = x0 + σ ε, x: (B, ...), sigmas: (n + 1,) descending and usually ending in 0.

The σ table is copied to the host once before the loop and every per-step coefficient is computed
there, with 0-d tensor arithmetic in the σ table's dtype in k-diffusion's order of operations (torch's
CPU transcendentals are not correctly rounded, so this is what reproduces k-diffusion to rounding);
the loop does elementwise tensor math with those host values (Python floats, or for DPM-Solver++(2M)
0-d host tensors, which a bf16/fp16 state rounds to its dtype as k-diffusion's) and never reads a
device tensor.

With ``group=`` (frame averaging: the model runs on the whole orbit in one batched call and the fused
step op averages its outputs; ``transform_noise=k`` with it moves every noise draw by the group's
element k, so a stochastic sampler from g_k·x gives g_k· its sample from x, as in
``symfast.sample``) or ``seed=`` (Philox noise: one int per sample gives the same images
whatever the batch; see :class:`symfast.integrations.PhiloxGenerator`), a sampler runs on symfast's
sampler core instead, ``symfast.samplers.loops`` (each step's elementwise work one
``symfast::fused_step`` op, coefficients in float64 on the host): the same method, equal to this
module's eager loop to float32 rounding rather than to the bit. Without them the loops below keep
k-diffusion's arithmetic; both take churn γ, the ancestral split and the DPM-Solver++(2M) terms from
``symfast.samplers._core``.

One deliberate difference: k-diffusion's Euler/Heun draw ``randn_like(x)`` on every step even when
``s_churn == 0`` makes that noise unused; these draw only when ``s_churn > 0``, so outputs match but
the global RNG state afterwards may differ. Euler ancestral draws exactly where k-diffusion does, on
every step to σ' > 0, also where σ_up = 0 (a repeated σ, or ``eta == 0``), so every later draw, and a
stateful ``noise_sampler``'s calls, stay in step with k-diffusion's.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from tqdm.auto import trange

from symfast.groups import Group, get
from symfast.integrations._philox import PhiloxGenerator, repeat_for_orbit
from symfast.samplers._core import ancestral_split, churn_gamma, churn_levels, dpmpp_2m, pow_half

__all__ = ["get_sigmas_karras", "sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m",
           "PhiloxGenerator"]


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """Karras et al. (2022) σ: (n + 1,) float32, descending from sigma_max to sigma_min, then 0.

    Computed in float32 like k-diffusion (``symfast.schedules.karras_sigmas`` is the float64 form
    diffusers uses, which differs in the last bits).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])]).to(device)


def _host_sigmas(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"x and sigmas must be tensors, got {type(x).__name__} and {type(sigmas).__name__}")
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
    host = sigmas.detach().cpu()
    if not torch.isfinite(host).all() or (host < 0).any():
        raise ValueError(f"sigmas must be finite and >= 0, got {host.tolist()}")
    return host


def _check_descending(host: torch.Tensor, sampler: str, strictly: bool) -> None:
    """ValueError naming ``sigmas`` unless each σ is below the one before (``strictly``) or not
    above it. DPM-Solver++(2M) needs strictly: a repeated σ is a step of h = 0, which a
    neighbouring step's ratio r = h_prev / h or weight 1 / (2r) divides by (k-diffusion returns
    NaN, the core's division raised); a rise gives k-diffusion's extrapolation a negative r."""
    rises = host[1:] >= host[:-1] if strictly else host[1:] > host[:-1]
    if rises.any():
        order = "strictly decreasing" if strictly else "non-increasing"
        raise ValueError(f"sigmas must be {order} for {sampler}, got {host.tolist()}")


def _denoise(model: Callable, x: torch.Tensor, sigma: float, s_in: torch.Tensor, extra_args: dict,
             ) -> torch.Tensor:
    denoised = model(x, sigma * s_in, **extra_args)
    if denoised.shape != x.shape:
        raise ValueError(f"model returned shape {tuple(denoised.shape)} for an input of shape {tuple(x.shape)}")
    return denoised


class _OrbitDenoiser:
    """A k-diffusion model D(x, σ) -> x̂0 in symfast's sampler-core interface (``step``, as
    :class:`symfast.Denoiser`): the model on the orbit of x in one batched call (extra arguments
    with a batch dim tiled along), then one fused step op averages the outputs and updates x."""

    group = None  # no noise transform: NoiseSource reads this

    def __init__(self, model: Callable, extra_args: dict, group: Group | None):
        self.model, self.extra_args, self.orbit_group = model, extra_args, group

    def step(self, x: torch.Tensor, sigma: float, a: float, b: float, *, p: float = 0.0, q: float = 0.0,
             c: float = 0.0, u: torch.Tensor | None = None, v: torch.Tensor | None = None,
             noise: dict[str, Any] | None = None, return_denoised: bool = True):
        from symfast.ops.fused_step import StepCoefficients, fused_step
        from symfast.ops.group_average import orbit
        group, batch = self.orbit_group, x.shape[0]
        order = len(group) if group is not None else 1
        xs = orbit(x, group) if group is not None else x
        extra = repeat_for_orbit(self.extra_args, batch, order)
        y = _denoise(self.model, xs, sigma, xs.new_ones([xs.shape[0]]), extra)
        # the model is D itself: x̂0 = 0·x + 1·(orbit average of its outputs)
        return fused_step(x, y.to(x.dtype), StepCoefficients(0.0, 1.0, a, b, p, q, c), group, u=u, v=v,
                          return_denoised=return_denoised, **(noise or {}))


def _sampler_noise(x: torch.Tensor, sigmas: torch.Tensor, seed: Any, noise_sampler: Callable | None,
                   group: Group | None, transform_noise: int | None):
    from symfast.samplers._noise import NoiseSource

    class _FromSampler(NoiseSource):
        """k-diffusion's noise_sampler(σ_i, σ_{i+1}) as the noise of step i + 1."""

        def kwargs(self, i: int) -> dict[str, Any]:
            return {"noise": self.draw(i)}

        def unused(self, i: int) -> None:
            # k-diffusion calls the sampler on every step to σ' > 0, even where σ_up = 0: a
            # stateful sampler skipped here would hand every later step another step's noise
            if sigmas[i] > 0:
                self.draw(i)

        def _normal(self, i: int) -> torch.Tensor:
            return noise_sampler(sigmas[i - 1], sigmas[i])

    if noise_sampler is not None:
        if seed is not None:
            raise ValueError("pass seed= or noise_sampler=, not both")
        return _FromSampler(x, seed=0, group=group, transform=transform_noise)
    return NoiseSource(x, seed=0 if seed is None else seed, group=group, transform=transform_noise)


def _on_core(name: str, model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None,
             callback: Callable | None, disable: bool | None, group: Group | str | None, seed: Any,
             noise_sampler: Callable | None = None, transform_noise: int | None = None,
             **options: Any) -> torch.Tensor:
    """Run ``name`` on symfast's sampler core (symfast.samplers.loops): fused steps, frame averaging
    over ``group``, Philox noise keyed by ``seed`` (default 0), each draw moved by ``group``'s
    element ``transform_noise`` when given."""
    from symfast.samplers import loops
    host = _host_sigmas(x, sigmas)
    # the core's steps divide by every σ but the last (k-diffusion's loops return NaN instead)
    if (host[:-1] <= 0).any():
        raise ValueError(f"sigmas must be > 0 except the last, got {host.tolist()}")
    if name in ("euler_ancestral", "dpmpp_2m"):
        _check_descending(host, name, strictly=name == "dpmpp_2m")
    group = get(group) if group is not None else None
    if group is not None:
        group.check_input(x)
    denoiser = _OrbitDenoiser(model, {} if extra_args is None else extra_args, group)
    if transform_noise is not None and group is None:
        raise ValueError("transform_noise needs group= (the group whose element moves the noise)")
    noise = _sampler_noise(x, sigmas, seed, noise_sampler, group, transform_noise)
    return loops.SAMPLERS[name](denoiser, x, host.double().numpy(), noise,
                                callback=_tensor_sigmas(callback, sigmas),
                                progress=None if disable is None else not disable,
                                **options)


def _tensor_sigmas(callback: Callable | None, sigmas: torch.Tensor) -> Callable | None:
    """The core reports σ and σ̂ as host floats; k-diffusion's callbacks get 0-dim tensors on
    sigmas' device (``sigmas[i]``, as its loops pass them)."""
    if callback is None:
        return None

    def report(d: dict) -> None:
        sigma = sigmas[d["i"]]
        sigma_hat = sigma if d["sigma_hat"] == d["sigma"] else sigmas.new_tensor(d["sigma_hat"])
        callback({**d, "sigma": sigma, "sigma_hat": sigma_hat})
    return report


def _to_d(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_dtype: torch.dtype) -> torch.Tensor:
    """k-diffusion's to_d, (x − D) / σ, in its dtype: its σ is a tensor of the table's dtype with
    x's dims, so the result (and the state from the first step on) is promoted to that dtype, a
    bf16 x with float32 sigmas to float32 (kept in bf16, Euler ended 100x further from fp64)."""
    diff = x - denoised
    return diff.to(torch.promote_types(diff.dtype, sigma_dtype)) / sigma


def _churn_tables(host: torch.Tensor, s_churn: float, s_tmin: float, s_tmax: float
                  ) -> tuple[list[float], list[float], list[float]]:
    """Per step: γ_i, σ̂_i = σ_i (γ_i + 1) and the churn noise scale √(σ̂_i² − σ_i²) (Karras Alg. 2)."""
    n = len(host) - 1
    gammas = [churn_gamma(s, n, s_churn, s_tmin, s_tmax) for s in host[:-1].tolist()]
    levels = [churn_levels(host[i], g, pow_half) for i, g in enumerate(gammas)]
    return gammas, [float(h) for h, _ in levels], [float(c) for _, c in levels]


def _karras_loop(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None,
                 callback: Callable | None, disable: bool | None, s_churn: float, s_tmin: float, s_tmax: float,
                 s_noise: float, heun: bool, group: Group | str | None = None, seed: Any = None,
                 transform_noise: int | None = None) -> torch.Tensor:
    if group is not None or seed is not None or transform_noise is not None:
        return _on_core("heun" if heun else "euler", model, x, sigmas, extra_args, callback, disable, group, seed,
                        transform_noise=transform_noise, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                        s_noise=s_noise)
    extra_args = {} if extra_args is None else extra_args
    host = _host_sigmas(x, sigmas)
    gammas, sigma_hat, churn = _churn_tables(host, s_churn, s_tmin, s_tmax)
    sigma = host.tolist()
    n = len(sigma) - 1
    s_in = x.new_ones([x.shape[0]])
    for i in trange(n, disable=disable):
        if s_churn > 0:
            eps = torch.randn_like(x) * s_noise
            if gammas[i] > 0:
                x = x + eps * churn[i]
        denoised = _denoise(model, x, sigma_hat[i], s_in, extra_args)
        d = _to_d(x, denoised, sigma_hat[i], sigmas.dtype)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i] * (gammas[i] + 1),
                      "denoised": denoised})
        dt = float(host[i + 1] - sigma_hat[i])
        if not heun or sigma[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = _denoise(model, x_2, sigma[i + 1], s_in, extra_args)
            d_2 = _to_d(x_2, denoised_2, sigma[i + 1], sigmas.dtype)
            d_prime = (d + d_2) / 2
            x = x + d_prime * dt
    return x


@torch.no_grad()
def sample_euler(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callable | None = None, disable: bool | None = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, *,
                 group: Group | str | None = None, seed: Any = None,
                 transform_noise: int | None = None) -> torch.Tensor:
    """Euler steps on the probability-flow ODE with optional churn (Karras et al. 2022, Alg. 2).
    x: (B, ...) noise at sigmas[0]; returns the sample at sigmas[-1]. ``group``, ``seed``,
    ``transform_noise``: run on symfast's sampler core (module docstring)."""
    return _karras_loop(model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise,
                        heun=False, group=group, seed=seed, transform_noise=transform_noise)


@torch.no_grad()
def sample_heun(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callable | None = None, disable: bool | None = None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, *,
                group: Group | str | None = None, seed: Any = None,
                transform_noise: int | None = None) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 2), Euler on the last step to σ = 0.
    x: (B, ...) noise at sigmas[0]; returns the sample at sigmas[-1]. ``group``, ``seed``,
    ``transform_noise``: run on symfast's sampler core (module docstring)."""
    return _karras_loop(model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise,
                        heun=True, group=group, seed=seed, transform_noise=transform_noise)


@torch.no_grad()
def sample_euler_ancestral(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                           callback: Callable | None = None, disable: bool | None = None, eta: float = 1.0,
                           s_noise: float = 1.0, noise_sampler: Callable | None = None, *,
                           group: Group | str | None = None, seed: Any = None,
                           transform_noise: int | None = None) -> torch.Tensor:
    """Ancestral sampling with Euler steps: step down to σ_down, add noise of size σ_up.
    ``noise_sampler(sigma, sigma_next)`` returns noise shaped like x (default: ``randn_like(x)``;
    ``PhiloxGenerator(seeds).noise_sampler(x)`` for a seed per sample). ``group``, ``seed``,
    ``transform_noise``: run on symfast's sampler core (module docstring)."""
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if group is not None or seed is not None or transform_noise is not None:
        return _on_core("euler_ancestral", model, x, sigmas, extra_args, callback, disable, group, seed,
                        noise_sampler, transform_noise, eta=eta, s_noise=s_noise)
    extra_args = {} if extra_args is None else extra_args
    host = _host_sigmas(x, sigmas)
    # like the x passed in (k-diffusion's default_noise_sampler(x)), not the state, which to_d
    # promotes (a bf16 x: bf16 draws, whose values differ from float32 ones)
    first = x
    noise_sampler = (lambda sigma, sigma_next: torch.randn_like(first)) if noise_sampler is None else noise_sampler
    sigma = host.tolist()
    n = len(sigma) - 1
    dt, sigma_up = [], []
    for i in range(n):
        s_from = host[i]
        down, up = ancestral_split(s_from, host[i + 1], eta, pow_half)
        dt.append(float(down - s_from))
        sigma_up.append(float(up))
    s_in = x.new_ones([x.shape[0]])
    for i in trange(n, disable=disable):
        denoised = _denoise(model, x, sigma[i], s_in, extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        d = _to_d(x, denoised, sigma[i], sigmas.dtype)
        x = x + d * dt[i]
        if sigma[i + 1] > 0:  # also where σ_up = 0, as k-diffusion: later draws stay in step
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up[i]
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                    callback: Callable | None = None, disable: bool | None = None, *,
                    group: Group | str | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in t = −log σ: a second-order multistep in the data
    prediction, first order on the first step and on the step to σ = 0. sigmas: strictly decreasing
    (a repeated σ gives k-diffusion NaN). ``group``: run on symfast's sampler core (module
    docstring)."""
    if group is not None:
        return _on_core("dpmpp_2m", model, x, sigmas, extra_args, callback, disable, group, None)
    extra_args = {} if extra_args is None else extra_args
    host = _host_sigmas(x, sigmas)
    if (host[:-1] <= 0).any():
        raise ValueError(f"sigmas must be > 0 except the last, got {host.tolist()}")
    _check_descending(host, "dpmpp_2m", strictly=True)
    sigma = host.tolist()
    n = len(sigma) - 1
    t = [-torch.log(s) for s in host]
    ratio, expm1, c_new, c_old = [], [], [], []
    for i in range(n):
        c = dpmpp_2m(t[i - 1] if i > 0 else None, t[i], t[i + 1], torch.expm1)
        # k-diffusion's ratio σ'/σ is exp(−t')/exp(−t), not the σ table's quotient. The terms stay
        # 0-d tensors of the table's dtype, as k-diffusion's: a bf16/fp16 x takes them rounded to
        # its dtype, where a Python float is kept in float32 (195 of 256 bf16 values differed)
        ratio.append(torch.exp(-t[i + 1]) / torch.exp(-t[i]))
        expm1.append(c.expm1_neg_h)
        c_new.append(c.c_new)
        c_old.append(c.c_old)
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in trange(n, disable=disable):
        denoised = _denoise(model, x, sigma[i], s_in, extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if old_denoised is None or sigma[i + 1] == 0:
            x = ratio[i] * x - expm1[i] * denoised
        else:
            denoised_d = c_new[i] * denoised - c_old[i] * old_denoised
            x = ratio[i] * x - expm1[i] * denoised_d
        old_denoised = denoised
    return x

