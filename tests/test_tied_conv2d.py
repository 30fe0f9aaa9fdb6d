import pytest
import torch
import torch.nn.functional as F

from conftest import TOL, available_backends, device_for, rel_err
from symfast import groups
from symfast._ext import load_cpu_kernels
from symfast.ops.tied_conv2d import tied_conv2d
from symfast.reference.tied_conv2d import expand_weight, kernel_orbits

# (group, C, O, H, W, kernel_size, stride, padding): ordinary, odd and strided shapes.
CASES = [
    ("d4", 3, 5, 9, 9, 3, 1, 1),
    ("d4", 2, 3, 8, 8, 5, 2, 2),
    ("c4", 3, 2, 7, 7, 3, 1, 0),
    ("flip_h", 4, 3, 6, 11, (3, 5), (2, 1), (0, 2)),
    ("flip_v", 1, 2, 5, 4, (3, 2), 1, (1, 0)),
    # wider than one 8-column chunk of the CPU stencil, and not a multiple of it
    ("d4", 3, 4, 16, 20, 5, 1, 2),
]


def _make(case, dtype, device, batch=2, seed=0):
    group, c, o, h, w, k, _, _ = case
    gen = torch.Generator().manual_seed(seed)
    ks = (k, k) if isinstance(k, int) else k
    r = kernel_orbits(group, ks).count
    x = torch.randn(batch, c, h, w, generator=gen).to(device, dtype)
    weight = torch.randn(o, c, r, generator=gen).to(device, dtype)
    bias = torch.randn(o, generator=gen).to(device, dtype)
    return x, weight, bias, ks


def _dense(x, weight, bias, case, ks):
    group, *_, stride, padding = case
    return F.conv2d(x, expand_weight(weight, kernel_orbits(group, ks)), bias, stride, padding)


@pytest.mark.parametrize("group,kernel,count", [
    ("d4", 3, 3), ("d4", 5, 6), ("c4", 3, 3), ("c4", 5, 7), ("flip_h", 3, 6), ("flip_v", 3, 6),
    ("c2", 3, 5), ("trivial", 3, 9)])
def test_orbit_counts_and_expanded_kernel_is_invariant(group, kernel, count):
    orbits = kernel_orbits(group, (kernel, kernel))
    assert orbits.count == count
    w = expand_weight(torch.randn(2, 3, count), orbits)
    g = groups.get(group)
    for k in range(len(g)):
        assert torch.equal(g.elements[k](w), w)
    # distinct orbits hold independent values: the expanded kernel has exactly `count` values
    assert torch.unique(w[0, 0]).numel() == count


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[5]}-s{c[6]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_dense_conv(backend, case, dtype):
    device = device_for(backend)
    x, weight, bias, ks = _make(case, dtype, device)
    out = tied_conv2d(x, weight, bias, ks, case[0], case[6], case[7], backend=backend)
    ref = _dense(x.double(), weight.double(), bias.double(), case, ks)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) <= TOL[dtype]


def test_non_contiguous_and_no_bias(backend):
    device = device_for(backend)
    case = CASES[0]
    x, weight, _, ks = _make(case, torch.float32, device, batch=3)
    x_nc = x.transpose(2, 3)  # a transposed view: not contiguous
    weight_nc = torch.cat([weight, weight], dim=2)[:, :, ::2]
    assert not x_nc.is_contiguous() and not weight_nc.is_contiguous()
    out = tied_conv2d(x_nc, weight_nc, None, ks, "d4", 1, 1, backend=backend)
    ref = _dense(x_nc.double(), weight_nc.double(), None, case, ks)
    assert rel_err(out, ref) <= TOL[torch.float32]


# The CPU fp32 stride-1 forward and both gradients fuse the stencil into the GEMM (strips of 16
# columns, blocks of up to 6 output channels, blocks of 8 rows; the input gradient is the forward
# kernel run on grad_out): widths that are not a multiple of 16, channel counts that leave every
# tail for the last blocks, heights that leave a partial row block, no padding, 6- and 7-orbit
# kernels, one sample (fewer work items than threads).
FUSED_CASES = [
    # (group, C, O, H, W, kernel_size, padding, batch, bias)
    ("d4", 5, 13, 19, 16, 3, 1, 2, True),
    ("d4", 3, 7, 9, 33, 3, 0, 1, False),
    ("flip_h", 4, 6, 17, 24, 3, 1, 3, True),
    ("c4", 2, 11, 12, 21, 5, 2, 2, True),
    ("d4", 70, 5, 10, 40, 3, 1, 1, True),
]


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: f"{c[0]}-{c[2]}x{c[3]}x{c[4]}-k{c[5]}")
def test_cpu_fused_forward_and_gradients_elementwise(case):
    assert load_cpu_kernels("tied_conv2d")
    group, c, o, h, w, k, pad, batch, with_bias = case
    gen = torch.Generator().manual_seed(3)
    orbits = kernel_orbits(group, (k, k))
    x = torch.randn(batch, c, h, w, generator=gen).requires_grad_()
    weight = torch.randn(o, c, orbits.count, generator=gen).requires_grad_()
    bias = torch.randn(o, generator=gen).requires_grad_() if with_bias else None
    out = tied_conv2d(x, weight, bias, k, group, 1, pad, backend="cpu")
    ref_args = [t.detach().double().requires_grad_() for t in (x, weight)]
    ref_bias = None if bias is None else bias.detach().double().requires_grad_()
    ref = F.conv2d(ref_args[0], expand_weight(ref_args[1], orbits), ref_bias, 1, pad)
    assert out.shape == ref.shape

    # every element, not just the norm: a wrong strip or channel block must fail
    def close(got, want):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))

    close(out.detach(), ref.detach())
    # the input gradient goes through the same strips and blocks (fused when batch >= threads)
    grad_out = torch.randn(out.shape, generator=gen)
    out.backward(grad_out)
    ref.backward(grad_out.double())
    close(x.grad, ref_args[0].grad)
    close(weight.grad, ref_args[1].grad)
    if bias is not None:
        close(bias.grad, ref_bias.grad)
    # bf16 inputs take the same path in fp32 and round once: each element within bf16's half ulp
    xb, wb = x.detach().bfloat16(), weight.detach().bfloat16()
    bb = None if bias is None else bias.detach().bfloat16()
    out_b = tied_conv2d(xb, wb, bb, k, group, 1, pad, backend="cpu")
    ref_b = F.conv2d(xb.double(), expand_weight(wb.double(), orbits), None if bb is None else bb.double(),
                     1, pad)
    assert out_b.dtype == torch.bfloat16
    torch.testing.assert_close(out_b.double(), ref_b, rtol=2.0 ** -8, atol=1e-5 * float(ref_b.abs().max()))


# stride 1 (the CPU's register gather for the input gradient: widths below 8, 8 and above, a
# 5x5 and a non-square kernel, no padding) and a strided case
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[4], CASES[5]],
                         ids=["d4", "c4-nopad", "flip_h-strided", "flip_v-3x2", "d4-5x5-wide"])
def test_gradients_match_dense_conv(backend, case):
    device = device_for(backend)
    x, weight, bias, ks = _make(case, torch.float32, device, seed=1)
    args = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = tied_conv2d(*args, ks, case[0], case[6], case[7], backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_args = [t.double().requires_grad_() for t in (x, weight, bias)]
    _dense(*ref_args, case, ks).backward(grad_out.double())
    for got, ref in zip(args, ref_args):
        assert rel_err(got.grad, ref.grad) <= TOL[torch.float32]


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_gradcheck_fp64(backend_name):
    if backend_name not in available_backends():
        pytest.skip(f"{backend_name} unavailable")
    case = ("flip_h", 2, 2, 5, 6, (3, 3), (2, 1), (1, 1))
    x, weight, bias, ks = _make(case, torch.float64, device_for(backend_name), batch=1)
    args = tuple(t.requires_grad_() for t in (x, weight, bias))
    # fast_mode: a random projection of the Jacobian; the full one takes ~2 min in the interpreter
    assert torch.autograd.gradcheck(
        lambda a, b, c: tied_conv2d(a, b, c, ks, "flip_h", (2, 1), 1, backend=backend_name), args,
        fast_mode=True)


def test_opcheck_cpu():
    from symfast.ops.tied_conv2d import _tables, _tied_conv2d_op

    case = ("d4", 2, 2, 5, 5, 3, 1, 1)
    x, weight, bias, ks = _make(case, torch.float32, "cpu", batch=1)
    positions, offsets = _tables(kernel_orbits("d4", ks), x.device)
    args = (x.requires_grad_(), weight.requires_grad_(), bias, positions, offsets, [3, 3], [1, 1],
            [1, 1], "cpu")
    torch.library.opcheck(_tied_conv2d_op, args)


def test_stencil_kernels_match_reference():
    assert load_cpu_kernels("tied_conv2d")
    from symfast.kernels import tied_conv2d as triton_kernels
    from symfast.reference.tied_conv2d import stencil

    x = torch.randn(2, 3, 7, 6)
    orbits = kernel_orbits("flip_h", (3, 3))
    ref = stencil(x, orbits, (2, 1), (1, 1))
    args = (orbits.positions, orbits.offsets, 3, 3, 2, 1, 1, 1)
    assert rel_err(torch.ops.symfast.tied_stencil_cpu(x, *args), ref) <= 1e-6
    got = triton_kernels.stencil(x, orbits.positions, orbits.offsets, (3, 3), (2, 1), (1, 1))
    assert rel_err(got, ref) <= 1e-6
    # the transposed stencil is the adjoint: <S x, g> == <x, Sᵀ g>
    g = torch.randn_like(ref)
    lhs = (ref.double() * g.double()).sum()
    for gx in (torch.ops.symfast.tied_stencil_transpose_cpu(g, *args, 7, 6),
               triton_kernels.stencil_transpose(g, orbits.positions, orbits.offsets, (3, 3), (2, 1),
                                                (1, 1), (7, 6))):
        assert abs(float(lhs - (x.double() * gx.double()).sum())) <= 1e-5 * float(lhs.abs())


def test_bad_inputs_name_the_argument():
    x = torch.randn(1, 3, 8, 8)
    w = torch.randn(4, 3, 3)
    with pytest.raises(ValueError, match="square kernel"):
        tied_conv2d(x, torch.randn(4, 3, 6), None, (3, 5), "c4")
    with pytest.raises(ValueError, match="weight"):
        tied_conv2d(x, torch.randn(4, 3, 9), None, 3, "d4")
    with pytest.raises(ValueError, match="bias"):
        tied_conv2d(x, w, torch.randn(5), 3, "d4")
    with pytest.raises(TypeError, match="x"):
        tied_conv2d(x.long(), w, None, 3, "d4")
    with pytest.raises(ValueError, match="x must be"):
        tied_conv2d(x[0], w, None, 3, "d4")
    with pytest.raises(ValueError, match="kernel_size"):
        tied_conv2d(x, w, None, 0, "d4")
    with pytest.raises(TypeError, match="stride"):
        tied_conv2d(x, w, None, 3, "d4", stride=1.5)
    with pytest.raises(ValueError, match="padding"):
        tied_conv2d(x, w, None, 3, "d4", padding=-1)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        tied_conv2d(torch.randn(1, 3, 2, 2), w, None, 3, "d4")
    with pytest.raises(ValueError, match="sign"):
        tied_conv2d(x, w, None, 3, "sign")
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has torch.float32"):
        tied_conv2d(x, w.double(), None, 3, "d4")
    with pytest.raises(ValueError, match="backend"):
        tied_conv2d(x, w, None, 3, "d4", backend="fast")


def test_cpu_kernel_rejects_bad_tables():
    assert load_cpu_kernels("tied_conv2d")
    x = torch.randn(1, 2, 5, 5)
    bad_positions = torch.tensor([0, 1, 99], dtype=torch.int32)
    offsets = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.symfast.tied_stencil_cpu(x, bad_positions, offsets, 3, 3, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match="offsets"):
        torch.ops.symfast.tied_stencil_cpu(x, bad_positions[:2], offsets, 3, 3, 1, 1, 1, 1)


def test_eager_path_matches_the_custom_op():
    """Eager calls skip the custom op's Python dispatch (_dispatch.kernel_op); outputs and all
    three gradients must equal the custom op's, with and without grad mode."""
    from symfast.ops.tied_conv2d import _tables, _tied_conv2d_op

    assert load_cpu_kernels("tied_conv2d")
    case = ("d4", 3, 5, 9, 17, 3, 1, 1)
    x, weight, bias, ks = _make(case, torch.float32, "cpu", seed=4)
    positions, offsets = _tables(kernel_orbits("d4", ks), x.device)
    geometry = ([3, 3], [1, 1], [1, 1], "cpu")
    grad_out = None
    results = []
    for call in (lambda a, b, c: tied_conv2d(a, b, c, ks, "d4", 1, 1, backend="cpu"),
                 lambda a, b, c: _tied_conv2d_op(a, b, c, positions, offsets, *geometry)):
        args = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = call(*args)
        grad_out = torch.randn_like(out) if grad_out is None else grad_out
        out.backward(grad_out)
        with torch.no_grad():
            assert torch.equal(call(*args), out)
        results.append([out.detach(), *(a.grad for a in args)])
    for eager, op in zip(*results):
        assert torch.equal(eager, op)


def test_compile_fullgraph_forward_and_backward():
    """Under torch.compile the public function hands the custom op (with its fake impl) to the
    tracer instead of the eager autograd.Function; no graph breaks, same values and gradients."""
    assert load_cpu_kernels("tied_conv2d")
    case = ("d4", 3, 5, 9, 17, 3, 1, 1)
    x, weight, bias, ks = _make(case, torch.float32, "cpu", seed=5)
    fn = torch.compile(lambda a, b, c: tied_conv2d(a, b, c, ks, "d4", 1, 1, backend="cpu"),
                       fullgraph=True, backend="aot_eager")
    args = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = fn(*args)
    grad_out = torch.randn_like(out)
    with torch.profiler.profile() as prof:
        out.backward(grad_out)
    # one kernel call for all three gradients, as in eager (it used to be one per gradient)
    calls = [e for e in prof.events() if e.name == "symfast::tied_conv2d_backward_cpu"]
    assert len(calls) == 1
    ref_args = [t.double().requires_grad_() for t in (x, weight, bias)]
    ref = _dense(*ref_args, case, ks)
    ref.backward(grad_out.double())
    assert rel_err(out, ref) <= TOL[torch.float32]
    for got, want in zip(args, ref_args):
        assert rel_err(got.grad, want.grad) <= TOL[torch.float32]
    # only some gradients wanted (x frozen, no bias): the others are not computed or returned
    fn2 = torch.compile(lambda a, b: tied_conv2d(a, b, None, ks, "d4", 1, 1, backend="cpu"),
                        fullgraph=True, backend="aot_eager")
    w2 = weight.clone().requires_grad_()
    fn2(x, w2).backward(grad_out)
    want = ref_args[1].grad
    assert rel_err(w2.grad, want) <= TOL[torch.float32]


def test_compile_fullgraph_with_orbits_not_yet_cached():
    """Finding a kernel's orbits reads tensor values: fullgraph=True failed ("Could not guard on
    data-dependent expression") whenever the orbit cache had no entry for the group object,
    e.g. a deepcopied (or pickled) module, whose group is a new object, or a first call inside
    the compiled function; the orbits enter the graph as constants now."""
    import copy

    from symfast.nn import TiedConv2d
    torch.manual_seed(0)
    layer = TiedConv2d(2, 3, 5, "c4")
    clone = copy.deepcopy(layer)
    assert clone.group is not layer.group
    x = torch.randn(2, 2, 7, 7)
    assert rel_err(torch.compile(clone, fullgraph=True, backend="aot_eager")(x), layer(x)) <= 1e-6
    fresh = groups.product("flip_h", "flip_v")  # a new group object: nothing cached for it
    w = torch.randn(4, 2, 4)
    fn = torch.compile(lambda a, b: tied_conv2d(a, b, None, 3, fresh, 1, 1), fullgraph=True,
                       backend="aot_eager")
    want = F.conv2d(x, expand_weight(w, kernel_orbits(fresh, (3, 3))), padding=1)
    assert rel_err(fn(x, w), want) <= TOL[torch.float32]
    # the kernel-size error is the ValueError, not dynamo's internal error wrapping it
    bad = torch.compile(lambda a, b: tied_conv2d(a, b, None, (3, 2), "c4", 1, 1), backend="aot_eager")
    with pytest.raises(ValueError, match="need a square kernel"):
        bad(x, w)


def test_modules_build_on_the_meta_device():
    """The orbit tables were made on the default device: under torch.device("meta") their
    values could not be read (Tensor.item() on a meta tensor)."""
    from symfast.nn import EquivariantUNet, TiedConv2d
    with torch.device("meta"):
        layer = TiedConv2d(2, 3, 7, "c4")  # a kernel size no other test caches first
        net = EquivariantUNet(1, 1, channels=(8, 16), group="flip_h")
    assert layer.weight.is_meta and layer.orbits.index.device.type == "cpu"
    layer = layer.to_empty(device="cpu")
    layer.reset_parameters()
    x = torch.randn(1, 2, 9, 9)
    want = F.conv2d(x, layer.expanded_weight(), layer.bias, padding=3)
    assert rel_err(layer(x), want) <= TOL[torch.float32]
    net = net.to_empty(device="cpu")
    assert net(torch.randn(1, 1, 8, 8), 0.1).shape == (1, 1, 8, 8)


# The CPU fp32/bf16 stride-1 kernels put several samples side by side on one "canvas" when a plane
# is narrower than (or not a multiple of) the 16-column strips, and run the input gradient as the
# forward op on grad_out (theta transposed, positions reflected). Shapes: planes 5x7, 8x8, 4x4,
# 3x3, 1x1 and 19x40 (every column tail); batches of 1, 3 and 37 (a last canvas group of one
# sample, with 1 and 2 threads: the canvas width depends on the thread count); channel counts 1,
# 2, 7, 32, 33 (every tail of the 6-row output blocks, 1-row blocks split over k, the 8- and
# 16-wide weight-gradient panels); padding 0 and 2 and a padding the input gradient cannot
# reflect (3 on a 3x3 kernel: the unfused path).
CANVAS_CASES = [
    # (group, C, O, H, W, kernel_size, padding, batch)
    ("d4", 1, 32, 8, 8, 3, 1, 37),
    ("d4", 32, 1, 4, 4, 3, 1, 37),
    ("d4", 7, 33, 5, 7, 3, 1, 37),
    ("d4", 33, 7, 8, 8, 3, 1, 3),
    ("d4", 2, 2, 4, 4, 3, 1, 1),
    ("d4", 32, 32, 3, 3, 3, 1, 37),
    ("c4", 7, 2, 5, 7, 3, 0, 13),
    ("flip_h", 2, 33, 8, 8, 3, 2, 37),
    ("d4", 33, 32, 19, 40, 3, 1, 3),
    ("d4", 3, 5, 1, 1, 3, 1, 37),
    ("d4", 2, 7, 6, 9, 5, 2, 5),
    ("d4", 3, 4, 4, 4, 3, 3, 37),
    ("d4", 3, 4, 16, 16, 3, 3, 2),
]


def _reference_grads(x, weight, bias, group, k, pad, grad_out):
    from symfast.reference.tied_conv2d import tied_conv2d as reference_tied_conv2d

    args = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    out = reference_tied_conv2d(*args, kernel_orbits(group, (k, k)), (1, 1), (pad, pad))
    out.backward(grad_out.double())
    return out.detach(), [a.grad for a in args]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CANVAS_CASES,
                         ids=lambda c: f"{c[0]}-{c[1]}to{c[2]}-{c[3]}x{c[4]}-k{c[5]}p{c[6]}-b{c[7]}")
def test_cpu_canvas_forward_and_gradients_match_reference(case, threads):
    assert load_cpu_kernels("tied_conv2d")
    group, c, o, h, w, k, pad, batch = case
    gen = torch.Generator().manual_seed(11)
    orbits = kernel_orbits(group, (k, k))
    # a non-contiguous input: every other sample of a larger batch, channels-last storage
    x = torch.randn(2 * batch, h, w, c, generator=gen).permute(0, 3, 1, 2)[::2]
    assert not x.is_contiguous()
    weight = torch.randn(o, c, orbits.count, generator=gen)
    bias = torch.randn(o, generator=gen)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = tied_conv2d(*args, k, group, 1, pad, backend="cpu")
        grad_out = torch.randn(out.shape, generator=gen)
        out.backward(grad_out)
        # bf16 takes the same kernels in fp32 and rounds once
        xb, wb, bb = (t.detach().bfloat16().requires_grad_() for t in (x, weight, bias))
        out_b = tied_conv2d(xb, wb, bb, k, group, 1, pad, backend="cpu")
        out_b.backward(grad_out.bfloat16())
    finally:
        torch.set_num_threads(previous)
    ref, ref_grads = _reference_grads(x, weight, bias, group, k, pad, grad_out)
    assert out.shape == ref.shape
    for got, want in zip([out.detach(), *(a.grad for a in args)], [ref, *ref_grads]):
        assert rel_err(got, want) <= TOL[torch.float32]
        # every element, not just the norm: a strip stored to the wrong sample must fail
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    ref_b, ref_grads_b = _reference_grads(xb.float(), wb.float(), bb.float(), group, k, pad,
                                          grad_out.bfloat16().float())
    assert out_b.dtype == torch.bfloat16
    for got, want in zip([out_b.detach(), xb.grad, wb.grad, bb.grad], [ref_b, *ref_grads_b]):
        assert got.dtype == torch.bfloat16
        assert rel_err(got, want) <= TOL[torch.bfloat16]


def test_cpu_weight_gradient_is_deterministic():
    """The weight gradient's partial sums are fixed runs of work items added in order: two calls
    (threads racing for the runs differently) give the same bits."""
    assert load_cpu_kernels("tied_conv2d")
    gen = torch.Generator().manual_seed(12)
    orbits = kernel_orbits("d4", (3, 3))
    x = torch.randn(37, 33, 8, 8, generator=gen)
    grad_out = torch.randn(37, 32, 8, 8, generator=gen)
    weight = torch.randn(32, 33, orbits.count, generator=gen)
    args = (grad_out, x, weight, orbits.positions, orbits.offsets, 3, 3, 1, 1, 1, 1, [False, True, False])
    first = torch.ops.symfast.tied_conv2d_backward_cpu(*args)[1]
    for _ in range(3):
        assert torch.equal(torch.ops.symfast.tied_conv2d_backward_cpu(*args)[1], first)


@pytest.mark.parametrize("shape", [(8, 16, 24), (64, 16, 8), (3, 8, 40)])
def test_cpu_fp32_weight_gradient_has_the_same_bits_at_1_and_2_threads(shape):
    """The fused route planned its canvas (samples side by side) for the thread count, and the
    samples one GEMM sums over with it: (8, 16, 24, 24) gave other bits at 2 threads than at 1
    (found by a user tryout; docs/design.md promises thread-count-free bits)."""
    assert load_cpu_kernels("tied_conv2d")
    b, c, h = shape
    gen = torch.Generator().manual_seed(4)
    orbits = kernel_orbits("d4", (3, 3))
    x, grad_out = torch.randn(b, c, h, h, generator=gen), torch.randn(b, c, h, h, generator=gen)
    weight = torch.randn(c, c, orbits.count, generator=gen)
    args = (grad_out, x, weight, orbits.positions, orbits.offsets, 3, 3, 1, 1, 1, 1, [True, True, False])
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(torch.ops.symfast.tied_conv2d_backward_cpu(*args)[:2])
    finally:
        torch.set_num_threads(previous)
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)


def test_cpu_unfused_weight_gradient_has_the_same_bits_at_any_thread_count():
    """fp64 takes the per-sample route (stencil + GEMM per sample inside the parallel region):
    its partial sums are fixed runs of samples added in order, so 1 and 2 threads and repeated
    calls give the same bits."""
    assert load_cpu_kernels("tied_conv2d")
    gen = torch.Generator().manual_seed(21)
    orbits = kernel_orbits("d4", (3, 3))
    # large enough per sample that both threads take samples (the previous per-thread partials
    # then gave other bits at 2 threads than at 1 here)
    x = torch.randn(48, 16, 24, 24, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(48, 16, 24, 24, generator=gen, dtype=torch.float64)
    weight = torch.randn(16, 16, orbits.count, generator=gen, dtype=torch.float64)
    args = (grad_out, x, weight, orbits.positions, orbits.offsets, 3, 3, 1, 1, 1, 1, [False, True, False])
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 2, 2):
            torch.set_num_threads(threads)
            results.append(torch.ops.symfast.tied_conv2d_backward_cpu(*args)[1])
    finally:
        torch.set_num_threads(previous)
    for got in results[1:]:
        assert torch.equal(got, results[0])
    want = _reference_grads(x, weight, torch.zeros(16, dtype=torch.float64), "d4", 3, 1, grad_out)[1][1]
    assert rel_err(results[0], want) <= TOL[torch.float64]


def test_cpu_backward_rejects_mismatched_grad_out_dtype():
    assert load_cpu_kernels("tied_conv2d")
    orbits = kernel_orbits("d4", (3, 3))
    x = torch.randn(2, 3, 8, 8)
    weight = torch.randn(4, 3, orbits.count)
    with pytest.raises(RuntimeError, match="grad_out dtype"):
        torch.ops.symfast.tied_conv2d_backward_cpu(torch.randn(2, 4, 8, 8).double(), x, weight,
                                                   orbits.positions, orbits.offsets, 3, 3, 1, 1, 1, 1,
                                                   [True, True, False])


# fp64 skips the fused kernels: the stencil + at::mm paths that also serve CPUs without AVX2+FMA
# (small planes as one GEMM over the batch, per-sample GEMMs inside the parallel region when there
# are at least as many samples as threads, whole-batch GEMMs otherwise).
@pytest.mark.parametrize("case", [("d4", 7, 33, 4, 4, 3, 1, 3), ("d4", 2, 3, 19, 40, 3, 1, 1),
                                  ("c4", 33, 2, 17, 16, 3, 0, 5), ("d4", 3, 4, 4, 4, 3, 3, 2)],
                         ids=["small-plane", "one-sample", "per-sample", "pad3"])
def test_cpu_unfused_paths_fp64(case):
    assert load_cpu_kernels("tied_conv2d")
    group, c, o, h, w, k, pad, batch = case
    gen = torch.Generator().manual_seed(13)
    orbits = kernel_orbits(group, (k, k))
    x = torch.randn(batch, c, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(o, c, orbits.count, generator=gen, dtype=torch.float64)
    bias = torch.randn(o, generator=gen, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = tied_conv2d(*args, k, group, 1, pad, backend="cpu")
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(grad_out)
    ref, ref_grads = _reference_grads(x, weight, bias, group, k, pad, grad_out)
    for got, want in zip([out.detach(), *(a.grad for a in args)], [ref, *ref_grads]):
        assert rel_err(got, want) <= TOL[torch.float64]


def test_empty_batch_and_no_output_channels_on_every_backend(backend):
    """B = 0 and O = 0 are valid: empty outputs and gradients of the right shapes (Triton's
    reshapes with -1 used to fail on 0 elements)."""
    from symfast.nn import TiedConv2d
    dev = device_for(backend)
    m = TiedConv2d(3, 4, 3, "d4", padding=1, backend=backend).to(dev)
    x = torch.randn(0, 3, 8, 8, device=dev, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert y.shape == (0, 4, 8, 8) and x.grad.shape == x.shape
    assert torch.equal(m.weight.grad, torch.zeros_like(m.weight))
    w = m.weight.detach()[:0].requires_grad_(True)
    x = torch.randn(2, 3, 8, 8, device=dev, requires_grad=True)
    y = tied_conv2d(x, w, None, 3, "d4", padding=1, backend=backend)
    y.sum().backward()
    assert y.shape == (2, 0, 8, 8) and torch.equal(x.grad, torch.zeros_like(x))
    assert w.grad.shape == (0, 3, 3)


@pytest.mark.parametrize("group, kernel, shape", [("c4", 3, (1, 1, 1, 1)), ("trivial", 3, (1, 1, 1, 1)),
                                                  ("d4", 5, (1, 2, 1, 1)), ("d4", 3, (3, 2, 4, 4)),
                                                  ("flip_h", 3, (5, 3, 3, 7))])
def test_weight_gradient_nan_only_where_the_input_reaches(backend, group, kernel, shape):
    """A NaN in x makes NaN only the weight gradients of orbits whose taps read it. The cpu
    kernel lays narrow planes side by side and multiplied the stencil of dropped columns, which
    reads the NaN, by a zero grad_out (0 · NaN): found by tests/test_fuzz_modules.py."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g)
    x[shape[0] // 2, 0, shape[2] // 2, shape[3] - 1] = float("nan")
    orbits = kernel_orbits(groups.get(group), (kernel, kernel))
    weight = torch.randn(2, shape[1], orbits.count, generator=g)
    seed = torch.randn(shape[0], 2, shape[2], shape[3], generator=g)
    grads = {}
    for b in ("reference", backend):
        w = weight.to(dev).clone().requires_grad_(True)
        out = tied_conv2d(x.to(dev), w, None, kernel, group, 1, kernel // 2, backend=b)
        out.backward(seed.to(dev))
        grads[b] = w.grad.cpu().clone()
    ref, got = grads["reference"], grads[backend]
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert not torch.isnan(ref).all()  # some orbits never read the NaN
    finite = ~torch.isnan(ref)
    assert rel_err(got[finite], ref[finite]) <= TOL[torch.float32]
