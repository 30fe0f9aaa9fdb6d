"""symfast.train in one process: every equivariance variant and prediction end to end (train,
checkpoint, load, sample), that training learns the exact score, EMA, LR, data order, resume,
non-finite steps, and bad input caught before any work."""
from __future__ import annotations

import json
import logging
import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from _train_util import assert_bitwise_equal, final_tensors, metrics_rows
from conftest import rel_err
from symfast import sample
from symfast.data.images import ImageTensorDataset, gaussian_mixture, save_image_grid
from symfast.groups import get
from symfast.train import EMA, TrainConfig, TrainingDiverged, checkpoint, load, lr_at, make_config, train
from symfast.train.loop import DataOrder, _Run, clip_grad_norm_, sample_normals, sample_uniforms
from symfast.train.distributed import World

TINY = dict(data="gmm-d4", image_size=8, channels=(8, 16), heads=2, batch_size=8, progress=False,
            warmup_steps=2, dataset_size=64)
# for a dataset passed in, or a folder (dataset_size is gmm-d4's)
OWN_DATA = {k: v for k, v in TINY.items() if k not in ("data", "dataset_size")}

VARIANTS = [  # (equivariance, prediction, extra)
    ("none", "edm", {}),
    ("none", "x0", {}),
    ("augment", "eps", {}),
    ("wt", "edm", {}),
    ("fa", "v", {}),
    ("fa", "edm", {"fa_train": True}),
    ("reg", "edm", {"reg_weight": 0.5}),
]


@pytest.mark.parametrize("equivariance,prediction,extra", VARIANTS)
def test_variant_trains_checkpoints_loads_and_samples(tmp_path, equivariance, prediction, extra):
    result = train(**TINY, equivariance=equivariance, prediction=prediction, steps=4,
                   checkpoint_every=2, log_every=2, sample_every=4, sample_n=4, sample_steps=3,
                   out=str(tmp_path), **extra)
    assert result.step == 4 and result.nimg == 32 and math.isfinite(result.last_loss)
    assert (tmp_path / "samples" / "step-000000004.png").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["equivariance"] == equivariance
    rows = metrics_rows(tmp_path)
    assert [r["step"] for r in rows] == ["2", "4"]
    assert any(k.startswith("loss_sigma_") for k in rows[0])
    assert ("reg_loss" in rows[0]) == (equivariance == "reg")
    denoiser, cfg = load(tmp_path)
    assert cfg.equivariance == equivariance
    tensors, _ = final_tensors(tmp_path)
    ema = {k[len("ema.0."):]: v for k, v in tensors.items() if k.startswith("ema.0.")}
    assert all(torch.equal(v, ema[k]) for k, v in denoiser.model.state_dict().items())
    assert (denoiser.group is not None) == (equivariance in ("wt", "fa"))
    assert denoiser.frame_average == (equivariance == "fa")
    x_t = torch.randn(2, 1, 8, 8)
    out = sample(denoiser, x_t, sampler="heun", steps=3, progress=False)
    assert torch.isfinite(out).all()
    if equivariance in ("wt", "fa"):  # what the run trained samples exactly equivariantly
        g = get("d4")
        for k in (1, 5):
            moved = sample(denoiser, g.act(x_t, k), sampler="heun", steps=3, progress=False)
            assert rel_err(moved, g.act(out, k)) <= 1e-5


def _posterior_error(denoiser, mixture, sigmas, n=256):
    x0 = mixture.sample(n, seed=123)
    gen = torch.Generator().manual_seed(9)
    errs = []
    with torch.no_grad():
        for s in sigmas:
            y = x0 + s * torch.randn(x0.shape, generator=gen)
            errs.append(float((denoiser(y, s) - mixture.posterior_mean(y, s)).pow(2).mean()))
    return errs


def test_training_learns_the_exact_posterior_mean(tmp_path):
    """On the D4-invariant Gaussian mixture the optimal denoiser is known exactly; a short run
    must move the EMA denoiser well towards it at every σ."""
    mixture = gaussian_mixture("d4", size=8, channels=1, seed=0)
    cfg = dict(TINY, channels=(16, 32), batch_size=32, dataset_size=2048, lr=2e-3,
               ema_halflife_images=2000, steps=300, checkpoint_every=300, out=str(tmp_path))
    sigmas = (0.1, 0.3, 1.0)
    untrained = train(**dict(cfg, steps=1, out=str(tmp_path / "init")))
    before = _posterior_error(load(untrained.run_dir)[0], mixture, sigmas)
    train(**cfg)
    after = _posterior_error(load(tmp_path)[0], mixture, sigmas)
    for b, a in zip(before, after):
        assert a < 0.25 * b, (before, after)


class _Crash(Exception):
    pass


def test_resume_in_process_is_bitwise_equal(tmp_path, monkeypatch):
    """Crash right after the checkpoint of step 5 and resume to 9 (Reg, whose target is the EMA,
    two EMA widths, a cosine LR): the same tensors as 9 steps straight."""
    from symfast.train import checkpoint
    cfg = dict(TINY, equivariance="reg", lr_schedule="cosine", checkpoint_every=5, log_every=4,
               ema_halflife_images=(100, 400), steps=9)
    train(**cfg, out=str(tmp_path / "a"))
    save = checkpoint.save

    def save_then_crash(*args, **kwargs):
        path = save(*args, **kwargs)
        raise _Crash(path)

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(_Crash, match="step-000000005"):
        train(**cfg, out=str(tmp_path / "b"))
    monkeypatch.setattr(checkpoint, "save", save)
    train(**cfg, out=str(tmp_path / "b"), resume="auto")
    a, _ = final_tensors(tmp_path / "a")
    b, _ = final_tensors(tmp_path / "b")
    assert_bitwise_equal(a, b)
    assert any(k.startswith("ema.1.") for k in a)
    # the row of step 8 covers steps 5-8 in both runs (the checkpoint of step 5 carries the
    # interval's sums), so every logged figure but the timings is the same
    rows = [metrics_rows(tmp_path / name) for name in "ab"]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == ["4", "8", "9"]
    for a_row, b_row in zip(*rows):
        for key in a_row:
            if key not in ("images_per_s", "peak_memory_mb"):
                assert a_row[key] == b_row[key], (a_row["step"], key)


class _NaNAfter(nn.Module):
    """A small conv net whose output turns NaN on the calls listed in ``bad``."""

    def __init__(self, bad):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.calls, self.bad = 0, bad

    def forward(self, x, t):
        self.calls += 1
        out = self.conv(x)
        return out * float("nan") if self.calls in self.bad else out


def test_a_run_whose_loss_turns_nan_stops_and_keeps_its_last_good_checkpoint(tmp_path):
    # one network call per step: steps 0-4 are fine, from step 5 on the output is NaN; the
    # skipped step 5 leaves the weights as they were, so checkpoint 6 is still a good one
    model = _NaNAfter(bad=set(range(6, 1000)))
    with pytest.raises(TrainingDiverged, match="step 7.*last good checkpoint is .*step-000000006"):
        train(**TINY, network=model, steps=20, checkpoint_every=2, max_nonfinite=3, out=str(tmp_path))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000000002", "step-000000004", "step-000000006"]
    denoiser, _ = load(tmp_path, network=_NaNAfter(bad=set()))
    assert all(torch.isfinite(p).all() for p in denoiser.model.parameters())


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    model = _NaNAfter(bad={3, 4})
    result = train(**TINY, network=model, steps=6, checkpoint_every=6, log_every=1, out=str(tmp_path))
    assert result.skipped_steps == 2 and result.step == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert metrics_rows(tmp_path)[-1]["skipped_steps"] == "2"


def _poisoning_optimizer(monkeypatch, at_step):
    """make_optimizer, with a hook that sets a weight to inf after optimiser step ``at_step``
    (0-based): what a huge learning rate does, at a step chosen by the test."""
    import symfast.train.loop as loop
    real = loop.make_optimizer

    def make(params, cfg):
        optimizer = real(params, cfg)
        calls = [0]

        def poison(opt, args, kwargs):
            if calls[0] == at_step:
                with torch.no_grad():
                    opt.param_groups[0]["params"][0].view(-1)[0] = math.inf
            calls[0] += 1
        optimizer.register_step_post_hook(poison)
        return optimizer
    monkeypatch.setattr(loop, "make_optimizer", make)


def test_weights_that_turn_non_finite_stop_the_run_at_once_with_a_good_checkpoint(tmp_path, monkeypatch):
    # the gradients stay finite, so only a check of the weights sees it: the run went on, wrote
    # checkpoint 3 with inf weights and called it the last good one
    _poisoning_optimizer(monkeypatch, at_step=2)
    with pytest.raises(TrainingDiverged) as info:
        train(**TINY, steps=10, checkpoint_every=1, max_nonfinite=5, out=str(tmp_path / "a"))
    message = str(info.value)
    assert re.search(r"weights turned non-finite.*step 2.*last good checkpoint is .*step-000000002",
                     message), message
    # grad_clip is set (1.0, the default): the advice is not to set it
    assert "set grad_clip" not in message and "grad_clip=1.0 already" in message, message
    names = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert names == ["step-000000001", "step-000000002"], names
    assert all(torch.isfinite(v).all() for v in final_tensors(tmp_path / "a")[0].values()
               if v.is_floating_point())
    # in the first step, before any checkpoint: none is named, and without clipping the advice
    # is to set it
    _poisoning_optimizer(monkeypatch, at_step=0)
    with pytest.raises(TrainingDiverged, match="step 0.*No checkpoint was written yet.*or set grad_clip"):
        train(**TINY, steps=10, checkpoint_every=1, grad_clip=None, out=str(tmp_path / "b"))
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_an_ema_copy_that_turns_non_finite_is_never_checkpointed(tmp_path, monkeypatch):
    # (a lerp between huge finite weights overflows: made to happen here after the 3rd update)
    real, calls = EMA.update, [0]

    def update(self, nimg, batch):
        real(self, nimg, batch)
        calls[0] += 1
        if calls[0] == 3:
            with torch.no_grad():
                next(self.models[0].parameters()).view(-1)[0] = math.nan
    monkeypatch.setattr(EMA, "update", update)
    with pytest.raises(TrainingDiverged, match="EMA copy .* non-finite by step 3.*last good "
                                               "checkpoint is .*step-000000002"):
        train(**TINY, steps=10, checkpoint_every=1, out=str(tmp_path))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000000001", "step-000000002"], names


def test_a_run_on_busy_cores_says_how_to_set_the_threads(tmp_path, caplog):
    """When the kernels find another process on the cores (forced here) they run alone, and the
    run says once that torch's own ops want OMP_NUM_THREADS=1; at one thread it says nothing."""
    from symfast._ext import cpu_team_solo_for, load_cpu_kernels
    if not load_cpu_kernels("group_average"):
        pytest.skip("the CPU kernels are not built")
    before = torch.get_num_threads()
    try:
        for threads, expected in ((2, 1), (1, 0)):
            torch.set_num_threads(threads)
            cpu_team_solo_for(600_000)
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="symfast.train"):
                train(**TINY, equivariance="wt", steps=4, log_every=1, checkpoint_every=4,
                      out=str(tmp_path / f"threads-{threads}"))
            said = [r for r in caplog.records if "OMP_NUM_THREADS=1" in r.getMessage()]
            assert len(said) == expected, [r.getMessage() for r in caplog.records]
    finally:
        cpu_team_solo_for(0)
        torch.set_num_threads(before)


def test_ema_follows_edm():
    net = nn.Linear(3, 2)
    ema = EMA(net, (1000.0, 50.0), rampup=0.05)
    assert ema.beta(0, nimg=0, batch=10) == 0.0  # ramp-up: the first step copies the weights
    assert ema.beta(0, nimg=4000, batch=10) == pytest.approx(0.5 ** (10 / 200))
    assert ema.beta(1, nimg=4000, batch=10) == pytest.approx(0.5 ** (10 / 50))
    assert EMA(net, (1000.0,), rampup=None).beta(0, nimg=0, batch=10) == pytest.approx(0.5 ** 0.01)
    before = [p.clone() for p in ema.models[1].parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(nimg=4000, batch=10)
    beta = 0.5 ** (10 / 50)
    for old, new, p in zip(before, ema.models[1].parameters(), net.parameters()):
        assert rel_err(new, beta * old + (1 - beta) * p) <= 1e-6
    assert not any(p.requires_grad for p in ema.models[0].parameters())
    copy = EMA(net, (1000.0, 50.0))
    saved = SimpleNamespace(tensors=ema.state_tensors(), path="saved")  # as a resume loads them
    for i, model in enumerate(copy.models):
        checkpoint.load_weights(model, saved, f"ema.{i}.")
    assert all(torch.equal(a, b) for a, b in zip(copy.models[1].parameters(), ema.models[1].parameters()))
    # the loaded copy keeps moving (update works on the tensors the load wrote into)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    for e in (ema, copy):
        e.update(nimg=5000, batch=10)
    assert all(torch.equal(a, b) for a, b in zip(copy.models[1].parameters(), ema.models[1].parameters()))
    assert not torch.equal(copy.models[1].weight, before[0])


@pytest.mark.parametrize("clip", [None, 0.1, 1e9])
def test_clip_grad_norm_gives_torchs_bits(clip):
    torch.manual_seed(0)
    shapes = [(64, 32, 3), (64,), (7, 5), (1,), (128, 96)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    params.append(nn.Parameter(torch.randn(3)))  # no gradient: skipped by both
    for p in params[:-1]:
        p.grad = torch.randn_like(p) * 3
    mine = [p.grad.clone() for p in params[:-1]]
    theirs = [p.grad.clone() for p in params[:-1]]
    for p, g in zip(params, mine):
        p.grad = g
    norm = clip_grad_norm_(params, clip)
    for p, g in zip(params, theirs):
        p.grad = g
    expected = torch.nn.utils.clip_grad_norm_(params, math.inf if clip is None else clip, foreach=True)
    assert torch.equal(norm, expected)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    if clip == 0.1:  # the norm was ~170: scaled down to the clip
        assert norm > 100
        assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in mine])) <= 0.1 + 1e-6
    # mixed dtypes take torch's own path
    extra = nn.Parameter(torch.randn(4, dtype=torch.float64))
    extra.grad = torch.ones(4, dtype=torch.float64)
    pristine = [g.clone() for g in mine] + [extra.grad.clone()]
    for p, g in zip(params[:-1] + [extra], pristine):
        p.grad = g.clone()
    mixed = clip_grad_norm_(params + [extra], clip)
    for p, g in zip(params[:-1] + [extra], pristine):
        p.grad = g.clone()
    assert torch.equal(mixed, torch.nn.utils.clip_grad_norm_(
        params + [extra], math.inf if clip is None else clip, foreach=True))


def test_learning_rate_schedules():
    base = dict(TINY, lr=1.0, warmup_steps=10, steps=110)
    const = TrainConfig(**base)
    assert [lr_at(const, s) for s in (0, 4, 9, 50)] == [0.1, 0.5, 1.0, 1.0]
    cos = TrainConfig(**base, lr_schedule="cosine")
    assert lr_at(cos, 10) == 1.0 and lr_at(cos, 60) == pytest.approx(0.5) and lr_at(cos, 110) < 1e-9
    inv = TrainConfig(**base, lr_schedule="inverse-sqrt")
    assert lr_at(inv, 10) == 1.0 and lr_at(inv, 40) == pytest.approx(0.5)


def test_data_order_covers_every_image_each_epoch_and_splits_over_ranks():
    order = DataOrder(10, seed=3)
    epoch0 = order.indices(0, 0, 10)
    assert sorted(epoch0.tolist()) == list(range(10))
    # a batch of 4 from position 8 straddles the epoch boundary: epoch 0's last two, then epoch 1's first two
    straddle = order.indices(8, 0, 4)
    assert straddle[:2].tolist() == epoch0[8:].tolist()
    assert straddle[2:].tolist() == order.indices(10, 0, 2).tolist()
    assert not torch.equal(order.indices(10, 0, 10), epoch0)
    whole = order.indices(30, 0, 6)
    assert torch.equal(torch.cat([order.indices(30, 0, 3), order.indices(30, 3, 6)]), whole)
    assert torch.equal(DataOrder(10, seed=3).indices(30, 0, 6), whole)


def test_a_resume_with_another_batch_size_goes_on_where_the_data_stopped(tmp_path):
    """The data position was step * batch_size: 2 steps of 8 then a resume with batch 16 read
    positions 32..47 (epoch 1) and skipped 16..31. Every image of a 32-image epoch once."""
    from symfast.train import train
    seen = []

    class Recording:  # a get_batch-only dataset, as train() documents (its shape was read by [0])
        images = torch.linspace(-1, 1, 32 * 64).reshape(32, 1, 8, 8)

        def __len__(self):
            return 32

        def get_batch(self, index):
            seen.extend(index.tolist())
            return self.images[index]
    args = dict(image_size=8, channels=(8, 16), heads=2, log_every=1, progress=False, out=str(tmp_path))
    train(dataset=Recording(), batch_size=8, steps=2, **args)
    assert seen[0] == 0  # the shape probe
    del seen[0]
    assert len(seen) == 16
    train(dataset=Recording(), batch_size=16, steps=3, resume="auto", **args)
    del seen[16]
    assert sorted(seen) == list(range(32))


def test_per_sample_draws_do_not_depend_on_the_split():
    streams = torch.arange(8)
    u = sample_uniforms(7, 3, streams, 3)
    assert u.shape == (8, 3) and (u > 0).all() and (u < 1).all()
    assert not torch.equal(sample_uniforms(7, 4, streams, 3), u)
    many = sample_uniforms(7, 3, torch.arange(20000), 3)  # uniform: mean 1/2, variance 1/12
    assert abs(float(many.mean()) - 0.5) < 0.005 and abs(float(many.var()) - 1 / 12) < 0.002
    assert torch.equal(torch.cat([sample_uniforms(7, 3, streams[:5], 3),
                                  sample_uniforms(7, 3, streams[5:], 3)]), u)
    z = sample_normals(7, 3, streams, (8, 1, 4, 4), torch.device("cpu"))
    assert torch.equal(sample_normals(7, 3, streams[5:], (3, 1, 4, 4), torch.device("cpu")), z[5:])
    assert not torch.equal(sample_normals(7, 4, streams, (8, 1, 4, 4), torch.device("cpu")), z)


def test_precision_bf16_and_a_diffusers_model_and_an_image_folder(tmp_path):
    r = train(**TINY, equivariance="wt", precision="bf16", steps=2, out=str(tmp_path / "bf16"))
    assert math.isfinite(r.last_loss)
    pytest.importorskip("diffusers")
    r = train(**TINY, model="diffusers-unet", steps=2, out=str(tmp_path / "diffusers"))
    assert math.isfinite(r.last_loss)
    denoiser, _ = load(tmp_path / "diffusers")
    assert torch.isfinite(sample(denoiser, (2, 1, 8, 8), steps=2, progress=False)).all()
    folder = tmp_path / "images"
    for i in range(3):
        save_image_grid(torch.rand(3, 12, 10) * 2 - 1, folder / f"{i}.png", padding=0)
    r = train(**dict(OWN_DATA, data=str(folder), data_channels=3), steps=2, out=str(tmp_path / "folder"))
    assert math.isfinite(r.last_loss)
    assert load(tmp_path / "folder")[1].data_channels == 3


class _SmallConv(nn.Module):
    """A one-layer custom network F(x, t) for train(network=...)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * torch.cos(t)[:, None, None, None]


def test_compile_runs_the_network_under_torch_compile(tmp_path):
    torch.manual_seed(0)
    eager = train(**TINY, network=_SmallConv(), steps=3, out=str(tmp_path / "eager"))
    torch.manual_seed(0)
    compiled = train(**TINY, network=_SmallConv(), steps=3, compile=True, out=str(tmp_path / "compiled"))
    a, _ = final_tensors(tmp_path / "eager")
    b, _ = final_tensors(tmp_path / "compiled")
    for k in a:
        assert rel_err(b[k], a[k]) <= 1e-5, k
    assert eager.step == compiled.step == 3


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    train(**TINY, steps=2, log_every=1, out=str(tmp_path))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


# ---- bad input, caught before any work --------------------------------------------------------

def _nothing_written(path):
    return not path.exists()


@pytest.mark.parametrize("overrides,message", [
    ({"image_size": 10, "channels": (8, 16, 16)}, "image_size=10 cannot be pooled"),
    ({"equivariance": "wt", "model": "unet"}, "equivariance='wt'.*needs model='equivariant-unet'"),
    ({"group": "d4"}, "group='d4' needs equivariance"),
    ({"group": "d5", "equivariance": "fa"}, "unknown group name 'd5'"),
    ({"prediction": "score"}, "prediction must be one of"),
    ({"batch_size": 0}, "batch_size must be a positive int"),
    ({"data": "/no/such/folder"}, "data must be one of"),
    ({"resume": "/no/such/checkpoint"}, "resume='/no/such/checkpoint': no such checkpoint"),
    ({"fa_train": True}, "fa_train=True needs equivariance='fa'"),
    ({"channels": (8, 0)}, "channels must be a non-empty list of positive ints"),
    ({"learning_rate": 1.0}, r"unknown config field\(s\) \['learning_rate'\]"),
    ({"model": "diffusers-unet", "channels": (12, 24)}, r"channels=\[12, 24\] must each be divisible by 8"),
    ({"weight_decay": math.inf}, "weight_decay must be a finite number >= 0, got inf"),
    ({"weight_decay": math.nan}, "weight_decay must be a finite number >= 0, got nan"),
    ({"lr": 1e39}, r"lr must be at most 3.403e\+38 \(the largest float32\), got 1e\+39"),
    ({"image_size": 1, "channels": (8,)}, "image_size must be >= 2 for data='gmm-d4', got 1"),
])
def test_bad_config_is_refused_before_any_work(tmp_path, overrides, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train(**dict(TINY, steps=2, out=str(out), **overrides))
    assert _nothing_written(out)


@pytest.mark.parametrize("overrides,message", [
    ({"weight_decay": "0.1"}, "weight_decay must be a number, got '0.1'"),
    ({"adam_betas": (0.9, "a")}, "adam_betas must be a list of 2 numbers"),
    ({"compile": "false"}, "compile must be true or false, got 'false'"),
    ({"progress": "no"}, "progress must be true or false"),
    ({"resume": None}, "resume must be a string, got None"),
    ({"data": 5}, "data must be a string, got 5"),
    ({"grad_clip": "off"}, "grad_clip must be a number or None, got 'off'"),
])
def test_a_field_of_the_wrong_type_is_named(tmp_path, overrides, message):
    out = tmp_path / "run"
    with pytest.raises(TypeError, match=message):
        train(**dict(TINY, steps=2, out=str(out), **overrides))
    assert _nothing_written(out)


def test_config_strings_as_a_config_file_writes_them(tmp_path):
    # "none" disables what the command line's help says it disables; lists may be comma-separated
    cfg = make_config(dict(TINY, grad_clip="none", ema_rampup="None", channels="8,16", steps=1))
    assert cfg.grad_clip is None and cfg.ema_rampup is None and cfg.channels == (8, 16)
    with pytest.raises(ValueError, match="channels must be a comma-separated list of ints, got '8,x'"):
        make_config(dict(TINY, channels="8,x"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"steps": 3,}')
    with pytest.raises(ValueError, match="config file .*bad.json.* is not valid JSON"):
        make_config(str(bad))


def test_a_tensor_or_array_of_images_is_a_dataset(tmp_path):
    images = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    finals = []
    for name, data in (("wrapped", ImageTensorDataset(images)), ("tensor", images),
                       ("array", images.numpy())):
        torch.manual_seed(0)
        train(**dict(OWN_DATA, image_size=8), network=_SmallConv(), dataset=data, steps=2,
              out=str(tmp_path / name))
        finals.append(final_tensors(tmp_path / name)[0])
    for other in finals[1:]:
        assert all(torch.equal(other[k], finals[0][k]) for k in finals[0])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*unsqueeze\(1\)"):
        train(**OWN_DATA, network=_SmallConv(), dataset=images[:, 0], steps=1, out=str(tmp_path / "3d"))
    assert _nothing_written(tmp_path / "3d")


def test_an_empty_out_is_refused_not_taken_for_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="out='' is empty"):
        train(**TINY, steps=1, out="")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("case,message", [
    # a custom network took any size, and config.json recorded image_size 8 for 16x16 images
    ("16x16", r"the dataset's images are 16x16 but image_size=8"),
    # accepted, and a 2-channel grid failed only at the end of the run
    ("2 channels", "the dataset's images have 2 channels; data_channels must be 1 or 3"),
    # every step skipped, and the run ended "trained"
    ("all NaN", r"non-finite values \(NaN or inf\) in 20 of its 20 images"),
    ("one inf", r"non-finite values \(NaN or inf\) in 1 of its 20 images"),
])
def test_a_dataset_passed_in_is_checked_before_any_work(tmp_path, case, message):
    images = torch.rand(20, 1, 8, 8) * 2 - 1
    network = _SmallConv()
    if case == "16x16":
        images = torch.rand(20, 1, 16, 16) * 2 - 1
    elif case == "2 channels":
        images, network = torch.rand(20, 2, 8, 8) * 2 - 1, None
    elif case == "all NaN":
        images = torch.full((20, 1, 8, 8), math.nan)
    else:
        images[7, 0, 3, 3] = -math.inf
    with pytest.raises(ValueError, match=message):
        train(**dict(OWN_DATA, image_size=8), network=network, dataset=images, steps=1,
              out=str(tmp_path / "run"))
    assert _nothing_written(tmp_path / "run")


def test_a_network_of_the_wrong_output_shape_is_named(tmp_path):
    class Cropping(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3)  # no padding: 8x8 -> 6x6

        def forward(self, x, t):
            return self.conv(x)

    with pytest.raises(ValueError, match=r"model output has shape \(8, 1, 6, 6\).*\(8, 1, 8, 8\)"):
        train(**TINY, network=Cropping(), steps=1, out=str(tmp_path / "run"))


def test_rotation_group_with_non_square_images_is_refused(tmp_path):
    data = ImageTensorDataset(torch.zeros(4, 1, 8, 12))
    with pytest.raises(ValueError, match="dataset images.*square"):
        train(**dict(OWN_DATA, image_size=8), dataset=data, equivariance="augment", steps=1,
              out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="dataset's images are 8x12"):
        train(**dict(OWN_DATA, image_size=8), dataset=data, steps=1, out=str(tmp_path / "run"))
    assert _nothing_written(tmp_path / "run")


def test_batch_not_divisible_by_the_ranks_is_refused():
    cfg = make_config(dict(TINY, batch_size=8, steps=1, out="unused"))
    with pytest.raises(ValueError, match="batch_size=8 must be divisible by the number of processes"):
        _Run(cfg, World(rank=0, size=3), None, None)


def test_a_checkpoint_of_another_config_is_refused_naming_the_fields(tmp_path):
    train(**TINY, steps=2, out=str(tmp_path))
    with pytest.raises(ValueError, match=r"channels: \[8, 32\] vs \[8, 16\].*prediction: 'eps' vs 'edm'"):
        train(**dict(TINY, channels=(8, 32), prediction="eps"), steps=4, out=str(tmp_path))
    with pytest.raises(ValueError, match="resume='none' but .* already holds checkpoints"):
        train(**TINY, steps=4, out=str(tmp_path), resume="none")
    other = tmp_path / "other"
    with pytest.raises(ValueError, match="group: 'd4' vs None"):
        train(**dict(TINY, equivariance="fa"), steps=4, out=str(other), resume=str(tmp_path))
    assert _nothing_written(other)


def test_loss_bins_hold_equal_shares_of_the_training_draws():
    # the bins were (lo, hi]: on a DDPM schedule t = 200 fell in the first bin (0.201 / 0.199)
    from symfast.denoiser import DDPMSchedule, EDMSchedule
    from symfast.train.loop import sigma_bin_index, sigma_bins
    ddpm = DDPMSchedule()
    sigma = torch.from_numpy(ddpm.sigma_table).float()  # every timestep once: uniform draws
    assert torch.bincount(sigma_bin_index(sigma, sigma_bins(ddpm))).tolist() == [200] * 5
    edm = EDMSchedule()
    u = (torch.arange(100000, dtype=torch.float64) + 0.5) / 100000
    counts = torch.bincount(sigma_bin_index(edm.training_levels(u)[0], sigma_bins(edm)))
    assert (counts - 20000).abs().max() <= 1
