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
from symfast.reference.tied_conv2d import kernel_orbits
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


def _run(op: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """op's outputs at the README's size (the small one can be too small for a team), and its
    input gradients for the trained ops."""
    case = cases.make_case(op, "readme", dtype, "cpu", seed=seed)
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
    return {k: after[k] - before[k] for k in ("team_regions", "busy_regions", "solo_regions")}


def _same_bits_alone(run) -> None:
    """run() -> tensors: the same bits on teams and with every region alone."""
    before = cpu_team_record()
    on_team = run()
    # at least one region on a team (on a busy machine the rest may already go alone)
    assert _delta(before, cpu_team_record())["team_regions"] >= 1
    cpu_team_solo_for(60_000)
    before = cpu_team_record()
    alone = run()
    assert _delta(before, cpu_team_record())["solo_regions"] >= 1
    assert torch.get_num_threads() == 2
    for a, b in zip(on_team, alone, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", cases.OPS)
def test_alone_gives_the_same_bits(op, dtype, two_threads):
    """Every op, forward and backward, gives the same bits on a team and on one thread. float64
    takes tied_conv2d's routes with a GEMM per sample inside the region (MKL on one thread in
    both: nested in the team, or with the team size set to 1 alone)."""
    _same_bits_alone(lambda: _run(op, dtype=dtype))


def test_tied_conv2d_small_planes_alone_give_the_same_bits(two_threads):
    """8x8 planes: a stencil region, then one GEMM over the whole batch between regions, which
    keeps torch's thread count alone too (MKL splits its long inner dimension over threads, so
    one thread gave other bits: found by running tests/test_tied_conv2d.py on a busy machine)."""
    gen = torch.Generator().manual_seed(12)
    orbits = kernel_orbits("d4", (3, 3))
    x = torch.randn(37, 33, 8, 8, generator=gen)
    grad_out = torch.randn(37, 32, 8, 8, generator=gen)
    weight = torch.randn(32, 33, orbits.count, generator=gen)
    args = (grad_out, x, weight, orbits.positions, orbits.offsets, 3, 3, 1, 1, 1, 1,
            [True, True, True])
    _same_bits_alone(lambda: list(torch.ops.symfast.tied_conv2d_backward_cpu(*args)))


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
            if _delta(before, cpu_team_record())["solo_regions"] >= 3:
                break
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    seen = _delta(before, cpu_team_record())
    assert seen["busy_regions"] >= 2 and seen["solo_regions"] >= 3, seen
