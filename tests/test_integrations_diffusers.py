"""symfast.integrations.diffusers against the real diffusers schedulers and pipelines."""
import inspect
import subprocess
import sys

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


def _run_both(name, config, steps, step_kwargs=None, with_generator=True, shape=(2, 3, 8, 8), seed=0):
    """Drive both schedulers with the same model outputs and same-seeded generators; return the
    largest abs difference over every prev_sample, pred_original_sample and scaled model input."""
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
    for t in theirs.timesteps:
        worst = max(worst, _max_diff(theirs.scale_model_input(x_theirs, t), mine.scale_model_input(x_mine, t)))
        model_output = torch.randn(shape, generator=data)
        kw_theirs, kw_mine = dict(step_kwargs or {}), dict(step_kwargs or {})
        if with_generator:
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
