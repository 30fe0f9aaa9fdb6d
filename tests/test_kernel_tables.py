"""The Triton launchers check an index table once, not on every call (each check reads the
table's min/max: a device sync on a GPU), and check it again when it changes in place."""
import pytest
import torch

from conftest import device_for
from symfast import _backend, groups

pytestmark = pytest.mark.skipif(not _backend.triton_status()[0], reason="triton not importable")


def _count_checks(monkeypatch):
    from symfast.kernels import _tables

    calls = []
    real = _tables.check_once
    # a fresh record: tables validated by tests that ran before would not be checked again
    monkeypatch.setattr(_tables, "_validated", type(_tables._validated)())

    def counting(table, context, check):
        def counted():
            calls.append(context)
            check()
        real(table, context, counted)
    for name in ("group_average", "tied_conv2d"):
        module = __import__(f"symfast.kernels.{name}", fromlist=["check_once"])
        monkeypatch.setattr(module, "check_once", counting)
    return calls


def test_orbit_tables_checked_once_and_again_after_an_in_place_change(monkeypatch):
    from symfast.kernels import group_average as kernels

    calls = _count_checks(monkeypatch)
    dev = device_for("triton")
    table, inverse = groups.get("d4").tables((5, 5), dev)
    x = torch.randn(3, 25, device=dev)
    first = kernels.orbit(x, table)
    for _ in range(3):
        assert torch.equal(kernels.orbit(x, table), first)
    assert len(calls) == 1
    bad = table.clone()
    bad[2, 7] = 25  # a fresh (unchecked) table: refused
    with pytest.raises(ValueError, match="outside"):
        kernels.orbit(x, bad)
    good = table.clone()
    kernels.orbit(x, good)
    good[1, 0] = -26  # -t-1 = 25: outside, written into a table already checked
    with pytest.raises(ValueError, match="outside"):
        kernels.orbit(x, good)
    # the same table against a narrower input is a new check
    with pytest.raises(ValueError, match="outside"):
        kernels.orbit(torch.randn(3, 24, device=dev), table)


def test_tied_conv_tables_checked_once_per_table(monkeypatch):
    from symfast.ops import tied_conv2d

    calls = _count_checks(monkeypatch)
    dev = device_for("triton")
    x = torch.randn(2, 3, 6, 6, device=dev, requires_grad=True)
    w = torch.randn(4, 3, 3, device=dev, requires_grad=True)
    for _ in range(3):
        tied_conv2d(x, w, None, 3, "d4", 1, 1, backend="triton").sum().backward()
    assert len(calls) == 2  # positions and offsets, once each over 3 forward + backward calls
