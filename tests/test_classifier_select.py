import pytest
import torch
from conftest import TOL, available_backends, device_for, rel_err

from symfast.ops.classifier_select import classifier_select
from symfast.reference import classifier_select as reference

# (B, F, K, C): odd sizes on purpose, a single classifier, a single class, and (cpu only) the
# benchmark-like shape where K·C spans several GEMM tiles.
SHAPES = [(7, 13, 3, 5), (1, 9, 1, 4), (5, 33, 6, 1), (37, 70, 5, 11)]
BIG = (130, 257, 16, 50)


def _inputs(b, f, k, c, dtype=torch.float32, device="cpu", requires_grad=False, gen=None):
    def rnd(*shape, scale=1.0):
        t = (torch.randn(shape, dtype=torch.float64, generator=gen) * scale).to(dtype).to(device)
        return t.requires_grad_(requires_grad)
    # Weights scaled like a trained layer (unit-size scores), so the softmax is neither flat
    # nor one-hot and both gradient terms matter.
    return (rnd(b, f), rnd(k, f, scale=f ** -0.5), rnd(k), rnd(k, c, f, scale=f ** -0.5), rnd(k, c))


def _ref64(args, temperature):
    return reference.classifier_select(*[a.detach().double().cpu().requires_grad_() for a in args],
                                       temperature)


def _shapes(backend):
    return SHAPES[:3] if backend == "triton" else SHAPES + [BIG]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.37])
def test_forward_and_grads_match_reference(backend, dtype, temperature):
    dev = device_for(backend)
    # Seeded: the inputs drawn from the global generator depended on the tests run before, and
    # about 1 in 300 random draws of the (5, 33, 6, 1) case has a gate_weight gradient that float32
    # does not give to 1e-5 of float64 (torch's own float32 autograd of the reference reached
    # 2.9e-5 on 1 of 300 seeds, the kernel the same; the baseline-ISA build met such a draw in CI).
    gen = torch.Generator().manual_seed(0)
    for shape in _shapes(backend):
        args = _inputs(*shape, dtype=dtype, device=dev, requires_grad=True, gen=gen)
        out = classifier_select(*args, temperature=temperature, backend=backend)
        ref_args = [a.detach().double().cpu().requires_grad_() for a in args]
        ref = reference.classifier_select(*ref_args, temperature)
        assert out.shape == (shape[0], shape[3]) and out.dtype == dtype
        assert rel_err(out, ref) <= TOL[dtype], shape
        grad = torch.randn(out.shape, dtype=torch.float64, generator=gen)
        got = torch.autograd.grad(out, args, grad.to(dtype).to(dev))
        want = torch.autograd.grad(ref, ref_args, grad.to(dtype).double())
        names = ["h", "gate_weight", "gate_bias", "weight", "bias"]
        for name, g, w in zip(names, got, want):
            assert g.shape == w.shape and g.dtype == dtype
            assert rel_err(g, w) <= TOL[dtype], (shape, name)


def test_noncontiguous_inputs(backend):
    dev = device_for(backend)
    b, f, k, c = 6, 11, 3, 7
    h = torch.randn(f, b + 2, device=dev).t()[1:-1]  # transposed and sliced
    gate_weight = torch.randn(f, k, device=dev).t() * f ** -0.5
    gate_bias = torch.randn(2 * k, device=dev)[::2]
    weight = torch.randn(k, f, c, device=dev).transpose(1, 2) * f ** -0.5
    bias = torch.randn(c, k, device=dev).t()
    args = (h, gate_weight, gate_bias, weight, bias)
    assert not any(a.is_contiguous() for a in args)
    out = classifier_select(*args, backend=backend)
    assert rel_err(out, _ref64(args, 1.0)) <= TOL[torch.float32]
    want = reference.classifier_select(*[a.contiguous() for a in args])
    assert rel_err(out, want) <= TOL[torch.float32]


def test_gradcheck_fp64(backend):
    dev = device_for(backend)
    args = _inputs(3, 5, 3, 4, dtype=torch.float64, device=dev, requires_grad=True)
    # Full gradcheck costs two forward calls per input element (~140): too slow for the Triton
    # interpreter, which gets the random-projection check (every output and input still enters).
    assert torch.autograd.gradcheck(
        lambda *a: classifier_select(*a, temperature=0.6, backend=backend), args,
        fast_mode=backend == "triton" and dev == "cpu")


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_opcheck(backend_name):
    from conftest import available_backends
    if backend_name not in available_backends():
        pytest.skip("triton is not importable")
    dev = device_for(backend_name)
    args = _inputs(5, 7, 3, 4, device=dev, requires_grad=True)
    torch.library.opcheck(torch.ops.symfast.classifier_select.default,
                          (*args, 0.8, backend_name))


@pytest.mark.parametrize("threads, shape", [
    (2, BIG),              # 130 rows: two row blocks, each thread with its own GEMMs
    (3, (199, 40, 7, 9)),  # three uneven row and column blocks
    (2, (100, 33, 4, 6)),  # too few rows for two blocks: the BLAS threads the GEMMs
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_threading_paths_match_reference(threads, shape, dtype):
    """The cpu kernel splits rows across threads or leaves the threading to the BLAS, by the
    batch per thread (csrc/cpu/classifier_select.cpp, row_blocks): both paths, at several
    thread counts, whatever OMP_NUM_THREADS the suite runs with."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = _inputs(*shape, dtype=dtype, requires_grad=True)
        out = classifier_select(*args, temperature=0.7, backend="cpu")
        ref_args = [a.detach().double().requires_grad_() for a in args]
        ref = reference.classifier_select(*ref_args, 0.7)
        assert rel_err(out, ref) <= TOL[dtype]
        grad = torch.randn(out.shape, dtype=torch.float64)
        got = torch.autograd.grad(out, args, grad.to(dtype))
        want = torch.autograd.grad(ref, ref_args, grad.to(dtype).double())
        for name, g, w in zip(["h", "gate_weight", "gate_bias", "weight", "bias"], got, want):
            assert rel_err(g, w) <= TOL[dtype], name
        # The row blocks run on OpenMP threads: they must take on the caller's inference mode,
        # or writing the scores made under it would be refused there.
        with torch.inference_mode():
            plain = classifier_select(*[a.detach() for a in args], temperature=0.7, backend="cpu")
        assert torch.equal(plain, out.detach())
    finally:
        torch.set_num_threads(previous)


def test_gates_select_the_classifier():
    """With a sharp gate that always prefers classifier 1, the output is classifier 1's logits."""
    b, f, k, c = 5, 8, 3, 4
    h, _, _, weight, bias = _inputs(b, f, k, c)
    gate_weight = torch.zeros(k, f)
    gate_bias = torch.tensor([0.0, 50.0, 0.0])
    out = classifier_select(h, gate_weight, gate_bias, weight, bias, backend="cpu")
    assert rel_err(out, h @ weight[1].T + bias[1]) <= 1e-6
    # temperature → large flattens the gate to the plain average of the K classifiers
    out = classifier_select(h, gate_weight, gate_bias, weight, bias, temperature=1e9, backend="cpu")
    mean = (torch.einsum("bf,kcf->bkc", h, weight) + bias).mean(1)
    assert rel_err(out, mean) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_small_temperature_selects_the_argmax_not_nan(backend, dtype):
    # scores / T overflows (3e-39 is just above the accepted minimum): the max must be taken
    # before the scaling, on every backend alike; the gates tend to the argmax's one-hot
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(4)
    args = [a.to(dev) for a in _inputs(6, 9, 4, 3, dtype=dtype, gen=gen)]
    args = [a.requires_grad_() for a in args]
    h, gate_weight, gate_bias, weight, bias = args
    for temperature in (3e-39, 1e-30, 1e-6):
        out = classifier_select(*args, temperature=temperature, backend=backend)
        scores = (h.double() @ gate_weight.double().T + gate_bias.double())
        pick = scores.argmax(1)
        want = torch.einsum("bf,bcf->bc", h.double(), weight.double()[pick]) + bias.double()[pick]
        assert torch.isfinite(out).all()
        assert rel_err(out.double(), want) <= TOL[dtype]
        grads = torch.autograd.grad(out.sum(), args)
        assert all(torch.isfinite(g).all() for g in grads)
        # one-hot gates: no gradient reaches the gate parameters
        assert grads[1].abs().max() == 0 and grads[2].abs().max() == 0


def test_compile_sees_through_the_op():
    args = _inputs(6, 10, 4, 3, requires_grad=True)
    fn = torch.compile(lambda *a: classifier_select(*a, backend="cpu"), fullgraph=True)
    out = fn(*args)
    assert rel_err(out, _ref64(args, 1.0)) <= TOL[torch.float32]
    out.sum().backward()
    ref_args = [a.detach().double().requires_grad_() for a in args]
    reference.classifier_select(*ref_args).sum().backward()
    for a, r in zip(args, ref_args):
        assert rel_err(a.grad, r.grad) <= TOL[torch.float32]


def test_empty_batch(backend):
    dev = device_for(backend)
    args = _inputs(0, 5, 2, 3, device=dev, requires_grad=True)
    out = classifier_select(*args, backend=backend)
    assert out.shape == (0, 3)
    grads = torch.autograd.grad(out.sum(), args[1:])
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("bad, exc, match", [
    (dict(h=torch.randn(3, 4, 5)), ValueError, "h must be"),
    (dict(gate_weight=torch.randn(3, 6)), ValueError, "gate_weight"),
    (dict(gate_bias=torch.randn(4)), ValueError, "gate_bias"),
    (dict(weight=torch.randn(3, 2, 6)), ValueError, "weight must be"),
    (dict(weight=torch.randn(2, 2, 5)), ValueError, "weight must be"),
    (dict(bias=torch.randn(3, 3)), ValueError, "bias must be"),
    (dict(h=torch.randint(0, 3, (4, 5))), TypeError, "h must be a real floating"),
    (dict(weight=torch.randn(3, 2, 5, dtype=torch.float64)), TypeError, "weight has dtype"),
    (dict(gate_bias=[0.0, 0.0, 0.0]), TypeError, "gate_bias must be a torch.Tensor"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    # 1/T overflows fp32: the kernels' gates would all be NaN, so every backend refuses it
    (dict(temperature=1e-39), ValueError, r"temperature must be >= 2.94e-39"),
    (dict(temperature=1e-39, backend="reference"), ValueError, "temperature must be >="),
    (dict(temperature="1"), TypeError, "temperature"),
    (dict(backend="gpu"), ValueError, "backend"),
])
def test_bad_inputs(bad, exc, match):
    good = dict(zip(["h", "gate_weight", "gate_bias", "weight", "bias"], _inputs(4, 5, 3, 2)))
    good.update(temperature=1.0, backend="cpu")
    good.update(bad)
    with pytest.raises(exc, match=match):
        classifier_select(**good)


def test_cpu_kernel_rejects_bad_shapes_without_crashing():
    """The raw C++ op checks shapes itself (TORCH_CHECK), whoever calls it."""
    from symfast._ext import load_cpu_kernels
    assert load_cpu_kernels("classifier_select")
    h, gw, gb, w, b = _inputs(4, 5, 3, 2)
    with pytest.raises(RuntimeError, match="bias must be"):
        torch.ops.symfast.classifier_select_fwd_cpu(h, gw, gb, w, b[:2], 1.0)
    out, scores = torch.ops.symfast.classifier_select_fwd_cpu(h, gw, gb, w, b, 1.0)
    with pytest.raises(RuntimeError, match="scores must be"):
        torch.ops.symfast.classifier_select_bwd_cpu(out, scores[:, :-1], h, gw, w, 1.0)
    with pytest.raises(RuntimeError, match="temperature"):
        torch.ops.symfast.classifier_select_fwd_cpu(h, gw, gb, w, b, -1.0)


def test_meta_tensors_with_an_explicit_kernel_backend_are_a_clear_error():
    args = [torch.empty(4, 5, device="meta"), torch.empty(3, 5, device="meta"),
            torch.empty(3, device="meta"), torch.empty(3, 2, 5, device="meta"),
            torch.empty(3, 2, device="meta")]
    assert classifier_select(*args).shape == (4, 2)  # "auto" on meta: the reference's shapes
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        classifier_select(*args, backend="cpu")
    if "triton" in available_backends():
        with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
            classifier_select(*args, backend="triton")


def test_sizes_past_the_triton_tile_are_refused_or_run_by_the_reference(monkeypatch):
    """The Triton kernels hold a row's K x C logits in one tile of next_power_of_2 sizes, which
    Triton caps at 2^20 values: K = 64 classifiers of ImageNet-21k's 21843 classes (2^21) did not
    compile on a GPU. backend='triton' says so, naming K and C; the automatic choice runs the
    reference instead (the same answer)."""
    from symfast.ops import _dispatch
    from symfast.ops.classifier_select import triton_tile_fits
    assert triton_tile_fits(32, 32768) and not triton_tile_fits(32, 32769)
    assert not triton_tile_fits(64, 21843) and triton_tile_fits(64, 16384)
    args = _inputs(2, 3, 64, 16385)
    if "triton" in available_backends():
        with pytest.raises(ValueError, match=r"K=64, C=16385 need 2097152"):
            classifier_select(*[a.to(device_for("triton")) for a in args], backend="triton")
    # the automatic choice where it would pick triton (a CUDA tensor): the reference's answer
    monkeypatch.setattr(_dispatch, "resolve", lambda backend, tensor, op: "triton")
    assert torch.equal(classifier_select(*args), reference.classifier_select(*args, 1.0))
