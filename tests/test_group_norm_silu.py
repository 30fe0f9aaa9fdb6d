import pytest
import torch
import torch.nn.functional as F

from conftest import TOL, device_for, rel_err
from symfast._ext import load_cpu_kernels
from symfast.ops import group_norm_silu
from symfast.reference import group_norm_silu as reference

# (shape, groups): ordinary and odd shapes. C = 1; groups = 1; groups = C (with planes of more
# than one element); spatial 1x1 (groups of 4 channels x 1 pixel); 5x7 and 3-d spatial; planes
# with a tail after whole 8-lane blocks (9x13 = 117) and planes longer than the CPU kernel's
# 256-element fp32 partial sums (33x33 = 1089); 40 channels in 8 groups (5 per group).
CASES = [
    ((2, 12, 5, 7), 3),
    ((3, 1, 4, 4), 1),
    ((2, 6, 4, 4), 1),
    ((2, 6, 3, 3), 6),
    ((3, 8, 1, 1), 2),
    ((2, 6, 3, 4, 5), 2),
    ((2, 40, 9, 13), 8),
    ((1, 4, 33, 33), 2),
]
# The interpreter runs a launch in Python: the triton backend gets the cases it runs quickly
# (every kind of tail, channel block and 3-d spatial among them).
TRITON_CASES = [CASES[i] for i in (0, 1, 3, 4, 5)]


def _cases(backend):
    return TRITON_CASES if backend == "triton" else CASES


def _inputs(shape, dtype, device, seed=0, offset=0.5, affine=(True, True, True)):
    """x (mean `offset`), shift, weight, bias; shift/weight/bias left out where affine says so."""
    gen = torch.Generator().manual_seed(seed)
    b, c = shape[:2]
    x = (torch.randn(shape, generator=gen) * 1.5 + offset).to(device, dtype)
    shift = torch.randn(b, c, generator=gen).to(device, dtype)
    weight = (1 + 0.5 * torch.randn(c, generator=gen)).to(device, dtype)
    bias = (0.5 * torch.randn(c, generator=gen)).to(device, dtype)
    return x, *(t if keep else None for t, keep in zip((shift, weight, bias), affine))


def _reference_and_grads(x, shift, weight, bias, groups, grad_z, eps=1e-5):
    """The fp64 reference output and gradients of (x, shift, weight, bias) (None where absent)."""
    args = [t.detach().cpu().double().requires_grad_() if t is not None else None
            for t in (x, shift, weight, bias)]
    z = reference.group_norm_silu(args[0], groups, args[2], args[3], eps, args[1])
    z.backward(grad_z.detach().cpu().double())
    return z.detach(), [a.grad if a is not None else None for a in args]


def _run_with_grads(x, shift, weight, bias, groups, grad_z, backend, eps=1e-5):
    args = [t.detach().clone().requires_grad_() if t is not None else None
            for t in (x, shift, weight, bias)]
    z = group_norm_silu(args[0], groups, args[2], args[3], eps, shift=args[1], backend=backend)
    z.backward(grad_z)
    return z.detach(), [a.grad if a is not None else None for a in args]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_forward_and_gradients_match_reference(backend, dtype):
    device = device_for(backend)
    for i, (shape, groups) in enumerate(_cases(backend)):
        x, shift, weight, bias = _inputs(shape, dtype, device, seed=i)
        grad_z = torch.randn(shape, generator=torch.Generator().manual_seed(100 + i)).to(device, dtype)
        z, grads = _run_with_grads(x, shift, weight, bias, groups, grad_z, backend)
        ref, ref_grads = _reference_and_grads(x, shift, weight, bias, groups, grad_z)
        assert z.dtype == dtype and z.shape == x.shape
        assert rel_err(z, ref) <= TOL[dtype], (shape, groups)
        if backend == "reference" and dtype in (torch.bfloat16, torch.float16):
            continue  # PyTorch's own low-precision GroupNorm backward: its accuracy, not ours
        for name, got, want in zip(("x", "shift", "weight", "bias"), grads, ref_grads):
            assert got.dtype == dtype and got.shape == want.shape, (name, shape)
            if name == "shift" and groups == shape[1]:
                _assert_cancels(got, ref_grads[0], dtype)
            else:
                assert rel_err(got, want) <= TOL[dtype], (name, shape, groups)


def _assert_cancels(grad_shift, grad_x, dtype):
    """With one channel per group a shift only moves the group's mean, which the normalisation
    removes: grad shift = sum over the plane of grad x is exactly 0. What is left is the rounding
    of that cancelling sum, measured against the size of its terms (sum of |grad x|)."""
    scale = grad_x.abs().flatten(2).sum(-1).norm()
    assert float(grad_shift.double().norm().cpu()) <= TOL[dtype] * float(scale)


@pytest.mark.parametrize("affine", [(False, False, False), (True, False, False), (False, True, False),
                                    (False, False, True), (False, True, True)],
                         ids=["none", "shift", "weight", "bias", "weight+bias"])
def test_with_and_without_shift_weight_bias(backend, affine):
    device = device_for(backend)
    shape, groups = (2, 12, 5, 7), 4
    x, shift, weight, bias = _inputs(shape, torch.float32, device, seed=3, affine=affine)
    grad_z = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(device)
    z, grads = _run_with_grads(x, shift, weight, bias, groups, grad_z, backend)
    ref, ref_grads = _reference_and_grads(x, shift, weight, bias, groups, grad_z)
    assert rel_err(z, ref) <= TOL[torch.float32]
    for got, want in zip(grads, ref_grads):
        assert (got is None) == (want is None)
        if want is not None:
            assert rel_err(got, want) <= TOL[torch.float32]


def test_noncontiguous_inputs(backend):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(7)
    b, c, h, w, groups = 3, 8, 5, 6, 4
    x = torch.randn(b, c, w, h, generator=gen).to(device).transpose(2, 3)  # (b, c, h, w) strided
    shift = torch.randn(c, b, generator=gen).to(device).t()
    weight = torch.randn(2 * c, generator=gen).to(device)[::2]
    bias = torch.randn(c, 2, generator=gen).to(device)[:, 1]
    grad_z = torch.randn(b, c, h, w, generator=gen).to(device).permute(0, 2, 3, 1).contiguous()
    grad_z = grad_z.permute(0, 3, 1, 2)  # channels-last strides
    for t in (x, shift, weight, bias, grad_z):
        assert not t.is_contiguous()
    z, grads = _run_with_grads(x, shift, weight, bias, groups, grad_z, backend)
    ref, ref_grads = _reference_and_grads(x, shift, weight, bias, groups, grad_z)
    assert rel_err(z, ref) <= TOL[torch.float32]
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) <= TOL[torch.float32]


def test_one_element_groups_give_silu_of_bias(backend):
    """groups = C on 1x1 planes: every normalised value is exactly 0, so z = silu(bias), and the
    weight gets no gradient; the bias gets sum_b grad_z * silu'(bias). (The reference once
    normalised as torch does, x * scale + (bias - mean * scale), ~3e-5 off here.)"""
    device = device_for(backend)
    x, _, weight, bias = _inputs((4, 6, 1, 1), torch.float32, device, seed=11)
    x.requires_grad_()
    bias.requires_grad_()
    weight.requires_grad_()
    z = group_norm_silu(x, 6, weight, bias, backend=backend)
    assert rel_err(z, F.silu(bias.double()).expand(4, 6).reshape(4, 6, 1, 1)) <= 1e-6
    z.sum().backward()
    sig = torch.sigmoid(bias.detach().double())
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert rel_err(bias.grad, 4 * sig * (1 + bias.detach().double() * (1 - sig))) <= 1e-6


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_gradcheck_fp64(backend_name):
    from conftest import available_backends

    if backend_name not in available_backends():
        pytest.skip(f"{backend_name} unavailable")
    device = device_for(backend_name)
    x, shift, weight, bias = _inputs((2, 4, 3, 2), torch.float64, device, seed=5)
    args = tuple(t.requires_grad_() for t in (x, shift, weight, bias))
    # fast_mode for the interpreter: a random projection of the Jacobian instead of all of it
    assert torch.autograd.gradcheck(
        lambda a, s, w, b: group_norm_silu(a, 2, w, b, 1e-5, shift=s, backend=backend_name), args,
        fast_mode=backend_name == "triton")


def test_cpu_kernel_is_deterministic_and_thread_count_independent():
    """Tiles are handed out dynamically, but each is summed by one thread in a fixed order."""
    assert load_cpu_kernels("group_norm_silu")
    x, shift, weight, bias = _inputs((16, 32, 16, 16), torch.float32, "cpu", seed=6)
    grad_z = torch.randn_like(x)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, threads, threads):
            torch.set_num_threads(n)
            z, mean, rstd = torch.ops.symfast.group_norm_silu_cpu(x, shift, weight, bias, 8, 1e-5)
            grads = torch.ops.symfast.group_norm_silu_backward_cpu(grad_z, x, shift, weight, bias,
                                                                    mean, rstd, 8)
            results.append((z, mean, rstd, *grads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_shift_gradient_sums_to_zero_over_each_group(backend):
    """The shift gradient's sum over a group is 0 in exact arithmetic (a shift common to the group
    is normalised away) and everything upstream of a per-group shift (a UNet's time embedding) is
    made of it. Far from 0 mean, where the forward's rounded mean leaves the recomputed xhat off
    zero mean and the subtracted group term is large, the kernels' sum once grew with the mean:
    max 3.0e-5 / 4.1e-4 of the sum of |grad| at mean 100 / 1000 on cpu, 1.1e-5 / 7.2e-5 on
    triton (torch's GroupNorm: 4.5e-6 / 2.3e-6; the kernels now at most 2.9e-6). Bound: 4 eps
    sqrt(group size). The interpreter runs 3 draws of a smaller batch, the others 40."""
    device = device_for(backend)
    shape, groups = ((2, 16, 16, 16), 4) if backend == "triton" else ((4, 32, 16, 16), 8)
    per_group = shape[1] // groups * shape[2] * shape[3]
    for offset in (100.0, 1000.0):
        worst = 0.0
        for seed in range(3 if backend == "triton" else 40):
            x, shift, weight, bias = _inputs(shape, torch.float32, device, seed=seed, offset=offset)
            grad_z = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 100))
            shift.requires_grad_()
            z = group_norm_silu(x, groups, weight, bias, 1e-5, shift=shift, backend=backend)
            (gshift,) = torch.autograd.grad(z, (shift,), grad_z.to(device))
            by_group = gshift.double().cpu().view(shape[0], groups, -1)
            worst = max(worst, (by_group.sum(-1).abs() / by_group.abs().sum(-1)).max().item())
        assert worst <= 4 * torch.finfo(torch.float32).eps * per_group ** 0.5, (offset, worst)


def test_statistics_are_saved_in_fp32_and_match_group_norm():
    assert load_cpu_kernels("group_norm_silu")
    x, shift, _, _ = _inputs((3, 8, 6, 6), torch.bfloat16, "cpu", seed=8)
    _, mean, rstd = torch.ops.symfast.group_norm_silu_cpu(x, shift, None, None, 4, 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (3, 4)
    y = (x.double() + shift.double()[:, :, None, None]).reshape(3, 4, -1)
    assert rel_err(mean, y.mean(-1)) <= 1e-6
    assert rel_err(rstd, (y.var(-1, unbiased=False) + 1e-5).rsqrt()) <= 1e-6


def test_nan_stays_in_its_group(backend):
    device = device_for(backend)
    x, shift, weight, bias = _inputs((2, 8, 4, 4), torch.float32, device, seed=9)
    x[1, 5, 2, 3] = float("nan")
    z = group_norm_silu(x, 4, weight, bias, shift=shift, backend=backend)
    nan = z.isnan()
    assert nan[1, 4:6].all() and nan.sum() == 2 * 16  # the group of channels 4, 5 of sample 1


@pytest.mark.parametrize("value", [float("inf"), -float("inf")])
def test_an_infinite_input_makes_its_group_nan_as_torch_does(backend, value):
    # the variance of a group holding -inf is NaN; max(0, NaN) made it 0, and the group came
    # out +-inf instead of NaN (F.group_norm and the reference give NaN)
    device = device_for(backend)
    x, _, weight, bias = _inputs((2, 8, 4, 4), torch.float32, device, seed=10)
    x[0, 2, 1, 1] = value
    z = group_norm_silu(x, 4, weight, bias, backend=backend)
    want = F.silu(F.group_norm(x.cpu(), 4, weight.cpu(), bias.cpu()))
    assert torch.equal(z.isnan().cpu(), want.isnan()) and want[0, 2:4].isnan().all()


def test_extreme_pre_activations_are_finite_and_accurate(backend):
    """silu saturates: a = -200 gives z ~ 0 (no overflow in e^-a), a = +200 gives z = a."""
    device = device_for(backend)
    x = torch.tensor([[-1.0, 1.0], [-1.0, 1.0]], device=device).reshape(1, 2, 2, 1)
    weight = torch.tensor([200.0, -200.0], device=device)
    z = group_norm_silu(x, 2, weight, None, eps=0.0, backend=backend)
    want = F.silu(torch.tensor([-200.0, 200.0, 200.0, -200.0], dtype=torch.float64)).reshape(1, 2, 2, 1)
    assert torch.isfinite(z).all()
    assert (z.double().cpu() - want).abs().max() <= 1e-3 and rel_err(z, want) <= 1e-6


def test_silu_far_below_zero_is_the_float64_result_rounded(backend):
    """Pre-activations far below zero: silu(a) = a e^a rounds to -0 in float at a = -491 (it is
    1e-211), on every backend, and so does its gradient. The cpu kernel left 8e-36 there, from a
    sigmoid floored at e^-87 (found by the fuzz suite at 10,000 examples); it now also gives a e^a
    to an ulp where that is a subnormal or tiny float (a from -110 to -87), forward and backward
    (torch's own float silu is 0 below -88.7, where this is not, so that part is the kernel's)."""
    device = device_for(backend)
    deep = torch.tensor([-491.0, -300.0, -120.0, -110.5], device=device)
    tails = torch.tensor([-109.0, -105.0, -100.0, -95.0, -90.0, -88.0, -87.5, -87.0, -86.0, -50.0])
    a = torch.cat([deep, tails.to(device)]) if backend == "cpu" else deep
    n = a.numel()
    x = torch.zeros(1, n, 1, 1, device=device)  # groups of one element: a = bias
    bias = a.clone().requires_grad_()
    z = group_norm_silu(x, n, torch.ones(n, device=device), bias, backend=backend)
    grad_z = torch.full_like(z, 3.0)
    (grad_bias,) = torch.autograd.grad(z, bias, grad_z)
    exact = a.detach().double().cpu().requires_grad_()
    want = exact * torch.sigmoid(exact)
    (want_grad,) = torch.autograd.grad(want, exact, grad_z.double().cpu().flatten())
    for got, ref in ((z.detach().flatten().cpu(), want.detach().float()), (grad_bias.cpu(), want_grad.float())):
        assert (got[:4] == 0).all()
        assert torch.equal(got == 0, ref == 0)
        assert ((got - ref).abs() <= 2e-6 * ref.abs()).all(), (got, ref)


def test_eager_path_matches_the_custom_op():
    """Eager calls skip the custom op's Python dispatch (_dispatch.kernel_op); the output and
    every gradient must equal the custom op's, with and without grad mode."""
    from symfast.ops.group_norm_silu import _forward_op

    x, shift, weight, bias = _inputs((3, 8, 5, 5), torch.float32, "cpu", seed=10)
    grad_z = torch.randn_like(x)
    results = []
    for call in (lambda a, s, w, b: group_norm_silu(a, 4, w, b, 1e-5, shift=s, backend="cpu"),
                 lambda a, s, w, b: _forward_op(a, s, w, b, 4, 1e-5, "cpu")[0]):
        args = [t.clone().requires_grad_() for t in (x, shift, weight, bias)]
        out = call(*args)
        out.backward(grad_z)
        with torch.no_grad():
            assert torch.equal(call(*args), out)
        results.append([out.detach(), *(a.grad for a in args)])
    for eager, op in zip(*results):
        assert torch.equal(eager, op)


def test_opcheck_custom_ops():
    from symfast.ops.group_norm_silu import _backward_op, _forward_op

    x, shift, weight, bias = _inputs((2, 6, 3, 4), torch.float32, "cpu", seed=12)
    for s, w, b in ((shift, weight, bias), (None, None, None)):
        args = (x.clone().requires_grad_(), s, w, b, 3, 1e-5, "cpu")
        torch.library.opcheck(_forward_op, args)
    _, mean, rstd = _forward_op(x, shift, weight, bias, 3, 1e-5, "cpu")
    torch.library.opcheck(_backward_op, (torch.randn_like(x), x, shift, weight, bias, mean, rstd,
                                         3, "cpu"))


def test_compile_fullgraph_forward_and_backward():
    """Under torch.compile the public function hands the custom op (with its fake impl) to the
    tracer; no graph breaks, the same values and gradients as the reference."""
    x, shift, weight, bias = _inputs((2, 8, 6, 6), torch.float32, "cpu", seed=13)

    def f(a, s, w, b):
        return group_norm_silu(a * 2.0, 4, w, b, 1e-5, shift=s).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = [t.clone().requires_grad_() for t in (x, shift, weight, bias)]
    compiled(*args).backward()
    ref_args = [t.double().requires_grad_() for t in (x, shift, weight, bias)]
    want = reference.group_norm_silu(ref_args[0] * 2.0, 4, ref_args[2], ref_args[3], 1e-5,
                                     ref_args[1]).square().sum()
    want.backward()
    assert rel_err(compiled(*args), want) <= TOL[torch.float32]
    for got, ref in zip(args, ref_args):
        assert rel_err(got.grad, ref.grad) <= TOL[torch.float32]


def test_bad_inputs_name_the_argument(backend):
    device = device_for(backend)
    x = torch.randn(2, 6, 4, 4, device=device)
    c = torch.randn(6, device=device)
    cases = [
        (TypeError, "x must be a torch.Tensor", lambda: group_norm_silu([[1.0]], 1)),
        (TypeError, "x must be a real floating-point", lambda: group_norm_silu(x.long(), 2)),
        (ValueError, r"x must be \(B, C, \*spatial\)", lambda: group_norm_silu(x[0, 0, 0], 1)),
        (ValueError, "groups must be a positive divisor of the 6", lambda: group_norm_silu(x, 4)),
        (ValueError, "groups must be a positive divisor", lambda: group_norm_silu(x, 0)),
        (TypeError, "groups must be an int", lambda: group_norm_silu(x, 2.0)),
        (ValueError, "eps must be", lambda: group_norm_silu(x, 2, eps=-1.0)),
        (ValueError, r"weight must have shape \(6,\)", lambda: group_norm_silu(x, 2, c[:5])),
        (ValueError, r"bias must have shape \(6,\)", lambda: group_norm_silu(x, 2, c, c[None])),
        (ValueError, r"shift must have shape \(2, 6\)", lambda: group_norm_silu(x, 2, shift=c)),
        (TypeError, "weight has dtype torch.float64", lambda: group_norm_silu(x, 2, c.double())),
        (TypeError, "shift must be a real floating-point",
         lambda: group_norm_silu(x, 2, shift=torch.ones(2, 6, dtype=torch.int64, device=device))),
        (ValueError, "backend must be one of", lambda: group_norm_silu(x, 2, backend="fast")),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
    # a numpy scalar eps, as F.group_norm takes it (it was refused as not a number)
    import numpy as np
    assert torch.equal(group_norm_silu(x, 2, eps=np.float32(1e-3), backend=backend),
                       group_norm_silu(x, 2, eps=float(np.float32(1e-3)), backend=backend))


def test_cpu_kernel_checks_its_inputs():
    assert load_cpu_kernels("group_norm_silu")
    x = torch.randn(2, 6, 4, 4)
    op, back = torch.ops.symfast.group_norm_silu_cpu, torch.ops.symfast.group_norm_silu_backward_cpu
    with pytest.raises(RuntimeError, match="divide C = 6"):
        op(x, None, None, None, 4, 1e-5)
    with pytest.raises(RuntimeError, match=r"shift must have shape \[2, 6\]"):
        op(x, torch.randn(6, 2), None, None, 2, 1e-5)
    with pytest.raises(RuntimeError, match="weight must be a CPU Float"):
        op(x, None, torch.randn(6).double(), None, 2, 1e-5)
    with pytest.raises(RuntimeError, match="eps must be finite"):
        op(x, None, None, None, 2, float("nan"))
    with pytest.raises(RuntimeError, match="floating point"):
        op(x.int(), None, None, None, 2, 1e-5)
    _, mean, rstd = op(x, None, None, None, 2, 1e-5)
    with pytest.raises(RuntimeError, match="grad_z must be"):
        back(x[:1], x, None, None, None, mean, rstd, 2)
    with pytest.raises(RuntimeError, match=r"mean and rstd must be CPU Float tensors of shape \(2, 3\)"):
        back(x, x, None, None, None, mean, rstd, 3)
    with pytest.raises(RuntimeError, match="mean and rstd"):
        back(x, x, None, None, None, mean.double(), rstd, 2)


def test_empty_batch():
    for backend in ("cpu", "reference"):
        x = torch.randn(0, 4, 3, 3, requires_grad=True)
        z = group_norm_silu(x, 2, backend=backend)
        assert z.shape == x.shape
        z.sum().backward()
        assert x.grad.shape == x.shape
