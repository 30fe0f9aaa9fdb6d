"""Triton kernels at GPU sizes: offsets past 2^31 elements, computed in int64.

Each case places its data past 2^31 elements of one large allocation that stays virtual (only
the pages written are touched), with what a wrapped int32 offset would read just before it, and
(where the grid is large) narrows the interpreter's loop over programs to the few that reach
those offsets. The interpreter wraps int32 arithmetic as a GPU does, so the int32 offsets these
kernels had read or wrote the wrong memory here, silently (values off by ~1000). On a CUDA machine
the tensors would be real: the tests run under the interpreter only.
"""
from __future__ import annotations

import builtins
import os

import pytest
import torch

from symfast import _backend

pytestmark = pytest.mark.skipif(
    not (_backend.triton_status()[0] and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs the Triton interpreter (on a GPU these allocations would be real)")

WRAPPED = 1000.0  # what sits where a wrapped offset lands


@pytest.fixture
def only_programs(monkeypatch):
    """only_programs(grid, pids): the interpreter runs just these programs of a 1-D grid."""
    import triton.runtime.interpreter as interp

    def narrow(grid: int, pids: list[int]) -> None:
        monkeypatch.setattr(interp, "range", lambda *a: pids if a == (grid,) else builtins.range(*a),
                            raising=False)
    return narrow


def test_orbit_mean_and_fused_step_of_a_group_acting_on_single_values(only_programs):
    """sign (N = 1): y's row k * M + m passed 2^31 once M (every value of x) passed 2^30, e.g. x
    of shape (80, 16, 1024, 1024)."""
    from symfast.ops import StepCoefficients, fused_step, orbit_mean
    m_rows = 2**30 + 2**20
    first_wrapped = 2**31 - m_rows
    pids = [0, first_wrapped - 1, first_wrapped, m_rows - 1]
    only_programs(m_rows, pids)
    buf = torch.empty(2**31 + 2 * m_rows, dtype=torch.bfloat16)
    buf[:2**22] = WRAPPED
    y = buf[2**31:].view(2, m_rows)
    x = torch.empty(1, m_rows, dtype=torch.bfloat16)
    for m in pids:
        y[0, m], y[1, m], x[0, m] = 2.0, -6.0, 0.0  # the mean of g⁻¹ y_k: (2 + 6) / 2 = 4
    out = orbit_mean(y, "sign", backend="triton")
    assert [out[0, m].item() for m in pids] == [4.0] * 4
    _, denoised = fused_step(x, y, StepCoefficients(c_skip=1.0, c_out=1.0, b=1.0), "sign",
                             backend="triton")
    assert [denoised[0, m].item() for m in pids] == [4.0] * 4


def test_classifier_select_gemms_on_views_with_large_strides():
    """The backward's ds[:, :K].t() has strides (1, K + K·C), and the forward's stacked.t()
    (1, F): the column offsets passed 2^31 (B = 65536, K = 32, C = 1000; K·C·F = 2^31)."""
    from symfast.kernels.classifier_select import _matmul
    row, b, k, f = 2**30 + 16, 3, 4, 8
    big = torch.empty(2**31 + b * row, dtype=torch.bfloat16)
    big[:64] = WRAPPED
    ds = big[2**31:].view(b, row)
    ds[:, :k] = torch.arange(1, b * k + 1, dtype=torch.bfloat16).view(b, k)
    a = ds[:, :k].t()
    h = torch.ones(b, f, dtype=torch.bfloat16)
    assert torch.equal(_matmul(a, h), (a.float() @ h.float()).to(torch.bfloat16))
    del big, ds, a

    features, rows, kd = 2**20, 2049, 32
    big = torch.empty(2**31 + rows * features, dtype=torch.bfloat16)
    big[:kd] = WRAPPED
    stacked = big[2**31:].view(rows, features)
    stacked[:, :kd] = 1.0
    w = stacked[:, :kd].t()
    h = torch.ones(b, kd, dtype=torch.bfloat16)
    assert torch.equal(_matmul(h, w), (h.float() @ w.float()).to(torch.bfloat16))


def test_tied_conv2d_weight_gradient_stencil_of_many_orbits(only_programs, monkeypatch):
    """The weight gradient's stencil in the (C, R, B) layout stores orbit r at r · B·Ho·Wo:
    past 2^31 for (R - 1)·B·Ho·Wo >= 2^31 (flip_h 7x7, R = 28, with B = 304 at 512x512)."""
    from symfast.groups import get
    from symfast.kernels import tied_conv2d as kernels
    from symfast.reference.tied_conv2d import kernel_orbits
    c, h, w, size, pad = 1, 16, 16, 7, 3
    orbits = kernel_orbits(get("flip_h"), (size, size))
    r, hw = orbits.count, h * w
    b = -(-2**31 // ((r - 1) * hw))  # the smallest batch whose last orbit's offset wraps
    only_programs(b * c, [b - 1])  # one program per plane at 16x16: the last sample's
    x = torch.empty(b, c, h, w, dtype=torch.bfloat16)
    x[b - 1] = torch.randn(c, h, w, generator=torch.Generator().manual_seed(0)).bfloat16()
    buf = torch.empty(2**31 + c * r * b * hw, dtype=torch.bfloat16)
    out = buf[2**31:].view(c, r, b, h, w)
    out[:, :, b - 1] = WRAPPED
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *shape, **kw: out if shape == ((c, r, b, h, w),)
                        or shape == (c, r, b, h, w) else empty(*shape, **kw))
    got = kernels.stencil(x, orbits.positions, orbits.offsets, (size, size), (1, 1), (pad, pad),
                          layout="crb")
    monkeypatch.setattr(torch, "empty", empty)
    assert got.data_ptr() == out.data_ptr()
    want = kernels.stencil(x[b - 1:], orbits.positions, orbits.offsets, (size, size), (1, 1),
                           (pad, pad), layout="crb")
    assert torch.equal(got[:, :, b - 1], want[:, :, 0])
