"""The evaluation issue: the shipped digit features and FD, equivariant FD, sampler equivariance,
exported checkpoints, `symfast demo` on the shipped checkpoint (and its bad input), and the
digits experiment's --quick mode."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from symfast import Denoiser
from symfast.data import digits, orbit_augmented
from symfast.demo import DEMO_CHECKPOINT
from symfast.groups import d4
from symfast.metrics import (DIGIT_FEATURES, digit_features, equivariant_fd, frechet_distance,
                             sampler_equivariance, _shipped_classifier)
from symfast.nn import EquivariantUNet, UNet
from symfast.train import CheckpointError, export, load, train

REPO = Path(__file__).resolve().parent.parent


# ---- the shipped digit classifier and FD in its feature space ---------------------------------

def test_shipped_digit_classifier_is_small_and_classifies_held_out_digits():
    assert DIGIT_FEATURES.stat().st_size <= 1_000_000
    record = json.loads(DIGIT_FEATURES.with_suffix(".json").read_text())
    assert record["command"].startswith("python experiments/train_digit_features.py")
    test = digits(16, split="test")
    with torch.no_grad():
        acc = (_shipped_classifier()(test.images).argmax(1) == test.labels).float().mean().item()
    assert acc == pytest.approx(record["held_out_accuracy_upright"], abs=1e-6)
    assert acc > 0.75  # ten classes: chance is 0.1
    assert digit_features(test.images).shape == (len(test), 64)
    # other sizes are resized: the 8x8 digits give nearly the features of their 16x16 resize
    small = digits(8, split="test").images
    assert digit_features(small).shape == (len(test), 64)


def test_digit_fd_ranks_real_digits_above_blurred_and_noise():
    data = orbit_augmented(digits(16, split="train"), "d4").images
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    a, b = data[perm[:1000]], data[perm[1000:2000]]
    same = frechet_distance(a, b)
    blurred = torch.nn.functional.avg_pool2d(a, 3, 1, 1)
    noise = torch.rand(1000, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert 0 <= same < frechet_distance(blurred, b) < frechet_distance(noise, b)


def test_fd_feature_choice_errors():
    with pytest.raises(ValueError, match="single-channel"):
        frechet_distance(torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16))
    with pytest.raises(TypeError, match="features must be"):
        frechet_distance(torch.rand(4, 1, 4, 4), torch.rand(4, 1, 4, 4), features="inception")


def test_equivariant_fd_is_zero_for_an_invariant_set_and_not_for_upright_digits():
    group = d4()
    invariant = orbit_augmented(digits(16, split="test"), group).images
    reference = orbit_augmented(digits(16, split="train"), group).images[:2000]
    result = equivariant_fd(invariant, reference, group)
    assert len(result["fd"]) == 8
    # g permutes an orbit-augmented set: the same features, so every FD is the same
    assert result["spread"] < 1e-6 * max(result["fd"])
    upright = digits(16, split="test").images
    assert equivariant_fd(upright, reference, group)["spread"] > 0.1 * min(result["fd"])
    with pytest.raises(ValueError):
        equivariant_fd(torch.rand(4, 1, 4, 6), torch.rand(4, 1, 4, 6), group)


# ---- sampler equivariance -------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["heun", "euler_ancestral"])
def test_sampler_equivariance_is_exact_for_wt_and_fa_and_not_for_a_plain_unet(sampler):
    torch.manual_seed(0)
    group = d4()
    wt = Denoiser(EquivariantUNet(1, 1, (4, 8), group=group), "edm", group=group)
    fa = Denoiser(UNet(1, 1, (4, 8)), "edm", group=group)
    plain = Denoiser(UNet(1, 1, (4, 8)), "edm")
    for denoiser in (wt, fa):
        assert sampler_equivariance(denoiser, group, sampler, (3, 1, 8, 8), steps=3) < 1e-5
    if sampler == "heun":  # deterministic: a plain model can be measured, and is not equivariant
        assert sampler_equivariance(plain, group, sampler, (3, 1, 8, 8), steps=3) > 1e-3
    x_T = torch.randn(2, 1, 8, 8)
    assert sampler_equivariance(wt, group, sampler, x_T, steps=2) < 1e-5
    # a one-element group: nothing to compare, exactly equivariant
    assert sampler_equivariance(plain, "trivial", sampler, x_T, steps=2) == 0.0


# ---- exported checkpoints -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two finished 3-step runs on 8x8 digits: WT (D4) and a plain UNet."""
    root = tmp_path_factory.mktemp("runs")
    common = dict(data="digits-d4", image_size=8, channels=(4, 8), batch_size=4, steps=3,
                  checkpoint_every=3, progress=False, ema_halflife_images=(50.0, 500.0))
    train(common, equivariance="wt", group="d4", out=str(root / "wt"))
    train(common, out=str(root / "plain"))
    return root


def test_export_keeps_one_ema_copy_and_loads_to_the_same_denoiser(tiny_runs, tmp_path):
    out = export(tiny_runs / "wt", tmp_path / "exported", ema=1)
    exported, cfg = load(out)
    original, _ = load(tiny_runs / "wt", ema=1)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(exported(x, 0.7), original(x, 0.7))
    assert cfg.ema_halflife_images == (500.0,)
    state = json.loads((out / "state.json").read_text())
    assert all(name.startswith("ema.0.") for name in state["tensors"]["names"])
    full = next((tiny_runs / "wt" / "checkpoints").iterdir()) / "tensors.safetensors"
    assert (out / "tensors.safetensors").stat().st_size < full.stat().st_size / 3
    with pytest.raises(ValueError, match="ema must be"):
        export(tiny_runs / "wt", tmp_path / "x", ema=2)
    with pytest.raises(CheckpointError, match="does not exist"):
        export(tmp_path / "nothing", tmp_path / "y")
    # exporting again replaces an exported checkpoint, but nothing else is ever deleted
    assert export(tiny_runs / "wt", out, ema=0) == out
    assert load(out)[1].ema_halflife_images == load(tiny_runs / "wt")[1].ema_halflife_images[:1]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        export(tiny_runs / "wt", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    for inside in (tiny_runs / "wt", tiny_runs / "wt" / "checkpoints", tiny_runs):
        with pytest.raises(ValueError, match="must not be the checkpoint being exported"):
            export(tiny_runs / "wt", inside)
    assert (tiny_runs / "wt" / "checkpoints").is_dir() and (tiny_runs / "wt" / "config.json").exists()
    # an exported checkpoint starts a run (init_from), but cannot be resumed as one
    with pytest.raises(ValueError, match="exported checkpoint"):
        train(data="digits-d4", image_size=8, channels=(4, 8), batch_size=4, steps=1,
              equivariance="wt", group="d4", progress=False, out=str(tmp_path / "r"),
              resume=str(out))
    train(data="digits-d4", image_size=8, channels=(4, 8), batch_size=4, steps=1,
          equivariance="wt", group="d4", progress=False, out=str(tmp_path / "r"), init_from=str(out))


def test_export_never_writes_over_a_training_checkpoint_and_resume_names_the_ema_count(tiny_runs, tmp_path):
    import shutil
    run = tmp_path / "wt"
    shutil.copytree(tiny_runs / "wt", run)
    newest = sorted((run / "checkpoints").iterdir())[-1]
    older = run / "checkpoints" / "step-000000001"
    shutil.copytree(newest, older)  # another training checkpoint of the run
    before = {p.name: p.read_bytes() for p in older.iterdir()}
    with pytest.raises(ValueError, match="holds a training checkpoint; refusing to replace it"):
        export(newest, older)
    assert {p.name: p.read_bytes() for p in older.iterdir()} == before
    # an empty checkpoint slot: resume='auto' would take the export for the newest checkpoint
    with pytest.raises(ValueError, match="is a checkpoint slot of a run"):
        export(newest, run / "checkpoints" / "step-000000009")
    assert not (run / "checkpoints" / "step-000000009").exists()
    # one EMA copy per half-life: resuming two copies as one named the field, not a state_dict dump
    with pytest.raises(ValueError, match=r"ema_halflife_images: 1 EMA copies \(50.0,\) vs 2"):
        train(data="digits-d4", image_size=8, channels=(4, 8), batch_size=4, steps=4,
              checkpoint_every=3, progress=False, equivariance="wt", group="d4", out=str(run),
              ema_halflife_images=(50.0,))


def test_export_cli_then_demo_on_the_exported_checkpoint(tiny_runs, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "symfast", "export", str(tiny_runs / "wt"),
                           str(tmp_path / "small"), "--ema", "1"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "small" / "state.json").read_text())["exported_from"]["ema"] == 1
    from symfast import demo
    summary = demo.run(tmp_path / "out", checkpoint=tmp_path / "small", n=2, steps=2)
    assert summary["model"] == "EquivariantUNet" and summary["sampler_equivariance_error"] < 1e-5
    done = subprocess.run([sys.executable, "-m", "symfast", "export", str(tiny_runs / "wt"),
                           str(tmp_path / "bad"), "--ema", "5"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "ema must be" in done.stderr and not (tmp_path / "bad").exists()


# ---- the demo -------------------------------------------------------------------------------

def test_shipped_demo_checkpoint_is_small_and_records_how_it_was_made():
    files = list(DEMO_CHECKPOINT.iterdir())
    assert sum(f.stat().st_size for f in files) <= 5_000_000
    state = json.loads((DEMO_CHECKPOINT / "state.json").read_text())
    assert state["config"]["equivariance"] == "wt" and state["config"]["group"] == "d4"
    assert state["command"].startswith("python experiments/digits_d4.py")
    denoiser, cfg = load(DEMO_CHECKPOINT)
    assert isinstance(denoiser.model, EquivariantUNet) and cfg.image_size == 16


def test_demo_on_the_shipped_checkpoint_samples_digits_and_is_equivariant(tmp_path):
    from symfast import demo
    summary = demo.run(tmp_path / "out", n=8, steps=6)
    assert summary["sampler_equivariance_error"] < 1e-5
    assert summary["denoise"]["equivariance_error"] < 1e-5
    assert summary["denoise"]["psnr_denoised"] > summary["denoise"]["psnr_noisy"] + 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["denoise.png", "samples.png",
                                                                     "summary.json"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    from PIL import Image
    grid = Image.open(tmp_path / "out" / "samples.png")
    assert grid.size == (3 * (3 * 17 + 1), 3 * (3 * 17 + 1))  # 3x3 digits of 16+1 pixels, x3


def _demo_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "symfast", "demo", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_demo_cli_writes_its_files_and_prints_the_table(tmp_path):
    done = _demo_cli("--n", "4", "--steps", "4", "--out", "d", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "sampler equivariance error" in done.stdout and "PSNR" in done.stdout
    assert (tmp_path / "d" / "samples.png").exists()


def test_demo_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, tiny_runs):
    (tmp_path / "not-a-checkpoint").mkdir()
    (tmp_path / "not-a-checkpoint" / "state.json").write_text('{"hello": 1}')
    done = _demo_cli("--checkpoint", "not-a-checkpoint", "--out", "d1", cwd=tmp_path)
    assert done.returncode == 2 and "not a symfast checkpoint" in done.stderr
    done = _demo_cli("--checkpoint", str(tiny_runs / "plain"), "--out", "d2", cwd=tmp_path)
    assert done.returncode == 2 and "without a group" in done.stderr
    (tmp_path / "a-file").write_text("x")
    done = _demo_cli("--out", "a-file/sub", cwd=tmp_path)
    assert done.returncode == 2 and "out='a-file/sub' cannot be written" in done.stderr
    done = _demo_cli("--device", "cuda" if not torch.cuda.is_available() else "tpu", "--out", "d4",
                     cwd=tmp_path)
    assert done.returncode == 2 and "device=" in done.stderr and "Traceback" not in done.stderr
    for folder in ("d1", "d2", "d4"):  # the checks run before the folder is made
        assert not (tmp_path / folder).exists()
    from symfast import demo
    with pytest.raises(ValueError, match="n must be"):
        demo.run(tmp_path / "d3", n=0)
    with pytest.raises(ValueError, match="sigma must be"):
        demo.run(tmp_path / "d3", sigma="0.5")
    # the model's range, checked before sampling (0.001 passed a (0, 80) check, sampled 64
    # digits, then failed in denoise and left an empty folder)
    for sigma in (-1.0, 0.001, 81.0):
        with pytest.raises(ValueError, match=r"outside the schedule's range \[0.002, 80\]"):
            demo.run(tmp_path / "d3", sigma=sigma)
    assert not (tmp_path / "d3").exists()


# ---- the digits experiment, end to end in --quick mode ----------------------------------------

def test_digits_experiment_quick(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "experiments" / "digits_d4.py"), "--quick",
                           "--eval-seeds", "2", "--out", str(tmp_path / "runs"),
                           "--results", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "results" / "digits_d4_quick.json").read_text())
    table = result["table"]
    assert set(table) == {"plain", "augment", "FA", "WT", "Reg", "floor"}
    for name in ("FA", "WT"):  # exact by construction, at any training budget
        assert table[name]["sampler_equivariance"] < 1e-5
        assert table[name]["denoise_equivariance"] < 1e-5
    assert table["plain"]["sampler_equivariance"] > 1e-4
    assert all(table[n]["fd"] > 0 for n in table)
    assert (tmp_path / "results" / "digits_d4_quick.png").exists()


def _python(*args: str) -> str:
    """stdout of a fresh ``python ARGS`` (a new process: what it imports is its own), which must
    succeed."""
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_does_not_import_torch():
    # `symfast --help` (and `symfast` with a typo'd command) answer at once: torch is imported only
    # by the command that runs
    out = _python("-c", "import sys, symfast.cli as c\n"
                  "try:\n    c.main(['--help'])\nexcept SystemExit as e:\n    code = e.code\n"
                  "print(code, 'torch' in sys.modules)")
    assert out.splitlines()[-1] == "0 False"
    assert "train" in out and "demo" in out and "profile" in out
    # a subcommand's own help still lists its flags
    assert "--equivariance" in _python("-m", "symfast", "train", "--help")


def test_package_attributes_are_the_documented_functions():
    # symfast.symmetrize is the function whichever module was imported first (a submodule of the
    # same name would replace it on the package once imported)
    code = ("import symfast, symfast.nn, symfast.denoiser; from symfast import Denoiser, sample; "
            "print(symfast.symmetrize.__name__, callable(symfast.symmetrize), "
            "symfast.equivariance_error.__name__, symfast.sample.__module__)")
    assert _python("-c", code).split() == ["symmetrize", "True", "equivariance_error",
                                           "symfast.samplers.api"]


def test_import_is_light_and_the_documented_namespaces_are_reachable():
    """`import symfast` must not import torch._dynamo (4.7 s here) or the lazily reached packages;
    each documented namespace is an attribute of the package."""
    code = ("import sys, symfast; heavy = [m for m in ('torch._dynamo', 'sklearn', 'symfast.train', "
            "'symfast.models', 'PIL') if m in sys.modules]; print(heavy); "
            "print(symfast.models.CABCNN.__name__, symfast.data.digits.__name__, "
            "symfast.metrics.frechet_distance.__name__, symfast.attention_dynamics.__name__, "
            "symfast.integrations.__name__, symfast.train.load.__name__)")
    assert _python("-c", code).splitlines() == ["[]", "CABCNN digits frechet_distance "
                                                "symfast.attention_dynamics symfast.integrations load"]
