import pytest
import torch
from conftest import TOL, device_for, rel_err

from symfast import groups
from symfast.ops import orbit, orbit_mean
from symfast.reference import group_average as reference

GROUPS = {
    "d4": groups.get("d4"),
    "c4": groups.get("c4"),
    "flip_h": groups.get("flip_h"),
    "flip_v": groups.get("flip_v"),
    "c2": groups.get("c2"),
    "sign": groups.get("sign"),
    "cyclic7": groups.cyclic(7),
    "chanperm": groups.channel_perm([[1, 2, 0], [2, 0, 1]]),
    "d4xsign": groups.product(groups.d4(), groups.sign_flip()),
}
# Odd shapes on purpose: 3 channels, odd H = W, and an extra leading batch dim.
SHAPES = {"cyclic7": (3, 2, 5, 7), "chanperm": (2, 3, 5, 9)}
DEFAULT_SHAPE = (3, 2, 9, 9)


def _shape(name, backend):
    shape = SHAPES.get(name, DEFAULT_SHAPE)
    return shape if backend != "triton" else (2,) + shape[1:]


@pytest.mark.parametrize("name", list(GROUPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_orbit_and_orbit_mean_match_reference(backend, name, dtype):
    g, dev = GROUPS[name], device_for(backend)
    x = torch.randn(_shape(name, backend), dtype=dtype, device=dev)
    out = orbit(x, g, backend=backend)
    ref = reference.orbit(x.cpu(), g)
    assert out.shape == (len(g) * x.shape[0],) + x.shape[1:] and out.dtype == dtype
    assert rel_err(out, ref) == 0.0  # a gather: exact in every dtype
    y = torch.randn(out.shape, dtype=dtype, device=dev)
    got = orbit_mean(y, g, backend=backend)
    want = reference.orbit_mean(y.cpu().double(), g)
    assert got.shape == x.shape and got.dtype == dtype
    assert rel_err(got, want) <= TOL[dtype]


# The CPU kernel sums fp32/bf16 square planes of side 8, 16, 32, 64, 96 or 128 in registers, with
# its own handling of each direction a group element can read a row in; other sides take the
# general path. Exercise both, and every kind of element: flips, rotations, transposes, and signs
# (d4xsign has 16 elements).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", [8, 24, 96, 128, 136])
@pytest.mark.parametrize("name", ["d4", "c4", "flip_h", "flip_v", "c2", "sign", "d4xsign"])
def test_orbit_mean_on_register_summed_plane_sizes(name, side, dtype):
    g = GROUPS[name]
    y = torch.randn(len(g) * 2, 3, side, side).to(dtype)
    got = orbit_mean(y, g, backend="cpu")
    assert got.dtype == dtype
    assert rel_err(got, reference.orbit_mean(y.double(), g)) <= TOL[dtype]
    # a non-contiguous input (made contiguous by the op) and the orbit round trip
    x = torch.randn(2, 3, side, side).to(dtype).transpose(-1, -2)
    assert rel_err(orbit_mean(orbit(x, g, backend="cpu"), g, backend="cpu"), x) <= TOL[dtype]


def test_five_dim_input_and_noncontiguous(backend):
    g, dev = GROUPS["d4"], device_for(backend)
    base = torch.randn(2, 3, 4, 11, 11, device=dev)
    x = base.transpose(-1, -2)[:, :, 1:]  # non-contiguous, odd sizes, extra batch dim
    assert not x.is_contiguous()
    assert torch.equal(orbit(x, g, backend=backend).cpu(), reference.orbit(x.cpu(), g))
    y = torch.randn(16, 3, 11, 11, device=dev).permute(0, 1, 3, 2)
    assert rel_err(orbit_mean(y, g, backend=backend), reference.orbit_mean(y.cpu(), g)) <= 1e-6


def test_orbit_mean_of_orbit_is_identity_and_projects_onto_invariants(backend):
    g, dev = GROUPS["d4"], device_for(backend)
    x = torch.randn(2, 3, 8, 8, device=dev)
    assert rel_err(orbit_mean(orbit(x, g, backend=backend), g, backend=backend), x) <= 1e-6
    # orbit_mean of the orbit of an arbitrary batch is invariant: g·mean == mean
    y = torch.randn(16, 3, 8, 8, device=dev)
    m = orbit_mean(y, g, backend=backend)
    inv = reference.orbit_mean(reference.orbit(m.cpu(), g), g)
    assert rel_err(inv, m) <= 1e-6


@pytest.mark.parametrize("name", ["d4", "d4xsign", "chanperm"])
def test_gradcheck(backend, name):
    if backend == "triton" and name != "d4":
        pytest.skip("one group suffices for the interpreter; the others share the kernel")
    g, dev = GROUPS[name], device_for(backend)
    shape = (1, 3, 3, 3)
    x = torch.randn(shape, dtype=torch.float64, device=dev, requires_grad=True)
    y = torch.randn((len(g),) + shape[1:], dtype=torch.float64, device=dev, requires_grad=True)
    # The interpreter runs each launch in Python: fast mode (random projections) keeps it short.
    fast = backend == "triton"
    assert torch.autograd.gradcheck(lambda t: orbit(t, g, backend=backend), (x,), fast_mode=fast)
    assert torch.autograd.gradcheck(lambda t: orbit_mean(t, g, backend=backend), (y,), fast_mode=fast)
    if backend != "triton":
        assert torch.autograd.gradgradcheck(lambda t: orbit_mean(t, g, backend=backend), (y,))


def test_grads_match_reference_in_fp32(backend):
    g, dev = GROUPS["c4"], device_for(backend)
    x = torch.randn(2, 3, 7, 7, device=dev, requires_grad=True)
    w = torch.randn(8, 3, 7, 7, device=dev)
    (orbit(x, g, backend=backend) * w).sum().backward()
    xr = x.detach().cpu().requires_grad_()
    (reference.orbit(xr, g) * w.cpu()).sum().backward()
    assert rel_err(x.grad, xr.grad) <= 1e-6


def test_opcheck_custom_ops():
    g = GROUPS["d4"]
    x = torch.randn(6, 25, requires_grad=True)
    table, inverse_table = g.tables((5, 5))
    y = torch.randn(8, 6, 25, requires_grad=True)
    torch.library.opcheck(torch.ops.symfast.orbit.default, (x, table, inverse_table, "cpu"))
    torch.library.opcheck(torch.ops.symfast.orbit_mean.default, (y, table, inverse_table, "cpu"))


def test_torch_compile_fullgraph_has_no_graph_breaks():
    g = groups.get("d4")

    def f(x):
        return orbit_mean(torch.tanh(orbit(x, g)) * 2.0, g)

    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(x), f(x)) <= 1e-6


def test_nan_propagates_without_crash(backend):
    g, dev = GROUPS["d4"], device_for(backend)
    y = torch.randn(8, 1, 4, 4, device=dev)
    y[3, 0, 1, 2] = float("nan")
    out = orbit_mean(y, g, backend=backend)
    assert out.isnan().sum() == 1  # exactly the pixel g_3⁻¹ maps (1, 2) to
    assert orbit(y[:1], g, backend=backend).isnan().sum() == 0


def test_bad_inputs_raise_clear_errors(backend):
    dev = device_for(backend)
    with pytest.raises(ValueError, match=r"square trailing dims"):
        orbit(torch.randn(2, 3, 4, 5, device=dev), "c4", backend=backend)
    with pytest.raises(ValueError, match=r"multiple of \|G\| = 8"):
        orbit_mean(torch.randn(12, 3, 4, 4, device=dev), "d4", backend=backend)
    with pytest.raises(ValueError, match="unknown group name"):
        orbit(torch.randn(2, 3, 4, 4, device=dev), "d5", backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        orbit(torch.randn(2, 3, 4, 4, device=dev), "d4", backend="cuda")
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        orbit([[1.0]], "d4", backend=backend)
    # every backend refuses what the kernels cannot average (bool + bool is OR, not a sum)
    for dtype in (torch.int64, torch.bool, torch.complex64):
        with pytest.raises(TypeError, match="x must be a real floating-point"):
            orbit(torch.ones(2, 3, 4, 4, dtype=dtype, device=dev), "d4", backend=backend)
        with pytest.raises(TypeError, match="y must be a real floating-point"):
            orbit_mean(torch.ones(8, 3, 4, 4, dtype=dtype, device=dev), "d4", backend=backend)


def test_raw_op_rejects_wrong_device_and_out_of_bounds_tables():
    g = GROUPS["d4"]
    table, inverse_table = g.tables((4, 4))
    x = torch.randn(3, 16)
    # The dispatcher routes a call with any meta argument to the fake kernel, so the device check
    # the op runs first is exercised directly (a CUDA table with CPU input reaches it in the op).
    from symfast.ops.group_average import _check_tables
    with pytest.raises(ValueError, match="table is on meta but the input is on cpu"):
        _check_tables(x, table.to("meta"), inverse_table)
    with pytest.raises(ValueError, match=r"inverse_table must be int32 of shape \(G, 16\)"):
        _check_tables(x, table, inverse_table.long())
    bad = table.clone()
    bad[2, 5] = 16  # one past the end
    with pytest.raises(RuntimeError, match=r"outside \[0, 16\)"):
        torch.ops.symfast.orbit(x, bad, inverse_table, "cpu")
    with pytest.raises(RuntimeError, match=r"outside \[0, 16\)"):
        torch.ops.symfast.orbit_mean(torch.randn(8, 3, 16), table, bad, "cpu")


# ---- orbit(..., out=) ----------------------------------------------------------------------------

def _garbage_out(x, g, dev=None):
    """An out tensor full of NaN, so every element the op fails to write shows."""
    return torch.full((len(g) * x.shape[0],) + tuple(x.shape[1:]), float("nan"), dtype=x.dtype,
                      device=dev if dev is not None else x.device)


@pytest.mark.parametrize("name", list(GROUPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_orbit_out_matches_reference(backend, name, dtype):
    g, dev = GROUPS[name], device_for(backend)
    gen = torch.Generator().manual_seed(hash((name, str(dtype))) % 2**31)
    x = torch.randn(_shape(name, backend), generator=gen).to(dtype).to(dev)
    out = _garbage_out(x, g)
    assert orbit(x, g, backend=backend, out=out) is out
    assert torch.equal(out.cpu(), reference.orbit(x.cpu(), g))
    # the buffer reused for another input: every element rewritten
    x2 = torch.randn(x.shape, generator=gen).to(dtype).to(dev)
    orbit(x2, g, backend=backend, out=out)
    assert torch.equal(out.cpu(), reference.orbit(x2.cpu(), g))


def test_orbit_out_noncontiguous_and_five_dim_input(backend):
    g, dev = GROUPS["d4"], device_for(backend)
    x = torch.randn(2, 3, 4, 11, 11, device=dev).transpose(-1, -2)[:, :, 1:]
    assert not x.is_contiguous()
    out = _garbage_out(x, g)
    orbit(x, g, backend=backend, out=out)
    assert torch.equal(out.cpu(), reference.orbit(x.cpu(), g))


# Outputs of 4 MB and more are written with streaming stores (fp32), whose 16-byte stores need
# aligned rows: sides that are multiples of 16, of 4 but not 8 or 16, not of 4 (the transposed
# planes fall back to plain stores), rows not a multiple of 16 bytes (no streaming at all), and an
# out whose data starts 4 bytes past an alignment boundary.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", [64, 36, 20, 34, 35])
@pytest.mark.parametrize("name", ["d4", "c4", "flip_v", "d4xsign", "chanperm"])
def test_orbit_out_on_large_outputs(name, side, dtype):
    g = GROUPS[name]
    batch = -(-(5 << 20) // (len(g) * 3 * side * side * 4))  # an fp32 orbit of >= 5 MB
    x = torch.randn(batch, 3, side, side).to(dtype)
    want = reference.orbit(x, g)
    assert torch.equal(orbit(x, g, backend="cpu"), want)
    out = _garbage_out(x, g)
    orbit(x, g, backend="cpu", out=out)
    assert torch.equal(out, want)
    storage = torch.empty(want.numel() + 1, dtype=dtype)
    shifted = storage[1:].view(want.shape)  # contiguous, data 2 or 4 bytes off alignment
    orbit(x, g, backend="cpu", out=shifted)
    assert torch.equal(shifted, want)


def test_orbit_out_rejects_a_bad_out(backend):
    g, dev = GROUPS["d4"], device_for(backend)
    x = torch.randn(2, 3, 4, 4, device=dev)
    good = torch.empty(16, 3, 4, 4, device=dev)
    with pytest.raises(TypeError, match="out must be a torch.Tensor or None, got list"):
        orbit(x, g, backend=backend, out=[good])
    with pytest.raises(TypeError, match="out has dtype torch.float64 but x has torch.float32"):
        orbit(x, g, backend=backend, out=good.double())
    with pytest.raises(ValueError, match=r"out must have shape \(16, 3, 4, 4\) \(\|G\|·B, ...\) "
                                         r"for x of shape \(2, 3, 4, 4\) and group d4, got "
                                         r"\(8, 3, 4, 4\)"):
        orbit(x, g, backend=backend, out=good[:8])
    with pytest.raises(ValueError, match="out must have shape"):
        orbit(x, g, backend=backend, out=good.reshape(16, 3, 16))
    with pytest.raises(ValueError, match="out is on meta but x is on"):
        orbit(x, g, backend=backend, out=good.to("meta"))
    with pytest.raises(ValueError, match="out must be contiguous"):
        orbit(x, g, backend=backend, out=torch.empty(16, 3, 4, 4, device=dev).transpose(-1, -2))
    # out sharing memory with x: x inside out, x a strided view spanning out, out inside x's base
    with pytest.raises(ValueError, match="out shares memory with x"):
        orbit(good[:2], g, backend=backend, out=good)
    with pytest.raises(ValueError, match="out shares memory with x"):
        orbit(good[::8].transpose(-1, -2), g, backend=backend, out=good)
    base = torch.randn(40, 3, 4, 4, device=dev)
    with pytest.raises(ValueError, match="out shares memory with x"):
        orbit(base[16:18], g, backend=backend, out=base[2:18])
    orbit(base[16:18], g, backend=backend, out=base[:16])  # adjacent, not overlapping: fine
    assert torch.equal(base[:16].cpu(), reference.orbit(base[16:18].cpu(), g))
    # no autograd through out=, as torch's out= functions
    leaf = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="don't support automatic differentiation"):
        orbit(leaf, g, backend=backend, out=good)
    with pytest.raises(RuntimeError, match="don't support automatic differentiation"):
        orbit(x, g, backend=backend, out=good.clone().requires_grad_())
    with torch.no_grad():
        orbit(leaf, g, backend=backend, out=good)
    assert torch.equal(good.cpu(), reference.orbit(x.cpu(), g))


def test_orbit_out_on_empty_batch(backend):
    g, dev = GROUPS["c4"], device_for(backend)
    x = torch.randn(0, 3, 4, 4, device=dev)
    out = torch.empty(0, 3, 4, 4, device=dev)
    assert orbit(x, g, backend=backend, out=out) is out


def test_raw_orbit_out_op_checks_what_it_writes():
    g = GROUPS["d4"]
    table, _ = g.tables((4, 4))
    x = torch.randn(3, 16)
    with pytest.raises(RuntimeError, match=r"out must be contiguous with G·M·N = 384 elements"):
        torch.ops.symfast.orbit_out_cpu(x, table, torch.empty(8, 3, 15))
    with pytest.raises(RuntimeError, match="out has dtype Double but x has Float"):
        torch.ops.symfast.orbit_out_cpu(x, table, torch.empty(8, 3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="out shares memory with x"):
        buf = torch.empty(8 * 3 * 16)
        torch.ops.symfast.orbit_out(buf[:48].view(3, 16), table, "cpu", buf)
    out = torch.empty(8, 3, 16)
    torch.ops.symfast.orbit_out(x, table, "cpu", out)
    assert torch.equal(out.reshape(-1), torch.ops.symfast.orbit_cpu(x, table).reshape(-1))


def test_opcheck_orbit_out():
    table, _ = GROUPS["d4"].tables((5, 5))
    x = torch.randn(6, 25)
    schema = torch.ops.symfast.orbit_out.default._schema
    assert [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write] == ["out"]
    assert len(schema.returns) == 0
    torch.library.opcheck(torch.ops.symfast.orbit_out.default,
                          (x, table, "cpu", torch.empty(8, 6, 25)))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_with_out(compiler):
    g = GROUPS["d4"]

    def f(x, buf):
        orbit(x * 2.0, g, out=buf)  # x * 2 and the sum below are exact, whatever the compiler
        return orbit_mean(buf + 1.0, g)

    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    buf = torch.full((16, 3, 8, 8), float("nan"))
    for _ in range(2):  # the buffer rewritten by the second call
        x = torch.randn(2, 3, 8, 8)
        got = compiled(x, buf)
        assert torch.equal(buf, reference.orbit(x * 2.0, g))  # the mutation reached the caller
        assert rel_err(got, x * 2.0 + 1.0) <= 1e-6


# ---- the Denoiser's orbit buffer, reused across sampling steps -------------------------------------

class _Net(torch.nn.Module):
    """A small non-equivariant CNN that records the memory it was called on."""

    def __init__(self, channels=2, size=8):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a = torch.nn.Conv2d(channels, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(4, channels, 3, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.3
        self.pos = torch.nn.Parameter(torch.randn(1, channels, size, size, generator=gen) * 0.1)
        self.inputs = []

    def forward(self, x, t):
        self.inputs.append(x.data_ptr())
        return self.b(torch.tanh(self.a(x) + 0.01 * t.view(-1, 1, 1, 1))) + self.pos


def _denoiser(model=None, **kwargs):
    from symfast.denoiser import Denoiser
    return Denoiser(model if model is not None else _Net(), "edm", group="d4", **kwargs)


def _no_reuse(monkeypatch):
    from symfast.denoiser import Denoiser
    monkeypatch.setattr(Denoiser, "_take_orbit_buffer", lambda self, x_in, order: None)


@pytest.mark.parametrize("sampler", ["heun", "euler_ancestral", "dpmpp_2m"])
def test_denoiser_reuses_its_orbit_buffer_and_samples_the_same(monkeypatch, sampler):
    from symfast.samplers import sample
    d = _denoiser()
    got = sample(d, (3, 2, 8, 8), sampler, steps=6, seed=1, progress=False)
    calls = d.model.inputs
    # every step's network input was the one buffer the denoiser keeps
    assert len(calls) >= 6 and set(calls) == {d._orbit_buffers[0].data_ptr()}
    got_other_batch = sample(d, (5, 2, 8, 8), sampler, steps=6, seed=1, progress=False)
    with monkeypatch.context() as m:
        _no_reuse(m)
        fresh = _denoiser()
        want = sample(fresh, (3, 2, 8, 8), sampler, steps=6, seed=1, progress=False)
        want_other_batch = sample(fresh, (5, 2, 8, 8), sampler, steps=6, seed=1, progress=False)
    assert torch.equal(got, want)
    assert torch.equal(got_other_batch, want_other_batch)


def test_denoiser_orbit_buffer_follows_batch_dtype_and_mode():
    d = _denoiser()
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        first = d.orbit_outputs(x, 1.0)
        want = d.orbit_outputs(x, 1.0)  # reused
        assert torch.equal(first, want)
        other = torch.randn(3, 2, 8, 8)
        y = d.orbit_outputs(other, 1.0)  # another batch size: a buffer of its own
        assert y.shape == (24, 2, 8, 8)
        d.model.double()
        y64 = d.orbit_outputs(other.double(), 1.0)  # another dtype
        assert y64.dtype == torch.float64 and torch.allclose(y64.float(), y, atol=1e-5)
        d.model.float()
    with torch.inference_mode():  # an inference tensor is made, and used only in inference mode
        assert torch.equal(d.orbit_outputs(x, 1.0), want)
        assert torch.equal(d.orbit_outputs(x, 1.0), want)
    with torch.no_grad():
        assert torch.equal(d.orbit_outputs(x, 1.0), want)
    # with autograd recording, a fresh orbit every call
    assert d._take_orbit_buffer(x, 8) is None
    y = d.orbit_outputs(x, 1.0)
    assert y.requires_grad and torch.equal(y.detach(), want)


def test_denoiser_never_overwrites_an_orbit_buffer_still_in_use():
    x1, x2 = torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)

    # a network whose output is its input: the step's result is a view of the orbit buffer
    d = _denoiser(lambda x, t: x)
    with torch.no_grad():
        y1 = d.orbit_outputs(x1, 1.0)
        kept = y1.clone()
        y2 = d.orbit_outputs(x2, 1.0)
    assert torch.equal(y1, kept) and not torch.equal(y2, kept)
    assert y1.data_ptr() != y2.data_ptr()

    # a network that keeps its input
    class Keeper(_Net):
        def forward(self, x, t):
            self.kept = x
            return super().forward(x, t)

    d = _denoiser(Keeper())
    with torch.no_grad():
        d.orbit_outputs(x1, 1.0)
        seen = d.model.kept
        copy = seen.clone()
        d.orbit_outputs(x2, 1.0)
    assert torch.equal(seen, copy)

    # a chunked network call (views of the buffer per chunk) reuses it once they are gone
    d = _denoiser(chunks=4)
    with torch.no_grad():
        a = d.orbit_outputs(x1, 1.0)
        b = d.orbit_outputs(x1, 1.0)
    assert torch.equal(a, b)
    assert len(set(d.model.inputs[:4])) == 4 and d.model.inputs[:4] == d.model.inputs[4:]


def test_denoiser_copies_leave_the_orbit_buffer_behind():
    import copy

    d = _denoiser()
    with torch.no_grad():
        want = d.orbit_outputs(torch.ones(2, 2, 8, 8), 1.0)
    assert len(d._orbit_buffers) == 1
    clone = copy.deepcopy(d)
    assert "_orbit_buffers" not in clone.__dict__ and "_orbit_buffers" not in d.state_dict()
    with torch.no_grad():
        assert torch.equal(clone.orbit_outputs(torch.ones(2, 2, 8, 8), 1.0), want)
