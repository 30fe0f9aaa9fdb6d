"""SFBD: the noisy data, the backward step's shards, the rounds and the online mode end to end,
resume after a real SIGKILL, and 2 torchrun processes against one."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from _train_util import assert_bitwise_equal, child_env, final_tensors, symfast_command
from conftest import rel_err
from symfast.data import NoisyDataset, clean_split, digits, gaussian_mixture
from symfast.train import checkpoint, load
from symfast.train.sfbd import make_sfbd_config, read_shard, run, shard_path

# 160 images of an 8x8 mixture: 16 clean, 144 noisy in 9 shards of 16; a few steps per stage.
TINY = dict(data="gmm-d4", image_size=8, channels=(16, 32), dataset_size=160, batch_size=8,
            clean_fraction=0.1, tau=0.5, rounds=2, pretrain_steps=6, steps_per_round=6,
            denoise_steps=6, denoise_batch=16, shard_size=16, checkpoint_every=2, keep=2,
            ema_halflife_images=50, lr=1e-3, warmup_steps=2, log_every=1, progress=False)


def _flags(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
    return out


def sfbd_command(out: Path, nproc: int = 1, **changes) -> list[str]:
    return symfast_command("sfbd", *_flags(dict(TINY, out=str(out), **changes)), nproc=nproc)


def run_cli(out: Path, nproc: int = 1, **changes) -> None:
    proc = subprocess.run(sfbd_command(out, nproc, **changes), env=child_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"sfbd failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def shards(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: read_shard(p) for p in sorted(folder.glob("shard-*.safetensors"))}


# ---- data ----------------------------------------------------------------------------------

def test_noisy_dataset_noise_is_fixed_per_image():
    data = digits(8)
    clean, noisy = clean_split(len(data), 0.04, seed=3)
    assert len(clean) == round(0.04 * len(data)) and len(clean) + len(noisy) == len(data)
    assert not set(clean.tolist()) & set(noisy.tolist())
    assert torch.equal(clean_split(len(data), 0.04, seed=3)[0], clean)
    assert not torch.equal(clean_split(len(data), 0.04, seed=4)[0], clean)
    ys = NoisyDataset(data, 0.3, seed=5, indices=noisy)
    batch = ys.get_batch(torch.tensor([4, 0, 9]))
    again = NoisyDataset(data, 0.3, seed=5, indices=noisy)  # another instance, other batches
    assert torch.equal(again.get_batch(torch.tensor([9]))[0], batch[2])
    assert torch.equal(again[0], batch[1])
    # the noise belongs to the image, not to its position in a subset
    whole = NoisyDataset(data, 0.3, seed=5)
    assert torch.equal(whole.get_batch(noisy[[4, 0, 9]]), batch)
    assert torch.equal(ys.clean_batch(torch.tensor([4, 0, 9])), data.images[noisy[[4, 0, 9]]])
    eps = (whole.get_batch(torch.arange(len(data))) - data.images) / 0.3  # 115k values
    assert abs(float(eps.mean())) < 0.01 and abs(float(eps.std()) - 1) < 0.01
    assert not torch.equal(NoisyDataset(data, 0.3, seed=6)[0], whole[0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(tau=0.0), "tau"), (dict(tau=float("nan")), "tau"), (dict(seed=-1), "seed"),
    (dict(indices=torch.tensor([0, 5000])), "indices"), (dict(indices=torch.tensor([0.5])), "indices"),
])
def test_noisy_dataset_rejects_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        NoisyDataset(digits(8), **dict(dict(tau=0.5), **kwargs))
    with pytest.raises(ValueError, match="clean_fraction"):
        clean_split(10, 0.0)


@pytest.mark.parametrize("changes, match", [
    (dict(tau=-1.0), "tau"), (dict(tau=100.0), "sigma_max"),
    (dict(tau=0.001), r"tau=0.001 is outside the schedule's noise levels \[sigma_min=0.002"),
    (dict(clean_fraction=0.0), "clean_fraction"),
    (dict(clean_fraction=1.5), "clean_fraction"), (dict(rounds=0), "rounds"),
    (dict(clean_fraction=1.0), r"clean_fraction must be in \(0, 1\)"),  # no noisy image left
    (dict(clean_fraction=0.01), "fewer than one batch"), (dict(mode="batch"), "mode"),
    (dict(denoise_sampler="rk4"), "denoise_sampler"), (dict(channels="16,x"), "channels|invalid"),
    (dict(fd_samples=1), "fd_samples"), (dict(fd_samples=-2), "fd_samples"),
    (dict(merge_clean="yes"), "merge_clean must be true or false"),
    (dict(steps=5), r"\['steps'\] cannot be given to SFBD"),
    (dict(resume="none"), r"\['resume'\] cannot be given to SFBD"),
    (dict(train={"init_from": "x"}), r"\['init_from'\] cannot be given to SFBD"),
    (dict(bogus=1), r"unknown config field\(s\) \['bogus'\]; SFBD fields: .*'tau'.*training fields"),
])
def test_bad_config_fails_before_any_work(tmp_path, changes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        run(dict(TINY, out=str(tmp_path / "out"), **changes))
    assert not (tmp_path / "out").exists()


def test_config_from_a_toml_file_with_flags_over_it(tmp_path):
    path = tmp_path / "sfbd.toml"
    path.write_text('[sfbd]\ntau = 0.25\nrounds = 3\n[train]\nbatch_size = 16\nlr = 1e-3\n')
    cfg = make_sfbd_config(str(path), rounds=5, channels="16,32")
    assert (cfg.tau, cfg.rounds, cfg.train.batch_size, cfg.train.channels) == (0.25, 5, 16, (16, 32))


# ---- the run end to end --------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny rounds run to the end (in-process)."""
    out = tmp_path_factory.mktemp("sfbd") / "run"
    result = run(dict(TINY, out=str(out)), device="cpu")
    return out, result


def test_each_stage_summary_holds_the_frechet_distance_of_its_ema_samples(tmp_path):
    from symfast.metrics import frechet_distance
    from symfast.samplers.api import sample
    out = tmp_path / "run"
    result = run(dict(TINY, rounds=1, fd_samples=12, data_seed=3, out=str(out)), device="cpu")
    assert [s["stage"] for s in result.summaries] == ["pretrain", "round 1"]
    from symfast.train.build import build_dataset
    clean = build_dataset(make_sfbd_config(dict(TINY, out=str(out))).train).images  # all 160
    for stage, folder in zip(result.summaries, (out / "pretrain", out / "round-1")):
        assert json.loads((folder / "summary.json").read_text())["fd"] == stage["fd"]
        denoiser, _ = load(folder)
        x = sample(denoiser, (12, 1, 8, 8), sampler="heun", steps=18, seed=3, progress=False)
        assert stage["fd"] == frechet_distance(x.clamp(-1, 1), clean, "pixels") > 0
    # not an experiment field: the finished run, asked again without it, redoes nothing
    again = run(dict(TINY, rounds=1, data_seed=3, out=str(out)), device="cpu")
    assert again.summaries == result.summaries


def test_rounds_write_every_stage_and_the_backward_step_is_the_pf_ode(finished):
    out, result = finished
    assert [s["stage"] for s in result.summaries] == ["pretrain", "round 1", "round 2"]
    assert result.checkpoint == checkpoint.latest(out / "round-2").path
    for k in (1, 2):
        found = shards(out / f"round-{k}" / "denoised")
        assert len(found) == 9
        index = torch.cat([s["index"] for s in found.values()])
        assert torch.equal(index, torch.arange(144))
        assert all(s["x"].shape[1:] == (1, 8, 8) for s in found.values())
        summary = json.loads((out / f"round-{k}" / "summary.json").read_text())
        assert summary["denoised_mse"] > 0 and summary["backward_seconds"] > 0
        assert checkpoint.latest(out / f"round-{k}").step == TINY["steps_per_round"]
    assert checkpoint.latest(out / "pretrain").step == TINY["pretrain_steps"]
    # round 1's set is the pretrained EMA model's PF-ODE from tau on the fixed noisy images
    from symfast import denoise
    cfg = make_sfbd_config(dict(TINY))
    mixture = gaussian_mixture("d4", size=8, channels=1, seed=0)
    data = mixture.dataset(160, seed=0)
    _, noisy_idx = clean_split(160, TINY["clean_fraction"], 0)
    y = NoisyDataset(data, cfg.tau, 0, noisy_idx).get_batch(torch.arange(16, 32))
    denoiser, _ = load(out / "pretrain")
    expected = denoise(denoiser, y, cfg.tau, steps=cfg.denoise_steps)  # the mixture: not clipped
    assert torch.equal(shards(out / "round-1" / "denoised")["shard-00001.safetensors"]["x"], expected)
    # the denoised images are closer to the clean ones than the noisy ones are
    clean = data.images[noisy_idx]
    denoised = torch.cat([s["x"] for s in shards(out / "round-1" / "denoised").values()])
    assert (denoised - clean).pow(2).mean() < 0.9 * TINY["tau"] ** 2


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    """The same run through the CLI in a child process with one thread, as the runs it is
    compared with bit for bit (the thread count changes how some kernels add up)."""
    out = tmp_path_factory.mktemp("sfbd-cli") / "run"
    run_cli(out)
    return out


def test_each_round_starts_from_the_previous_ema_weights(tmp_path, finished):
    """init_from: the fine-tuning run's first weights are the previous stage's EMA weights."""
    from symfast.train import train
    out, _ = finished
    result = train(dict(TINY_TRAIN, out=str(tmp_path / "ft"), steps=1, lr=1e-30, warmup_steps=0,
                        init_from=str(out / "pretrain"), ema_rampup=None))
    source = checkpoint.latest(out / "pretrain").tensors
    for name, value in result.model.state_dict().items():
        assert torch.equal(value, source["ema.0." + name]), name
    with pytest.raises(ValueError, match="channels"):
        train(dict(TINY_TRAIN, channels=(8, 16), out=str(tmp_path / "ft2"), steps=1,
                   init_from=str(out / "pretrain")))


TINY_TRAIN = {k: v for k, v in TINY.items() if k in ("data", "image_size", "channels",
                                                      "dataset_size", "batch_size", "log_every",
                                                      "progress")}


def test_a_finished_run_redoes_nothing_and_a_damaged_shard_is_redone(tmp_path, finished):
    source, _ = finished
    out = tmp_path / "run"
    shutil.copytree(source, out)
    before = shards(out / "round-2" / "denoised")
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    result = run(dict(TINY, out=str(out)), device="cpu")
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten
    assert [s["stage"] for s in result.summaries] == ["pretrain", "round 1", "round 2"]
    # round 2 unfinished, one shard torn and one gone: those two are denoised again, equal
    (out / "round-2" / "summary.json").unlink()
    damaged = shard_path(out / "round-2" / "denoised", 3)
    damaged.write_bytes(damaged.read_bytes()[:100])
    shard_path(out / "round-2" / "denoised", 7).unlink()
    kept = shard_path(out / "round-2" / "denoised", 0).stat().st_mtime_ns
    run(dict(TINY, out=str(out)), device="cpu")
    after = shards(out / "round-2" / "denoised")
    assert sorted(after) == sorted(before)
    for name in before:
        assert torch.equal(after[name]["x"], before[name]["x"]), name
    assert shard_path(out / "round-2" / "denoised", 0).stat().st_mtime_ns == kept


def test_another_experiment_in_the_same_folder_is_refused(tmp_path, finished):
    source, _ = finished
    out = tmp_path / "run"
    shutil.copytree(source, out)
    with pytest.raises(ValueError, match="tau: 0.3 vs 0.5"):
        run(dict(TINY, out=str(out), tau=0.3), device="cpu")
    # training settings that change the result too: a rerun with them fine-tuned the next stage
    # with the new ones and rewrote sfbd.json to claim them for the stages before
    record = (out / "sfbd.json").read_text()
    for change, name in ((dict(weight_decay=0.5), "train.weight_decay"), (dict(p_mean=1.0), "train.p_mean"),
                         (dict(lr_schedule="cosine"), "train.lr_schedule"),
                         (dict(ema_halflife_images=(100.0,)), "train.ema_halflife_images"),
                         (dict(precision="bf16"), "train.precision")):
        with pytest.raises(ValueError, match=f"mismatching fields .*{name}"):
            run(dict(TINY, out=str(out), rounds=3, **change), device="cpu")
    assert (out / "sfbd.json").read_text() == record
    # more rounds is the same experiment, continued
    result = run(dict(TINY, out=str(out), rounds=3), device="cpu")
    assert result.summaries[-1]["stage"] == "round 3"


def _kill_when(out: Path, ready, **changes) -> None:
    """Start the CLI run and SIGKILL it once ``ready(out)`` holds."""
    proc = subprocess.Popen(sfbd_command(out, **changes), env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if ready(out):
                break
        except OSError:  # a folder renamed or removed under the scan
            pass
        time.sleep(0.002)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def _shard_count(folder: Path) -> int:
    return len(list(folder.glob("shard-*.safetensors"))) if folder.is_dir() else 0


def test_sigkill_in_the_backward_and_the_forward_step_then_resume_is_bitwise(tmp_path, cli_reference):
    reference = cli_reference
    out = tmp_path / "killed"
    # in round 1's backward step (a few shards written), then in its forward step
    _kill_when(out, lambda o: _shard_count(o / "round-1" / "denoised") >= 3, denoise_steps=40)
    assert not (out / "round-1" / "summary.json").exists()
    # (the test's first run used 40 denoising steps to be slow enough to catch; the finished
    # shards of that run would be of another experiment, so the folder is refused)
    with pytest.raises(ValueError, match="denoise_steps"):
        run(dict(TINY, out=str(out)), device="cpu")
    shutil.rmtree(out)
    _kill_when(out, lambda o: 1 <= _shard_count(o / "round-1" / "denoised") < 9)
    _kill_when(out, lambda o: any(p.name.startswith("step-")
                                  for p in (o / "round-1" / "checkpoints").glob("step-*")))
    run_cli(out)
    for k in (1, 2):
        a, b = shards(out / f"round-{k}" / "denoised"), shards(reference / f"round-{k}" / "denoised")
        assert sorted(a) == sorted(b)
        for name in a:
            assert torch.equal(a[name]["x"], b[name]["x"]), (k, name)
    assert_bitwise_equal(final_tensors(out / "round-2")[0], final_tensors(reference / "round-2")[0])


def test_two_processes_denoise_the_same_set_bit_for_bit_and_train_the_same_model(tmp_path, cli_reference):
    one, two = cli_reference, tmp_path / "two"  # one process with one thread; two with one each
    two.mkdir()
    shutil.copytree(one / "pretrain", two / "pretrain")  # the same pretrained model
    run_cli(two, nproc=2)
    a, b = shards(one / "round-1" / "denoised"), shards(two / "round-1" / "denoised")
    assert sorted(a) == sorted(b) and len(a) == 9
    for name in a:
        assert torch.equal(a[name]["x"], b[name]["x"]), name
    ta, _ = final_tensors(one / "round-2")
    tb, state = final_tensors(two / "round-2")
    assert state["world_size"] == 2
    for prefix in ("model.", "ema.0."):
        keys = [k for k in ta if k.startswith(prefix)]
        va = torch.cat([ta[k].flatten() for k in keys])
        vb = torch.cat([tb[k].flatten() for k in keys])
        assert rel_err(vb, va) < 1e-4, prefix


# ---- the backward step's noise and range, the stages' EMA and summaries ---------------------

class _ZeroNet(torch.nn.Module):
    """F = 0: the EDM denoiser is c_skip(σ)·x, so a sampler's output is a known multiple of y
    plus whatever noise it injects."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return torch.zeros_like(x)


def _zero_denoiser():
    from symfast import Denoiser
    from symfast.schedules import EDMSchedule
    return Denoiser(_ZeroNet(), prediction="edm", schedule=EDMSchedule())


def _denoise_zero(tmp_path, name, noisy, *, batch=4, sampler="euler_ancestral", **seed):
    """denoise_into_shards with the zero network into one shard of 8: the images, as stored."""
    from symfast.train.distributed import World
    from symfast.train.sfbd import denoise_into_shards
    denoise_into_shards(_zero_denoiser(), noisy, torch.arange(len(noisy)), tmp_path / name,
                        World(), steps=6, sampler=sampler, batch=batch, shard_size=8, **seed)
    return read_shard(shard_path(tmp_path / name, 0))["x"]


def test_a_stochastic_backward_sampler_gives_each_image_its_own_noise(tmp_path):
    from symfast import denoise
    from symfast.data import ImageTensorDataset
    noisy = NoisyDataset(ImageTensorDataset(torch.zeros(8, 1, 4, 4)), 0.5, seed=0)
    x = _denoise_zero(tmp_path, "a", noisy)
    # the output is α·y + the injected noise (linear in y: the network is zero)
    kw = dict(sampler="euler_ancestral", steps=6, seed=123)
    alpha = float((denoise(_zero_denoiser(), torch.ones(1, 1, 4, 4), 0.5, **kw)
                   - denoise(_zero_denoiser(), torch.zeros(1, 1, 4, 4), 0.5, **kw)).mean())
    noise = x - alpha * noisy.get_batch(torch.arange(8))
    assert float(noise.std()) > 1e-3  # (α·y is exact to ~1e-7)
    # image j and j + batch sat in the same slot of two batches: they shared their noise
    for j in range(4):
        assert not torch.allclose(noise[j], noise[j + 4], rtol=0, atol=1e-5), j
    # the noise belongs to (seed, image): the same in another batching, another with another seed
    assert torch.equal(_denoise_zero(tmp_path, "b", noisy, batch=8), x)
    assert torch.equal(_denoise_zero(tmp_path, "c", noisy, seed=0), x)
    assert not torch.allclose(_denoise_zero(tmp_path, "d", noisy, seed=1), x, rtol=0, atol=1e-5)


def test_every_round_and_refresh_draws_other_sampler_noise_for_each_image(tmp_path, monkeypatch):
    """The per-image seeds a run passes to denoise: all different over images, rounds and
    online refreshes, and the same when a run denoises again (a resumed run draws the same)."""
    import symfast.samplers
    from symfast.data import ImageTensorDataset
    calls = []

    def record(denoiser, y, sigma, *, seed=None, **kwargs):
        calls.append(seed)
        return y

    monkeypatch.setattr(symfast.samplers, "denoise", record)
    small = dict(TINY, channels=(8, 16), pretrain_steps=1, steps_per_round=1,
                 denoise_sampler="euler_ancestral")
    dataset = ImageTensorDataset(digits(8).images[:160])

    def drawn(out: Path, **changes) -> list[int]:
        calls.clear()
        run(dict(small, out=str(out), **changes), dataset=dataset, device="cpu")
        assert calls and all(isinstance(c, list) for c in calls), calls[:1]
        return [s for c in calls for s in c]

    rounds = drawn(tmp_path / "rounds")
    assert len(rounds) == 2 * 144 and len(set(rounds)) == len(rounds)
    for k in (1, 2):  # both rounds' backward steps done again
        (tmp_path / "rounds" / f"round-{k}" / "summary.json").unlink()
        shutil.rmtree(tmp_path / "rounds" / f"round-{k}" / "denoised")
    assert drawn(tmp_path / "rounds") == rounds
    # online, 2 segments of 1 step: every image denoised, then half of them again
    shutil.copytree(tmp_path / "rounds" / "pretrain", tmp_path / "online" / "pretrain")
    online = drawn(tmp_path / "online", **dict(ONLINE, rounds=1, steps_per_round=2, refresh_every=1))
    assert len(online) == 144 + 72 and len(set(online)) == len(online)
    assert not set(online) & set(rounds)


def test_denoised_images_are_clipped_to_the_data_range(tmp_path):
    from symfast.data import ImageTensorDataset
    noisy = NoisyDataset(ImageTensorDataset(torch.ones(8, 1, 4, 4)), 1.0, seed=0)
    from symfast import denoise
    raw = denoise(_zero_denoiser(), noisy.get_batch(torch.arange(8)), 1.0, sampler="heun", steps=6)
    assert raw.max() > 1  # the check below sees images that left the range
    assert torch.equal(_denoise_zero(tmp_path, "x", noisy, sampler="heun", clip=(-1.0, 1.0)),
                       raw.clamp(-1, 1))
    assert torch.equal(_denoise_zero(tmp_path, "y", noisy, sampler="heun"), raw)
    # images are in [-1, 1]; the mixture is unbounded (17% of its values outside) and a dataset
    # passed in has no known range
    from symfast.train import make_config
    from symfast.train.build import pixel_range
    ranges = {data: pixel_range(make_config(dict(data=data))) for data in ("digits", "gmm-d4", "custom")}
    assert ranges == {"digits": (-1.0, 1.0), "gmm-d4": None, "custom": None}


def test_a_rounds_ema_ends_near_its_trained_weights(finished):
    """The round's EMA half-life is capped at a tenth of the images it trains on: the EMA that
    denoises and starts the next round has left the previous weights (at TINY's 50-image
    half-life over 48 images it kept half of them)."""
    out, result = finished
    start = checkpoint.latest(out / "pretrain").tensors
    tensors, state = final_tensors(out / "round-1")
    names = [k[len("model."):] for k in tensors
             if k.startswith("model.") and tensors[k].is_floating_point()]
    begin = torch.cat([start["ema.0." + k].flatten() for k in names])
    raw = torch.cat([tensors["model." + k].flatten() for k in names]) - begin
    ema = torch.cat([tensors["ema.0." + k].flatten() for k in names]) - begin
    assert float(ema @ raw / (raw @ raw)) > 0.8
    cap = TINY["steps_per_round"] * TINY["batch_size"] / 10
    assert state["config"]["ema_halflife_images"] == [cap]
    assert result.summaries[1]["ema_halflife_images"] == [cap]
    # a pure function of the config: each half-life capped, the paper's long stages unchanged
    cfg = make_sfbd_config(dict(TINY, batch_size=64, ema_halflife_images=(500000.0, 100.0)))
    from symfast.train.sfbd import stage_ema_halflife_images
    assert stage_ema_halflife_images(cfg, 1000) == (6400.0, 100.0)
    assert stage_ema_halflife_images(cfg, 100000) == (500000.0, 100.0)


def test_a_stage_summary_written_by_a_resumed_run_is_the_uninterrupted_ones(tmp_path, finished):
    """Killed after round 2 trained but before its summary.json: the rerun trains nothing and
    denoises only a missing shard; its summary has the same loss, and a rate over that shard."""
    source, result = finished
    out = tmp_path / "run"
    shutil.copytree(source, out)
    (out / "round-2" / "summary.json").unlink()
    shard_path(out / "round-2" / "denoised", 3).unlink()
    again = run(dict(TINY, out=str(out)), device="cpu").summaries[2]
    before = result.summaries[2]
    for key in ("stage", "loss", "denoised_mse", "ema_halflife_images"):
        assert again[key] == before[key], key
    assert isinstance(before["loss"], float)
    assert again["denoised_per_second"] * again["backward_seconds"] == pytest.approx(TINY["shard_size"])
    (out / "round-2" / "summary.json").unlink()
    assert run(dict(TINY, out=str(out)), device="cpu").summaries[2]["denoised_per_second"] is None


# ---- online mode ---------------------------------------------------------------------------

ONLINE = dict(mode="online", refresh_every=3, refresh_fraction=0.5, ramp_steps=4)


def test_online_mode_refreshes_the_denoised_set_and_resumes_bitwise(tmp_path):
    out = tmp_path / "online"
    run_cli(out, **ONLINE)  # one thread, as the killed run below
    folder = out / "online"
    assert json.loads((folder / "summary.json").read_text())["stage"] == "online"
    assert checkpoint.latest(folder).step == TINY["rounds"] * TINY["steps_per_round"]
    # refresh 0: every noisy image; refreshes 1..3: alternate halves of a seeded permutation
    assert _shard_count(folder / "refresh-0000") == 9
    halves = [torch.cat([s["index"] for s in shards(folder / f"refresh-{j:04d}").values()])
              for j in (1, 2, 3)]
    assert len(halves[0]) == 72 and torch.equal(halves[0], halves[2])
    assert sorted(torch.cat(halves[:2]).tolist()) == list(range(144))
    # refresh 1 is the EMA at step 3's PF-ODE, not the pretrained model's
    first = shards(folder / "refresh-0000")
    x0 = torch.cat([s["x"] for s in first.values()])
    x1 = torch.cat([s["x"] for s in shards(folder / "refresh-0001").values()])
    assert not torch.equal(x1, x0[halves[0]])
    reference = final_tensors(folder)[0]
    killed = tmp_path / "killed"
    _kill_when(killed, lambda o: _shard_count(o / "online" / "refresh-0002") >= 1,
               **ONLINE)
    run_cli(killed, **ONLINE)
    assert_bitwise_equal(final_tensors(killed / "online")[0], reference)


def test_loss_weights_ramp_in_the_denoised_images():
    from symfast.train.sfbd import _WeightedUnion
    union = _WeightedUnion(torch.zeros(3, 1, 2, 2), torch.ones(5, 1, 2, 2), ramp_steps=4)
    w = union.loss_weights(torch.tensor([0, 2, 3, 7]), step=1)
    assert w.tolist() == [1.0, 1.0, 0.5, 0.5]
    assert union.loss_weights(torch.tensor([5]), step=10).tolist() == [1.0]
    assert torch.equal(union.get_batch(torch.tensor([2, 3])), torch.tensor([0.0, 1.0])[:, None, None, None]
                       .expand(2, 1, 2, 2))


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(sfbd_command(tmp_path / "x", clean_fraction=0.01), env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "clean_fraction=0.01" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_a_users_dataset_of_colour_images(tmp_path):
    from symfast.data import ImageTensorDataset
    images = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    values = {k: v for k, v in TINY.items() if k not in ("data", "dataset_size")}
    result = run(dict(values, rounds=1, clean_fraction=0.25, shard_size=64, out=str(tmp_path / "rgb")),
                 dataset=ImageTensorDataset(images), device="cpu")
    assert [s["stage"] for s in result.summaries] == ["pretrain", "round 1"]
    assert shards(tmp_path / "rgb" / "round-1" / "denoised")["shard-00000.safetensors"]["x"].shape == (30, 3, 8, 8)
    denoiser, cfg = load(result.checkpoint)
    assert cfg.data_channels == 3


@pytest.mark.parametrize("equivariance", ["wt", "fa"])
def test_sfbd_with_an_equivariant_model_denoises_equivariantly(tmp_path, equivariance):
    """A WT or FA model through the whole loop: the backward step's shards are the loaded
    model's (equivariant) PF-ODE, so denoising g·y gives g·(the shard) for every g."""
    from symfast import denoise
    from symfast.groups import d4
    from symfast.nn import EquivariantUNet
    config = dict(TINY, rounds=1, equivariance=equivariance, group="d4", out=str(tmp_path / "run"))
    result = run(config, device="cpu")
    assert [s["stage"] for s in result.summaries] == ["pretrain", "round 1"]
    denoiser, cfg = load(tmp_path / "run" / "pretrain")
    assert isinstance(denoiser.model, EquivariantUNet) == (equivariance == "wt")
    data = gaussian_mixture("d4", size=8, channels=1, seed=0).dataset(160, seed=0)
    _, noisy_idx = clean_split(160, TINY["clean_fraction"], 0)
    y = NoisyDataset(data, TINY["tau"], 0, noisy_idx).get_batch(torch.arange(16, 32))
    x = shards(tmp_path / "run" / "round-1" / "denoised")["shard-00001.safetensors"]["x"]
    assert torch.equal(x, denoise(denoiser, y, TINY["tau"], steps=TINY["denoise_steps"]))
    group = d4()
    for k in range(1, len(group)):
        got = denoise(denoiser, group.act(y, k), TINY["tau"], steps=TINY["denoise_steps"])
        assert rel_err(got, group.act(x, k)) < 1e-5


# ---- the refreshed share, the data fingerprint, fd on a finished run, messages --------------

# the smallest run: 80 images of 8x8 (8 clean, 72 noisy in one shard and batch), channels 8,16,
# one step per stage, a 2-step backward grid
SMALL = dict(TINY, channels=(8, 16), dataset_size=80, rounds=1, pretrain_steps=1, steps_per_round=1,
             denoise_steps=2, shard_size=72, denoise_batch=72)


def test_online_refreshes_refresh_the_fraction_asked_for(tmp_path):
    """Each refresh renews round(refresh_fraction·N) images, the next ones of a seeded
    permutation in turn (ceil(1/f) chunks renewed 25% for f = 0.3 and 50% for any f > 0.5)."""
    from symfast.train.sfbd import refresh_positions
    for n, f in ((112, 0.9), (144, 0.3), (144, 0.4), (10, 0.01)):
        m = max(1, round(f * n))
        seen = [refresh_positions(n, f, 0, j) for j in range(1, 2 * n // m + 2)]
        assert all(len(p) == m and len(set(p.tolist())) == m for p in seen), (n, f)
        # taken in turn: the first ceil(n/m) refreshes cover every image, the first floor(n/m)
        # renew no image twice
        assert len(set(torch.cat(seen[:-(-n // m)]).tolist())) == n, (n, f)
        assert len(set(torch.cat(seen[:n // m]).tolist())) == n // m * m, (n, f)
        assert torch.equal(refresh_positions(n, f, 0, 3), seen[2])  # a resumed run: the same
    with pytest.raises(ValueError, match="fraction must be in"):
        refresh_positions(10, 0.0, 0, 1)
    # fraction 1/k with k dividing N: the chunks of the former scheme (order[c::k]), so an online
    # run started before keeps its refresh shards
    from symfast.philox import seeded_generator
    order = torch.randperm(144, generator=seeded_generator(1, "data_seed"))
    for j in (1, 2, 3):
        assert torch.equal(refresh_positions(144, 0.5, 0, j), order[(j - 1) % 2::2].sort().values)
    # the run: two refreshes of 22 = round(0.3·72) images each, one after the other
    out = tmp_path / "online"
    run(dict(SMALL, mode="online", steps_per_round=3, refresh_every=1, refresh_fraction=0.3,
             ramp_steps=1, out=str(out)), device="cpu")
    done = [torch.cat([s["index"] for s in shards(out / "online" / f"refresh-{j:04d}").values()])
            for j in (1, 2)]
    assert [len(d) for d in done] == [22, 22] and not set(done[0].tolist()) & set(done[1].tolist())


def test_another_dataset_in_the_same_folder_is_refused(tmp_path):
    from symfast.data import ImageTensorDataset
    images = digits(8).images[:80]
    out = str(tmp_path / "cust")
    first = run(dict(SMALL, out=out), dataset=ImageTensorDataset(images), device="cpu")
    record = (tmp_path / "cust" / "sfbd.json").read_text()
    assert "data_fingerprint" in json.loads(record)
    # the same shape, the config the same ("custom"): only the images differ
    with pytest.raises(ValueError, match=r"dataset \(passed to run\) differs"):
        run(dict(SMALL, out=out), dataset=ImageTensorDataset(images.flip(-1)), device="cpu")
    assert (tmp_path / "cust" / "sfbd.json").read_text() == record
    # the same images (another tensor) are the same experiment: nothing redone
    again = run(dict(SMALL, out=out), dataset=ImageTensorDataset(images.clone()), device="cpu")
    assert again.summaries == first.summaries


def test_fd_samples_added_to_a_finished_run_is_computed(tmp_path, caplog, monkeypatch):
    out = tmp_path / "run"
    first = run(dict(SMALL, out=str(out)), device="cpu")
    assert all("fd" not in s for s in first.summaries)
    with caplog.at_level("INFO", logger="symfast.sfbd"):
        again = run(dict(SMALL, out=str(out), fd_samples=4), device="cpu")
    assert [s["fd_samples"] for s in again.summaries] == [4, 4]
    assert all(s["fd"] > 0 for s in again.summaries)
    assert "fd_samples=4" in caplog.text
    # kept in the summaries: the same count again computes nothing; another one recomputes
    stamp = (out / "round-1" / "summary.json").stat().st_mtime_ns
    assert run(dict(SMALL, out=str(out), fd_samples=4), device="cpu").summaries == again.summaries
    assert (out / "round-1" / "summary.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "round-1" / "summary.json").read_text())["fd"] == again.summaries[1]["fd"]
    # (the sampling itself stubbed: 70 network calls per stage are most of this test's time)
    from symfast.train.sfbd import _SFBD
    monkeypatch.setattr(_SFBD, "_fd", lambda self, denoiser: {"fd": -1.0, "fd_samples": self.cfg.fd_samples})
    changed = run(dict(SMALL, out=str(out), fd_samples=6), device="cpu").summaries
    assert [(s["fd"], s["fd_samples"]) for s in changed] == [(-1.0, 6)] * 2


def test_evaluate_passed_to_a_finished_run_is_called(tmp_path, caplog):
    """A finished stage is not trained again; an evaluate= its summary has not seen runs on the
    stage's EMA model (from its checkpoint) instead of being silently skipped, once."""
    out = tmp_path / "run"
    first = run(dict(SMALL, out=str(out)), device="cpu")
    seen = []

    def evaluate(denoiser):
        seen.append(denoiser)
        x = torch.zeros(2, 1, 8, 8)
        with torch.no_grad():
            return {"mean_abs": float(denoiser(x, 1.0).abs().mean())}

    with caplog.at_level("INFO", logger="symfast.sfbd"):
        again = run(dict(SMALL, out=str(out)), evaluate=evaluate, device="cpu")
    assert len(seen) == len(first.summaries) == 2
    assert all(s["mean_abs"] > 0 and s["evaluated"] for s in again.summaries)
    assert [s["loss"] for s in again.summaries] == [s["loss"] for s in first.summaries]
    assert "evaluating the finished stage" in caplog.text
    assert run(dict(SMALL, out=str(out)), evaluate=evaluate, device="cpu").summaries == again.summaries
    assert len(seen) == 2


def test_profile_sfbd_checks_tau_against_the_models_noise_levels(tmp_path):
    from symfast.profiling.trace import profile_sfbd
    for tau, match in ((0.001, r"tau=0.001 is outside the schedule's noise levels"),
                       (81.0, r"tau=81.0 is outside .*sigma_max=80"), (-1.0, "tau must be")):
        with pytest.raises(ValueError, match=match):
            profile_sfbd(tmp_path / "prof", tau=tau)
        assert not (tmp_path / "prof").exists()


def test_the_finished_line_is_printed_on_rank_0_only(monkeypatch, capsys, tmp_path):
    import argparse

    import symfast.train.sfbd
    from symfast.cli import _sfbd
    from symfast.train.sfbd import SFBDResult
    for rank, printed in ((0, True), (1, False)):
        result = SFBDResult(tmp_path, tmp_path / "ckpt", [{}], rank=rank)
        monkeypatch.setattr(symfast.train.sfbd, "run", lambda config, **values: result)
        assert _sfbd(argparse.Namespace(command="sfbd", config=None, out=str(tmp_path))) == 0
        assert ("SFBD finished" in capsys.readouterr().out) == printed, rank


def test_online_says_resumed_only_on_a_real_resume(tmp_path, caplog):
    """An uninterrupted online run goes on from its own segments' checkpoints without saying
    "resumed from"; a run started again from a checkpoint says it once."""
    out = tmp_path / "online"
    config = dict(SMALL, mode="online", steps_per_round=4, refresh_every=2, refresh_fraction=0.5,
                  ramp_steps=1, checkpoint_every=2, keep=5, out=str(out))  # 2 segments
    with caplog.at_level("INFO", logger="symfast.train"):
        run(config, device="cpu")
    assert "resumed from" not in caplog.text
    caplog.clear()
    (out / "online" / "summary.json").unlink()
    shutil.rmtree(checkpoint.path_for(out / "online", 4))
    with caplog.at_level("INFO", logger="symfast.train"):
        run(config, device="cpu")
    assert caplog.text.count("resumed from") == 1
