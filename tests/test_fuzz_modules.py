"""Property-based tests of the diffusion modules built on symfast's ops: TiedConv2d, UNet /
EquivariantUNet, and Denoiser with either network inside the samplers (the classifier models are
in tests/test_fuzz_models.py).

Valid-but-odd inputs (size-1 and prime dims, B = 0, transposed / sliced / stride-0 / channels_last
views, every float dtype, huge and tiny values, NaN) go through each kernel backend and through
the reference backend in the same dtype and in float64, compared as tests/_module_fuzz.py
specifies: NaN/inf where the reference has them, elsewhere no further from float64 than 4x the
reference's own error plus TOL. Equivariance is checked where the module promises it, and bad
inputs must raise a ValueError/TypeError naming the argument. Budget: ``SYMFAST_FUZZ_EXAMPLES``
(tests/test_fuzz_ops.py), each module test a share of it: a network example is ~100x an op's.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, note
from hypothesis import strategies as st

from _module_fuzz import SLACK, grads, rounded, rounding_sensitivity, run_three, with_backend
from symfast import Denoiser, sample
from symfast.nn import EquivariantUNet, TiedConv2d, UNet
from symfast.schedules import DDPMSchedule, EDMSchedule, VESchedule
from conftest import TOL
from test_fuzz_ops import (_INTERPRETED, BACKENDS, CONV_GROUPS, FLOATS, NOT_REAL, _expect, _fuzz,
                           make_leaf, specs, view)

KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]
# Equivariance in float64 follows from the float64 accuracy the other tests check; the Triton
# interpreter (seconds per network call) runs only those, a GPU runs all.
EQUIVARIANCE_BACKENDS = [b for b in BACKENDS if not (b == "triton" and _INTERPRETED)]
ROTATIONS = ("c4", "d4")  # groups whose elements need H == W
# input magnitudes (powers of two): the networks normalise, so only the first layer sees them
X_EXP = {torch.float16: (-8, 8), torch.bfloat16: (-60, 60), torch.float32: (-60, 60),
         torch.float64: (-200, 200)}


def _params_drawn(module: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """``module`` with every parameter redrawn (N(0, scale²), the same values for a seed): the
    default init puts norms at weight 1, bias 0, which would hide a swapped or dropped term."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    return module


def _param_grads(module: torch.nn.Module, out: torch.Tensor, x: torch.Tensor,
                 seed: torch.Tensor) -> dict:
    """The gradients of <out, seed> for x, and for the parameters by name (compared together:
    tests/_module_fuzz.py, close_in_total)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    found = grads(out, [p for _, p in named] + [x], seed.to(out.dtype))
    return {"grad x": found[-1], "grad params": {n: g for (n, _), g in zip(named, found)}}


def _nan_at(t: torch.Tensor, seed: int) -> torch.Tensor:
    """``t`` with one element NaN (drawn from ``seed``)."""
    t = t.clone()
    if t.numel():
        t.view(-1)[seed % t.numel()] = float("nan")
    return t


# ---------------------------------------------------------------------------------------------
# TiedConv2d
# ---------------------------------------------------------------------------------------------

@st.composite
def tied_cases(draw, backend: str):
    group = draw(st.sampled_from(CONV_GROUPS))
    square = group in ROTATIONS
    kh = draw(st.sampled_from([1, 2, 3, 5]))
    kw = kh if square else draw(st.sampled_from([1, 2, 3]))
    stride = draw(st.sampled_from([1, 1, 2, (1, 2)]))
    # padding that rotations swap is refused by the layer (tests/test_equivariant_unet.py)
    padding = draw(st.sampled_from([None, 0, 1] + ([] if square else [(0, 2)])))
    pad = (kh // 2, kw // 2) if padding is None else (padding, padding) if isinstance(padding, int) \
        else padding
    small = backend == "triton"
    b = draw(st.sampled_from([0, 1, 2] if small else [0, 1, 2, 3, 5]))
    cin, cout = (draw(st.sampled_from([1, 2, 3] if small else [1, 2, 3, 5, 7])) for _ in range(2))
    h = draw(st.integers(max(1, kh - 2 * pad[0]), 7))
    w = draw(st.integers(max(1, kw - 2 * pad[1]), 7))
    dtype = draw(st.sampled_from(FLOATS))
    return dict(group=group, kernel=(kh, kw), stride=stride, padding=padding,
                bias=draw(st.booleans()), cin=cin, cout=cout, dtype=dtype,
                x=draw(specs((b, cin, h, w), dtype, exp=X_EXP[dtype])),
                seed=draw(st.integers(0, 2**31 - 1)), params=draw(st.integers(0, 2**31 - 1)), nan=draw(st.sampled_from([None] * 5 + [1, 7])))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fuzz_tied_conv2d_module(backend):
    def body(backend, case):
        dtype = case["dtype"]
        conv = TiedConv2d(case["cin"], case["cout"], case["kernel"], case["group"], case["stride"],
                          case["padding"], bias=case["bias"])
        _params_drawn(conv, case["params"], 0.5)
        x_leaf = make_leaf(case["x"], dtype)
        if case["nan"] is not None:
            x_leaf = _nan_at(x_leaf, case["nan"])

        def run(b, compute):
            module = with_backend(conv, b, dtype, compute)
            x = view(case["x"], rounded(x_leaf, dtype, compute).requires_grad_(True))
            out = module(x)
            seed = torch.randn(out.shape, generator=torch.Generator().manual_seed(case["seed"]))
            return {"out": out, **_param_grads(module, out, x, seed)}

        run_three(run, backend, dtype)

    _fuzz(backend, tied_cases(backend), body, share=0.5)


# ---------------------------------------------------------------------------------------------
# UNet / EquivariantUNet
# ---------------------------------------------------------------------------------------------

@st.composite
def unet_cases(draw, backend: str):
    # the Triton interpreter takes seconds per network call: one level, two-element groups
    small = backend == "triton"
    group = draw(st.sampled_from([None, "flip_h", "c2"] if small else
                                 [None, "trivial", "flip_h", "c2", "c4", "d4"]))
    levels = 1 if small else draw(st.sampled_from([1, 2]))
    widths = [1, 2] if small else [1, 2, 3, 5, 8, 16]
    channels = tuple(draw(st.sampled_from(widths)) for _ in range(levels))
    attention = tuple(draw(st.lists(st.integers(0, levels - 1), max_size=1, unique=True)))
    heads = draw(st.sampled_from([h for h in (1, 2) if all(channels[a] % h == 0 for a in attention)
                                  and channels[-1] % h == 0]))
    multiple = 2 ** (levels - 1)
    sizes = st.sampled_from([1, 2] if small else [1, 2, 3, 5])
    h = multiple * draw(sizes)
    w = h if group in ROTATIONS else multiple * draw(sizes)
    # a 1x1 bottom level of single-channel groups is refused (tested below), not fuzzed
    assume(not (h == multiple and w == multiple))
    b = draw(st.sampled_from([0, 1, 2] if small else [0, 1, 2, 3]))
    cin, cout = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 3]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    t_kind = draw(st.sampled_from(["scalar", "batch"]))
    return dict(group=group, channels=channels, attention=attention, heads=heads, cin=cin,
                cout=cout, dtype=dtype, x=draw(specs((b, cin, h, w), dtype, exp=X_EXP[dtype])),
                t=draw(st.floats(-3, 1000)) if t_kind == "scalar" else
                draw(st.lists(st.floats(-3, 1000), min_size=b, max_size=b)),
                seed=draw(st.integers(0, 2**31 - 1)), params=draw(st.integers(0, 2**31 - 1)),
                scale=draw(st.sampled_from([0.1, 0.5, 1.0])),
                nan=draw(st.sampled_from([None] * 7 + [3])))


def _unet(case) -> torch.nn.Module:
    kwargs = dict(channels=case["channels"], attention_levels=case["attention"], heads=case["heads"])
    net = (UNet(case["cin"], case["cout"], **kwargs) if case["group"] is None
           else EquivariantUNet(case["cin"], case["cout"], group=case["group"], **kwargs))
    return _params_drawn(net, case["params"], case["scale"])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fuzz_unet(backend):
    def body(backend, case):
        dtype = case["dtype"]
        net = _unet(case)
        x_leaf = make_leaf(case["x"], dtype)
        if case["nan"] is not None:
            x_leaf = _nan_at(x_leaf, case["nan"])
        t = case["t"] if isinstance(case["t"], float) else torch.tensor(case["t"])

        def run(b, compute):
            module = with_backend(net, b, dtype, compute)
            x = view(case["x"], rounded(x_leaf, dtype, compute).requires_grad_(True))
            out = module(x, t)
            seed = torch.randn(out.shape, generator=torch.Generator().manual_seed(case["seed"]))
            return {"out": out, **_param_grads(module, out, x, seed)}

        run_three(run, backend, dtype)

    _fuzz(backend, unet_cases(backend), body, share=0.5)


@pytest.mark.parametrize("backend", EQUIVARIANCE_BACKENDS)
def test_fuzz_equivariant_unet_is_equivariant(backend):
    """F(g x, t) = g F(x, t) for every element, at every size the network accepts, to the
    rounding of a changed summation order as this network amplifies it at this input: TOL plus
    SLACK times the float64 reference's :func:`rounding_sensitivity` (a 2x2 input of size 1e-8
    into a width-1 c4 network moves the reference's own output by 1.7e-11 under a rotation,
    found at 2,000 examples). In float64: in a lower precision the rounding of a small random
    network is amplified without bound (a GroupNorm over two nearly equal values decides their
    signs by it), and the comparisons with the float64 reference above already bound each side
    of the equation by the reference's own error."""
    def body(backend, case):
        assume(case["group"] is not None and case["nan"] is None and case["x"].shape[0] > 0)
        dtype = torch.float64
        net = with_backend(_unet(case), backend, dtype, dtype)
        reference = with_backend(_unet(case), "reference", dtype, dtype)
        x = view(case["x"], make_leaf(case["x"], dtype))
        t = case["t"] if isinstance(case["t"], float) else torch.tensor(case["t"])
        with torch.no_grad():
            allowed = TOL[dtype] + SLACK * rounding_sensitivity(lambda: reference(x, t))
            out = net(x, t)
            group = net.group
            for k in range(len(group)):
                moved = net(group.act(x, k), t)
                expected = group.act(out, k)
                err = float((moved - expected).norm() / expected.norm().clamp_min(1e-300))
                note(f"element {k}: rel_err {err:.3g} (allowed {allowed:.3g})")
                assert err <= allowed, (f"element {k} of {group.name}: rel_err {err:.3g}, "
                                        f"allowed {allowed:.3g}")

    _fuzz(backend, unet_cases(backend), body, share=0.25)


# ---------------------------------------------------------------------------------------------
# Denoiser (inside the samplers)
# ---------------------------------------------------------------------------------------------

SCHEDULES = {"edm": EDMSchedule, "ddpm": DDPMSchedule, "ve": VESchedule}


@st.composite
def denoiser_cases(draw, backend: str):
    net = draw(unet_cases(backend))
    assume(net["nan"] is None)
    prediction = draw(st.sampled_from(["eps", "x0", "v", "edm"]))
    schedule = draw(st.sampled_from(["ddpm"] if prediction == "v" else sorted(SCHEDULES)))
    wrap = "wt" if net["group"] is not None else draw(st.sampled_from(["none", "fa"]))
    square = net["x"].shape[-1] == net["x"].shape[-2] and backend != "triton"
    fa_group = draw(st.sampled_from(["flip_h", "c2", "d4"] if square else ["flip_h", "c2"])) \
        if wrap == "fa" else None
    net.update(cout=net["cin"], dtype=draw(st.sampled_from([torch.float32, torch.float64])))
    net["x"] = draw(specs(net["x"].shape, net["dtype"], exp=(-4, 4)))
    return dict(net=net, prediction=prediction, schedule=schedule, wrap=wrap, fa_group=fa_group,
                sigma=draw(st.floats(0.02, 80)), sampler=draw(st.sampled_from(
                    ["euler", "euler_ancestral"] if backend == "triton" else
                    ["euler", "heun", "euler_ancestral", "ddim", "dpmpp_2m"])),
                steps=draw(st.integers(1, 1 if backend == "triton" else 3)), chunks=draw(st.sampled_from([None, 1, 3])))


def _denoiser(case, network: torch.nn.Module, backend: str) -> Denoiser:
    group = case["net"]["group"] if case["wrap"] == "wt" else case["fa_group"]
    return Denoiser(network, case["prediction"], SCHEDULES[case["schedule"]](), group=group,
                    chunks=case["chunks"], backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_fuzz_denoiser_in_samplers(backend):
    """D(x, σ), the training loss's gradients, and a few sampler steps with Philox noise."""
    def body(backend, case):
        dtype = case["net"]["dtype"]
        net = _unet(case["net"])
        x_leaf = make_leaf(case["net"]["x"], dtype)
        b = case["net"]["x"].shape[0]
        noise = torch.randn(case["net"]["x"].shape, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(case["net"]["seed"]))

        def run(be, compute):
            module = with_backend(net, be, dtype, compute)
            den = _denoiser(case, module, be)
            x = view(case["net"]["x"], rounded(x_leaf, dtype, compute))
            with torch.no_grad():
                result = {"denoised": den(x, case["sigma"])}
                if b:
                    result["sample"] = sample(den, x, case["sampler"], steps=case["steps"],
                                              seed=list(range(b)), progress=False, dtype=compute)
            if b:
                loss = den.loss(x, case["sigma"], rounded(noise, dtype, compute))
                named = list(module.named_parameters())
                found = grads(loss, [p for _, p in named], torch.ones((), dtype=loss.dtype))
                result.update({"loss": loss, "grad params": {n: g for (n, _), g in zip(named, found)}})
            return result

        run_three(run, backend, dtype)

    _fuzz(backend, denoiser_cases(backend), body, share=0.25)


@pytest.mark.parametrize("backend", EQUIVARIANCE_BACKENDS)
def test_fuzz_denoiser_is_equivariant(backend):
    """D(g x, σ) = g D(x, σ): with an EquivariantUNet by construction, with a plain UNet by
    frame averaging; in float64 (as for the network above), to rounding relative to the terms
    D = c_skip x + c_out F adds, which ‖x‖ + ‖D‖ bounds (0 <= c_skip <= 1), since D cancels them
    at large σ."""
    def body(backend, case):
        assume(case["wrap"] != "none" and case["net"]["x"].shape[0] > 0)
        dtype = torch.float64
        den = _denoiser(case, with_backend(_unet(case["net"]), backend, dtype, dtype), backend)
        x = view(case["net"]["x"], make_leaf(case["net"]["x"], dtype))
        with torch.no_grad():
            out = den(x, case["sigma"])
            group = den.group
            for k in range(len(group)):
                moved, expected = den(group.act(x, k), case["sigma"]), group.act(out, k)
                scale = (expected.norm() + x.norm()).clamp_min(1e-300)
                err = float((moved - expected).norm() / scale)
                note(f"element {k}: rel_err {err:.3g}")
                assert err <= TOL[dtype], f"element {k} of {group.name}: rel_err {err:.3g}"

    _fuzz(backend, denoiser_cases(backend), body, share=0.25)


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------

@st.composite
def module_bad_cases(draw):
    """(kind, callable(backend), exception, message regex)."""
    group = draw(st.sampled_from(["d4", "c4", "flip_h"]))
    kind = draw(st.sampled_from([
        "conv_dtype", "conv_channels", "conv_rank", "conv_mixed_dtype", "conv_meta", "conv_ctor",
        "unet_dtype", "unet_mixed_dtype", "unet_channels", "unet_rank", "unet_divisible",
        "unet_square", "unet_t_shape", "unet_t_type", "unet_bottom", "unet_ctor",
        "den_sigma", "den_sigma_type", "den_x", "den_ctor", "den_loss_empty", "den_loss_sigma"]))
    x = torch.randn(2, 3, 4, 4)
    draw_prediction = draw(st.sampled_from(["eps", "edm", "x0"]))

    def conv(backend):
        return TiedConv2d(3, 2, 3, group, backend=backend)

    def unet(backend, cls=EquivariantUNet):
        return cls(3, 3, channels=(2, 4), group=group, backend=backend)

    if kind == "conv_dtype":
        dtype = draw(st.sampled_from(NOT_REAL))
        return kind, lambda b: conv(b)(torch.ones(2, 3, 4, 4, dtype=dtype)), TypeError, \
            "x must be a real floating-point"
    if kind == "conv_channels":
        c = draw(st.sampled_from([1, 2, 4, 7]))
        return kind, lambda b: conv(b)(torch.randn(2, c, 4, 4)), ValueError, \
            f"x has {c} channels but this TiedConv2d takes 3"
    if kind == "conv_rank":
        shape = draw(st.sampled_from([(3, 4, 4), (1, 2, 3, 4, 4), (3,)]))
        return kind, lambda b: conv(b)(torch.randn(shape)), ValueError, r"x must be \(B, C, H, W\)"
    if kind == "conv_mixed_dtype":
        dtype = draw(st.sampled_from([torch.float64, torch.bfloat16, torch.float16]))
        return kind, lambda b: conv(b)(x.to(dtype)), TypeError, "weight has dtype"
    if kind == "conv_meta":
        return kind, lambda b: conv(b)(x.to("meta")), ValueError, "on meta"
    if kind == "conv_ctor":
        arg, value, exc = draw(st.sampled_from([
            ("in_channels", 0, ValueError), ("in_channels", 2.0, ValueError),
            ("out_channels", True, ValueError), ("kernel_size", 0, ValueError),
            ("stride", -1, ValueError), ("group", "d5", ValueError), ("group", 4, TypeError)]))
        kwargs = dict(in_channels=3, out_channels=2, kernel_size=3, group=group)
        kwargs[arg] = value
        return kind, lambda b: TiedConv2d(**kwargs, backend=b), exc, arg
    if kind == "unet_dtype":
        dtype = draw(st.sampled_from(NOT_REAL[:-1]))  # complex: refused as not floating either
        return kind, lambda b: unet(b)(torch.ones(2, 3, 4, 4, dtype=dtype), 0.5), TypeError, \
            "x must be a floating-point tensor"
    if kind == "unet_mixed_dtype":
        dtype = draw(st.sampled_from([torch.float64, torch.bfloat16, torch.float16]))
        return kind, lambda b: unet(b)(x.to(dtype), 0.5), TypeError, \
            "x has dtype .* but the network's parameters are torch.float32"
    if kind == "unet_channels":
        c = draw(st.sampled_from([1, 2, 4]))
        return kind, lambda b: unet(b)(torch.randn(2, c, 4, 4), 0.5), ValueError, \
            f"x has {c} channels but the network takes 3"
    if kind == "unet_rank":
        shape = draw(st.sampled_from([(3, 4, 4), (1, 2, 3, 4, 4)]))
        return kind, lambda b: unet(b)(torch.randn(shape), 0.5), ValueError, \
            r"x must be a \(B, C, H, W\) tensor"
    if kind == "unet_divisible":
        return kind, lambda b: unet(b)(torch.randn(2, 3, 5, 5), 0.5), ValueError, \
            "must be divisible by 2"
    if kind == "unet_square":
        assume(group in ROTATIONS)
        return kind, lambda b: unet(b)(torch.randn(2, 3, 4, 6), 0.5), ValueError, \
            "square trailing dims"
    if kind == "unet_t_shape":
        t = torch.randn(draw(st.sampled_from([3, 5])))
        return kind, lambda b: unet(b)(x, t), ValueError, r"t \(the noise conditioning\) must be"
    if kind == "unet_t_type":
        t = draw(st.sampled_from(["0.5", None, torch.ones(2, dtype=torch.complex64), [0.5, 1.0]]))
        return kind, lambda b: unet(b)(x, t), TypeError, r"t \(the noise conditioning\) must be"
    if kind == "unet_bottom":
        return kind, lambda b: EquivariantUNet(3, 3, channels=(3, 1), heads=1, group=group, backend=b)(
            torch.randn(1, 3, 2, 2), 0.5), ValueError, "bottom level would be 1x1"
    if kind == "unet_ctor":
        arg, kwargs, exc = draw(st.sampled_from([
            ("channels", dict(channels=()), ValueError), ("channels", dict(channels=(4, 0)), ValueError),
            ("attention_levels", dict(channels=(4,), attention_levels=(1,)), ValueError),
            ("heads", dict(channels=(4,), heads=3), ValueError),
            ("group", dict(channels=(4,), group="d7"), ValueError)]))
        return kind, lambda b: EquivariantUNet(3, 3, **kwargs, backend=b), exc, arg
    if kind == "den_sigma":
        sigma = draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf")]))
        return kind, lambda b: Denoiser(unet(b), "edm", group=group, backend=b)(x, sigma), \
            ValueError, "sigma must be finite and > 0"
    if kind == "den_sigma_type":
        sigma, exc, match = draw(st.sampled_from([
            (torch.tensor(0.5), TypeError, "sigma must be a host float"),
            ("0.5", TypeError, "sigma must be a real number"),
            (True, TypeError, "sigma must be a real number")]))
        return kind, lambda b: Denoiser(unet(b), "edm", group=group, backend=b)(x, sigma), exc, match
    if kind == "den_x":
        bad, exc, match = draw(st.sampled_from([
            (x.long(), TypeError, "must be a .*floating-point"), (x.tolist(), TypeError, "x must be a torch.Tensor"),
            (x.double(), TypeError, "x has dtype torch.float64")]))
        fa = draw(st.booleans())
        return kind, lambda b: Denoiser(unet(b, UNet if fa else EquivariantUNet), "edm", group=group,
                                        backend=b)(bad, 0.5), exc, match
    if kind == "den_ctor":
        kwargs, exc, match = draw(st.sampled_from([
            (dict(prediction="score"), ValueError, "prediction must be one of"),
            (dict(prediction="v", schedule=EDMSchedule()), ValueError, "prediction='v'"),
            (dict(schedule="edm"), TypeError, "schedule must be"),
            (dict(chunks=0), ValueError, "chunks must be"),
            (dict(frame_average=1), TypeError, "frame_average must be"),
            (dict(group=None, frame_average=True), ValueError, "frame_average=True needs group")]))
        kwargs = {"group": group, **kwargs}
        return kind, lambda b: Denoiser(unet(b), backend=b, **kwargs), exc, match
    if kind == "den_loss_sigma":
        sigma = draw(st.sampled_from([0.0, -2.0, float("nan"), float("inf"), [0.5, 0.0]]))
        return kind, lambda b: Denoiser(unet(b), draw_prediction, group=group, backend=b).loss(
            x, sigma), ValueError, "sigma must be finite and > 0"
    return kind, lambda b: Denoiser(unet(b), "edm", group=group, backend=b).loss(x[:0]), \
        ValueError, "x0 must hold at least one sample"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_module_bad_inputs_raise_clear_errors(backend):
    def body(backend, case):
        kind, call, exc, match = case
        note(kind)
        _expect(lambda: call(backend), exc, match)

    _fuzz(backend, module_bad_cases(), body, cheap=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_through_denoiser_and_network(backend):
    """B = 0 is a valid batch for every module (as for torch's): empty results, no error."""
    net = EquivariantUNet(2, 2, channels=(4, 8), backend=backend)
    for group in ("d4", None):
        den = Denoiser(net if group else UNet(2, 2, channels=(4, 8), backend=backend), "edm",
                       group=group or "flip_h", backend=backend)
        x = torch.randn(0, 2, 4, 4)
        assert den(x, 0.7).shape == (0, 2, 4, 4)


@pytest.mark.parametrize("width", [1, 3, 5])
def test_unet_with_an_odd_first_width_embeds_t(width):
    """Found by test_fuzz_unet: the sinusoidal embedding made channels[0] // 2 cos/sin pairs, one
    feature short of the MLP's input for an odd width (width 1: none at all), so every call failed
    inside nn.Linear. The width rounds up to even; t must still move the output."""
    torch.manual_seed(0)
    net = UNet(2, 2, channels=(width, 4), heads=1)
    x = torch.randn(2, 2, 4, 4)
    assert net(x, 0.1).shape == (2, 2, 4, 4)
    assert not torch.equal(net(x, 0.1), net(x, 2.0))
