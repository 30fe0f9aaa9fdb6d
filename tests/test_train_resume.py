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

from _train_util import (assert_bitwise_equal, child_env, final_tensors, metrics_rows, run_train,
                         train_command)
from symfast.train import checkpoint

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
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: torchrun and its ranks
    proc.wait(timeout=60)


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


def _write(run_dir, step, value=1.0):
    tensors = {"model.w": torch.full((4, 4), value), "ema.0.w": torch.zeros(4)}
    return checkpoint.save(run_dir, step, tensors, {"nimg": step}, keep=None)


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
        checkpoint.save(tmp_path, step, {"model.w": torch.ones(2)}, {"nimg": step}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000000004",
                                                                      "step-000000005"]
    root = tmp_path / "checkpoints"
    (root / ".step-000000006.tmp-deadbeef").mkdir()
    (root / ".trash-step-000000003-cafef00d").mkdir()
    assert len(checkpoint.clean_leftovers(tmp_path)) == 2
    assert {p.name for p in root.iterdir()} == {"step-000000004", "step-000000005"}
