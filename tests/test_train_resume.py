"""Nothing lost: a training run killed with SIGKILL at any moment (also while it writes a
checkpoint), then resumed, ends bitwise equal to the same run left alone; torn checkpoints are
skipped, never loaded half."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
import torch

from _train_util import (DIGITS, assert_bitwise_equal, child_env, final_tensors, metrics_rows,
                         run_command, run_train, sigkill_inside_write, sigkill_tree, symfast_command,
                         train_command)
from symfast.train import checkpoint, load, train

STEPS = 40
FLAGS = ("--checkpoint-every", "3", "--keep", "2")


def _checkpoint_folders(run_dir):
    root = run_dir / "checkpoints"
    return {p.name for p in os.scandir(root)} if root.is_dir() else set()


def _start(out, nproc):
    return subprocess.Popen(train_command(out, STEPS, *FLAGS, nproc=nproc), env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _kill(proc) -> None:
    sigkill_tree(proc)  # torchrun and its ranks


def _kill_during_write(out, nproc, attempts: int = 6) -> bool:
    """Start the run and SIGKILL it the moment a temporary checkpoint folder exists; True once a
    kill left one behind (the writer died mid-write)."""
    for _ in range(attempts):
        proc = _start(out, nproc)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if any(name.startswith(".step-") for name in _checkpoint_folders(out)):
                _kill(proc)
                break
        else:
            proc.kill()
            proc.wait()
        assert proc.returncode != 0, "the run finished before it could be killed"
        if any(name.startswith(".step-") for name in _checkpoint_folders(out)):
            return True
    return False


def _kill_at_random(out, nproc, rng: random.Random) -> None:
    """Start the run, wait for it to write a new checkpoint, SIGKILL it a random moment later."""
    before = _checkpoint_folders(out)
    proc = _start(out, nproc)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if _checkpoint_folders(out) - before:
            break
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.25))
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
    _kill(proc)


def _interrupted_run(out, nproc, seed):
    rng = random.Random(seed)
    _kill_at_random(out, nproc, rng)
    assert _kill_during_write(out, nproc), "no SIGKILL landed inside a checkpoint write"
    _kill_at_random(out, nproc, rng)
    resumed_from = checkpoint.latest(out).step
    assert 0 < resumed_from < STEPS
    run_train(out, STEPS, *FLAGS, nproc=nproc)


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkilled_run_resumes_bitwise_equal(tmp_path, nproc):
    """Uninterrupted vs killed three times (once inside a checkpoint write) and resumed each
    time: the same weights, EMA, optimiser state and logged losses, bit for bit."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_train(whole, STEPS, *FLAGS, nproc=nproc)
    _interrupted_run(broken, nproc, seed=nproc)
    a, state_a = final_tensors(whole)
    b, state_b = final_tensors(broken)
    assert state_a["step"] == state_b["step"] == STEPS
    assert state_a["nimg"] == state_b["nimg"]
    assert_bitwise_equal(a, b)
    rows_a, rows_b = metrics_rows(whole), metrics_rows(broken)
    assert [r["step"] for r in rows_b] == [str(s) for s in range(1, STEPS + 1)]
    for ra, rb in zip(rows_a, rows_b):
        assert (ra["step"], ra["loss"], ra["grad_norm"], ra["lr"]) == \
            (rb["step"], rb["loss"], rb["grad_norm"], rb["lr"])
    # the folder is clean: no temporary or trash folders, only the kept checkpoints
    names = _checkpoint_folders(broken)
    assert names == {"step-000000039", "step-000000040"}, names


def _write(run_dir, step, value=1.0, keep=None):
    tensors = {"model.w": torch.full((4, 4), value), "ema.0.w": torch.zeros(4)}
    return checkpoint.save(run_dir, step, tensors, {"nimg": step, "config": {}}, keep=keep)


def test_torn_and_corrupt_checkpoints_are_skipped_with_a_warning(tmp_path, caplog):
    good = _write(tmp_path, 1)
    truncated = _write(tmp_path, 2)
    flipped = _write(tmp_path, 3)
    no_state = _write(tmp_path, 4)
    missing = _write(tmp_path, 5)
    blob = (truncated / "tensors.safetensors").read_bytes()
    (truncated / "tensors.safetensors").write_bytes(blob[:len(blob) // 2])
    blob = bytearray((flipped / "tensors.safetensors").read_bytes())
    blob[-3] ^= 0xFF
    (flipped / "tensors.safetensors").write_bytes(bytes(blob))
    (no_state / "state.json").unlink()
    (missing / "tensors.safetensors").unlink()
    with caplog.at_level("WARNING", logger="symfast.train"):
        found = checkpoint.latest(tmp_path)
    assert found.path == good and torch.equal(found.tensors["model.w"], torch.ones(4, 4))
    for bad in (truncated, flipped, no_state, missing):
        assert str(bad) in caplog.text
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
        checkpoint.load(truncated)
    with pytest.raises(checkpoint.CheckpointError, match="missing tensors.safetensors"):
        checkpoint.load(missing)
    with pytest.raises(checkpoint.CheckpointError, match="not a symfast checkpoint|no state.json"):
        checkpoint.load(no_state)


def test_a_checkpoint_missing_a_tensor_is_refused(tmp_path):
    import json
    path = _write(tmp_path, 7)
    state = json.loads((path / "state.json").read_text())
    state["tensors"]["names"].append("model.bias")
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(checkpoint.CheckpointError, match="missing tensors.*model.bias"):
        checkpoint.load(path)


def test_keep_prunes_oldest_and_leftovers_are_cleaned(tmp_path):
    for step in range(1, 6):
        _write(tmp_path, step, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000000004",
                                                                      "step-000000005"]
    root = tmp_path / "checkpoints"
    (root / ".step-000000006.tmp-deadbeef").mkdir()
    (root / ".trash-step-000000003-cafef00d").mkdir()
    assert len(checkpoint.clean_leftovers(tmp_path)) == 2
    assert {p.name for p in root.iterdir()} == {"step-000000004", "step-000000005"}


def test_keep_never_prunes_the_checkpoint_just_written(tmp_path):
    # a later step's checkpoint (of an abandoned run) is not the writer's to prune, nor a
    # reason to prune the one it has just written
    _write(tmp_path, 6)
    for step in (2, 3, 4):
        _write(tmp_path, step, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "step-000000003", "step-000000004", "step-000000006"]


def _train_digits(out, steps, *extra):
    return run_command(symfast_command("train", *DIGITS, "--steps", str(steps), "--out", str(out),
                                       *extra))


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(tmp_path):
    """Branching from step 2 of a 6-step run in the same folder: the old steps 4 and 6 (and
    their grids) move into one abandoned-after-step folder, named in the log, and the new run's
    checkpoints are its newest, for resume='auto', load() and a prune alike."""
    out = tmp_path / "run"
    grids = ("--sample-every", "2", "--sample-n", "1", "--sample-steps", "1")
    _train_digits(out, 6, "--checkpoint-every", "2", "--keep", "3", *grids)
    old_four = (out / "checkpoints" / "step-000000004" / "tensors.safetensors").read_bytes()
    branch = _train_digits(out, 4, "--checkpoint-every", "1", "--keep", "3", "--lr", "2e-3", *grids,
                           "--resume", str(out / "checkpoints" / "step-000000002"))
    assert [p.name for p in checkpoint.list_checkpoints(out)] == [
        "step-000000002", "step-000000003", "step-000000004"]
    (aside,) = out.glob("abandoned-after-step-000000002-*")
    assert str(aside) in branch.stderr and "step-000000006" in branch.stderr
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step-000000004",
                                                                          "step-000000006"]
    assert (aside / "checkpoints" / "step-000000004" / "tensors.safetensors").read_bytes() == old_four
    assert sorted(p.name for p in (aside / "samples").iterdir()) == ["step-000000004.png",
                                                                      "step-000000006.png"]
    assert [r["step"] for r in metrics_rows(aside)][-1] == "6"
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000000002.png",
                                                                    "step-000000004.png"]
    newest = checkpoint.latest(out)
    assert newest.step == 4 and newest.state["config"]["lr"] == 2e-3
    assert load(out)[1].lr == 2e-3
    _train_digits(out, 5, "--checkpoint-every", "1", "--keep", "1", "--lr", "2e-3")
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-000000005"]
    assert checkpoint.latest(out).state["config"]["lr"] == 2e-3


def test_a_grid_lost_to_a_sigkill_is_written_on_resume(tmp_path):
    """SIGKILL inside the write of step 4's sample grid: no checkpoint of step 4 exists yet (the
    grid comes first), so the resumed run redoes step 4, writes the grid the run left alone
    writes, and removes the killed write's temporary."""
    args = [*DIGITS, "--steps", "4", "--checkpoint-every", "2", "--sample-every", "2",
            "--sample-n", "2", "--sample-steps", "2"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_command(symfast_command("train", *args, "--out", str(whole)))
    sigkill_inside_write("step-000000004", "train", *args, "--out", str(broken))
    assert [p.name for p in checkpoint.list_checkpoints(broken)] == ["step-000000002"]
    assert ".step-000000004.png.abcd1234.tmp" in {p.name for p in (broken / "samples").iterdir()}
    run_command(symfast_command("train", *args, "--out", str(broken)))
    names = sorted(p.name for p in (broken / "samples").iterdir())
    assert names == ["step-000000002.png", "step-000000004.png"], names
    for name in names:
        assert (broken / "samples" / name).read_bytes() == (whole / "samples" / name).read_bytes()


@pytest.mark.parametrize("edit", ["no sha256", "no tensors", "no config", "tensors a list",
                                  "bytes a string"])
def test_a_state_json_lacking_a_field_is_skipped_like_a_torn_one(tmp_path, caplog, edit):
    import json
    good = _write(tmp_path, 1)
    bad = _write(tmp_path, 2)
    state = json.loads((bad / "state.json").read_text())
    if edit == "no sha256":
        del state["tensors"]["sha256"]
    elif edit == "no tensors":
        del state["tensors"]
    elif edit == "no config":
        del state["config"]
    elif edit == "tensors a list":
        state["tensors"] = []
    else:
        state["tensors"]["bytes"] = "many"
    (bad / "state.json").write_text(json.dumps(state))
    with caplog.at_level("WARNING", logger="symfast.train"):
        assert checkpoint.latest(tmp_path).path == good
    assert str(bad) in caplog.text
    with pytest.raises(checkpoint.CheckpointError, match="not a complete symfast checkpoint"):
        checkpoint.load(bad)


TINY_DIGITS = dict(data="digits", image_size=8, channels=(8, 16), heads=2, batch_size=8,
                   progress=False)


def _rewrite_tensor(path, name, change):
    """Change one tensor of a checkpoint and refresh its hash, as a checkpoint of another
    model would look."""
    import hashlib
    import json
    from safetensors.torch import load as safetensors_load, save as safetensors_save
    tensors = safetensors_load((path / "tensors.safetensors").read_bytes())
    tensors[name] = change(tensors[name])
    blob = safetensors_save(tensors)
    (path / "tensors.safetensors").write_bytes(blob)
    state = json.loads((path / "state.json").read_text())
    state["tensors"].update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    (path / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("prefix", ["model.", "ema.0.", "optim."])
def test_resuming_a_checkpoint_of_another_shape_names_it(tmp_path, prefix):
    out = tmp_path / "run"
    train(**TINY_DIGITS, steps=2, out=str(out))
    path = checkpoint.latest(out).path
    name = next(k for k, v in checkpoint.load(path).tensors.items() if k.startswith(prefix) and v.dim() > 1)
    _rewrite_tensor(path, name, lambda v: v.reshape(-1))
    with pytest.raises(ValueError, match=f"checkpoint {path} does not fit the model"):
        train(**TINY_DIGITS, steps=3, out=str(out))


def test_changing_steps_under_a_cosine_schedule_is_warned(tmp_path, caplog):
    train(**TINY_DIGITS, steps=2, lr_schedule="cosine", out=str(tmp_path / "cos"))
    train(**TINY_DIGITS, steps=2, out=str(tmp_path / "const"))
    with caplog.at_level("WARNING", logger="symfast.train"):
        train(**TINY_DIGITS, steps=3, out=str(tmp_path / "const"))
        assert "lr_schedule" not in caplog.text
        train(**TINY_DIGITS, steps=3, lr_schedule="cosine", out=str(tmp_path / "cos"))
    assert "steps=3 (it was trained with steps=2) under lr_schedule='cosine'" in caplog.text


@pytest.mark.parametrize("field", ["nimg", "optimizer", "optimizer.scalars", "rng", "data", "lr",
                                   "nonfinite_skipped", "world_size"])
def test_a_checkpoint_lacking_a_field_a_resume_reads_is_skipped_like_a_torn_one(tmp_path, caplog, field):
    # without nimg or optimizer the resume stopped with an error; without the others it resumed
    # with no warning at all
    import json
    out = tmp_path / "run"
    train(**TINY_DIGITS, steps=2, checkpoint_every=1, out=str(out))
    bad = checkpoint.path_for(out, 2)
    state = json.loads((bad / "state.json").read_text())
    table, key = (state["optimizer"], "scalars") if field == "optimizer.scalars" else (state, field)
    del table[key]
    (bad / "state.json").write_text(json.dumps(state))
    with caplog.at_level("WARNING", logger="symfast.train"):
        result = train(**TINY_DIGITS, steps=3, checkpoint_every=1, out=str(out))
    assert f"skipping checkpoint {bad}" in caplog.text and f"no {field}" in caplog.text, caplog.text
    assert "this run continues from step 1" in caplog.text, caplog.text
    assert result.step == 3
    # named, when given as the checkpoint to resume (the run above set it aside, branching)
    (aside,) = out.glob("abandoned-after-step-*/checkpoints/step-000000002")
    with pytest.raises(ValueError, match=f"no {field} .*not a complete symfast training checkpoint"):
        train(**TINY_DIGITS, steps=3, out=str(tmp_path / "other"), resume=str(aside))


def test_resuming_a_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    # (as an older symfast wrote them after a divergence) a run that resumed it named it as the
    # last good checkpoint when it diverged again
    out = tmp_path / "run"
    train(**TINY_DIGITS, steps=2, out=str(out))
    path = checkpoint.latest(out).path
    name = next(k for k in checkpoint.load(path).tensors if k.startswith("model."))
    _rewrite_tensor(path, name, lambda v: torch.full_like(v, float("nan")))
    with pytest.raises(ValueError, match=f"checkpoint {path} holds non-finite weights"):
        train(**TINY_DIGITS, steps=3, out=str(out))


def test_a_resume_trains_with_the_optimiser_settings_and_records_the_images_seen(tmp_path):
    """A resume with another --weight-decay / --adam-betas was warned about and written into the
    config, but trained on with the checkpoint's (the optimiser's saved groups replaced them); after
    one with another batch size, state.json's data position was step x the new batch size."""
    import json
    changed = dict(TINY_DIGITS, weight_decay=0.5, adam_betas=(0.5, 0.9), batch_size=4)
    for out in ("resumed", "plain"):
        train(**TINY_DIGITS, steps=2, out=str(tmp_path / out))
    resumed = train(**changed, steps=4, out=str(tmp_path / "resumed"))
    plain = train(**dict(TINY_DIGITS, batch_size=4), steps=4, out=str(tmp_path / "plain"))
    assert not torch.equal(next(resumed.model.parameters()), next(plain.model.parameters()))
    state = json.loads((checkpoint.latest(tmp_path / "resumed").path / "state.json").read_text())
    assert [(g["weight_decay"], g["betas"]) for g in state["optimizer"]["param_groups"]] \
        == [(0.5, [0.5, 0.9])] * len(state["optimizer"]["param_groups"])
    assert state["nimg"] == 2 * 8 + 2 * 4
    assert (state["data"]["epoch"], state["data"]["offset"]) == divmod(24, state["data"]["dataset_size"])


def test_the_default_attention_level_given_explicitly_resumes(tmp_path):
    """attention_levels None builds the lowest level's attention: [1] for two levels resumed it
    was refused as a mismatch ([1] vs None); another level still is."""
    out = tmp_path / "run"
    train(**TINY_DIGITS, steps=2, out=str(out))
    assert train(**TINY_DIGITS, steps=3, attention_levels=(1,), out=str(out)).step == 3
    with pytest.raises(ValueError, match=r"attention_levels: \[0\] vs \[1\]"):
        train(**TINY_DIGITS, steps=4, attention_levels=(0,), out=str(out))
