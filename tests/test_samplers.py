"""Schedules, Denoiser, samplers: diffusers parity, equivariance, reproducibility, bad inputs."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import rel_err
from symfast.denoiser import Denoiser
from symfast.groups import get
from symfast.samplers import denoise, sample
from symfast.schedules import DDPMSchedule, EDMSchedule, VESchedule, timesteps

D4 = get("d4")


class TinyNet(nn.Module):
    """A random, deliberately non-equivariant CNN (asymmetric kernels, a position bias)."""

    def __init__(self, channels=2, size=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Conv2d(channels, 8, 3, padding=1)
        self.b = nn.Conv2d(8, channels, 3, padding=1)
        self.pos = nn.Parameter(0.1 * torch.randn(1, channels, size, size))

    def forward(self, x, t):
        h = torch.tanh(self.a(x) + 0.01 * t.view(-1, 1, 1, 1))
        return 0.5 * self.b(h) + self.pos


def _x(shape=(2, 2, 8, 8), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def eps_fa():
    return Denoiser(TinyNet(), "eps", DDPMSchedule(), group="d4")


@pytest.fixture(scope="module")
def edm_fa():
    return Denoiser(TinyNet(seed=3), "edm", EDMSchedule(), group="d4")


# ---- schedules ---------------------------------------------------------------------------------

def test_schedules_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for bs, start, end in [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012),
                           ("squaredcos_cap_v2", 1e-4, 0.02)]:
        sched = DDPMSchedule(beta_schedule=bs, beta_start=start, beta_end=end)
        for spacing, offset in [("leading", 1), ("trailing", 0), ("linspace", 0)]:
            ddim = diffusers.DDIMScheduler(beta_schedule=bs, beta_start=start, beta_end=end,
                                           timestep_spacing=spacing, steps_offset=offset)
            ddim.set_timesteps(23)
            assert torch.equal(sched.alphas_cumprod, ddim.alphas_cumprod)
            assert np.array_equal(sched.timesteps(23, spacing, offset), ddim.timesteps.numpy())
            for karras in (False, True):
                euler = diffusers.EulerDiscreteScheduler(
                    beta_schedule=bs, beta_start=start, beta_end=end, timestep_spacing=spacing,
                    steps_offset=offset, use_karras_sigmas=karras)
                euler.set_timesteps(23)
                sigmas = sched.sigmas(23, spacing, karras, offset)
                assert np.array_equal(sigmas.astype(np.float32), euler.sigmas.numpy())
                # diffusers calls the model at σ→t of Karras σ, as model_time does, and else at the
                # spaced timesteps themselves (model_time(σ(t)) returns t to float32 rounding)
                times = ([sched.model_time(float(s)) for s in sigmas[:-1]] if karras else
                         timesteps(1000, 23, spacing, offset, integer=False))
                np.testing.assert_allclose(times, euler.timesteps.numpy(), rtol=1e-6)


def test_karras_and_ve_grids():
    s = EDMSchedule().sigmas(5)
    rho = 7
    expected = [(80 ** (1 / rho) + i / 4 * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho for i in range(5)]
    np.testing.assert_allclose(s, expected + [0.0], rtol=1e-12)
    v = VESchedule(0.01, 50).sigmas(3)
    np.testing.assert_allclose(v, [50, math.sqrt(0.5), 0.01, 0], rtol=1e-12)


def test_trailing_spacing_gives_exactly_steps_descending_timesteps():
    """diffusers' np.arange(n, 0, -n/steps) yields steps + 1 timesteps ending in -1 for some
    step counts (61 of 1000 among them), which sent the σ grid back up to σ_max."""
    sched = DDPMSchedule()
    for steps in range(1, 1001):
        t = sched.timesteps(steps, "trailing")
        assert len(t) == steps and t.min() >= 0 and (np.diff(t) < 0).all(), steps
    for sampler in ("ddim", "euler"):
        grid = sched.sampling_sigmas(sampler, 61, "trailing", False)
        assert len(grid) == 62 and (np.diff(grid) < 0).all() and grid[-1] == 0
    # the diffusers drop-ins keep diffusers' own timesteps (tests/test_integrations_diffusers.py)
    assert timesteps(1000, 61, "trailing", diffusers_arange=True)[-1] == -1


def test_a_users_own_vp_schedule_is_asked_not_typed():
    # A VP schedule that is not a DDPMSchedule subclass: the Denoiser's c_in, the start scale and
    # v-prediction follow its methods, so it gives the same samples as the DDPMSchedule it copies.
    class MyVP(EDMSchedule):
        variance_preserving = True

        def __init__(self):
            super().__init__()
            self.inner = DDPMSchedule()
            self.sigma_min, self.sigma_max = self.inner.sigma_min, self.inner.sigma_max

        def input_scale(self, sigma, sqrt=math.sqrt):
            return self.inner.input_scale(sigma, sqrt)

        def start_scale(self, sigma0):
            return self.inner.start_scale(sigma0)

        def sampling_sigmas(self, sampler, steps, spacing="leading", karras=False):
            return self.inner.sampling_sigmas(sampler, steps, spacing, karras)

        def model_time(self, sigma):
            return self.inner.model_time(sigma)

    net = TinyNet()
    for prediction in ("eps", "v"):
        mine = Denoiser(net, prediction, MyVP())
        theirs = Denoiser(net, prediction, DDPMSchedule())
        for sampler in ("ddim", "euler"):
            a = sample(mine, _x(), sampler=sampler, steps=6, progress=False)
            b = sample(theirs, _x(), sampler=sampler, steps=6, progress=False)
            assert torch.equal(a, b), (prediction, sampler)
    with pytest.raises(ValueError, match="variance-preserving"):
        Denoiser(net, "v", EDMSchedule())


# ---- Denoiser ------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "edm"])
def test_denoiser_parametrisations(prediction):
    net = TinyNet()
    sched = EDMSchedule() if prediction == "edm" else DDPMSchedule()
    d = Denoiser(net, prediction, sched)
    x, sigma = _x() * 3, 2.5
    if prediction == "edm":
        sd = 0.5
        f = net(x / math.sqrt(sigma**2 + sd**2), torch.full((2,), math.log(sigma) / 4))
        ref = sd**2 / (sigma**2 + sd**2) * x + sigma * sd / math.sqrt(sigma**2 + sd**2) * f
    else:
        ac = 1 / (1 + sigma**2)
        t = torch.full((2,), sched.model_time(sigma))
        x_vp = x * math.sqrt(ac)
        f = net(x_vp, t)
        ref = {"eps": (x_vp - math.sqrt(1 - ac) * f) / math.sqrt(ac), "x0": f,
               "v": math.sqrt(ac) * x_vp - math.sqrt(1 - ac) * f}[prediction]
    assert rel_err(d(x, sigma), ref) <= 1e-5


def test_denoiser_group_is_frame_averaging():
    from symfast._symmetrize import symmetrize
    net = TinyNet()
    d = Denoiser(net, "x0", EDMSchedule(), group="d4")
    x, sigma = _x(), 1.7
    fa = symmetrize(lambda z: net(z, torch.full((z.shape[0],), math.log(sigma) / 4)), "d4")
    assert rel_err(d(x, sigma), fa(x * d.coefficients(sigma)[2])) <= 1e-5


def test_a_declared_group_skips_averaging_only_when_it_holds_the_denoisers_elements():
    """frame_average=None trusts a network's declared group: by its elements, not its name
    (every channel_perm group on C channels is "channel_perm(C)"), and a group containing the
    denoiser's (d4 holds c4)."""
    from symfast import groups
    swap01, swap12 = groups.channel_perm([[0, 1, 2], [1, 0, 2]]), groups.channel_perm([[0, 1, 2], [0, 2, 1]])
    assert swap01.name == swap12.name and not swap01.same_elements(swap12)
    net = TinyNet()
    net.group = swap01
    assert Denoiser(net, "x0", EDMSchedule(), group=swap12).frame_average
    assert not Denoiser(net, "x0", EDMSchedule(), group=groups.channel_perm([[1, 0, 2], [0, 1, 2]])).frame_average
    net.group = get("d4")
    assert not Denoiser(net, "x0", EDMSchedule(), group="d4").frame_average
    assert not Denoiser(net, "x0", EDMSchedule(), group="c4").frame_average
    net.group = get("c4")
    assert Denoiser(net, "x0", EDMSchedule(), group="d4").frame_average


# ---- equivariance --------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["euler", "ddim", "heun", "dpmpp_2m"])
def test_ode_samplers_equivariant(eps_fa, sampler):
    x_T = _x()
    out = sample(eps_fa, x_T, sampler=sampler, steps=6, progress=False)
    for k in (1, 6):
        out_g = sample(eps_fa, D4.act(x_T, k), sampler=sampler, steps=6, progress=False)
        assert rel_err(out_g, D4.act(out, k)) <= 1e-5


def test_without_group_not_equivariant():
    """The same check fails for the raw network, so the tests above can fail."""
    d = Denoiser(TinyNet(), "eps", DDPMSchedule())
    x_T = _x()
    out = sample(d, x_T, sampler="euler", steps=6, progress=False)
    assert rel_err(sample(d, D4.act(x_T, 1), sampler="euler", steps=6, progress=False),
                   D4.act(out, 1)) > 1e-2


@pytest.mark.parametrize("sampler,opts", [("ddpm", {}), ("euler_ancestral", {}),
                                          ("euler_maruyama", {}), ("ddim", {"eta": 0.5}),
                                          ("heun", {"s_churn": 2.0})])
def test_stochastic_samplers_equivariant_with_transformed_noise(edm_fa, sampler, opts):
    x_T = _x()
    out = sample(edm_fa, x_T, sampler=sampler, steps=5, seed=7, progress=False, **opts)
    k = 5
    out_g = sample(edm_fa, D4.act(x_T, k), sampler=sampler, steps=5, seed=7, transform_noise=k,
                   progress=False, **opts)
    assert rel_err(out_g, D4.act(out, k)) <= 1e-5
    plain = sample(edm_fa, D4.act(x_T, k), sampler=sampler, steps=5, seed=7, progress=False, **opts)
    assert rel_err(plain, D4.act(out, k)) > 1e-3  # untransformed noise breaks it


def test_heun_churn_noise_is_added_by_one_fused_op():
    """The churn x + s·z of Heun is one fused_step call for Philox noise; it equals drawing z and
    adding it, and the noise is the same whatever x holds."""
    from symfast.samplers._noise import NoiseSource
    x = torch.randn(3, 2, 8, 8)
    src = NoiseSource(x, seed=[4, 5, 6])
    got = src.add(x, 3, 0.37)
    want = x + src.draw(3) * 0.37
    assert rel_err(got, want) <= 1e-6
    assert rel_err(src.add(torch.zeros_like(x), 3, 1.0), src.draw(3)) <= 1e-6
    assert rel_err(src.add(x, 4, 0.37), want) > 1e-2  # another step, other noise


def test_denoise_equivariant(edm_fa):
    y = _x() * 0.8
    out = denoise(edm_fa, y, 0.8, steps=10)
    assert out.shape == y.shape and torch.isfinite(out).all()
    for k in (2, 7):
        assert rel_err(denoise(edm_fa, D4.act(y, k), 0.8, steps=10), D4.act(out, k)) <= 1e-5


# ---- reproducibility -----------------------------------------------------------------------------

def test_backends_give_same_samples(edm_fa):
    x_T = _x()
    ref = Denoiser(edm_fa.model, "edm", group="d4", backend="reference")
    cpu = Denoiser(edm_fa.model, "edm", group="d4", backend="cpu")
    a = sample(ref, x_T, sampler="euler_ancestral", steps=4, seed=3, progress=False)
    b = sample(cpu, x_T, sampler="euler_ancestral", steps=4, seed=3, progress=False)
    assert rel_err(b, a) <= 1e-5


def test_per_sample_seeds_independent_of_batch(edm_fa):
    x = sample(edm_fa, (3, 2, 8, 8), sampler="euler_ancestral", steps=4, seed=[10, 11, 12],
               progress=False)
    one = sample(edm_fa, (1, 2, 8, 8), sampler="euler_ancestral", steps=4, seed=[12], progress=False)
    assert rel_err(one[0], x[2]) <= 1e-5
    again = sample(edm_fa, (3, 2, 8, 8), sampler="euler_ancestral", steps=4, seed=[10, 11, 12],
                   progress=False)
    assert torch.equal(again, x)


def test_generator_path_reproducible(edm_fa):
    a = sample(edm_fa, (2, 2, 8, 8), sampler="euler_ancestral", steps=3,
               generator=torch.Generator().manual_seed(5), progress=False)
    b = sample(edm_fa, (2, 2, 8, 8), sampler="euler_ancestral", steps=3,
               generator=torch.Generator().manual_seed(5), progress=False)
    c = sample(edm_fa, (2, 2, 8, 8), sampler="euler_ancestral", steps=3,
               generator=torch.Generator().manual_seed(6), progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddim_matches_diffusers_loop():
    diffusers = pytest.importorskip("diffusers")
    net = TinyNet()
    sched = diffusers.DDIMScheduler(clip_sample=False)
    sched.set_timesteps(8)
    x_T = _x()
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(net(x, t.float().expand(2)), t, x).prev_sample
    ours = sample(Denoiser(net, "eps", DDPMSchedule()), x_T, sampler="ddim", steps=8, progress=False)
    assert (ours - x).abs().max() <= 1e-5 * max(1.0, float(x.abs().max()))


def test_callback_and_compiled_step(eps_fa):
    seen = []
    sample(eps_fa, _x(), sampler="dpmpp_2m", steps=3, progress=False,
           callback=lambda d: seen.append((d["i"], d["sigma"], d["denoised"].shape)))
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][2] == (2, 2, 8, 8)
    x = _x()
    with torch.no_grad():
        eager = eps_fa.step(x, 3.0, 0.5, 0.5)
        compiled = torch.compile(lambda z: eps_fa.step(z, 3.0, 0.5, 0.5), fullgraph=True,
                                 backend="aot_eager")
        out = compiled(x)
    assert rel_err(out[0], eager[0]) <= 1e-6 and rel_err(out[1], eager[1]) <= 1e-6


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "euler", "euler_ancestral", "euler_maruyama",
                                     "heun", "dpmpp_2m"])
def test_callback_gets_the_state_each_step_starts_from(eps_fa, sampler):
    """k-diffusion's meaning of the callback's x: the state at σ_i the step starts from (the first
    is the input itself), not the state the step returns."""
    y, seen = _x(), []
    out = denoise(eps_fa, y, 2.0, sampler=sampler, steps=6, callback=seen.append)
    assert torch.equal(seen[0]["x"], y)
    assert all(not torch.equal(a["x"], b["x"]) for a, b in zip(seen, seen[1:]))
    assert not torch.equal(seen[-1]["x"], out)
    assert [d["i"] for d in seen] == list(range(len(seen)))
    assert seen[0]["sigma"] == 2.0 and seen[0]["denoised"].shape == y.shape


# ---- bad input -------------------------------------------------------------------------------------

def test_bad_inputs(eps_fa, edm_fa):
    with pytest.raises(ValueError, match="exceeds the schedule"):
        sample(eps_fa, _x(), sampler="euler", steps=1001, progress=False)
    with pytest.raises(ValueError, match="outside the schedule's range"):
        denoise(edm_fa, _x(), 500.0)
    with pytest.raises(ValueError, match="outside the schedule's range"):
        denoise(edm_fa, _x(), 0.0001)
    with pytest.raises(ValueError, match="seed has 3 entries"):
        sample(edm_fa, (2, 2, 8, 8), sampler="euler_ancestral", steps=2, seed=[1, 2, 3], progress=False)
    with pytest.raises(ValueError, match="seed has 1 entries"):
        sample(edm_fa, _x(), sampler="euler_ancestral", steps=2, seed=[1], progress=False)
    bad = Denoiser(lambda x, t: x[..., :4], "eps", DDPMSchedule())
    with pytest.raises(ValueError, match="model output has shape"):
        sample(bad, _x(), sampler="euler", steps=2, progress=False)
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample(eps_fa, _x(), sampler="plms", steps=2, progress=False)
    with pytest.raises(ValueError, match="prediction must be one of"):
        Denoiser(TinyNet(), "score")
    # VE built with sigma_min above sigma_max (or a zero sigma_min), then failed where it was used
    with pytest.raises(ValueError, match="sigma_min=5 must be below sigma_max=1"):
        VESchedule(sigma_min=5, sigma_max=1)
    with pytest.raises(ValueError, match="sigma_min must be a finite number > 0"):
        VESchedule(sigma_min=0.0)
    with pytest.raises(ValueError, match="spacing must be one of"):
        sample(edm_fa, _x(), sampler="euler", steps=2, spacing="trialing", progress=False)
    with pytest.raises(TypeError, match="karras must be True or False"):
        sample(eps_fa, _x(), sampler="euler", steps=2, karras="no", progress=False)
    for kwargs in ({"beta_end": 1.5}, {"beta_start": -0.1}, {"trained_betas": []}):
        with pytest.raises(ValueError, match="beta"):
            DDPMSchedule(**kwargs)
    with pytest.raises(ValueError, match="rho must be a finite number > 0"):
        EDMSchedule(rho=0)
    with pytest.raises(TypeError, match="model must be callable"):
        Denoiser("not a model", "eps")
    # sigma_data was silently unused by the other predictions, and silently preferred to the
    # schedule's (which the schedule still reported)
    with pytest.raises(ValueError, match="prediction='eps' does not use it"):
        Denoiser(TinyNet(), "eps", sigma_data=0.3)
    with pytest.raises(ValueError, match="sigma_data=0.7 differs from the schedule's sigma_data=0.3"):
        Denoiser(TinyNet(), "edm", EDMSchedule(sigma_data=0.3), sigma_data=0.7)
    assert Denoiser(TinyNet(), "edm", EDMSchedule(sigma_data=0.3)).sigma_data == 0.3
    assert Denoiser(TinyNet(), "edm", VESchedule(), sigma_data=0.3).sigma_data == 0.3
    # grids of NaN (an inf sigma_max), a division by rho = 0, a DDPM table of one step whose
    # model time was -1, a bool step count, a nested trained_betas failing inside torch
    from symfast.schedules import karras_sigmas, ve_sigmas
    for grid in (karras_sigmas, ve_sigmas):
        with pytest.raises(ValueError, match="sigma_max must be a finite number > 0, got inf"):
            grid(5, 0.1, math.inf)
    for rho in (0, -1.0, math.nan):
        with pytest.raises(ValueError, match="rho must be a finite number > 0"):
            karras_sigmas(5, 0.1, 10.0, rho=rho)
    with pytest.raises(ValueError, match="num_train_timesteps must be a positive int, got True"):
        DDPMSchedule(num_train_timesteps=True)
    for trained in ([[0.1, 0.2]], ["a", "b"]):
        with pytest.raises(ValueError, match="trained_betas must be a non-empty sequence of numbers"):
            DDPMSchedule(trained_betas=trained)
    # one timestep (diffusers' DDPM takes it): its model time is 0, not -1
    assert DDPMSchedule(num_train_timesteps=1).model_time(0.5) == 0
    for sigma_data in (0.0, -0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="sigma_data must be a finite number > 0"):
            Denoiser(TinyNet(), "edm", sigma_data=sigma_data)
        with pytest.raises(ValueError, match="sigma_data must be a finite number > 0"):
            EDMSchedule(sigma_data=sigma_data)
    for dtype in (torch.int64, torch.bool, torch.complex64):
        wrong = Denoiser(lambda x, t, dtype=dtype: x.to(dtype), "eps", DDPMSchedule())
        with pytest.raises(TypeError, match="model output must be a floating tensor"):
            sample(wrong, _x(), sampler="euler", steps=2, progress=False)
    with pytest.raises(ValueError, match="transform_noise"):
        sample(Denoiser(TinyNet(), "edm"), _x(), sampler="ddpm", steps=2, transform_noise=1,
               progress=False)
    with pytest.raises(TypeError, match="sigma must be a host float"):
        denoise(edm_fa, _x(), torch.tensor(0.5))
    with pytest.raises(TypeError, match="sigma must be a host float"):
        denoise(edm_fa, _x(), True)
    assert torch.equal(denoise(edm_fa, _x(), np.float32(0.5), steps=3),
                       denoise(edm_fa, _x(), float(np.float32(0.5)), steps=3))
    for name, kwargs in [("eta", {"sampler": "ddim", "eta": 1.5}), ("eta", {"sampler": "ddim", "eta": math.nan}),
                         ("eta", {"sampler": "euler_ancestral", "eta": -1.0}),
                         ("s_churn", {"sampler": "heun", "s_churn": -1.0}),
                         ("s_noise", {"sampler": "heun", "s_churn": 1.0, "s_noise": math.nan}),
                         ("s_noise", {"sampler": "euler_ancestral", "s_noise": "1"}),
                         ("s_tmax", {"sampler": "euler", "s_tmax": math.nan})]:
        with pytest.raises(ValueError, match=f"{name} must be a"):
            sample(eps_fa, _x(), steps=2, progress=False, **kwargs)
    for bad, error, match in [(torch.zeros(()), ValueError, r"x_T must be \(B, ...\)"),
                              (torch.zeros(4), ValueError, r"x_T must be \(B, ...\)"),
                              (torch.full((2, 2, 8, 8), math.nan), ValueError, "x_T holds non-finite"),
                              ((1.9, 2, 8, 8), TypeError, "x_T_or_shape must be"),
                              (4, TypeError, "x_T_or_shape must be")]:
        with pytest.raises(error, match=match):
            sample(eps_fa, bad, sampler="euler", steps=2, progress=False)
    for dtype in (torch.int32, "float64"):
        with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
            sample(eps_fa, (2, 2, 8, 8), sampler="euler", steps=2, progress=False, dtype=dtype)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sample(eps_fa, (2, 2, 8, 8), sampler="euler", steps=2, progress=False, generator=3)
    with pytest.raises(ValueError, match="y holds non-finite"):
        denoise(edm_fa, torch.full((2, 2, 8, 8), math.inf), 0.5)


def test_denoise_is_continuous_in_sigma_near_a_grid_value(edm_fa):
    """σ read back from float32 sits just above the grid value it came from: the grid value is
    left out rather than kept as a step of ~1e-8 (DPM-Solver++(2M)'s extrapolation blew up)."""
    from symfast.samplers.api import denoise_sigmas
    grid = denoise_sigmas(edm_fa, 80.0, "dpmpp_2m", 10)  # 80 is the grid's first value
    on = float(grid[3])
    above = float(np.float32(on)) if float(np.float32(on)) > on else np.nextafter(on, np.inf)
    assert len(denoise_sigmas(edm_fa, above, "dpmpp_2m", 10)) == len(denoise_sigmas(edm_fa, on, "dpmpp_2m", 10))
    y = _x()
    a, b = (denoise(edm_fa, y, s, sampler="dpmpp_2m", steps=10) for s in (on, above))
    assert rel_err(b, a) <= 1e-4


def _reference_denoise_grid(sigma: float, steps: int = 40, sigma_min: float = 0.002,
                            sigma_max: float = 80.0, rho: float = 7.0) -> np.ndarray:
    """SFBD's reference grid (watml/SFBD denoise.py): EDM's ``steps``-point ρ grid in float64
    and 0, cut at the last point >= σ, that point replaced by σ."""
    i = np.arange(steps, dtype=np.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    t = np.append((hi + i / (steps - 1) * (lo - hi)) ** rho, 0.0)
    t = t[np.nonzero(t >= sigma)[0].max():].copy()
    t[0] = sigma
    return t


def test_denoise_grid_is_the_reference_grid_except_for_a_multistep_sampler(edm_fa):
    """Heun and Euler run on the reference's grid point for point, a first step however short
    included (σ = 0.5 lies 6% above the grid point 0.47); only DPM-Solver++(2M) leaves a point
    within half a log-step of σ out (the test above)."""
    from symfast.samplers.api import denoise_sigmas
    full = _reference_denoise_grid(80.0)
    on_grid = [float(full[k]) for k in (5, 17, 30)]
    just_above = [float(np.nextafter(v, np.inf)) for v in on_grid]
    for sigma in [0.5, 0.05, 0.1, 0.2, 1.0, 2.0] + on_grid + just_above:
        for sampler in ("heun", "euler"):
            np.testing.assert_allclose(denoise_sigmas(edm_fa, sigma, sampler, 40),
                                       _reference_denoise_grid(sigma), rtol=1e-12, atol=0,
                                       err_msg=f"{sampler} at sigma={sigma}")
    assert len(denoise_sigmas(edm_fa, 0.5, "dpmpp_2m", 40)) == len(_reference_denoise_grid(0.5)) - 1
    # σ read back from float32 sits ~3e-8 above the grid value it came from: Heun's extra step
    # that short changes nothing (it was DPM-Solver++(2M)'s extrapolation that blew up)
    y, on = _x(), on_grid[1]
    above = on * (1 + 3e-8)
    assert len(denoise_sigmas(edm_fa, above, "heun", 40)) == len(denoise_sigmas(edm_fa, on, "heun", 40)) + 1
    a, b = (denoise(edm_fa, y, s, sampler="heun", steps=40) for s in (on, above))
    assert rel_err(b, a) <= 1e-5


def test_one_step_on_a_ddpm_schedule_with_karras_sigmas():
    """steps=1 with Karras σ on a DDPM schedule: the grid is [σ(t), 0] as diffusers' Euler gives
    (it used to fail with 'need 0 < sigma_min < sigma_max'), and sample/denoise run."""
    from symfast import Denoiser, denoise, sample
    from symfast.nn import UNet
    from symfast.schedules import DDPMSchedule, karras_sigmas
    schedule = DDPMSchedule()
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.EulerDiscreteScheduler(use_karras_sigmas=True)
    reference.set_timesteps(1)
    assert np.allclose(schedule.sigmas(1, karras=True), reference.sigmas.double().numpy(), rtol=1e-6)
    d = Denoiser(UNet(1, 1, (4, 8)), "eps", schedule)
    assert denoise(d, torch.randn(2, 1, 8, 8), 0.5, steps=1).isfinite().all()
    assert sample(d, (2, 1, 8, 8), sampler="heun", steps=1, karras=True, progress=False).isfinite().all()
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        karras_sigmas(2, 0.5, 0.5)  # more than one step needs a range


# ---- found by a user tryout -----------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler", "dpmpp_2m", "heun"])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_zero_terminal_snr_samples_from_the_last_timestep(sampler, spacing):
    """ᾱ_T = 0 made σ_T infinite: every sampler refused the grid (trailing and linspace reach
    t = T - 1), the standard zero-SNR recipe (v prediction, trailing) could not sample at all.
    ᾱ_T = 2^-24 as in diffusers' Euler schedulers."""
    schedule = DDPMSchedule(rescale_zero_terminal_snr=True)
    assert schedule.sigma_max == pytest.approx(math.sqrt(2.0 ** 24 - 1))
    denoiser = Denoiser(lambda x, t: 0.1 * torch.tanh(x), "v", schedule)
    for karras in (False, True):
        out = sample(denoiser, (2, 1, 4, 4), sampler=sampler, steps=4, spacing=spacing,
                     karras=karras, seed=0)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("rescale", [True, False])
def test_the_network_sees_the_same_timestep_at_a_table_sigma_in_training_and_sampling(rescale):
    """With zero terminal SNR the σ table ends 15406, 4096 (not monotone): the log-σ
    interpolation gave σ_T the time 995.3 at sampling and in a loss at a given σ, while training
    drew t = 999 for it and diffusers calls the network with 999."""
    schedule = DDPMSchedule(rescale_zero_terminal_snr=rescale)
    seen = []
    denoiser = Denoiser(lambda x, t: seen.append(t.tolist()) or torch.zeros_like(x), "v", schedule)
    sigma, t = schedule.training_levels(torch.tensor([0.9999, 0.5, 0.0], dtype=torch.float64))
    assert t.tolist() == [999.0, 500.0, 0.0]
    denoiser.loss(torch.zeros(3, 1, 4, 4), sigma)
    assert seen[-1] == t.tolist()
    sample(denoiser, (1, 1, 4, 4), sampler="euler", steps=10, spacing="trailing", progress=False)
    assert seen[-10] == [999.0]  # the first step, at σ_T
    assert [schedule.model_time(float(schedule.sigma_table[k])) for k in (996, 997, 998, 999)] \
        == [996.0, 997.0, 998.0, 999.0]


def test_betas_whose_alpha_product_underflows_are_named():
    with pytest.raises(ValueError, match="beta_start and beta_end make ᾱ underflow to 0 from t="):
        DDPMSchedule(beta_start=0.5, beta_end=0.9)


def test_callback_is_checked_before_any_network_call():
    calls = []
    denoiser = Denoiser(lambda x, t: calls.append(1) or x, "edm")
    for run in (lambda: sample(denoiser, (1, 1, 4, 4), sampler="heun", steps=2, callback=3),
                lambda: denoise(denoiser, torch.zeros(1, 1, 4, 4), 1.0, steps=2, callback="no")):
        with pytest.raises(TypeError, match="callback must be callable"):
            run()
    assert not calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_draws_the_x_T_philox_latents_gives(dtype):
    """PhiloxGenerator.latents is documented as symfast.sample's x_T for the same seeds: sample
    drew float32 reference normals (2.4e-7 away, and float32 for a float64 run)."""
    from symfast.integrations import PhiloxGenerator
    denoiser = Denoiser(lambda x, t: torch.tanh(x), "edm")
    seeds = [1, 2, 3]
    from_shape = sample(denoiser, (3, 1, 8, 8), sampler="heun", steps=2, seed=seeds, dtype=dtype)
    latents = PhiloxGenerator(seeds).latents((3, 1, 8, 8), dtype=dtype)
    assert torch.equal(sample(denoiser, latents, sampler="heun", steps=2, seed=seeds), from_shape)


def test_a_meta_start_state_runs_like_a_meta_shape():
    """sample(D, shape, device="meta") ran; a meta x_T failed reading its values for the
    finiteness check (Tensor.item() on a meta tensor), and so did denoise on a meta y."""
    d = Denoiser(lambda x, t: torch.zeros_like(x), prediction="edm")
    for sampler in ("euler", "heun", "dpmpp_2m"):
        out = sample(d, torch.empty(2, 1, 8, 8, device="meta"), sampler=sampler, steps=3, progress=False)
        assert out.device.type == "meta" and out.shape == (2, 1, 8, 8)
    assert denoise(d, torch.empty(2, 1, 8, 8, device="meta"), 1.0, steps=2,
                   progress=False).device.type == "meta"
