"""Training under torchrun with 2 CPU processes (gloo): the same model as one process with the
same global batch, and a clear error for a batch the ranks cannot split. (The SIGKILL resume of a
2-process run is in test_train_resume.py.)"""
from __future__ import annotations

import pytest
import torch

from _train_util import final_tensors, run_train
from conftest import rel_err


@pytest.mark.parametrize("variant", [(), ("--equivariance", "wt")])
def test_two_processes_train_the_same_model_as_one(tmp_path, variant):
    one, two = tmp_path / "one", tmp_path / "two"
    run_train(one, 8, "--checkpoint-every", "8", *variant)
    run_train(two, 8, "--checkpoint-every", "8", *variant, nproc=2)
    a, state_a = final_tensors(one)
    b, state_b = final_tensors(two)
    assert state_b["world_size"] == 2 and state_a["nimg"] == state_b["nimg"] == 64
    for prefix in ("model.", "ema.0.", "optim."):
        keys = sorted(k for k in a if k.startswith(prefix))
        assert keys
        # fp32 reduction order only (DESIGN's fp32 tolerance; measured 3e-6 relative over all
        # weights after 8 AdamW steps at lr 1e-3). Compared as one vector: a tensor whose exact gradient is zero (the key bias of
        # attention, which softmax ignores) is moved by Adam's normalised rounding noise, so
        # alone it differs at ~1e-4 between any two reduction orders.
        flat_a = torch.cat([a[k].double().reshape(-1) for k in keys])
        flat_b = torch.cat([b[k].double().reshape(-1) for k in keys])
        assert rel_err(flat_b, flat_a) <= 1e-5, prefix
        assert not torch.equal(flat_a, flat_b) or prefix == "optim."  # two real runs, not one file


def test_a_batch_the_ranks_cannot_split_is_refused(tmp_path):
    proc = run_train(tmp_path / "run", 2, "--batch-size", "9", nproc=2, check=False)
    assert proc.returncode != 0
    assert "batch_size=9 must be divisible by the number of processes (2)" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_ranks_stop_once_torchrun_is_killed(tmp_path):
    """torchrun starts each rank in a session of its own: a SIGKILL of torchrun alone left both
    ranks training on to the last step, writing checkpoints beside any run started next."""
    import os
    import signal
    import subprocess
    import time

    from _train_util import alive, child_env, process_tree, sigkill_tree, train_command
    out, ranks = tmp_path / "run", []
    proc = subprocess.Popen(train_command(out, 100000, "--checkpoint-every", "1", "--keep", "2", nproc=2),
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not (out / "checkpoints").is_dir():
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        ranks = process_tree(proc.pid)[1:]
        assert len(ranks) >= 2
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's group: not the ranks' sessions
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in ranks), "the ranks trained on without torchrun"
    finally:
        if proc.poll() is None:
            sigkill_tree(proc)
        for pid in ranks:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_resume_under_another_number_of_processes_logs_the_same_rows(tmp_path):
    """The interval's grad-norm sum in a checkpoint was the sum over the saving run's ranks, and
    the resumed run divided it by its own number of ranks: step 4's grad_norm came out 2.76
    instead of 3.48 after a 1 -> 2 process resume."""
    from _train_util import metrics_rows
    flags = ("--checkpoint-every", "3", "--log-every", "2")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_train(whole, 6, *flags)
    run_train(resumed, 6, *flags, "--resume", str(whole / "checkpoints" / "step-000000003"), nproc=2)
    rows = {r["step"]: r for r in metrics_rows(whole)}
    for row in metrics_rows(resumed):
        want = rows[row["step"]]
        for key in ("loss", "grad_norm"):
            assert abs(float(row[key]) - float(want[key])) <= 1e-4 * abs(float(want[key])), (row["step"], key)
