"""symfast::fused_step: every backend against the reference, noise included."""
import pytest
import torch

from conftest import TOL, available_backends, device_for, rel_err
from symfast import _backend
from symfast.groups import get
from symfast.ops.fused_step import StepCoefficients, fused_step
from symfast.philox import noise_key, sample_noise
from symfast.reference.fused_step import fused_step as reference_step

COEFS = StepCoefficients(c_skip=0.9, c_out=-0.3, a=0.7, b=0.2, p=0.1, q=-0.05, c=0.4)

CASES = [  # (group, sample shape)
    ("d4", (2, 3, 9, 9)),
    ("c2", (3, 2, 5, 7)),
    ("flip_h", (2, 11)),
    (None, (5, 3, 4)),
    ("sign", (2, 3, 5)),  # negative table entries: y's gradient crashed on cpu and triton
]


def _inputs(group, shape, dtype, device, noncontiguous=False):
    order = len(get(group)) if group else 1
    gen = torch.Generator().manual_seed(hash((group, shape)) % 2**31)

    def rnd(*s):
        t = torch.randn(*s, generator=gen)
        if noncontiguous and len(s) >= 2:
            t = torch.randn(*s[:-2], s[-1], s[-2], generator=gen).transpose(-1, -2)
        return t.to(device=device, dtype=dtype)

    return rnd(*shape), rnd(order * shape[0], *shape[1:]), rnd(*shape), rnd(*shape)


def _check(out, ref, dtype):
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert rel_err(o, r) <= TOL[dtype]


@pytest.mark.parametrize("group,shape", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("noise_mode", ["philox", "philox_transformed", "tensor", "none"])
def test_matches_reference(backend, group, shape, dtype, noise_mode):
    dev = device_for(backend)
    x, y, u, v = _inputs(group, shape, dtype, dev, noncontiguous=noise_mode == "tensor")
    key = noise_key(1234, shape[0], dev)
    kwargs = dict(u=u, v=v, step=7)
    coefs = COEFS
    if noise_mode == "philox":
        kwargs["key"] = key
    elif noise_mode == "philox_transformed":
        if group is None:
            pytest.skip("no group to transform the noise with")
        kwargs.update(key=key, noise_element=len(get(group)) - 1)
    elif noise_mode == "tensor":
        kwargs["noise"] = torch.randn(shape, device=dev).to(dtype)
    else:
        coefs = COEFS._replace(c=0.0)
    out = fused_step(x, y, coefs, group, backend=backend, **kwargs)
    g = get(group) if group else get("trivial")
    ref = reference_step(x.cpu(), y.cpu(), g, coefs, u.cpu(), v.cpu(),
                         kwargs["noise"].cpu() if "noise" in kwargs else None, key.cpu(), 7,
                         kwargs.get("noise_element"))
    _check([t.cpu() for t in out], ref, dtype)


@pytest.mark.parametrize("group,shape", [("d4", (2, 3, 9, 9)), ("c2", (3, 2, 5, 7)), ("flip_h", (2, 11))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noise_group_transforms_the_noise_without_averaging(backend, group, shape, dtype):
    """A network equivariant by construction: one output per sample (no orbit), and the Philox
    noise still transformed by g_k — z ← g_k z, exactly as the frame-averaged step does."""
    dev = device_for(backend)
    g = get(group)
    x, _, u, v = _inputs(group, shape, dtype, dev, noncontiguous=True)
    y = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device=dev, dtype=dtype)
    key = noise_key(99, shape[0], dev)
    k = len(g) - 1
    out = fused_step(x, y, COEFS, None, u=u, v=v, key=key, step=5, noise_element=k,
                     noise_group=group, backend=backend)
    ref = reference_step(x.cpu(), y.cpu(), get("trivial"), COEFS, u.cpu(), v.cpu(), None,
                         key.cpu(), 5, k, g)
    _check([t.cpu() for t in out], ref, dtype)
    # the reference's noise is g_k of the untransformed draw
    acc = x.cpu().float()
    den = COEFS.c_skip * acc + COEFS.c_out * y.cpu().float()
    manual = (COEFS.a * acc + COEFS.b * den + COEFS.p * u.cpu().float() + COEFS.q * v.cpu().float()
              + COEFS.c * g.act(sample_noise(key.cpu(), 5, shape), k))
    assert rel_err(ref[0], manual.to(dtype)) <= TOL[dtype]


def test_noise_group_with_averaging_is_refused():
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="noise_group"):
        fused_step(x, torch.randn(16, 1, 4, 4), COEFS, "d4", key=noise_key(0, 2), noise_element=1,
                   noise_group="c4")


def test_optional_terms_and_no_denoised(backend):
    dev = device_for(backend)
    x, y, _, _ = _inputs("d4", (2, 1, 6, 6), torch.float32, dev)
    coefs = StepCoefficients(1.0, -0.5, 0.3, 0.6, 0.0, 0.0, 0.0)
    out, den = fused_step(x, y, coefs, "d4", return_denoised=False, backend=backend)
    assert den is None
    ref, _ = reference_step(x.cpu(), y.cpu(), get("d4"), coefs)
    assert rel_err(out, ref) <= TOL[torch.float32]


def test_noise_is_exact_philox_and_batch_independent(backend):
    """c=1, all else 0: x_next is the noise itself; per-sample seeds make it batch-independent."""
    dev = device_for(backend)
    coefs = StepCoefficients(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    shape = (3, 2, 5, 5)
    x, y, _, _ = _inputs(None, shape, torch.float32, dev)
    key = noise_key([5, 6, 7], 3, dev)
    z, _ = fused_step(x, y, coefs, backend=backend, key=key, step=2)
    expected = sample_noise(key.cpu(), 2, shape)
    assert rel_err(z, expected) <= 1e-6
    z2, _ = fused_step(x[1:2], y[1:2], coefs, backend=backend, key=noise_key([6], 1, dev), step=2)
    assert rel_err(z2, z[1:2]) <= 1e-6
    # the transformed noise is g applied to the untransformed noise
    g = get("d4")
    xg, yg, _, _ = _inputs("d4", shape, torch.float32, dev)
    zg, _ = fused_step(xg, yg, coefs, "d4", backend=backend, key=key, step=2, noise_element=3)
    assert rel_err(zg, g.act(expected, 3).to(dev)) <= 1e-6


def test_a_key_of_any_layout_gives_the_same_noise(backend):
    """A (B, 2) key that is a column-major copy or a slice of a wider table is read by value."""
    dev = device_for(backend)
    coefs = StepCoefficients(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    x, y, _, _ = _inputs(None, (3, 1, 4, 4), torch.float32, dev)
    key = noise_key([5, 6, 7], 3, dev)
    expected, _ = fused_step(x, y, coefs, backend=backend, key=key, step=1)
    column_major = key.t().contiguous().t()
    wide = torch.cat([key, torch.zeros_like(key)], dim=1)[:, :2]
    for variant in (column_major, wide):
        assert not variant.is_contiguous()
        got, _ = fused_step(x, y, coefs, backend=backend, key=variant, step=1)
        assert torch.equal(got, expected)


def test_cpu_noise_matches_reference_elementwise_over_many_draws():
    """The CPU kernel's float32 Box-Muller uses its own vectorisable log and cos; over ~200k draws
    (tails out to |z| ~ 4.5 included) each normal stays within 2e-6 of the reference's
    torch.log/cos. Its float64 normals (its own float64 log, sin and cos, within 3 ulp of
    torch's) agree to a few float64 ulps."""
    if "cpu" not in available_backends():
        pytest.skip("cpu kernels not built")
    coefs = StepCoefficients(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    shape = (12, 1, 128, 128)
    x = torch.zeros(shape)
    key = noise_key(list(range(100, 112)), 12)
    z, _ = fused_step(x, x, coefs, backend="cpu", key=key, step=5)
    ref = sample_noise(key, 5, shape)
    assert ref.abs().max() > 4.0
    assert (z - ref).abs().max() <= 2e-6
    z64, _ = fused_step(x.double(), x.double(), coefs, backend="cpu", key=key, step=5)
    assert (z64 - sample_noise(key, 5, shape, torch.float64)).abs().max() <= 1e-14


@pytest.mark.skipif(not _backend.triton_status()[0], reason="triton not importable")
def test_sample_noise_is_triton_randn4x():
    """The stream's definition: element e is tl.randn4x(seed, e // 4)[e % 4] at step = stream = 0
    (both Box-Muller outputs of both word pairs), checked against Triton's own randn4x."""
    import triton
    import triton.language as tl

    @triton.jit
    def randn4x_kernel(out_ptr, seed, groups, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        n0, n1, n2, n3 = tl.randn4x(seed, offs)
        mask = offs < groups
        tl.store(out_ptr + offs * 4, n0, mask=mask)
        tl.store(out_ptr + offs * 4 + 1, n1, mask=mask)
        tl.store(out_ptr + offs * 4 + 2, n2, mask=mask)
        tl.store(out_ptr + offs * 4 + 3, n3, mask=mask)

    dev = device_for("triton")
    n = 1001  # not a multiple of 4: the last counter's words are partly unused
    for seed in (17, 2**40 + 3):
        out = torch.empty(4 * 251, dtype=torch.float32, device=dev)
        randn4x_kernel[(triton.cdiv(251, 128),)](out, seed, 251, BLOCK=128)
        ref = sample_noise(noise_key([seed], 1), 0, (1, n))
        torch.testing.assert_close(ref[0], out[:n].cpu(), rtol=1e-6, atol=1e-6)


def _noise_only(key, rows_per_sample, step, shape, dtype):
    out = torch.empty(shape, dtype=dtype)
    torch.ops.symfast.fused_step_cpu_noise(key, rows_per_sample, step, out)
    return out


@pytest.mark.parametrize("n", [1, 7, 15, 16, 17, 33, 512, 515, 1100])
def test_cpu_philox_words_exact_at_every_row_length(n):
    """The AVX2 rounds take 16 counters at a time and the scalar loop the rest (a CPU without
    AVX2 runs it alone): float64 normals expose a wrong Philox word as an O(1) error, so rows of
    every length agree with the reference to a few float64 ulps (the kernel's log, sin and cos
    are within 3 ulp of torch's), in the step and the draw-only op."""
    if "cpu" not in available_backends():
        pytest.skip("cpu kernels not built")
    key = noise_key([3, 2**40 + 9], 2)
    shape = (2, 3, n)
    ref = sample_noise(key, 11, shape, torch.float64)
    x, y = torch.zeros(shape, dtype=torch.float64), torch.zeros((4, 3, n), dtype=torch.float64)
    z, _ = fused_step(x, y, StepCoefficients(c=1.0), "flip_h", key=key, step=11, backend="cpu")
    assert (z - ref).abs().max() <= 1e-14
    drawn = _noise_only(key, 3, 11, (6, n), torch.float64).reshape(shape)
    assert (drawn - ref).abs().max() <= 1e-14
    drawn32 = _noise_only(key, 3, 11, (6, n), torch.float32).reshape(shape)
    z32, _ = fused_step(x.float(), y.float(), StepCoefficients(c=1.0), "flip_h", key=key, step=11,
                        backend="cpu")
    assert torch.equal(drawn32, z32)
    assert (drawn32 - sample_noise(key, 11, shape)).abs().max() <= 2e-6


def test_cpu_noise_only_bad_inputs():
    if "cpu" not in available_backends():
        pytest.skip("cpu kernels not built")
    key = noise_key(1, 2)
    with pytest.raises(RuntimeError, match="out must be"):
        _noise_only(key, 1, 0, (2, 5), torch.float16)
    with pytest.raises(RuntimeError, match="rows_per_sample"):
        _noise_only(key, 3, 0, (4, 5), torch.float32)
    with pytest.raises(RuntimeError, match="key must be"):
        _noise_only(noise_key(1, 3), 1, 0, (2, 5), torch.float32)
    with pytest.raises(RuntimeError, match="step"):
        _noise_only(key, 1, -1, (2, 5), torch.float32)


@pytest.mark.parametrize("group,shape", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("noise_mode", ["philox_transformed", "tensor"])
def test_gradients_match_reference(backend, group, shape, dtype, noise_mode):
    """The step is differentiable in x, y, u, v and a given noise tensor, through both outputs,
    on every backend (the reference is plain autograd)."""
    dev = device_for(backend)
    x, y, u, v = _inputs(group, shape, dtype, dev, noncontiguous=True)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dev, dtype)
    key = noise_key(99, shape[0], dev)
    g = get(group) if group else get("trivial")
    element = len(g) - 1 if noise_mode == "philox_transformed" and group else None
    given = noise if noise_mode == "tensor" else None
    w_next, w_den = (torch.randn(shape, generator=torch.Generator().manual_seed(s)).to(dev, dtype)
                     for s in (6, 7))
    grads = []
    for run in ("ours", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, y, u, v, noise)]
        lx, ly, lu, lv, ln = leaves
        if run == "ours":
            out = fused_step(lx, ly, COEFS, group, u=lu, v=lv, noise=ln if given is not None else None,
                             key=key, step=3, noise_element=element, backend=backend)
        else:
            out = reference_step(lx, ly, g, COEFS, lu, lv, ln if given is not None else None, key,
                                 3, element)
        ((out[0] * w_next).sum() + (out[1] * w_den).sum()).backward()
        grads.append([t.grad for t in leaves])
    for name, mine, ref in zip(("x", "y", "u", "v", "noise"), *grads):
        if name == "noise" and given is None:
            assert mine is None and ref is None
            continue
        assert mine.dtype == ref.dtype and mine.shape == ref.shape, name
        assert rel_err(mine.cpu(), ref.cpu()) <= TOL[dtype], name


def test_gradient_of_y_alone_without_denoised():
    x, y, _, _ = _inputs("d4", (2, 3, 6, 6), torch.float32, "cpu")
    y.requires_grad_()
    out, den = fused_step(x, y, COEFS._replace(c=0.0), "d4", return_denoised=False)
    assert den is None
    out.sum().backward()
    ref_y = y.detach().clone().requires_grad_()
    reference_step(x, ref_y, get("d4"), COEFS._replace(c=0.0))[0].sum().backward()
    assert rel_err(y.grad, ref_y.grad) <= TOL[torch.float32]


def test_gradients_compile_fullgraph():
    x, y, u, _ = _inputs("d4", (2, 3, 8, 8), torch.float32, "cpu")
    key = noise_key(3, 2)

    def loss(x, y, u):
        out, den = fused_step(x, y, COEFS, "d4", u=u, key=key, step=4, backend="cpu")
        return (out * out).sum() + den.sum()

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, y, u)]
        fn(*leaves).backward()
        return [t.grad for t in leaves]

    eager = grads(loss)
    compiled = grads(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        assert rel_err(b, a) <= 1e-6


def test_compiles_fullgraph():
    x, y, u, _ = _inputs("d4", (2, 3, 8, 8), torch.float32, "cpu")
    key = noise_key(3, 2)

    def step(x, y, u, key):
        return fused_step(x, y, COEFS, "d4", u=u, key=key, step=4, backend="cpu")

    ref = step(x, y, u, key)  # eager first: builds the gather tables, which dynamo cannot trace
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x, y, u, key)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_opcheck():
    x, y, u, _ = _inputs("c2", (2, 3, 4, 6), torch.float32, "cpu")
    table, inverse = get("c2").tables((4, 6))
    key = noise_key(3, 2)
    torch.library.opcheck(torch.ops.symfast.fused_step,
                          (x.reshape(6, 24), y.reshape(2, 6, 24), inverse, u.reshape(6, 24), None,
                           None, key, table[1], 3, 1, list(COEFS), True, "cpu"),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_bad_inputs():
    x, y, _, _ = _inputs("d4", (2, 3, 6, 6), torch.float32, "cpu")
    with pytest.raises(ValueError, match="model output y has shape"):
        fused_step(x, y[:8], COEFS._replace(c=0.0), "d4")
    with pytest.raises(ValueError, match="model output y has shape"):
        fused_step(x, y[:, :, :5], COEFS._replace(c=0.0), "d4")
    with pytest.raises(TypeError, match="y .*dtype"):
        fused_step(x, y.double(), COEFS._replace(c=0.0), "d4")
    with pytest.raises(TypeError, match="x must be"):
        fused_step(x.numpy(), y, COEFS, "d4")
    with pytest.raises(ValueError, match="needs noise= or key="):
        fused_step(x, y, COEFS, "d4")
    with pytest.raises(ValueError, match="key must be an int64 tensor of shape"):
        fused_step(x, y, COEFS, "d4", key=noise_key(1, 3))
    with pytest.raises(ValueError, match="noise_element"):
        fused_step(x, y, COEFS, "d4", key=noise_key(1, 2), noise_element=8)
    with pytest.raises(ValueError, match="noise_element"):  # a bool is not an element index
        fused_step(x, y, COEFS, "d4", key=noise_key(1, 2), noise_element=True)
    with pytest.raises(ValueError, match="coefs must have 7 values"):
        fused_step(x, y, tuple(COEFS)[:6], "d4", key=noise_key(1, 2))
    with pytest.raises(ValueError, match="coefs must have 7 values"):
        fused_step(x, y, tuple(COEFS) + (1.0,), "d4", key=noise_key(1, 2))
    with pytest.raises(TypeError, match="coefs.a must be a real number"):
        fused_step(x, y, (1.0, 0.5, "0.3", 0.0, 0.0, 0.0, 0.0), "d4")
    with pytest.raises(TypeError, match="coefs must be"):
        fused_step(x, y, "1,0,0,0,0,0,0", "d4")
    with pytest.raises(ValueError, match="u has shape"):
        fused_step(x, y, COEFS, "d4", key=noise_key(1, 2), u=x[:1])
    with pytest.raises(ValueError, match="step"):
        fused_step(x, y, COEFS, "d4", key=noise_key(1, 2), step=-1)
    with pytest.raises(ValueError, match="backend"):
        fused_step(x, y, COEFS, "d4", key=noise_key(1, 2), backend="numba")
    # the C++ op checks its own inputs too (malformed tables never read out of bounds)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.symfast.fused_step_cpu(x.reshape(6, 36), y.reshape(8, 6, 36),
                                         torch.full((8, 36), 36, dtype=torch.int32), None, None,
                                         None, None, None, 3, 0, [0.0] * 7, True)


def test_extra_terms_and_given_noise_are_read_at_the_accumulation_precision(backend):
    """u, v and noise take part at fp32 (fp64 for fp64 x) as in the reference: an fp16 state
    with u = 1e5 (inf in fp16) and p = 1e-3 gives 100, and fp64 noise is not cut to fp32."""
    dev = device_for(backend)
    x = torch.zeros(2, 1, 4, 4, dtype=torch.float16, device=dev)
    u = torch.full((2, 1, 4, 4), 1e5, device=dev)
    coefs = StepCoefficients(1.0, 0.0, 0.0, 0.0, 1e-3, 0.0, 0.0)
    out, _ = fused_step(x, x, coefs, u=u, backend=backend)
    ref, _ = fused_step(x.cpu(), x.cpu(), coefs, u=u.cpu(), backend="reference")
    assert torch.equal(ref, torch.full_like(ref, 100.0)) and torch.equal(out.cpu(), ref)
    x64 = torch.zeros(2, 1, 4, 4, dtype=torch.float64, device=dev)
    noise = torch.randn(2, 1, 4, 4, dtype=torch.float64, device=dev) * (1 + 1e-9)
    out, _ = fused_step(x64, x64, StepCoefficients(c=1.0), noise=noise, backend=backend)
    assert (out - noise).abs().max() <= 1e-15
