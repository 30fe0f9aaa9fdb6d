"""symfast.integrations.diffusers against the real diffusers schedulers and pipelines."""
import inspect
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from symfast.integrations import diffusers as ours  # noqa: E402

ATOL = 1e-5  # the bound: max abs diff, fp32

SPACINGS = ["leading", "trailing", "linspace"]
PREDICTIONS = ["epsilon", "v_prediction", "sample"]


def _pair(name, **config):
    theirs = getattr(diffusers, name).from_config(config)
    return theirs, getattr(ours, name).from_config(theirs.config)


def _max_diff(a, b):
    """max |a - b|; infinite when either side has a NaN/inf, so a non-finite result never passes."""
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return (a.double() - b.double()).abs().max().item()


def _run_both(name, config, steps, step_kwargs=None, with_generator=True, shape=(2, 3, 8, 8), seed=0,
              output_channels=None, timesteps=None, positive_variance=False):
    """Drive both schedulers with the same model outputs and same-seeded generators; return the
    largest abs difference over every prev_sample, pred_original_sample and scaled model input.
    ``output_channels``: the model's channels (twice the sample's for a learned variance);
    ``timesteps``: a function of the schedule giving the timesteps to step through (default: all);
    ``positive_variance``: make the model's variance channels positive (variance_type='learned')."""
    theirs, mine = _pair(name, **config)
    theirs.set_timesteps(steps)
    mine.set_timesteps(steps)
    assert torch.equal(theirs.timesteps, mine.timesteps)
    if hasattr(theirs, "sigmas"):
        assert torch.equal(theirs.sigmas, mine.sigmas)
    assert float(theirs.init_noise_sigma) == float(mine.init_noise_sigma)
    data = torch.Generator().manual_seed(seed)
    x_theirs = torch.randn(shape, generator=data) * float(theirs.init_noise_sigma)
    x_mine = x_theirs.clone()
    gen_theirs, gen_mine = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    worst = 0.0
    for t in (theirs.timesteps if timesteps is None else timesteps(theirs.timesteps)):
        worst = max(worst, _max_diff(theirs.scale_model_input(x_theirs, t), mine.scale_model_input(x_mine, t)))
        model_output = torch.randn((shape[0], output_channels or shape[1], *shape[2:]), generator=data)
        if positive_variance:
            model_output[:, shape[1]:] = model_output[:, shape[1]:].abs() * 0.01
        kw_theirs, kw_mine = dict(step_kwargs or {}), dict(step_kwargs or {})
        if with_generator and "generator" in inspect.signature(theirs.step).parameters:
            kw_theirs["generator"], kw_mine["generator"] = gen_theirs, gen_mine
        out_theirs = theirs.step(model_output, t, x_theirs, **kw_theirs)
        out_mine = mine.step(model_output, t, x_mine, **kw_mine)
        worst = max(worst, _max_diff(out_theirs.prev_sample, out_mine.prev_sample))
        if getattr(out_theirs, "pred_original_sample", None) is not None:
            worst = max(worst, _max_diff(out_theirs.pred_original_sample, out_mine.pred_original_sample))
        x_theirs, x_mine = out_theirs.prev_sample, out_mine.prev_sample
    assert torch.isfinite(x_mine).all()
    return worst


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("clip", [True, False])
def test_ddpm_matches_diffusers(prediction, spacing, clip):
    config = dict(prediction_type=prediction, timestep_spacing=spacing, clip_sample=clip)
    assert _run_both("DDPMScheduler", config, 8) <= ATOL


@pytest.mark.parametrize("variance_type", ["fixed_small_log", "fixed_large"])
def test_ddpm_variance_types_match_diffusers(variance_type):
    assert _run_both("DDPMScheduler", dict(variance_type=variance_type), 6) <= ATOL


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers(prediction, spacing, clip, eta):
    config = dict(prediction_type=prediction, timestep_spacing=spacing, clip_sample=clip,
                  set_alpha_to_one=(eta == 0.0))
    assert _run_both("DDIMScheduler", config, 7, step_kwargs=dict(eta=eta)) <= ATOL


def test_ddim_clipped_model_output_matches_diffusers():
    config = dict(clip_sample=True, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                  prediction_type="v_prediction")
    assert _run_both("DDIMScheduler", config, 6, step_kwargs=dict(eta=0.5, use_clipped_model_output=True)) <= ATOL


KARRAS_SCHEDULERS = [  # (name, steps, extra config, whether step takes a generator)
    ("EulerDiscreteScheduler", 8, dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), True),
    ("HeunDiscreteScheduler", 5, dict(clip_sample=True), False),
    ("HeunDiscreteScheduler", 5, dict(clip_sample=False), False),
    ("DPMSolverMultistepScheduler", 8, {}, True),
]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("name, steps, extra, with_generator", KARRAS_SCHEDULERS)
def test_euler_heun_dpmpp_2m_match_diffusers(name, steps, extra, with_generator, prediction, spacing, karras):
    config = dict(prediction_type=prediction, timestep_spacing=spacing, use_karras_sigmas=karras, **extra)
    assert _run_both(name, config, steps, with_generator=with_generator) <= ATOL


@pytest.mark.parametrize("config", [
    dict(interpolation_type="log_linear"),
    dict(use_exponential_sigmas=True),
    dict(final_sigmas_type="sigma_min", use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0),
    dict(prediction_type="v_prediction", timestep_type="continuous", beta_schedule="squaredcos_cap_v2"),
])
def test_euler_config_variants_match_diffusers(config):
    assert _run_both("EulerDiscreteScheduler", config, 6) <= ATOL


def test_euler_churn_matches_diffusers():
    kwargs = dict(s_churn=2.0, s_tmin=0.5, s_tmax=20.0, s_noise=1.003)
    assert _run_both("EulerDiscreteScheduler", dict(use_karras_sigmas=True), 8, step_kwargs=kwargs) <= ATOL


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_euler_ancestral_matches_diffusers(prediction, spacing):
    config = dict(prediction_type=prediction, timestep_spacing=spacing)
    assert _run_both("EulerAncestralDiscreteScheduler", config, 8) <= ATOL


def test_euler_ancestral_sample_prediction_equals_epsilon_form():
    """diffusers raises for x0-prediction here; ours must agree with the same step written as ε."""
    x0_sched = ours.EulerAncestralDiscreteScheduler(prediction_type="sample")
    eps_sched = ours.EulerAncestralDiscreteScheduler(prediction_type="epsilon")
    for s in (x0_sched, eps_sched):
        s.set_timesteps(5)
    data = torch.Generator().manual_seed(3)
    x_a = torch.randn(2, 3, 8, 8, generator=data) * x0_sched.init_noise_sigma
    x_b = x_a.clone()
    g_a, g_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for i, t in enumerate(x0_sched.timesteps):
        x0 = torch.randn(x_a.shape, generator=data)
        sigma = x0_sched.sigmas[i]
        x_a = x0_sched.step(x0, t, x_a, generator=g_a).prev_sample
        x_b = eps_sched.step((x_b - x0) / sigma, t, x_b, generator=g_b).prev_sample
        assert (x_a - x_b).abs().max() <= 1e-4 * (1 + x_b.abs().max())
    assert (x_a - x_b).abs().max() <= ATOL


@pytest.mark.parametrize("config", [
    dict(algorithm_type="sde-dpmsolver++", solver_type="heun", use_karras_sigmas=True),
    dict(algorithm_type="sde-dpmsolver++", lower_order_final=False),
    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", prediction_type="v_prediction"),
    dict(algorithm_type="sde-dpmsolver", solver_type="heun", final_sigmas_type="sigma_min"),
    dict(solver_order=1, beta_schedule="squaredcos_cap_v2"),
    dict(lambda_min_clipped=-5.1, timestep_spacing="trailing"),
])
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_dpm_solver_variants_match_diffusers(config):
    assert _run_both("DPMSolverMultistepScheduler", config, 16) <= ATOL


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                                  "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                                  "DPMSolverMultistepScheduler"])
def test_add_noise_and_return_tuple_match_diffusers(name):
    theirs, mine = _pair(name)
    theirs.set_timesteps(6)
    mine.set_timesteps(6)
    gen = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(3, 3, 8, 8, generator=gen), torch.randn(3, 3, 8, 8, generator=gen)
    t = theirs.timesteps[[0, 2, 3]]
    assert _max_diff(theirs.add_noise(x0, noise, t), mine.add_noise(x0, noise, t)) <= ATOL
    # return_dict=False gives diffusers' tuple (prev_sample, pred_original_sample), or (prev_sample,)
    sample = mine.scale_model_input(x0, mine.timesteps[0])
    theirs.scale_model_input(x0, theirs.timesteps[0])
    takes_generator = "generator" in inspect.signature(theirs.step).parameters
    assert takes_generator == ("generator" in inspect.signature(mine.step).parameters)
    kw_theirs = {"generator": torch.Generator().manual_seed(6)} if takes_generator else {}
    kw_mine = {"generator": torch.Generator().manual_seed(6)} if takes_generator else {}
    out_theirs = theirs.step(noise, theirs.timesteps[0], sample, return_dict=False, **kw_theirs)
    out_mine = mine.step(noise, mine.timesteps[0], sample, return_dict=False, **kw_mine)
    assert isinstance(out_mine, tuple) and len(out_mine) == len(out_theirs)
    for a, b in zip(out_theirs, out_mine):
        assert _max_diff(a, b) <= ATOL
    assert mine.order == theirs.order and len(mine) == len(theirs)


def test_from_config_accepts_frozen_dict_dict_and_other_schedulers_configs():
    pipe_config = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").config
    euler = ours.EulerDiscreteScheduler.from_config(pipe_config, use_karras_sigmas=True)
    assert euler.config.beta_schedule == "squaredcos_cap_v2" and euler.config.prediction_type == "v_prediction"
    assert euler.config.use_karras_sigmas is True
    reference = diffusers.EulerDiscreteScheduler.from_config(pipe_config, use_karras_sigmas=True).config
    assert {k: v for k, v in reference.items() if not k.startswith("_")} == \
        {k: v for k, v in euler.config.items() if not k.startswith("_")}
    plain = ours.DDIMScheduler.from_config(dict(pipe_config))
    assert plain.config["beta_schedule"] == "squaredcos_cap_v2"
    again, unused = ours.DDIMScheduler.from_config(plain.config, return_unused_kwargs=True, not_a_key=1)
    assert unused == {"not_a_key": 1} and dict(again.config) == dict(plain.config)
    # and diffusers reads ours
    back = diffusers.DDIMScheduler.from_config(plain.config)
    assert back.config.beta_schedule == "squaredcos_cap_v2"
    with pytest.raises(TypeError, match="config"):
        ours.DDIMScheduler.from_config(3)
    # the config is diffusers' own FrozenDict, read-only the way diffusers' is
    assert type(plain.config) is type(back.config)
    with pytest.raises(Exception, match="FrozenDict"):
        plain.config.pop("beta_schedule")


SWAP_SOURCES = [  # configs people swap from, each with keys only some classes take
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True, "final_sigmas_type": "zero"}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "sigma_min": 0.5, "sigma_max": 5.0}),
    ("EulerDiscreteScheduler", {"interpolation_type": "log_linear", "timestep_spacing": "leading",
                                "steps_offset": 1}),
    ("DDIMScheduler", {"clip_sample": True, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}),
    ("DDPMScheduler", {"thresholding": True, "variance_type": "fixed_large"}),
]


@pytest.mark.parametrize("target", ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                                    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                                    "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("source, config", SWAP_SOURCES)
def test_from_another_scheduler_s_config_reads_only_its_own_keys(source, config, target):
    """from_config(other.config) keeps the other class's keys in .config; diffusers' classes read
    only their own parameters. Euler a read DPM-Solver's use_karras_sigmas (σ 36.9 for 17.3)
    and Euler's interpolation_type (one σ too many: a run ending at 0.112, not 0.01)."""
    src = getattr(diffusers, source)(**config).config
    try:
        theirs = getattr(diffusers, target).from_config(src)
        theirs.set_timesteps(5)
    except Exception as exc:  # a combination diffusers refuses: ours must refuse it too
        with pytest.raises(type(exc)):
            getattr(ours, target).from_config(src).set_timesteps(5)
        return
    mine = getattr(ours, target).from_config(src)
    mine.set_timesteps(5)
    assert torch.equal(mine.timesteps, theirs.timesteps)
    if hasattr(theirs, "sigmas"):
        assert torch.equal(mine.sigmas, theirs.sigmas)


def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.mark.parametrize("pipeline, scheduler, kwargs", [
    ("DDPMPipeline", "DDPMScheduler", {}),
    ("DDIMPipeline", "DDIMScheduler", {"eta": 0.5}),
])
def test_pipeline_with_our_scheduler_gives_the_same_images(pipeline, scheduler, kwargs):
    unet = _tiny_unet()
    config = dict(num_train_timesteps=100, prediction_type="epsilon", clip_sample=True)
    pipe = getattr(diffusers, pipeline)(unet=unet, scheduler=getattr(diffusers, scheduler).from_config(config))
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4,
                     output_type="pt", **kwargs).images
    pipe.scheduler = getattr(ours, scheduler).from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, getattr(ours, scheduler))
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4,
                  output_type="pt", **kwargs).images
    assert images.shape == reference.shape == (2, 3, 8, 8)
    assert _max_diff(images, reference) <= ATOL
    assert reference.std() > 0


def test_manual_euler_loop_with_unet_matches_diffusers():
    """The loop a diffusers user writes for a σ-space scheduler: init_noise_sigma, scale_model_input, step."""
    unet = _tiny_unet()
    results = []
    for module in (diffusers, ours):
        sched = module.EulerDiscreteScheduler(num_train_timesteps=100, use_karras_sigmas=True)
        sched.set_timesteps(5)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, 3, 8, 8, generator=gen) * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps:
                eps = unet(sched.scale_model_input(x, t), t).sample
                x = sched.step(eps, t, x, generator=gen).prev_sample
        results.append(x)
    assert _max_diff(results[0], results[1]) <= ATOL


def test_symfast_imports_without_diffusers_and_the_drop_ins_name_it_when_missing():
    """import symfast / symfast.integrations never import diffusers; the drop-ins (built on diffusers'
    base classes) raise an ImportError that names the package when it is missing."""
    code = ("import sys; import symfast, symfast.integrations; assert 'diffusers' not in sys.modules; "
            "sys.modules['diffusers'] = None\n"
            "try:\n    import symfast.integrations.diffusers\nexcept ImportError as e:\n"
            "    assert \"'diffusers' package\" in str(e), e\nelse:\n    raise SystemExit('imported')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_bad_inputs_raise_clear_errors():
    sched = ours.DDIMScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(torch.zeros(1, 3, 4, 4), 999, torch.zeros(1, 3, 4, 4))
    sched.set_timesteps(3)
    with pytest.raises(ValueError, match="shape"):
        sched.step(torch.zeros(1, 3, 4, 4), sched.timesteps[0], torch.zeros(1, 3, 4, 5))
    with pytest.raises(ValueError, match="eta"):
        sched.step(torch.zeros(1, 3, 4, 4), sched.timesteps[0], torch.zeros(1, 3, 4, 4), eta=-1.0)
    with pytest.raises(ValueError, match="steps"):
        sched.set_timesteps(1001)
    with pytest.raises(ValueError, match="prediction_type"):
        ours.DDPMScheduler(prediction_type="noise")
    with pytest.raises(ValueError, match="timestep_spacing"):
        ours.EulerDiscreteScheduler(timestep_spacing="sideways")
    with pytest.raises(ValueError, match="solver_order"):
        ours.DPMSolverMultistepScheduler(solver_order=4)
    with pytest.raises(ValueError, match="solver_order=3"):
        ours.DPMSolverMultistepScheduler(solver_order=3, algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min")
    for option in ("use_flow_sigmas", "use_dynamic_shifting"):
        with pytest.raises(ValueError, match=option):
            ours.DPMSolverMultistepScheduler(**{option: True})
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        ours.EulerDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(TypeError, match="timestep"):
        sched.step(torch.zeros(1, 3, 4, 4), 10.5, torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="timestep"):
        sched.step(torch.zeros(1, 3, 4, 4), 1000, torch.zeros(1, 3, 4, 4))
    euler = ours.EulerDiscreteScheduler()
    euler.set_timesteps(2)
    x = torch.zeros(1, 3, 4, 4)
    for t in euler.timesteps:
        x = euler.step(x, t, x).prev_sample
    with pytest.raises(ValueError, match="set_timesteps again"):
        euler.step(x, euler.timesteps[-1], x)
    with pytest.raises(ValueError, match="not an integer index"):
        euler.step(x, 3, x)


# ---- diffusers' API, whole (issue 13) ------------------------------------------------------------

SIX = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
       "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"]


@pytest.mark.parametrize("name", SIX)
def test_they_are_diffusers_schedulers_with_diffusers_types(name):
    from diffusers.configuration_utils import ConfigMixin, FrozenDict
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    cls, ref = getattr(ours, name), getattr(diffusers, name)
    assert issubclass(cls, SchedulerMixin) and issubclass(cls, ConfigMixin) and cls is not ref
    assert cls.__module__ == "symfast.integrations.diffusers"
    assert list(inspect.signature(cls.__init__).parameters) == list(inspect.signature(ref.__init__).parameters)
    assert sorted(cls._compatibles) == sorted(ref._compatibles) and cls.order == ref.order
    # compatibles: symfast's class where symfast has one of that name, diffusers' for the rest
    compat = {c.__name__: c for c in cls().compatibles}
    assert set(compat) == {c.__name__ for c in ref().compatibles}
    assert all(compat[n] is getattr(ours, n) for n in SIX)
    mine, theirs = cls(), ref()
    assert isinstance(mine.config, FrozenDict)
    assert type(mine.init_noise_sigma) is type(theirs.init_noise_sigma)
    mine.set_timesteps(5)
    theirs.set_timesteps(5)
    assert type(mine.init_noise_sigma) is type(theirs.init_noise_sigma)
    assert float(mine.init_noise_sigma) == float(theirs.init_noise_sigma)
    assert mine.timesteps.dtype == theirs.timesteps.dtype
    sample = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out_mine = mine.step(sample, mine.timesteps[0], sample)
    out_theirs = theirs.step(sample, theirs.timesteps[0], sample)
    assert type(out_mine) is type(out_theirs)  # diffusers' own output class
    assert list(out_mine.keys()) == list(out_theirs.keys()) and out_mine["prev_sample"] is out_mine.prev_sample
    if name in ("DDPMScheduler", "DDIMScheduler"):
        assert hasattr(mine, "_get_variance")
    # pickles by the public path (what __module__ names)
    again = pickle.loads(pickle.dumps(mine))
    assert type(again) is cls and torch.equal(again.timesteps, mine.timesteps)


def test_ddpm_previous_timestep_and_get_variance_have_diffusers_values_and_types():
    mine, theirs = ours.DDPMScheduler(), diffusers.DDPMScheduler()
    assert mine.previous_timestep(7) == theirs.previous_timestep(7) == 6  # no schedule yet: t - 1
    for variance_type in ("fixed_small", "fixed_small_log", "fixed_large"):
        for t in (0, 1, 487, 999):
            a = mine._get_variance(t, variance_type=variance_type)
            b = theirs._get_variance(t, variance_type=variance_type)
            assert isinstance(a, torch.Tensor) and torch.equal(a, b)
    mine.set_timesteps(timesteps=[100, 87, 50, 1, 0])
    theirs.set_timesteps(timesteps=[100, 87, 50, 1, 0])
    for t in theirs.timesteps:
        a, b = mine.previous_timestep(t), theirs.previous_timestep(t)
        assert isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.item() == b.item()
    pv = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    a = mine._get_variance(87, pv, "learned_range")
    b = theirs._get_variance(87, pv, "learned_range")
    assert torch.equal(a, b)
    ddim_mine, ddim_theirs = ours.DDIMScheduler(), diffusers.DDIMScheduler()
    assert torch.equal(ddim_mine._get_variance(500, 480), ddim_theirs._get_variance(500, 480))
    assert torch.equal(ddim_mine._get_variance(10, -10), ddim_theirs._get_variance(10, -10))


@pytest.mark.parametrize("name", SIX)
def test_save_pretrained_from_pretrained_save_config_register_to_config(name, tmp_path):
    cls = getattr(ours, name)
    sched = cls(num_train_timesteps=200, beta_schedule="scaled_linear", prediction_type="v_prediction")
    sched.register_to_config(steps_offset=1)
    assert sched.config.steps_offset == 1
    sched.save_pretrained(tmp_path / "scheduler")
    loaded = cls.from_pretrained(tmp_path, subfolder="scheduler")
    assert type(loaded) is cls
    assert {k: v for k, v in loaded.config.items() if k != "_use_default_values"} == \
        {k: v for k, v in sched.config.items() if k != "_use_default_values"}
    sched.save_config(tmp_path / "config_only")
    config = cls.load_config(tmp_path / "config_only")
    again = cls.from_config(config)
    assert again.config.num_train_timesteps == 200 and again.config.prediction_type == "v_prediction"
    # diffusers' class reads symfast's files and the other way round
    theirs = getattr(diffusers, name).from_pretrained(tmp_path, subfolder="scheduler")
    for s in (loaded, theirs):
        s.set_timesteps(4)
    assert torch.equal(loaded.timesteps, theirs.timesteps)
    # from_config of a scheduler object, as diffusers' does
    assert type(cls.from_config(theirs)) is cls and cls.from_config(theirs).config.num_train_timesteps == 200


def test_use_default_values_lists_keys_not_passed():
    """SDXL's Euler config through symfast DDIM and back to symfast Euler keeps 'leading' spacing
    (diffusers' [751, 501, 251, 1]), as the same chain through diffusers' own classes does."""
    sdxl = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, interpolation_type="linear",
                num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
                trained_betas=None, use_karras_sigmas=False)
    euler = ours.EulerDiscreteScheduler.from_config(sdxl)
    # keys equal to the default but passed are not "default values"
    assert "num_train_timesteps" not in euler.config._use_default_values
    assert "timestep_type" in euler.config._use_default_values
    chain_mine = ours.EulerDiscreteScheduler.from_config(ours.DDIMScheduler.from_config(euler.config).config)
    chain_theirs = diffusers.EulerDiscreteScheduler.from_config(
        diffusers.DDIMScheduler.from_config(diffusers.EulerDiscreteScheduler.from_config(sdxl).config).config)
    for s in (chain_mine, chain_theirs):
        s.set_timesteps(4)
    assert chain_mine.timesteps.tolist() == chain_theirs.timesteps.tolist() == [751.0, 501.0, 251.0, 1.0]
    assert chain_mine.config.timestep_spacing == "leading"
    # a key left at DDIM's default ('leading' for timestep_spacing) becomes Euler's default ('linspace')
    plain = ours.EulerDiscreteScheduler.from_config(ours.DDIMScheduler().config)
    assert plain.config.timestep_spacing == diffusers.EulerDiscreteScheduler.from_config(
        diffusers.DDIMScheduler().config).config.timestep_spacing == "linspace"


@pytest.mark.parametrize("pattern", ["skip", "repeat", "arbitrary"])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_uses_the_timestep_it_is_given(pattern, eta):
    """Tensor timesteps skipped, repeated or off the schedule: each step uses its timestep, as diffusers'."""
    pick = {"skip": lambda ts: ts[::2],
            "repeat": lambda ts: torch.cat([ts[:3], ts[2:3], ts[3:]]),
            "arbitrary": lambda ts: torch.tensor([977, 640, 641, 333, 12, 5, 0])}[pattern]
    config = dict(prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False)
    assert _run_both("DDIMScheduler", config, 10, step_kwargs=dict(eta=eta), timesteps=pick) <= ATOL


@pytest.mark.parametrize("name", ["DDPMScheduler"])
def test_ddpm_uses_the_timestep_it_is_given(name):
    # DDPM's previous timestep is the schedule's next entry: skipping through the schedule
    assert _run_both(name, dict(clip_sample=False), 10, timesteps=lambda ts: ts[::3]) <= ATOL


@pytest.mark.parametrize("name, steps", [("EulerDiscreteScheduler", 8), ("EulerAncestralDiscreteScheduler", 8),
                                         ("HeunDiscreteScheduler", 4), ("DPMSolverMultistepScheduler", 8)])
def test_sigma_schedulers_follow_diffusers_step_counter(name, steps):
    """diffusers' σ schedulers find the first timestep and then count steps, whatever timesteps later
    calls pass; skipping timesteps therefore gives diffusers' (counter) result here too."""
    assert _run_both(name, {}, steps, timesteps=lambda ts: ts[1::2]) <= ATOL


def test_step_reads_timestep_views_from_the_host_table_and_a_written_table_afresh():
    sched = ours.DDIMScheduler()
    sched.set_timesteps(5)
    assert [sched._host_value(t) for t in sched.timesteps] == sched.timesteps.tolist()
    assert sched._host_value(sched.timesteps[2]) == 400
    sched.timesteps[2] = 401  # written in place: the host copy is stale, so the value is read
    assert sched._host_value(sched.timesteps[2]) == 401
    assert sched._host_value(torch.tensor(17)) == 17 and sched._host_value(np.int64(3)) == 3


IF_STAGE_I_DDPM = dict(beta_schedule="squaredcos_cap_v2", clip_sample=True, clip_sample_range=1.5,
                       dynamic_thresholding_ratio=0.95, sample_max_value=1.5, thresholding=True,
                       timestep_spacing="leading", variance_type="learned_range")


@pytest.mark.parametrize("name, config, output_channels, step_kwargs", [
    ("DDPMScheduler", IF_STAGE_I_DDPM, 6, {}),  # DeepFloyd IF: dynamic thresholding + learned_range
    ("DDPMScheduler", dict(variance_type="learned"), 6, {}),
    ("DDPMScheduler", dict(beta_schedule="sigmoid", rescale_betas_zero_snr=True), None, {}),
    ("DDPMScheduler", dict(beta_schedule="laplace", variance_type="fixed_small_log"), None, {}),
    ("DDIMScheduler", dict(thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9), None,
     dict(eta=0.3)),
    ("EulerDiscreteScheduler", dict(use_beta_sigmas=True), None, {}),
    ("EulerDiscreteScheduler", dict(use_exponential_sigmas=True, timestep_spacing="trailing"), None, {}),
    ("HeunDiscreteScheduler", dict(beta_schedule="exp"), None, {}),
    ("HeunDiscreteScheduler", dict(use_beta_sigmas=True), None, {}),
    ("HeunDiscreteScheduler", dict(use_exponential_sigmas=True), None, {}),
    ("DPMSolverMultistepScheduler", dict(use_lu_lambdas=True), None, {}),
    ("DPMSolverMultistepScheduler", dict(use_beta_sigmas=True), None, {}),
    ("DPMSolverMultistepScheduler", dict(use_exponential_sigmas=True), None, {}),
    ("DPMSolverMultistepScheduler", dict(thresholding=True, sample_max_value=1.2, prediction_type="sample"), None, {}),
    ("DPMSolverMultistepScheduler", dict(thresholding=True, algorithm_type="dpmsolver",
                                         final_sigmas_type="sigma_min"), None, {}),
    ("DPMSolverMultistepScheduler", dict(variance_type="learned_range"), 6, {}),
    ("DPMSolverMultistepScheduler", dict(solver_order=3), None, {}),
    ("DPMSolverMultistepScheduler", dict(solver_order=3, lower_order_final=False, solver_type="heun"), None, {}),
    ("DPMSolverMultistepScheduler", dict(solver_order=3, algorithm_type="dpmsolver",
                                         final_sigmas_type="sigma_min"), None, {}),
    ("DPMSolverMultistepScheduler", dict(solver_order=3, algorithm_type="sde-dpmsolver++",
                                         use_karras_sigmas=True), None, {}),
])
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_options_diffusers_configs_use_match_diffusers(name, config, output_channels, step_kwargs):
    steps = 18 if name == "DPMSolverMultistepScheduler" else 7
    worst = _run_both(name, config, steps, step_kwargs=step_kwargs, output_channels=output_channels,
                      positive_variance=config.get("variance_type") == "learned")
    assert worst <= ATOL


def test_thresholding_changes_the_result():
    """The thresholding test above is not vacuous: with it off the IF config gives other samples."""
    off = dict(IF_STAGE_I_DDPM, thresholding=False)
    theirs_on, _ = _pair("DDPMScheduler", **IF_STAGE_I_DDPM)
    theirs_off, _ = _pair("DDPMScheduler", **off)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    out = torch.randn(1, 6, 8, 8, generator=torch.Generator().manual_seed(1)) * 3
    a = theirs_on.step(out, 500, x, generator=torch.Generator().manual_seed(2)).prev_sample
    b = theirs_off.step(out, 500, x, generator=torch.Generator().manual_seed(2)).prev_sample
    assert (a - b).abs().max() > 1e-3


def test_learned_variance_needs_the_variance_channels():
    sched = ours.DDPMScheduler(variance_type="learned_range")
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="learned_range"):
        sched.step(x, 10, x)
    # diffusers' DDPM step gives NaN for every sample with this one (√log β): refused instead
    with pytest.raises(ValueError, match="fixed_large_log"):
        ours.DDPMScheduler(variance_type="fixed_large_log")


@pytest.mark.parametrize("pipeline, scheduler", [("DDPMPipeline", "DDPMScheduler"), ("DDIMPipeline", "DDIMScheduler")])
def test_pipeline_save_pretrained_round_trips_with_our_scheduler(pipeline, scheduler, tmp_path):
    """pipe.save_pretrained records ["symfast.integrations.diffusers", "<class>"] in model_index.json and
    DiffusionPipeline.from_pretrained imports our class from there; no download."""
    import json
    unet = _tiny_unet()
    sched = getattr(ours, scheduler)(num_train_timesteps=100, clip_sample=True)
    pipe = getattr(diffusers, pipeline)(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    if pipeline == "DDIMPipeline":
        # diffusers' DDIMPipeline.__init__ converts any scheduler to diffusers' own DDIMScheduler
        # (DDIMScheduler.from_config(scheduler.config)); assigning after construction keeps ours
        assert type(pipe.scheduler) is diffusers.DDIMScheduler
        pipe.scheduler = sched
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["symfast.integrations.diffusers", scheduler]
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    kwargs = dict(batch_size=2, num_inference_steps=4, output_type="pt")
    expected_type = diffusers.DDIMScheduler if pipeline == "DDIMPipeline" else getattr(ours, scheduler)
    assert type(loaded) is type(pipe) and type(loaded.scheduler) is expected_type
    loaded.set_progress_bar_config(disable=True)
    a = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    b = loaded(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert _max_diff(a, b) <= ATOL and a.std() > 0


@pytest.mark.parametrize("name", SIX)
def test_every_public_attribute_of_diffusers_scheduler_exists_with_its_parameters(name):
    mine, theirs = getattr(ours, name)(), getattr(diffusers, name)()
    for attr in dir(theirs):
        if attr.startswith("__") or attr in ("_abc_impl",):
            continue
        assert hasattr(mine, attr), attr
        ref = getattr(type(theirs), attr, None)
        if callable(ref) and not attr.startswith("_"):
            expected = list(inspect.signature(ref).parameters)
            assert list(inspect.signature(getattr(type(mine), attr)).parameters) == expected, attr


def test_euler_get_velocity_matches_diffusers():
    theirs, mine = _pair("EulerDiscreteScheduler")
    for s in (theirs, mine):
        s.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 3, 4, 4, generator=gen), torch.randn(3, 3, 4, 4, generator=gen)
    t = theirs.timesteps[[0, 4, 9]]
    assert torch.equal(mine.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t))
    with pytest.raises(ValueError, match="integer index"):
        mine.get_velocity(x0, noise, torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("name", SIX)
def test_step_never_reads_a_device_tensor(name):
    """A whole loop with timesteps, samples and model outputs on the meta device, whose tensors have no
    values (reading one raises): scale_model_input and step only use host copies and Python floats."""
    sched = getattr(ours, name)()
    sched.set_timesteps(6, device="meta")
    x = torch.zeros(1, 3, 4, 4, device="meta")
    kwargs = {"eta": 0.5} if name == "DDIMScheduler" else {}
    for t in sched.timesteps:
        x = sched.scale_model_input(x, t)
        x = sched.step(torch.zeros_like(x), t, x, **kwargs).prev_sample
    assert x.device.type == "meta" and x.shape == (1, 3, 4, 4)
    # the check bites: a timestep table written in place is stale on the host, so its value must be read
    sched.set_timesteps(6, device="meta")
    sched.timesteps.add_(0)
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        sched.step(torch.zeros_like(x), sched.timesteps[0], x, **kwargs)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("replace", ["slice", "fresh", "in_place"])
def test_a_replaced_timesteps_table_is_the_one_step_reads(name, replace):
    """img2img code starts mid-schedule with ``scheduler.timesteps = scheduler.timesteps[k:]``: the
    host copy of the table was not refreshed, and each step ran from the timestep 4 places earlier
    (a final sample of 31.4 against diffusers' 3.29), silently."""
    finals = []
    for module in (diffusers, ours):
        s = getattr(module, name)(clip_sample=False)
        s.set_timesteps(10)
        if replace == "slice":
            s.timesteps = s.timesteps[4:]
        elif replace == "fresh":
            s.timesteps = torch.tensor([900, 500, 100])
        else:
            s.timesteps[1:-1] -= 50  # [900, 750, 650, ..., 50, 0]: written into the same table
        x = torch.ones(1, 1, 2, 2)
        g = torch.Generator().manual_seed(0)
        for t in s.timesteps:
            x = s.step(0.1 * x, t, x, generator=g).prev_sample
        finals.append(x)
    assert _max_diff(finals[1], finals[0]) <= ATOL * max(1.0, float(finals[0].abs().max()))


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                                  "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                                  "DPMSolverMultistepScheduler"])
def test_step_counts_and_dtypes_are_checked_as_users_pass_them(name):
    """Euler's set_timesteps(0) raised TypeError from len(None); a 0-d integer tensor (which
    diffusers' sigma schedulers take) was refused; integer model outputs stepped to zeros."""
    sched = getattr(ours, name)()
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        sched.set_timesteps(0)
    sched.set_timesteps(torch.tensor(5))
    by_int = getattr(ours, name)()
    by_int.set_timesteps(5)
    assert torch.equal(sched.timesteps, by_int.timesteps)
    ints = torch.ones(1, 1, 2, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="must be floating-point tensors, got torch.int64"):
        sched.step(ints, sched.timesteps[0], ints)


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                                  "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                                  "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("out_dtype, sample_dtype", [(torch.float16, torch.float32),
                                                     (torch.bfloat16, torch.float32),
                                                     (torch.float32, torch.float64)])
def test_mixed_dtype_steps_return_what_diffusers_returns(name, out_dtype, sample_dtype):
    """A UNet under autocast hands fp16/bf16 outputs to fp32 latents: DPM-Solver cast its result
    to the raw output's dtype (latents in fp16, 1% off over 20 steps) where diffusers keeps the
    converted output's (fp32)."""
    x = torch.randn(1, 2, 4, 4, dtype=sample_dtype, generator=torch.Generator().manual_seed(0)) * 3
    out = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1)).to(out_dtype)
    got = []
    for cls in (getattr(ours, name), getattr(diffusers, name)):
        sched = cls()
        sched.set_timesteps(5)
        kwargs = ({"generator": torch.Generator().manual_seed(2)}
                  if "generator" in inspect.signature(sched.step).parameters else {})
        got.append(sched.step(out, sched.timesteps[0], x, **kwargs).prev_sample.dtype)
    assert got[0] == got[1]


def test_a_step_past_the_schedule_names_the_entry_not_a_call_count():
    """The message counted calls from the step index, which starts at a repeated timestep's
    second entry (diffusers' rule): 7 calls read "step called 8 times"."""
    sched = ours.EulerDiscreteScheduler()
    sched.set_timesteps(3)
    x = torch.zeros(1, 1, 2, 2)
    for t in sched.timesteps:
        x = sched.step(torch.zeros_like(x), t, x).prev_sample
    with pytest.raises(ValueError, match="past the end of the schedule: this call would take entry 3 of 3"):
        sched.step(torch.zeros_like(x), sched.timesteps[-1], x)
