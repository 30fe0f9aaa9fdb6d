"""symfast's value inside diffusers: equivariant(pipe) (orbit UNet + fused orbit step) and Philox noise."""
import inspect

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from symfast.groups import get  # noqa: E402
from symfast.integrations import diffusers as ours  # noqa: E402
from symfast.integrations.diffusers import frame_averaging as eq_module  # noqa: E402

ATOL = 1e-5  # the bound: max abs diff, fp32
D4 = get("d4")


def _unet(size=8, seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()


class _NearDenoiser(torch.nn.Module):
    """ε ≈ x plus a small untrained UNet: DDIM/DDPM latents stay O(1), as with a trained model, so
    the 1e-5 bound is checked well above float32's rounding (a bare untrained UNet drives them to ~200)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        from diffusers.models.unets.unet_2d import UNet2DOutput
        return UNet2DOutput(sample=x + 0.1 * self.unet(x, t).sample)


def _x(batch=2, size=8, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _run(unet, scheduler, x, steps=4, generator=None, **step_kwargs):
    """The loop every diffusers pipeline runs: scale, model, step."""
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t).sample
        if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
            step_kwargs["generator"] = generator
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def _max_diff(a, b):
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a.double() - b.double()).abs().max().item()


CASES = [  # (scheduler, config, step kwargs, fused)
    ("DDIMScheduler", {"clip_sample": False}, {}, True),
    ("DDIMScheduler", {"clip_sample": False, "prediction_type": "v_prediction"}, {"eta": 0.5}, True),
    ("DDPMScheduler", {"clip_sample": False}, {}, True),
    ("DDPMScheduler", {"clip_sample": False, "prediction_type": "sample", "variance_type": "fixed_large"}, {}, True),
    ("EulerDiscreteScheduler", {}, {}, True),
    ("EulerAncestralDiscreteScheduler", {"prediction_type": "v_prediction"}, {}, True),
    ("DDIMScheduler", {"clip_sample": True}, {}, False),  # clipping x̂0: averaged, then the plain step
    ("HeunDiscreteScheduler", {}, {}, False),
    ("DPMSolverMultistepScheduler", {}, {}, False),
]


@pytest.mark.parametrize("name,config,step_kwargs,fused", CASES)
def test_equivariant_step_equals_python_loop_over_the_group(name, config, step_kwargs, fused, monkeypatch):
    """OrbitUNet + orbit scheduler == a Python loop of 8 UNet calls averaged, then the scheduler's
    step; the fused path is the one taken where the step is linear in the model output."""
    unet, x = _NearDenoiser(_unet()), _x()
    plain = getattr(diffusers, name).from_config(config)
    calls = {"fused_step": 0, "orbit_mean": 0}
    for op in calls:
        real = getattr(eq_module, op)
        monkeypatch.setattr(eq_module, op, lambda *a, _real=real, _op=op, **k: (calls.__setitem__(_op, calls[_op] + 1),
                                                                              _real(*a, **k))[1])
    mine = _run(eq_module.OrbitUNet(unet, D4), ours.orbit_scheduler(plain, D4), x,
                generator=torch.Generator().manual_seed(5), **dict(step_kwargs))
    theirs = _run(ours.LoopAveragedUNet(unet, D4), plain, x, generator=torch.Generator().manual_seed(5),
                  **dict(step_kwargs))
    assert _max_diff(mine, theirs) <= ATOL
    assert (calls["fused_step"] > 0, calls["orbit_mean"] > 0) == (fused, not fused)


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_ode_scheduler_images_are_equivariant(name):
    unet, x = _NearDenoiser(_unet()), _x()
    unet_orbit = eq_module.OrbitUNet(unet, D4)
    config = {"clip_sample": False}
    sched = ours.orbit_scheduler(getattr(diffusers, name).from_config(config), D4)
    base = _run(unet_orbit, sched, x)
    for k in range(1, len(D4)):
        moved = _run(unet_orbit, sched, D4.act(x, k))
        assert _max_diff(moved, D4.act(base, k)) <= ATOL, k
    # and the test can fail: a plain UNet is not equivariant
    plain = getattr(diffusers, name).from_config(config)
    assert _max_diff(_run(unet, plain, D4.act(x, 1)), D4.act(_run(unet, plain, x), 1)) > 1e-3


@pytest.mark.parametrize("pipeline", ["DDIMPipeline", "DDPMPipeline"])
def test_equivariant_pipeline_matches_the_loop_pipeline(pipeline):
    unet = _unet()
    sched = diffusers.DDIMScheduler(clip_sample=False) if pipeline == "DDIMPipeline" else \
        diffusers.DDPMScheduler(clip_sample=False, num_train_timesteps=20)
    cls = getattr(diffusers, pipeline)
    pipe = ours.equivariant(cls(unet=unet, scheduler=sched), "d4")
    loop = cls(unet=ours.LoopAveragedUNet(unet, D4), scheduler=sched)
    # what pipelines read off the unet comes through the wrapper
    assert pipe.unet.config is unet.config and pipe.unet.dtype == torch.float32
    assert pipe.device == torch.device("cpu") and pipe.unet.config.sample_size == 8
    # pipelines read the step's signature to decide whether to pass eta= and generator=
    assert "generator" in inspect.signature(pipe.scheduler.step).parameters
    for p in (pipe, loop):
        p.set_progress_bar_config(disable=True)
    kwargs = {"batch_size": 2, "num_inference_steps": 4, "output_type": "pt"}
    batches = []
    hook = unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    a = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    hook.remove()
    assert batches == [16] * 4  # one UNet call per step, on the whole orbit (8 × batch 2)
    b = loop(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (2, 3, 8, 8) and _max_diff(a, b) <= ATOL
    assert a.std() > 0.01  # not a clamped-flat image that any two runs would agree on


def test_save_pretrained_saves_the_plain_pipeline(tmp_path):
    """diffusers cannot save an OrbitUNet: saving the wrapped pipeline writes the plain one (UNet
    weights, the scheduler's own class), which loads and, wrapped again, gives the same images."""
    unet = _unet()
    pipe = ours.equivariant(diffusers.DDPMPipeline(unet=unet, scheduler=ours.DDPMScheduler(
        clip_sample=False, num_train_timesteps=20)), "d4")
    entries = (pipe.config.unet, pipe.config.scheduler)
    pipe.save_pretrained(tmp_path)
    assert (pipe.config.unet, pipe.config.scheduler) == entries  # the wrapped pipeline as it was
    assert isinstance(pipe.unet, ours.OrbitUNet) and isinstance(pipe.scheduler, eq_module._OrbitStep)
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded.unet) is diffusers.UNet2DModel and type(loaded.scheduler) is ours.DDPMScheduler
    for name, tensor in unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], tensor), name
    again = ours.equivariant(loaded, "d4")
    kwargs = {"batch_size": 2, "num_inference_steps": 3, "output_type": "pt"}
    images = [p(generator=torch.Generator().manual_seed(0), **kwargs).images for p in (pipe, again)]
    assert torch.equal(*map(torch.as_tensor, images))


@pytest.mark.parametrize("library", ["diffusers", "symfast"])
def test_a_scheduler_swapped_in_after_equivariant_sees_the_averaged_output(library, tmp_path):
    """pipe.scheduler = X.from_config(pipe.scheduler.config), diffusers' usual swap, after
    equivariant(): the pipeline raised a shape error and save_pretrained an IndexError. The
    swapped-in scheduler now gets the orbit average (exactly equivariant images, as the loop's),
    and saving records the class the user gave, diffusers' own kept as diffusers'."""
    unet = _unet()
    pipe = ours.equivariant(diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(
        clip_sample=False, num_train_timesteps=20)), "d4")
    pipe.save_pretrained(tmp_path / "kept")
    assert _model_index(tmp_path / "kept")["scheduler"] == ["diffusers", "DDPMScheduler"]
    pipe.scheduler = getattr(diffusers if library == "diffusers" else ours,
                             "DDIMScheduler").from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    loop = diffusers.DDIMPipeline(unet=ours.LoopAveragedUNet(unet, D4), scheduler=pipe.scheduler)
    loop.set_progress_bar_config(disable=True)
    x = _x()

    def images(p, latents):
        p.scheduler.set_timesteps(4)
        for t in p.scheduler.timesteps:
            latents = p.scheduler.step(p.unet(latents, t).sample, t, latents).prev_sample
        return latents
    base = images(pipe, x)
    assert _max_diff(base, images(loop, x)) <= ATOL
    assert _max_diff(images(pipe, D4.act(x, 1)), D4.act(base, 1)) <= ATOL
    assert pipe(batch_size=2, num_inference_steps=3, output_type="pt").images.shape == (2, 3, 8, 8)
    pipe.save_pretrained(tmp_path / "swapped")
    module = "diffusers" if library == "diffusers" else "symfast.integrations.diffusers"
    assert _model_index(tmp_path / "swapped")["scheduler"] == [module, "DDIMScheduler"]


def _model_index(folder):
    import json
    return json.loads((folder / "model_index.json").read_text())


def test_an_orbit_scheduler_copied_with_from_config_keeps_its_group():
    """type(s).from_config(s.config), diffusers' way to copy a scheduler, made an orbit scheduler
    with no group: AttributeError at its first step."""
    pipe = diffusers.DDPMPipeline(unet=_NearDenoiser(_unet()), scheduler=diffusers.EulerDiscreteScheduler())
    ours.equivariant(pipe, "c4")
    copied = type(pipe.scheduler).from_config(pipe.scheduler.config)
    assert copied._orbit_group is get("c4") and copied._orbit_source is diffusers.EulerDiscreteScheduler
    x = _x()
    assert _max_diff(_run(pipe.unet, copied, x), _run(pipe.unet, pipe.scheduler, x)) == 0.0


def test_orbit_unet_chunks_and_per_sample_arguments():
    unet, x = _unet(), _x(batch=3)
    t = torch.tensor([10, 500, 900])
    one = eq_module.OrbitUNet(unet, D4)(x, t).sample
    three = eq_module.OrbitUNet(unet, D4, chunks=3)(x, t).sample
    assert one.shape == (24, 3, 8, 8) and _max_diff(one, three) <= ATOL
    with torch.no_grad():  # sample-major: rows 8b + k are unet(g_k x[b]) at sample b's timestep
        assert _max_diff(one[2::8], unet(D4.act(x, 2), t).sample) <= ATOL
        assert _max_diff(one[8:16], unet(eq_module.orbit(x[1:2], D4), t[1]).sample) <= ATOL


class _Conditioned(torch.nn.Module):
    """A UNet taking encoder states (as UNet2DConditionModel does): the sample plus a per-sample
    embedding projected to the channels."""

    def __init__(self):
        super().__init__()
        self.unet, self.proj = _unet(), torch.nn.Linear(4, 3)

    def forward(self, x, t, encoder_hidden_states):
        from diffusers.models.unets.unet_2d import UNet2DOutput
        shift = self.proj(encoder_hidden_states.mean(1))[:, :, None, None]
        return UNet2DOutput(sample=x + 0.1 * self.unet(x + shift, t).sample)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_classifier_free_guidance_splits_the_orbit_output_by_sample(name):
    """StableDiffusionPipeline's loop: unet(cat([x] * 2)), .chunk(2) into uncond / cond, guidance,
    step. The orbit output was element-major, so chunk(2) split it by group element (g0-g3 vs
    g4-g7): no error, latents off by 285 where they peak at 537."""
    torch.manual_seed(0)
    model = _Conditioned().eval()
    x, cond = _x(batch=2), torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(2))
    states = torch.cat([torch.zeros_like(cond), cond])

    @torch.no_grad()
    def guided(unet, scheduler, scale=5.0):
        scheduler.set_timesteps(4)
        lat = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(torch.cat([lat] * 2), t), t,
                       encoder_hidden_states=states).sample
            uncond, text = out.chunk(2)
            lat = scheduler.step(uncond + scale * (text - uncond), t, lat).prev_sample
        return lat
    scheduler = getattr(ours, name)()
    want = guided(ours.LoopAveragedUNet(model, D4), scheduler)
    pipe = diffusers.DDPMPipeline(unet=model, scheduler=scheduler)
    ours.equivariant(pipe, D4)
    got = guided(pipe.unet, pipe.scheduler)
    assert _max_diff(got, want) <= ATOL * max(1.0, want.abs().max().item())


def test_bad_inputs_raise_clear_errors():
    unet = _unet()
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    with pytest.raises(TypeError, match="pipe"):
        ours.equivariant(object())
    with pytest.raises(ValueError, match="unknown group"):
        ours.equivariant(pipe, "d5")
    with pytest.raises(ValueError, match="chunks"):
        ours.equivariant(pipe, chunks=0)
    ours.equivariant(pipe)
    with pytest.raises(ValueError, match="already"):
        ours.equivariant(pipe)
    with pytest.raises(TypeError, match="unet"):
        eq_module.OrbitUNet(object())
    with pytest.raises(TypeError, match="scheduler"):
        ours.orbit_scheduler(object())
    pipe.scheduler.set_timesteps(4)
    x = _x()
    with pytest.raises(ValueError, match="orbit output"):
        pipe.scheduler.step(torch.zeros_like(x), pipe.scheduler.timesteps[0], x)


# ---- Philox noise: a seed per sample ---------------------------------------------------------

def _philox_run(unet_fn, sched, seeds, steps=4):
    gen = ours.PhiloxGenerator(seeds)
    x = gen.latents((len(seeds), 3, 8, 8))
    return _run(unet_fn, sched, x, steps=steps, generator=gen)


def _toy(x, t):
    """A per-sample model (batch-invariant to the bit, unlike a batched conv), so the test sees the noise."""
    from diffusers.models.unets.unet_2d import UNet2DOutput
    return UNet2DOutput(sample=torch.tanh(x.flip(-1) * 0.7 + 0.001 * t.float()))


@pytest.mark.parametrize("name", ["DDPMScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("orbit", [False, True])
def test_philox_seed_per_sample_gives_the_same_images_whatever_the_batch(name, orbit):
    config = {"clip_sample": False, "num_train_timesteps": 50}
    seeds = [11, 12, 13, 14]
    kwargs = {"eta": 1.0} if name == "DDIMScheduler" else {}

    def run(s):
        sched = getattr(ours, name).from_config(config)
        if orbit:  # the noise is drawn inside the fused op
            return _run(eq_module.OrbitUNet(_toy, D4), ours.orbit_scheduler(sched, D4),
                        ours.PhiloxGenerator(s).latents((len(s), 3, 8, 8)), generator=ours.PhiloxGenerator(s),
                        **kwargs)
        return _run(_toy, sched, ours.PhiloxGenerator(s).latents((len(s), 3, 8, 8)),
                    generator=ours.PhiloxGenerator(s), **kwargs)

    four = run(seeds)
    assert torch.equal(four, torch.cat([run(seeds[:2]), run(seeds[2:])]))
    assert torch.equal(four, torch.cat([run([s]) for s in seeds]))
    assert not torch.equal(four[0], four[1])
    other = run([11, 12, 13, 99])  # the noise is used: another seed changes that sample only
    assert torch.equal(other[:3], four[:3]) and not torch.equal(other[3], four[3])


def test_philox_generator_in_the_fused_step_equals_the_scheduler_draws():
    """The same Philox numbers whether drawn by the scheduler (plain step) or in the fused op."""
    config = {"clip_sample": False, "num_train_timesteps": 50}
    seeds = [3, 4]
    x = ours.PhiloxGenerator(seeds).latents((2, 3, 8, 8))
    fused = _run(eq_module.OrbitUNet(_toy, D4), ours.orbit_scheduler(ours.DDPMScheduler(**config), D4), x,
                 generator=ours.PhiloxGenerator(seeds))
    loop = _run(ours.LoopAveragedUNet(_toy, D4), ours.DDPMScheduler(**config), x,
                generator=ours.PhiloxGenerator(seeds))
    assert _max_diff(fused, loop) <= ATOL


def test_philox_generator_bad_seeds():
    with pytest.raises(TypeError, match="seed"):
        ours.PhiloxGenerator(1.5)
    with pytest.raises(TypeError, match="seed"):
        ours.PhiloxGenerator(["a"])
    for empty in ([], (), torch.zeros(0, dtype=torch.int64)):  # was accepted, then failed at a draw
        with pytest.raises(ValueError, match="non-empty list of ints"):
            ours.PhiloxGenerator(empty)
    with pytest.raises(ValueError, match="shape"):
        ours.PhiloxGenerator([1]).latents((0, 3))
    for bad in ((1, 2.5), (), (2, -1)):  # int() truncated 2.5 to 2
        with pytest.raises(ValueError, match="shape must be"):
            ours.PhiloxGenerator([1]).randn(bad)
