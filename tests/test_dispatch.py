"""The op dispatch (symfast/ops/_dispatch.py) seen through every public op: the same refusal of a
bad ``backend`` everywhere, a clear error for a backend that cannot take the tensors, and
torch.compile(fullgraph=True) through each op onto its kernel, with no graph break."""
import pytest
import torch

import symfast.ops as ops
from symfast.groups import get
from symfast.ops import StepCoefficients, _dispatch
from tests.conftest import rel_err

COEFS = StepCoefficients(0.9, -0.3, 0.7, 0.2, 0.1, -0.05, 0.4)


def _calls(device="cpu", requires_grad=False):
    """Per op: (the differentiable input tensors, f(backend, *those tensors) -> output)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_(requires_grad)

    tokens = torch.randint(0, 7, (3, 5), generator=gen).to(device)
    fixed = torch.randn(2, 3, 4, 4, generator=gen).to(device)
    y = torch.randn(16, 3, 4, 4, generator=gen).to(device)
    noise = torch.randn(2, 3, 4, 4, generator=gen).to(device)
    return {
        "orbit": ((randn(2, 3, 4, 4),), lambda b, x: ops.orbit(x, "d4", backend=b)),
        "orbit_mean": ((randn(16, 3, 4, 4),), lambda b, x: ops.orbit_mean(x, "d4", backend=b)),
        "fused_step": ((), lambda b: ops.fused_step(fixed, y, COEFS, "d4", noise=noise,
                                                    backend=b)[0]),
        "tied_conv2d": ((randn(2, 3, 6, 6), randn(5, 3, 3), randn(5)),
                        lambda b, x, w, c: ops.tied_conv2d(x, w, c, 3, "d4", 1, 1, backend=b)),
        "attention_pool": ((randn(7, 4), randn(7, 3), randn(3)),
                           lambda b, e, k, q: ops.attention_pool(tokens, None, e, k, q, backend=b)),
        "classifier_select": ((randn(4, 6), randn(3, 6), randn(3), randn(3, 2, 6), randn(3, 2)),
                              lambda b, *a: ops.classifier_select(*a, 0.7, backend=b)),
        "group_norm_silu": ((randn(2, 4, 3, 3), randn(4), randn(4)),
                            lambda b, x, w, c: ops.group_norm_silu(x, 2, w, c, backend=b)),
    }


def test_the_table_covers_every_op():
    public = {name for name in ops.__all__ if name != "StepCoefficients"}
    assert set(_calls()) == public


@pytest.mark.parametrize("bad", ["numba", "CPU", "", "cuda"])
def test_every_op_refuses_an_unknown_backend_with_one_message(bad):
    want = f"backend must be one of ('reference', 'cpu', 'triton'), None or 'auto'; got {bad!r}"
    for name, (args, call) in _calls().items():
        with pytest.raises(ValueError) as info:
            call(bad, *args)
        assert str(info.value) == want, name


@pytest.mark.parametrize("bad", [1, True, ("cpu",)])
def test_every_op_refuses_a_backend_that_is_not_a_str(bad):
    for name, (args, call) in _calls().items():
        with pytest.raises(TypeError, match="backend must be a str or None, got") as info:
            call(bad, *args)
        assert type(bad).__name__ in str(info.value), name


def test_cpu_backend_on_meta_tensors_is_a_clear_error():
    want = "backend='cpu' needs CPU tensors; got a tensor on meta"
    for name, (args, call) in _calls("meta").items():
        with pytest.raises(ValueError) as info:
            call("cpu", *args)
        assert str(info.value) == want, name


def test_auto_on_meta_tensors_runs_the_reference():
    """No kernel takes meta tensors; "auto" falls back to the reference, which propagates shapes."""
    cpu = _calls("cpu")
    for name, (args, call) in _calls("meta").items():
        out = call(None, *args)
        assert out.device.type == "meta", name
        cpu_args, cpu_call = cpu[name]
        assert out.shape == cpu_call("reference", *cpu_args).shape, name


def test_a_custom_op_called_with_another_backend_refuses_it():
    """The torch ops run kernels only; the reference is the public function's business."""
    table, inverse_table = get("d4").tables((4, 4))
    with pytest.raises(ValueError, match="backend must be 'cpu' or 'triton' for symfast::"):
        torch.ops.symfast.orbit(torch.randn(3, 16), table, inverse_table, "reference")
    with pytest.raises(ValueError, match="backend must be 'cpu' or 'triton'"):
        _dispatch.kernels("tied_conv2d", "numba")


@pytest.mark.parametrize("name", sorted(_calls()))
def test_compile_fullgraph_reaches_the_kernel(name):
    """fullgraph=True fails on any graph break; the graph holds the op's custom op (the backend
    choice folded at trace time to the CPU kernel, not traced and not the reference); values and
    gradients equal eager ones."""
    from torch._dynamo.backends.registry import lookup_backend

    args, call = _calls(requires_grad=True)[name]
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: call(None, *a), fullgraph=True, backend=backend)
    out = compiled(*args)
    assert any(target.startswith("symfast.") for target in seen), seen
    want = call("cpu", *args)
    assert rel_err(out, want) <= 1e-6
    if args:
        grad = torch.randn_like(want)
        got = torch.autograd.grad(out, args, grad)
        expected = torch.autograd.grad(want, args, grad)
        for g, e in zip(got, expected):
            assert rel_err(g, e) <= 1e-6


def test_compiled_call_with_an_unknown_backend_raises_the_same_error():
    """The check runs while tracing; dynamo with fullgraph=True wraps the ValueError it observes
    in its own Unsupported error, whose text carries ours."""
    x = torch.randn(2, 3, 4, 4)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: ops.orbit(t, "d4", backend="numba"), fullgraph=True,
                             backend="aot_eager")
    with pytest.raises(Exception, match=r"backend must be one of .*; got 'numba'"):
        compiled(x)


def test_compiled_attention_pool_still_refuses_out_of_range_ids():
    """Compiled, the id and length checks are assertions in the graph instead of host reads."""
    emb, keys, query = torch.randn(7, 4), torch.randn(7, 3), torch.randn(3)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t, n: ops.attention_pool(t, n, emb, keys, query),
                             fullgraph=True, backend="aot_eager")
    good = torch.randint(0, 7, (3, 5))
    lengths = torch.tensor([5, 1, 3])
    want = ops.attention_pool(good, lengths, emb, keys, query)
    assert rel_err(compiled(good, lengths), want) <= 1e-6
    with pytest.raises(RuntimeError, match=r"outside the vocabulary \[0, 7\)"):
        compiled(good + 7, lengths)
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[1, L = 5\]"):
        compiled(good, lengths + 1)


@pytest.mark.parametrize("name", ["tied_conv2d", "attention_pool", "classifier_select",
                                  "group_norm_silu"])
def test_a_double_backward_through_a_kernel_is_an_error_naming_the_op(name):
    """A constant incoming gradient (grad(f·v, x, create_graph=True), a gradient penalty) made
    torch's once_differentiable return gradients silently cut from the op's other inputs; now
    differentiating them again fails, naming the op."""
    inputs, f = _calls(requires_grad=True)[name]
    out = f("cpu", *inputs)
    v = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * v).sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match=f"symfast::{name}'s backward is not differentiable"):
        sum(g.square().sum() for g in grads).backward()
    # with respect to the op's inputs too (a gradient penalty's weight term): None, 0 or "not
    # used in the graph" before, whatever allow_unused / materialize_grads said
    for kwargs in ({}, {"allow_unused": True}, {"allow_unused": True, "materialize_grads": True}):
        with pytest.raises(RuntimeError, match=f"symfast::{name}'s backward is not differentiable"):
            torch.autograd.grad(sum(g.square().sum() for g in grads), inputs[-1], **kwargs)
    with pytest.raises(RuntimeError, match=f"symfast::{name}'s backward is not differentiable"):
        torch.autograd.gradgradcheck(lambda *a: f("cpu", *a), [t.detach().double().requires_grad_()
                                                               for t in inputs])
    # first-order gradients are untouched, create_graph or not
    plain = torch.autograd.grad((f("cpu", *inputs) * v).sum(), inputs)
    for a, b in zip(grads, plain):
        assert torch.equal(a.detach(), b)


def test_fused_step_is_differentiable_twice():
    x, y = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((2, 3, 4, 4), (16, 3, 4, 4)))
    assert torch.autograd.gradgradcheck(lambda a, b: ops.fused_step(a, b, COEFS._replace(c=0.0), "d4",
                                                                    backend="cpu")[0], (x, y))


# ---- torch.func, forward AD, FakeTensorMode and torch.export: the custom op, never a silent
# ---- wrong answer (the eager fast path hands them the raw kernel)

def _with_fused_step(calls):
    gen = torch.Generator().manual_seed(3)
    y, noise = torch.randn(16, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    x = calls["orbit"][0][0].detach().clone().requires_grad_(calls["orbit"][0][0].requires_grad)
    calls["fused_step"] = ((x,), lambda b, a: ops.fused_step(a, y, COEFS, "d4", noise=noise, backend=b)[0])
    return calls


@pytest.mark.parametrize("name", sorted(_calls()))
def test_forward_mode_ad_is_refused_naming_the_op(name):
    """No op has a jvp rule: torch ran them under jvp/jacfwd/forward_ad with a zero tangent."""
    import torch.autograd.forward_ad as fwad
    inputs, f = _with_fused_step(_calls())[name]
    tangents = tuple(torch.randn_like(t) for t in inputs)
    with pytest.raises(NotImplementedError, match=f"symfast::{name} has no forward-mode derivative"):
        torch.func.jvp(lambda *a: f("cpu", *a), inputs, tangents)
    with pytest.raises(NotImplementedError, match=f"symfast::{name} has no forward-mode derivative"):
        torch.func.jacfwd(lambda a: f("cpu", a, *inputs[1:]).sum())(inputs[0])
    with fwad.dual_level(), pytest.raises(NotImplementedError, match=f"symfast::{name}"):
        f("cpu", fwad.make_dual(inputs[0], tangents[0]), *inputs[1:])
    # the reference is plain torch: forward mode works there
    _, tangent = torch.func.jvp(lambda *a: f("reference", *a), inputs, tangents)
    assert tangent.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(set(_calls()) - {"fused_step"}))
def test_eager_calls_use_an_old_style_function(name):
    """Eager calls run an old-style autograd.Function: a new-style one (setup_context apart)
    binds its arguments with inspect on every apply, ~40 us a call. The new-style twin is kept
    for torch.func, which refuses old-style Functions (test below)."""
    inputs, f = _calls(requires_grad=True)[name]
    node = f("cpu", *inputs).grad_fn
    while not hasattr(node, "_forward_cls"):  # past views (tied_conv2d's) to the op's own node
        node = node.next_functions[0][0]
    cls = node._forward_cls
    assert cls.__name__ == "_Eager"
    assert not torch.autograd.function._is_setup_context_defined(cls.setup_context)


@pytest.mark.parametrize("name", sorted(_calls()))
def test_torch_func_grad_and_vmap_match_the_reference(name):
    inputs, f = _with_fused_step(_calls())[name]
    out = f("reference", *inputs)
    v = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    argnums = tuple(range(len(inputs)))

    def loss(backend):
        return lambda *a: (f(backend, *a) * v).sum()
    got = torch.func.grad(loss("cpu"), argnums=argnums)(*inputs)
    want = torch.func.grad(loss("reference"), argnums=argnums)(*inputs)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5
    # jacrev vmaps the backward over the cotangents (the double-backward guard had no vmap rule)
    rest = [t.detach() for t in inputs[1:]]
    jac = torch.func.jacrev(lambda a: f("cpu", a, *rest))(inputs[0].detach())
    assert rel_err(jac, torch.func.jacrev(lambda a: f("reference", a, *rest))(inputs[0].detach())) <= 1e-5
    # vmap over a new leading dim of the first input (the ensemble recipe): torch loops the op
    # over the batch, and the gradients reach the stacked input
    stacked = torch.stack([inputs[0].detach() * s for s in (1.0, -0.5, 2.0)]).requires_grad_()
    batched = torch.vmap(lambda a: f("cpu", a, *[t.detach() for t in inputs[1:]]))(stacked)
    loop = torch.stack([f("reference", a, *[t.detach() for t in inputs[1:]]) for a in stacked])
    assert rel_err(batched, loop) <= 1e-5
    (g_batched,) = torch.autograd.grad(batched.square().sum(), stacked)
    plain = stacked.detach().requires_grad_()
    ref = torch.stack([f("reference", a, *[t.detach() for t in inputs[1:]]) for a in plain])
    (g_loop,) = torch.autograd.grad(ref.square().sum(), plain)
    assert rel_err(g_batched, g_loop) <= 1e-5
    # per-sample gradients (vmap of grad) have no rule on either side: refused, naming the op
    with pytest.raises(NotImplementedError, match=f"symfast::{name} under torch.func.vmap together with grad"):
        torch.vmap(torch.func.grad(lambda a: f("cpu", a, *[t.detach() for t in inputs[1:]]).sum()))(stacked)


@pytest.mark.parametrize("name", sorted(_calls()))
def test_fake_tensor_mode_gives_the_shapes_and_leaves_no_fake_behind(name):
    """Under FakeTensorMode the op runs its fake rule (the raw kernel has none), whether or not
    its tables were built before; tables built under the mode are real, so eager calls after it
    still run."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from symfast import groups
    fresh = groups._NAMED_CACHE.pop("d4")  # a new d4 with no tables yet, for this test only
    try:
        groups._NAMED_CACHE["d4"] = groups.d4()
        for _ in range(2):  # no tables yet, then tables built (under the mode) the first time
            inputs, f = _calls()[name]
            # attention_pool's tokens and fused_step's tensors are constants of f: real ones,
            # as torch.export hands them over; the other ops get only fakes, as FakeTensorMode wants
            constants = name in ("attention_pool", "fused_step")
            with FakeTensorMode(allow_non_fake_inputs=constants) as mode:
                fake = f("cpu", *[mode.from_tensor(t) for t in inputs])
            assert fake.shape == f("reference", *inputs).shape
            assert rel_err(f("cpu", *inputs), f("reference", *inputs)) <= 1e-5
    finally:
        groups._NAMED_CACHE["d4"] = fresh


def test_export_of_a_model_with_symfast_ops_runs_and_leaves_eager_calls_working():
    from symfast import groups
    from symfast.nn import TiedConv2d

    class FrameAveraged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.group = groups.d4()  # no tables yet: built while export traces
            self.conv = TiedConv2d(3, 3, 3, self.group)

        def forward(self, x):
            return ops.orbit_mean(self.conv(ops.orbit(x, self.group)), self.group)

    model = FrameAveraged()
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    program = torch.export.export(model, (x,))
    want = ops.orbit_mean(model.conv(ops.orbit(x, model.group, backend="reference")), model.group,
                          backend="reference")
    assert rel_err(program.module()(x), want) <= 1e-5
    assert rel_err(model(x), want) <= 1e-5  # the eager call after the export


def test_compile_fullgraph_names_a_group_in_a_fresh_process():
    """The first use of a named group inside a compiled function: dynamo traced the group's
    construction (data-dependent tables) and failed under fullgraph=True."""
    import subprocess
    import sys
    code = ("import torch\nfrom symfast import ops\n"
            "f = torch.compile(lambda a: ops.orbit_mean(ops.orbit(a, 'd4') * 2, 'c4'), fullgraph=True)\n"
            "x = torch.randn(2, 3, 4, 4)\n"
            "print(float((f(x) - ops.orbit_mean(ops.orbit(x, 'd4') * 2, 'c4', backend='reference')).abs().max()))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_raw_ops_under_autocast_take_what_torch_ops_take(backend):
    """Under torch.autocast the raw ops refused what F.conv2d / F.linear / F.group_norm take:
    tied_conv2d and classifier_select a bf16 input with float32 parameters (autocast does not
    cast a custom op's inputs), group_norm_silu float32 parameters with a bf16 input; an
    all-float32 tied_conv2d returned float32 where F.conv2d returns bf16."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 3, 6, 6, generator=g), torch.randn(4, 3, 3, generator=g), torch.randn(4, generator=g)
    h = torch.randn(5, 6, generator=g)
    select = [torch.randn(3, 6, generator=g), torch.randn(3, generator=g), torch.randn(3, 4, 6, generator=g),
              torch.randn(3, 4, generator=g)]
    bf = torch.bfloat16
    with torch.autocast("cpu", dtype=bf):
        for inp in (x, x.to(bf)):  # float32 and bf16 inputs, float32 parameters
            got = ops.tied_conv2d(inp, w, b, 3, "d4", 1, 1, backend=backend)
            assert got.dtype == bf
            assert torch.equal(got, ops.tied_conv2d(x.to(bf), w.to(bf), b.to(bf), 3, "d4", 1, 1, backend=backend))
        got = ops.classifier_select(h.to(bf), *select, backend=backend)
        assert got.dtype == bf
        assert torch.equal(got, ops.classifier_select(h.to(bf), *(t.to(bf) for t in select), backend=backend))
    c = torch.randn(3, generator=g)
    got = ops.group_norm_silu(x.to(bf), 3, c, c, backend=backend)  # as F.group_norm, autocast or not
    assert got.dtype == bf and torch.equal(got, ops.group_norm_silu(x.to(bf), 3, c.to(bf), c.to(bf), backend=backend))
