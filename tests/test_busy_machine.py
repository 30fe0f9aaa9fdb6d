"""The C++ kernels on a busy machine (csrc/cpu/symfast_module.h, parallel_team).

When another process keeps a core, the kernels run their parallel regions and their whole calls on
the calling thread alone for a while. That must change no bit of any result, must give the caller
its thread count back (also when the op raises), and must actually happen when the cores are busy:
checked here with real spinning processes on every core, not a mock.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import symfast.ops as ops
from symfast._ext import cpu_team_record, cpu_team_solo_for, load_cpu_kernels
from symfast.profiling import cases

pytestmark = pytest.mark.skipif(not load_cpu_kernels("group_average"),
                                reason="the CPU kernels are not built")

# Ops whose backward the training loop runs (the others run in sampling, forward only).
TRAINED = ("group_norm_silu", "tied_conv2d", "attention_pool", "classifier_select")


@pytest.fixture
def two_threads():
    """Two threads for the test (teams need them), the record's back-off cleared before and after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    cpu_team_solo_for(0)
    try:
        yield
    finally:
        cpu_team_solo_for(0)
        torch.set_num_threads(before)


def _run(op: str, seed: int = 0):
    """op's outputs at the README's size (the small one can be too small for a team), and its
    input gradients for the trained ops."""
    case = cases.make_case(op, "readme", torch.float32, "cpu", seed=seed)
    args = [a.detach().requires_grad_() if op in TRAINED and isinstance(a, torch.Tensor)
            and a.is_floating_point() else a for a in case.args]
    out = getattr(ops, op)(*args, backend="cpu", **case.kwargs)
    outs = list(out) if isinstance(out, tuple) else [out]
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if inputs:
        gen = torch.Generator().manual_seed(seed + 1)
        grad_out = torch.randn(outs[0].shape, generator=gen)
        outs += list(torch.autograd.grad(outs[0], inputs, grad_out))
    return [o.detach() for o in outs if o is not None]


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in ("team_regions", "busy_regions", "solo_calls")}


@pytest.mark.parametrize("op", cases.OPS)
def test_alone_gives_the_same_bits(op, two_threads):
    """Every op, forward and backward, gives the same bits on a team and on one thread."""
    before = cpu_team_record()
    on_team = _run(op)
    teamed = _delta(before, cpu_team_record())
    assert teamed["team_regions"] >= 1 and teamed["solo_calls"] == 0, teamed
    cpu_team_solo_for(60_000)
    before = cpu_team_record()
    alone = _run(op)
    assert _delta(before, cpu_team_record())["solo_calls"] >= 1
    assert torch.get_num_threads() == 2
    for a, b in zip(on_team, alone, strict=True):
        assert torch.equal(a, b)


def test_thread_count_restored_when_an_op_raises(two_threads):
    """An op that raises inside a call run alone leaves the caller's thread count as it was."""
    x = torch.randn(3, 8)
    table = torch.arange(8, dtype=torch.int32).view(1, 8).repeat(2, 1)
    bad_out = torch.empty(5)
    cpu_team_solo_for(60_000)
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        torch.ops.symfast.orbit_out_cpu(x, table, bad_out)
    assert torch.get_num_threads() == 2
    torch.ops.symfast.orbit_out_cpu(x, table, out := torch.empty(2, 3, 8))
    assert torch.equal(out, x.unsqueeze(0).expand(2, 3, 8))


def test_solo_for_rejects_bad_ms():
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="ms"):
            cpu_team_solo_for(bad)


@pytest.mark.skipif(sys.platform != "linux", reason="thread CPU clocks as on Linux")
def test_busy_cores_are_noticed(two_threads):
    """With a spinning process on every core, the kernels find the machine busy and run alone,
    and their results keep their bits. Bounded by 20 s of trying; on a loaded core the second
    thread loses about half of each region, twice the threshold, so it is found in the first few."""
    quiet = _run("orbit")
    before = cpu_team_record()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(os.cpu_count() or 2)]
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            loaded = _run("orbit")
            for a, b in zip(quiet, loaded, strict=True):
                assert torch.equal(a, b)
            if _delta(before, cpu_team_record())["solo_calls"] >= 3:
                break
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    seen = _delta(before, cpu_team_record())
    assert seen["busy_regions"] >= 2 and seen["solo_calls"] >= 3, seen
