"""symfast.integrations.k_diffusion against k-diffusion's own sampling.py.

k_diffusion/__init__.py imports torchvision (through utils.py), and PyPI's torchvision does not load
beside every torch build, so the package is never imported whole: its sampling.py is loaded from the
installed files under a private package name, with its ``utils`` being the real k_diffusion/utils.py.
Only if torchvision cannot be imported is ``torchvision.transforms.functional`` stubbed for that one
load (utils uses it only for PIL conversions, which sampling never calls).
"""
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import rel_err

for _dependency in ("scipy", "torchsde", "torchdiffeq", "tqdm", "PIL", "safetensors"):
    pytest.importorskip(_dependency)

from symfast.integrations import k_diffusion as ours  # noqa: E402

TOL = 1e-6  # relative, fp32: both sides run the same float32 operations


def _load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _load_k_diffusion_sampling():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    root = Path(next(iter(spec.submodule_search_locations)))
    package = types.ModuleType("_kdiff_ref")
    package.__path__ = [str(root)]
    sys.modules["_kdiff_ref"] = package
    stubs = {}
    try:
        import torchvision.transforms.functional  # noqa: F401
    except Exception:  # missing, or built against another torch ("operator torchvision::nms does not exist")
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            stubs[name] = sys.modules.get(name)
            sys.modules[name] = types.ModuleType(name)
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    try:
        package.utils = _load_module("_kdiff_ref.utils", root / "utils.py")
    finally:
        for name, previous in stubs.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return _load_module("_kdiff_ref.sampling", root / "sampling.py")


@pytest.fixture(scope="module")
def kd():
    return _load_k_diffusion_sampling()


class _Denoiser(torch.nn.Module):
    """A random, non-trivial D(x, σ): a small CNN with EDM-style σ conditioning."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 3, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x, sigma, scale=1.0):
        s = sigma.reshape(-1, 1, 1, 1)
        c_in = 1 / (s ** 2 + 0.25) ** 0.5
        h = torch.tanh(self.conv1(x * c_in) + torch.log(s) / 4)
        return scale * (x * 0.25 / (s ** 2 + 0.25) + self.conv2(h) * s * 0.5 / (s ** 2 + 0.25) ** 0.5)


def _both(kd, name, sigmas, seed=0, **kwargs):
    model = _Denoiser()
    outs, logs = [], []
    for module in (kd, ours):
        torch.manual_seed(seed)
        x = torch.randn(2, 3, 8, 8) * sigmas[0]
        log = []
        out = getattr(module, name)(model, x, sigmas, extra_args={"scale": 0.9}, disable=True,
                                    callback=log.append, **kwargs)
        outs.append(out)
        logs.append(log)
    return outs, logs


SIGMA_GRIDS = {
    "karras": lambda: ours.get_sigmas_karras(7, 0.03, 40.0),
    "karras_rho3": lambda: ours.get_sigmas_karras(5, 0.1, 10.0, rho=3.0),
    "geometric": lambda: torch.cat([torch.logspace(1, -1.5, 6), torch.zeros(1)]),
}


@pytest.mark.parametrize("grid", sorted(SIGMA_GRIDS))
@pytest.mark.parametrize("name, kwargs", [
    ("sample_euler", {}),
    ("sample_euler", {"s_churn": 1.5, "s_tmin": 0.2, "s_tmax": 20.0, "s_noise": 1.007}),
    ("sample_heun", {}),
    ("sample_heun", {"s_churn": 0.8}),
    ("sample_euler_ancestral", {}),
    ("sample_euler_ancestral", {"eta": 0.6, "s_noise": 0.95}),
    ("sample_dpmpp_2m", {}),
])
def test_sampler_matches_k_diffusion(kd, name, kwargs, grid):
    sigmas = SIGMA_GRIDS[grid]()
    (ref, out), (ref_log, log) = _both(kd, name, sigmas, **kwargs)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) <= TOL
    assert len(log) == len(ref_log) == len(sigmas) - 1
    for a, b in zip(ref_log, log):
        assert set(a) == set(b) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert a["i"] == b["i"]
        assert float(a["sigma"]) == float(b["sigma"]) and float(a["sigma_hat"]) == float(b["sigma_hat"])
        assert rel_err(b["denoised"], a["denoised"]) <= TOL and rel_err(b["x"], a["x"]) <= TOL


@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_euler_ancestral", "sample_dpmpp_2m"])
@pytest.mark.parametrize("x_dtype, sigma_dtype", [(torch.bfloat16, torch.float32),
                                                  (torch.float16, torch.float32),
                                                  (torch.float32, torch.float64)])
def test_output_dtype_follows_k_diffusion(kd, name, x_dtype, sigma_dtype):
    """k-diffusion's to_d divides by σ as a tensor of the table's dtype with x's dims, so a bf16
    x with float32 sigmas is integrated (and returned) in float32; Euler/Heun/Euler a kept bf16
    here (100x further from the fp64 result over 20 steps). DPM-Solver++(2M)'s coefficients are
    0-d tensors of the table's dtype, rounded to a bf16/fp16 state's dtype before they multiply it,
    as k-diffusion's are (as Python floats 195 of 256 bf16 values differed)."""
    sigmas = ours.get_sigmas_karras(6, 0.1, 10.0).to(sigma_dtype)
    x = (torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * 10).to(x_dtype)
    outs = []
    for module in (kd, ours):
        torch.manual_seed(1)
        outs.append(getattr(module, name)(lambda z, s: torch.tanh(z) * 0.5, x, sigmas, disable=True))
    assert outs[1].dtype == outs[0].dtype
    assert torch.equal(outs[1], outs[0])


def test_brownian_style_noise_sampler_is_called_like_k_diffusion(kd):
    """A custom noise_sampler gets (sigma, sigma_next) and its noise is used as k-diffusion uses it."""
    sigmas = ours.get_sigmas_karras(5, 0.05, 20.0)
    calls = {"kd": [], "ours": []}

    def sampler_for(key):
        gen = torch.Generator().manual_seed(11)

        def noise_sampler(sigma, sigma_next):
            calls[key].append((float(sigma), float(sigma_next)))
            return torch.randn(2, 3, 8, 8, generator=gen)
        return noise_sampler

    model = _Denoiser()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    ref = kd.sample_euler_ancestral(model, x, sigmas, disable=True, noise_sampler=sampler_for("kd"))
    out = ours.sample_euler_ancestral(model, x, sigmas, disable=True, noise_sampler=sampler_for("ours"))
    assert calls["kd"] == calls["ours"] and len(calls["ours"]) == len(sigmas) - 2
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_euler_ancestral_draws_like_k_diffusion_on_a_repeated_sigma(kd, eta):
    """A repeated σ makes σ_up = 0 on one step (and η = 0 on all): k-diffusion still draws there,
    so skipping that draw handed every later step another step's noise (eager: off by 0.8)."""
    sigmas = torch.tensor([5.0, 5.0, 1.0, 0.3, 0.0])
    model = _Denoiser()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    outs = []
    for module in (kd, ours):
        torch.manual_seed(0)
        outs.append(module.sample_euler_ancestral(model, x, sigmas, disable=True, eta=eta))
        outs.append(torch.randn(3))  # the global RNG is left where k-diffusion leaves it
    assert rel_err(outs[2], outs[0]) <= TOL and torch.equal(outs[3], outs[1])
    # a stateful noise_sampler is called on the same steps, on the eager and on the core path
    calls = {}
    for key, module, extra in (("kd", kd, {}), ("eager", ours, {}), ("core", ours, {"group": "trivial"})):
        gen, calls[key] = torch.Generator().manual_seed(3), []

        def noise_sampler(sigma, sigma_next, calls=calls[key], gen=gen):
            calls.append((float(sigma), float(sigma_next)))
            return torch.randn(x.shape, generator=gen)
        module.sample_euler_ancestral(model, x, sigmas, disable=True, eta=eta, noise_sampler=noise_sampler,
                                      **extra)
    assert calls["eager"] == calls["core"] == calls["kd"] == [(5.0, 5.0), (5.0, 1.0), (1.0, float(sigmas[3]))]


@pytest.mark.parametrize("sigmas", [[5.0, 5.0, 1.0, 0.0], [1.0, 5.0, 0.5, 0.0]])
@pytest.mark.parametrize("extra", [{}, {"group": "d4"}])
def test_dpmpp_2m_refuses_sigmas_not_strictly_decreasing(sigmas, extra):
    """A repeated σ is a step of h = 0 that the next step's 1/(2r) divides by: NaN on the eager
    path (as k-diffusion), a bare ZeroDivisionError on the core's."""
    model, x = _Denoiser(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="sigmas must be strictly decreasing"):
        ours.sample_dpmpp_2m(model, x, torch.tensor(sigmas), disable=True, **extra)


def test_core_dpmpp_2m_refuses_a_repeated_sigma_and_runs_a_rise():
    """symfast.sample's own grids reach the core directly: a repeated σ is refused there too, while
    a rise (a zero-terminal-SNR table's end, σ_T = 4096 < σ_{T-1}, starts a trailing grid of 500
    steps) runs as it ran before, finite."""
    import numpy as np
    from symfast import Denoiser, sample
    from symfast.samplers import loops
    from symfast.samplers._noise import NoiseSource
    from symfast.schedules import DDPMSchedule
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="sigmas must not repeat a value.*5.0 twice"):
        loops.sample_dpmpp_2m(ours._OrbitDenoiser(_Denoiser(), {}, None), x, np.array([5.0, 5.0, 1.0, 0.0]),
                              NoiseSource(x), progress=False)
    zero_snr = Denoiser(lambda x, t: torch.zeros_like(x), "eps",
                        schedule=DDPMSchedule(rescale_zero_terminal_snr=True))
    assert torch.isfinite(sample(zero_snr, (1, 1, 4, 4), "dpmpp_2m", steps=500, spacing="trailing",
                                 progress=False)).all()


@pytest.mark.parametrize("extra", [{}, {"group": "trivial"}, {"seed": 0}])
def test_default_disable_lets_tqdm_decide(capsys, extra):
    """k-diffusion's disable=None leaves the bar to tqdm: none when stderr is not a terminal (as
    under capsys); the core path showed one whenever disable was not True."""
    sigmas = ours.get_sigmas_karras(3, 0.1, 1.0)
    x = torch.randn(1, 3, 4, 4)
    ours.sample_euler(lambda x, s: x * 0.5, x, sigmas, **extra)
    assert capsys.readouterr().err == ""
    ours.sample_euler(lambda x, s: x * 0.5, x, sigmas, disable=False, **extra)
    assert "3/3" in capsys.readouterr().err


@pytest.mark.parametrize("n, sigma_min, sigma_max, rho", [(10, 0.002, 80.0, 7.0), (1, 0.5, 3.0, 7.0),
                                                          (33, 0.0292, 14.61, 5.0)])
def test_get_sigmas_karras_matches_k_diffusion(kd, n, sigma_min, sigma_max, rho):
    ref = kd.get_sigmas_karras(n, sigma_min, sigma_max, rho=rho)
    out = ours.get_sigmas_karras(n, sigma_min, sigma_max, rho=rho)
    assert out.dtype == ref.dtype and out.shape == (n + 1,)
    assert torch.equal(out, ref)


def test_import_does_not_need_k_diffusion(monkeypatch):
    monkeypatch.setitem(sys.modules, "k_diffusion", None)
    module = _load_module("_symfast_kd_without_kd", ours.__file__)
    sigmas = module.get_sigmas_karras(3, 0.1, 1.0)
    x = module.sample_euler(lambda x, s: torch.zeros_like(x), torch.ones(1, 2), sigmas, disable=True)
    # D ≡ 0 makes the ODE dx/dσ = x/σ: x scales with σ, so it reaches 0 at σ = 0
    assert torch.equal(x, torch.zeros(1, 2))


def test_bad_inputs_raise_clear_errors():
    model = _Denoiser()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="sigmas"):
        ours.sample_euler(model, x, torch.tensor([1.0]), disable=True)
    with pytest.raises(ValueError, match="sigmas"):
        ours.sample_heun(model, x, torch.tensor([[1.0, 0.0]]), disable=True)
    with pytest.raises(ValueError, match="eta"):
        ours.sample_euler_ancestral(model, x, torch.tensor([1.0, 0.0]), eta=-1.0, disable=True)
    with pytest.raises(ValueError, match="shape"):
        ours.sample_dpmpp_2m(lambda x, s: x[:, :1], x, torch.tensor([1.0, 0.5, 0.0]), disable=True)
    with pytest.raises(ValueError, match="sigma_min"):
        ours.get_sigmas_karras(5, 2.0, 1.0)
    with pytest.raises(ValueError, match="n must"):
        ours.get_sigmas_karras(0, 0.1, 1.0)
    with pytest.raises(TypeError, match="tensors"):
        ours.sample_euler(model, x, [1.0, 0.0], disable=True)


# ---- group= and seed=: the samplers on symfast's sampler core ------------------------------------

from symfast.groups import get as _get_group  # noqa: E402

D4 = _get_group("d4")
ATOL = 1e-5  # the bound: max abs diff, fp32


def _loop_averaged(model):
    """The plain frame average, a Python loop over the 8 elements: 1/|G| Σ g_k⁻¹ D(g_k x)."""
    def averaged(x, sigma, **extra):
        outs = [D4.act(model(D4.act(x, k), sigma, **extra), D4.inverse(k)) for k in range(len(D4))]
        return sum(outs) / len(D4)
    return averaged


CORE_CASES = [
    ("sample_euler", {}),
    ("sample_heun", {}),
    ("sample_dpmpp_2m", {}),
    ("sample_euler_ancestral", {"eta": 0.6, "s_noise": 0.95}),
]


@pytest.mark.parametrize("name, kwargs", CORE_CASES)
def test_group_equals_the_eager_loop_over_the_group(name, kwargs):
    model, sigmas = _Denoiser(), ours.get_sigmas_karras(6, 0.05, 5.0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    if name == "sample_euler_ancestral":  # the same Philox noise on both sides
        mine = getattr(ours, name)(model, x, sigmas, extra_args={"scale": 0.9}, disable=True, group="d4",
                                   noise_sampler=ours.PhiloxGenerator([1, 2]).noise_sampler(x), **kwargs)
        kwargs = dict(kwargs, noise_sampler=ours.PhiloxGenerator([1, 2]).noise_sampler(x))
    else:
        mine = getattr(ours, name)(model, x, sigmas, extra_args={"scale": 0.9}, disable=True, group="d4", **kwargs)
    theirs = getattr(ours, name)(_loop_averaged(model), x, sigmas, extra_args={"scale": 0.9}, disable=True, **kwargs)
    assert (mine - theirs).abs().max().item() <= ATOL
    # the test can fail: without the average the model is not equivariant
    plain = getattr(ours, name)(model, x, sigmas, extra_args={"scale": 0.9}, disable=True, **kwargs)
    assert (plain - theirs).abs().max().item() > 1e-3


@pytest.mark.parametrize("name, kwargs", CORE_CASES)
def test_core_path_callback_reports_what_k_diffusion_reports(kd, name, kwargs):
    """With group= the loop runs on symfast's core (fused steps); its callback must still get
    k-diffusion's dict: x the state the step starts from (at σ̂), σ and σ̂ as tensors."""
    model, sigmas = _Denoiser(), ours.get_sigmas_karras(5, 0.05, 5.0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * sigmas[0]
    logs = []
    for module, extra in ((kd, {}), (ours, {"group": "trivial"})):
        log = []
        noise = ({"noise_sampler": ours.PhiloxGenerator([3, 4]).noise_sampler(x)}
                 if name == "sample_euler_ancestral" else {})
        getattr(module, name)(model, x, sigmas, disable=True, callback=log.append, **kwargs, **noise,
                              **extra)
        logs.append(log)
    ref_log, log = logs
    assert len(log) == len(ref_log) == len(sigmas) - 1
    assert torch.equal(log[0]["x"], x)
    for a, b in zip(ref_log, log):
        assert a["i"] == b["i"]
        for key in ("sigma", "sigma_hat"):
            assert isinstance(b[key], torch.Tensor) and b[key].dim() == 0
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-6)
        for key in ("x", "denoised"):
            assert (b[key] - a[key]).abs().max().item() <= ATOL * float(a[key].abs().max()), key


@pytest.mark.parametrize("name", ["sample_heun", "sample_dpmpp_2m"])
def test_group_makes_ode_samplers_equivariant(name):
    model, sigmas = _Denoiser(), ours.get_sigmas_karras(5, 0.05, 5.0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    base = getattr(ours, name)(model, x, sigmas, disable=True, group="d4")
    for k in range(1, len(D4)):
        moved = getattr(ours, name)(model, D4.act(x, k), sigmas, disable=True, group="d4")
        assert (moved - D4.act(base, k)).abs().max().item() <= ATOL


@pytest.mark.parametrize("name, kwargs", [("sample_euler_ancestral", {}),
                                          ("sample_euler_ancestral", {"noise": "sampler"}),
                                          ("sample_heun", {"s_churn": 5.0}),
                                          ("sample_euler", {"s_churn": 5.0})])
def test_transform_noise_makes_stochastic_samplers_equivariant(name, kwargs):
    """symfast.sample's transform_noise=k, in the drop-ins: the noise of a run from g_k·x moves
    with it (a user tryout found no way to make euler_ancestral with group= equivariant)."""
    model, sigmas = _Denoiser(), ours.get_sigmas_karras(5, 0.05, 5.0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7)) * sigmas[0]

    def run(x, **extra):
        noise = ({"noise_sampler": ours.PhiloxGenerator([5, 6]).noise_sampler(x)}
                 if kwargs.get("noise") else {"seed": [5, 6]})
        options = {k: v for k, v in kwargs.items() if k != "noise"}
        return getattr(ours, name)(model, x, sigmas, disable=True, group="d4", **noise, **options, **extra)
    base = run(x)
    for k in range(1, len(D4)):
        assert (run(D4.act(x, k), transform_noise=k) - D4.act(base, k)).abs().max().item() <= ATOL
    # the test can fail: the same noise unmoved breaks equivariance
    assert (run(D4.act(x, 1)) - D4.act(base, 1)).abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="transform_noise needs group="):
        getattr(ours, name)(model, x, sigmas, disable=True, transform_noise=1)
    with pytest.raises(ValueError, match=r"transform_noise must be an int in \[0, 8\)"):
        run(x, transform_noise=8)


def _per_sample_denoiser(x, sigma):
    """Elementwise ops and a roll within each sample: the same bits in any batch (a batched conv
    need not be), so these tests see the noise alone."""
    s = sigma.reshape(-1, 1, 1, 1)
    return x / (1 + s ** 2) + torch.tanh(x.roll(1, -1)) * s / (1 + s ** 2)


@pytest.mark.parametrize("name, kwargs", [("sample_euler_ancestral", {}),
                                          ("sample_heun", {"s_churn": 2.0}),
                                          ("sample_euler", {"s_churn": 2.0})])
def test_seed_per_sample_gives_the_same_images_whatever_the_batch(name, kwargs):
    model, sigmas = _per_sample_denoiser, ours.get_sigmas_karras(5, 0.05, 5.0)
    seeds = [21, 22, 23, 24]

    def run(s, **extra):
        x = ours.PhiloxGenerator(s).latents((len(s), 3, 8, 8)) * sigmas[0]
        return getattr(ours, name)(model, x, sigmas, disable=True, seed=s, **kwargs, **extra)

    for extra in ({}, {"group": "d4"}):
        four = run(seeds, **extra)
        assert torch.equal(four, torch.cat([run(seeds[:2], **extra), run(seeds[2:], **extra)]))
        assert torch.equal(four, torch.cat([run([s], **extra) for s in seeds]))
        other = run([21, 22, 23, 99], **extra)  # the noise is used
        assert torch.equal(other[:3], four[:3]) and not torch.equal(other[3], four[3])


def test_philox_noise_sampler_on_the_eager_path_is_batch_invariant():
    model, sigmas = _per_sample_denoiser, ours.get_sigmas_karras(5, 0.05, 5.0)
    seeds = [5, 6, 7, 8]

    def run(s):
        gen = ours.PhiloxGenerator(s)
        x = gen.latents((len(s), 3, 8, 8)) * sigmas[0]
        return ours.sample_euler_ancestral(model, x, sigmas, disable=True, noise_sampler=gen.noise_sampler(x))

    four = run(seeds)
    assert torch.equal(four, torch.cat([run(seeds[:2]), run(seeds[2:])]))
    assert torch.equal(four, torch.cat([run([s]) for s in seeds]))


def test_group_and_seed_bad_inputs():
    model, sigmas = _Denoiser(), ours.get_sigmas_karras(3, 0.05, 5.0)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="unknown group"):
        ours.sample_euler(model, x, sigmas, disable=True, group="d5")
    with pytest.raises(ValueError, match="seed= or noise_sampler="):
        ours.sample_euler_ancestral(model, x, sigmas, disable=True, seed=[1, 2],
                                    noise_sampler=lambda s, n: torch.randn_like(x))
    with pytest.raises(ValueError, match="2 samples|entries"):
        ours.sample_heun(model, x, sigmas, disable=True, seed=[1, 2, 3], s_churn=1.0)
    with pytest.raises(ValueError, match="square|H == W"):
        ours.sample_dpmpp_2m(model, torch.randn(2, 3, 8, 6), sigmas, disable=True, group="d4")
    for name in ("sample_euler", "sample_heun", "sample_euler_ancestral", "sample_dpmpp_2m"):
        for bad in ([1.0, 0.0, 0.5], [0.0, 0.0]):  # the core divides by every σ but the last
            with pytest.raises(ValueError, match="sigmas must be > 0 except the last"):
                getattr(ours, name)(model, x, torch.tensor(bad), disable=True, group="d4")
    with pytest.raises(ValueError, match="sigmas must be non-increasing"):
        ours.sample_euler_ancestral(model, x, torch.tensor([1.0, 5.0, 0.0]), disable=True, seed=[1, 2])
    rising = ours.sample_euler(model, x, torch.tensor([1.0, 5.0, 0.0]), disable=True, group="d4")
    assert torch.isfinite(rising).all()  # an ODE sampler may go up the grid
