import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TOL, rel_err
from symfast import equivariance_error
from symfast.nn import EquivariantUNet, TiedConv2d, UNet, equivariance_loss, tie_weights

SMALL = dict(channels=(8, 16, 16), heads=2)


def _sigma(batch):
    return torch.linspace(0.3, 3.0, batch)


def test_tied_conv2d_module_counts_orbits_and_matches_its_expanded_kernel():
    layer = TiedConv2d(5, 7, 3, "d4")
    assert sum(p.numel() for p in layer.parameters()) == 7 * 5 * 3 + 7
    assert TiedConv2d(5, 7, 5, "d4", bias=False).weight.numel() == 7 * 5 * 6
    assert TiedConv2d(5, 7, 3, "flip_h").weight.shape == (7, 5, 6)
    x = torch.randn(2, 5, 9, 9)
    ref = F.conv2d(x.double(), layer.expanded_weight().double(), layer.bias.double(), padding=1)
    assert rel_err(layer(x), ref) <= TOL[torch.float32]


def test_from_conv2d_keeps_a_symmetric_kernel_and_projects_others():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    tied = TiedConv2d.from_conv2d(conv, "d4")
    x = torch.randn(1, 3, 8, 8)
    projected = sum(torch.rot90(conv.weight, k, (2, 3)) + torch.rot90(conv.weight.flip(3), k, (2, 3))
                    for k in range(4)) / 8
    assert rel_err(tied.expanded_weight(), projected) <= 1e-6
    conv.weight.data.copy_(projected)
    assert rel_err(tied(x), conv(x)) <= TOL[torch.float32]


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel_size=3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    (dict(kernel_size=3, dilation=2), "dilation"),
    (dict(kernel_size=2, padding="same"), "even kernel"),
    (dict(kernel_size=3, groups=2), "groups=2"),
])
def test_from_conv2d_refuses_what_it_cannot_reproduce(kwargs, match):
    """It built a zero-padded, undilated, ungrouped layer for these (reflect padding 1.31 off an
    invariant kernel's conv, dilation 2 a 10x10 output for 8x8, groups=2 a reshape crash)."""
    with pytest.raises(ValueError, match=match):
        TiedConv2d.from_conv2d(nn.Conv2d(2, 2, **kwargs), "d4")
    with pytest.raises(TypeError, match="conv must be a torch.nn.Conv2d"):
        TiedConv2d.from_conv2d(nn.Linear(2, 2), "d4")


def test_tie_weights_keeps_a_shared_conv_shared_and_ties_every_place():
    """A conv used twice was tied in its first place only (the second stayed an untied
    nn.Conv2d, equivariance error 0.54) with report.exact True; one shared under two parents
    became two separate TiedConv2d, losing the weight sharing."""
    torch.manual_seed(0)
    shared = nn.Conv2d(2, 2, 3, padding=1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = tie_weights(model, "d4")
    assert report.exact and report.tied == ["0", "2"]
    assert isinstance(model[2], TiedConv2d) and model[0] is model[2]
    assert equivariance_error(model, torch.randn(2, 2, 8, 8), "d4") <= 1e-5
    inner = nn.Conv2d(2, 2, 3, padding=1)
    block = nn.Sequential(inner)
    model = nn.Sequential(block, nn.Sequential(inner), block)  # under two parents, one parent twice
    report = tie_weights(model, "d4")
    assert report.exact and sorted(report.tied) == ["0.0", "1.0", "2.0"]
    assert model[0][0] is model[1][0] is model[2][0] and isinstance(model[0][0], TiedConv2d)
    assert len(list(model.parameters())) == 2  # one weight, one bias


@pytest.mark.parametrize("cls", [UNet, EquivariantUNet])
def test_unets_under_torch_func_grad_jacrev_and_vmap(cls):
    """The UNets' own autograd.Functions (1x1 convolution, upsampling) were old-style only:
    torch.func.grad / jacrev / vmap refused them ("must override the setup_context
    staticmethod"). Eager training keeps the old-style ones (cheaper per call)."""
    torch.manual_seed(0)
    net = cls(1, 1, channels=(8, 16))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.1, 0.3])
    params = dict(net.named_parameters())
    grads = torch.func.grad(lambda p: torch.func.functional_call(net, p, (x, t)).square().sum())(params)
    net(x, t).square().sum().backward()
    for name, p in net.named_parameters():
        assert rel_err(grads[name], p.grad) <= 1e-5, name
    jac = torch.func.jacrev(lambda z: net(z, t[:1]))(x[:1])
    want = torch.autograd.functional.jacobian(lambda z: net(z, t[:1]), x[:1])
    assert rel_err(jac, want) <= 1e-5
    batched = torch.vmap(lambda z: net(z[None], t[:1])[0])(x)
    assert rel_err(batched, torch.cat([net(x[i:i + 1], t[:1]) for i in range(2)])) <= 1e-5


def test_equivariance_loss_takes_a_model_returning_a_tuple():
    """symmetrize and equivariance_error take a tuple's first tensor (as diffusers models
    return); equivariance_loss failed subtracting a tensor from the tuple."""
    torch.manual_seed(3)
    net = UNet(1, 1, channels=(8, 16))
    x, sigma = torch.randn(2, 1, 8, 8), torch.ones(2)

    def loss(model):
        return equivariance_loss(model, x, sigma, "d4", generator=torch.Generator().manual_seed(0))
    assert torch.equal(loss(lambda z, s: (net(z, s),)), loss(net))


@pytest.mark.parametrize("size", [16, 32, 64])
def test_equivariant_unet_is_exact_for_d4(size):
    torch.manual_seed(size)
    model = EquivariantUNet(3, 3, group="d4", **SMALL)
    x = torch.randn(1, 3, size, size)
    err = equivariance_error(lambda z: model(z, 0.8), x, "d4")
    assert err <= 1e-5


def test_plain_unet_is_not_equivariant_until_tied():
    torch.manual_seed(0)
    model = UNet(3, 3, **SMALL)
    x = torch.randn(2, 3, 16, 16)
    assert equivariance_error(lambda z: model(z, _sigma(2)), x, "d4") > 1e-2
    report = tie_weights(model, "d4")
    assert report.exact and "conv_in" in report.tied and "down.0.conv1" in report.tied
    # every 3x3 conv is tied; the 1x1 ones (skips, attention) commute as they are
    assert all(tuple(m.kernel_size) == (1, 1) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert equivariance_error(lambda z: model(z, _sigma(2)), x, "d4") <= 1e-5


@pytest.mark.parametrize("group,shape", [("c4", (16, 16)), ("flip_h", (16, 24)), ("flip_v", (8, 20))])
def test_other_groups_and_non_square_sizes(group, shape):
    torch.manual_seed(1)
    model = EquivariantUNet(2, 2, group=group, channels=(8, 8), heads=2)
    x = torch.randn(1, 2, *shape)
    assert equivariance_error(lambda z: model(z, 0.7), x, group) <= 1e-5


def test_unet_rejects_sizes_it_cannot_keep_exact():
    model = EquivariantUNet(1, 1, group="d4", **SMALL)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 1, 18, 18), 1.0)
    with pytest.raises(ValueError, match="square"):
        model(torch.randn(1, 1, 16, 32), 1.0)
    with pytest.raises(ValueError, match="noise conditioning"):
        model(torch.randn(2, 1, 16, 16), torch.ones(3))
    with pytest.raises(ValueError, match="group"):
        EquivariantUNet(1, 1, group=None)
    with pytest.raises(ValueError, match="square kernel"):
        TiedConv2d(2, 2, (3, 5), "c4")
    with pytest.raises(ValueError, match="in_channels"):
        TiedConv2d(0, 2, 3, "d4")


@pytest.mark.parametrize("width", [8, 16, 24, 32])
def test_every_block_sees_the_noise_conditioning(width):
    """A block adds the time embedding per channel before a GroupNorm; with one channel per group
    the mean subtraction removed it again and the block ignored t (found by
    tests/test_fuzz_modules.py: the time layers' gradients were exactly zero at width 8)."""
    torch.manual_seed(0)
    net = UNet(1, 1, channels=(width, 16), heads=1)
    block = net.down[0]
    h = torch.randn(2, width, 4, 4)
    emb = [net.time_mlp(torch.randn(2, net.embed_dim)) for _ in range(2)]
    assert rel_err(block(h, emb[0]), block(h, emb[1])) > 1e-3


def test_tie_weights_reports_what_still_breaks_equivariance():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.pad = nn.ZeroPad2d((1, 0, 1, 0))
            self.down = nn.Conv2d(2, 4, 3, stride=2, padding=1)
            self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)
            self.wide = nn.Conv2d(4, 4, (3, 5), padding=(1, 2))
            self.pos_embedding = nn.Parameter(torch.zeros(1, 4, 8, 8))
            self.head = nn.Linear(4, 4)

    model = Model()
    report = tie_weights(model, "d4")
    reasons = dict(report.problems)
    assert report.tied == ["down"] and isinstance(model.down, TiedConv2d)
    assert "stride" in reasons["down"]
    assert "asymmetric padding" in reasons["pad"]
    assert "groups=2" in reasons["grouped"] and isinstance(model.grouped, nn.Conv2d)
    assert "square kernel" in reasons["wide"]
    # a TiedConv2d is equivariant or refused: padding that rotations swap is not a layer option
    with pytest.raises(ValueError, match=r"padding \(1, 2\) differs between H and W"):
        TiedConv2d(1, 1, 3, "d4", padding=(1, 2))
    square = nn.Sequential(nn.Conv2d(1, 1, 3, padding=(1, 2)))
    assert "differs between H and W" in dict(tie_weights(square, "d4").problems)["0"]
    assert isinstance(square[0], nn.Conv2d)  # left untied
    assert tie_weights(nn.Sequential(nn.Conv2d(1, 1, 3, padding=(1, 2))), "flip_h").tied == ["0"]
    assert "positional" in reasons["pos_embedding"]
    assert "head" not in reasons and not report.exact
    # flip_h can tie the (3, 5) kernel; the padding (1, 0, 1, 0) is asymmetric in W too
    flip_report = tie_weights(Model(), "flip_h")
    assert "wide" in flip_report.tied and "pad" in dict(flip_report.problems)
    with pytest.raises(TypeError, match="module"):
        tie_weights(lambda x: x, "d4")
    # a bare conv cannot be replaced in place (it was left as it was, reported exact)
    with pytest.raises(TypeError, match="TiedConv2d.from_conv2d"):
        tie_weights(nn.Conv2d(1, 1, 3, padding=1), "d4")
    # padding="same" with an even kernel pads one side more: tying it changed the output size
    same = nn.Sequential(nn.Conv2d(1, 2, 4, padding="same"), nn.Conv2d(2, 2, 3, padding="same"))
    report = tie_weights(same, "d4")
    assert report.tied == ["1"] and "padding='same' with an even kernel" in dict(report.problems)["0"]
    assert same(torch.randn(1, 1, 8, 8)).shape == (1, 2, 8, 8)


def test_tie_weights_checks_layers_tied_under_another_group_and_keeps_1x1_convs():
    """A layer tied under flip_h was reported exact under d4 (equivariance error 0.73); 1x1
    convolutions (a UNet's skips, qkv, proj) became TiedConv2d of another weight shape, so a tied
    UNet no longer loaded into an EquivariantUNet."""
    from symfast import equivariance_error
    model = nn.Sequential(TiedConv2d(1, 4, 3, "flip_h", padding=1), nn.SiLU(), nn.Conv2d(4, 1, 3, padding=1))
    report = tie_weights(model, "d4")
    assert not report.exact and "tied under flip_h" in dict(report.problems)["0"]
    assert equivariance_error(model, torch.randn(2, 1, 8, 8), "d4") > 0.1  # the report is right
    # padding that differs between H and W, in a layer tied under a group that does not rotate
    # (a 1x1 kernel, invariant under every rotation): it was reported exact
    model = nn.Sequential(nn.Conv2d(2, 2, 3), TiedConv2d(2, 2, 1, "flip_h", padding=(0, 1)), nn.Tanh())
    report = tie_weights(model, "d4")
    assert dict(report.problems)["1"] == "padding (0, 1) differs between H and W, which rotations swap"
    # a d4-tied kernel is c4-invariant: nothing to report
    assert tie_weights(EquivariantUNet(1, 1, channels=(8, 16), group="d4"), "c4").exact
    unet = UNet(1, 1, channels=(8, 16))
    report = tie_weights(unet, "d4")
    assert report.exact and not any("skip" in name or "qkv" in name for name in report.tied)
    EquivariantUNet(1, 1, channels=(8, 16), group="d4").load_state_dict(unet.state_dict())
    assert equivariance_error(lambda z: unet(z, torch.zeros(2)), torch.randn(2, 1, 8, 8), "d4") <= 1e-5


def test_equivariance_loss_of_an_empty_batch_is_an_error_not_nan():
    with pytest.raises(ValueError, match="x_t must hold at least one sample"):
        equivariance_loss(UNet(3, 3, **SMALL), torch.zeros(0, 3, 16, 16), torch.ones(0), "d4")


def test_equivariance_loss_vanishes_for_equivariant_models_only():
    torch.manual_seed(2)
    x = torch.randn(4, 3, 16, 16)
    sigma = _sigma(4)
    tied = EquivariantUNet(3, 3, group="d4", **SMALL)
    plain = UNet(3, 3, **SMALL)
    scale = plain(x, sigma).pow(2).mean()
    assert equivariance_loss(tied, x, sigma, "d4") <= 1e-10 * scale
    assert equivariance_loss(plain, x, sigma, "d4") >= 1e-3 * scale


def test_equivariance_loss_stops_the_gradient_at_the_target():
    torch.manual_seed(3)
    x = torch.randn(3, 3, 8, 8)
    model = UNet(3, 3, channels=(8, 8), heads=2)
    ema = copy.deepcopy(model)
    for p in ema.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    loss = equivariance_loss(model, x, 1.0, "d4", target=ema,
                             generator=torch.Generator().manual_seed(5))
    loss.backward()
    assert all(p.grad is None for p in ema.parameters())
    assert all(p.grad is not None for p in model.parameters())
    # the same g choices give the same loss; the gradient is that of ‖F(x) − c‖² with c fixed
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    from symfast.nn.regularizer import act_per_sample
    from symfast.groups import get

    g = get("d4")
    index = torch.randint(8, (3,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        c = act_per_sample(ema(act_per_sample(x, index, g), 1.0),
                           torch.tensor([g.inverse(k) for k in index.tolist()]), g)
    manual = (model(x, 1.0) - c).pow(2).mean()
    assert torch.allclose(manual, loss, rtol=1e-6, atol=0)
    manual.backward()
    for got, ref in zip(grads, [p.grad for p in model.parameters()]):
        assert rel_err(got, ref) <= 1e-5


def test_equivariant_unet_trains_with_the_cpu_kernel():
    torch.manual_seed(4)
    model = EquivariantUNet(1, 1, group="d4", channels=(8, 8), heads=2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(4, 1, 8, 8)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (model(x + 0.5 * torch.ones_like(x), 0.5) - x).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert equivariance_error(lambda z: model(z, 0.5), x, "d4") <= 1e-5


def test_upsample2x_is_nearest_interpolation():
    from symfast.nn.unet import upsample2x

    for shape in [(2, 3, 5, 7), (1, 1, 1, 1), (3, 4, 8, 8)]:
        x = torch.randn(shape)
        assert torch.equal(upsample2x(x), F.interpolate(x, scale_factor=2, mode="nearest"))
    x = torch.randn(2, 3, 6, 4).transpose(2, 3)  # non-contiguous
    assert torch.equal(upsample2x(x), F.interpolate(x, scale_factor=2, mode="nearest"))


def test_upsample2x_gradient_is_the_2x2_block_sum():
    from symfast.nn.unet import upsample2x

    for shape, dtype in [((2, 3, 5, 7), torch.float64), ((3, 4, 8, 8), torch.float32),
                         ((1, 2, 4, 6), torch.bfloat16)]:
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        g = torch.randn(shape[0], shape[1], 2 * shape[2], 2 * shape[3], dtype=dtype)
        (gx,) = torch.autograd.grad(upsample2x(x), x, g)
        (ref,) = torch.autograd.grad(F.interpolate(x, scale_factor=2, mode="nearest"), x, g)
        assert gx.dtype == dtype and gx.shape == x.shape
        assert rel_err(gx, ref) <= (1e-12 if dtype == torch.float64 else TOL[dtype])
    x = torch.randn(2, 3, 6, 4, dtype=torch.float64).transpose(2, 3).requires_grad_()
    g = torch.randn(2, 3, 12, 8, dtype=torch.float64).transpose(2, 3)  # non-contiguous gradient
    (gx,) = torch.autograd.grad(upsample2x(x), x, g)
    (ref,) = torch.autograd.grad(F.interpolate(x, scale_factor=2, mode="nearest"), x, g)
    assert rel_err(gx, ref) <= 1e-12
    assert torch.autograd.gradcheck(upsample2x, (torch.randn(1, 2, 3, 2, dtype=torch.float64,
                                                             requires_grad=True),))


@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv2d_matches_conv2d_with_gradients(bias):
    from symfast.nn.unet import PointwiseConv2d

    torch.manual_seed(3)
    layer = PointwiseConv2d(6, 5, bias=bias)
    x = torch.randn(4, 8, 3, 7)[:, 1:7].requires_grad_()  # non-contiguous, odd plane
    y = layer(x)
    ref = F.conv2d(x.double(), layer.weight.double(),
                   None if layer.bias is None else layer.bias.double())
    assert rel_err(y, ref) <= TOL[torch.float32]
    g = torch.randn_like(y)
    params = [x, layer.weight] + ([layer.bias] if bias else [])
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(ref, params, g.double())
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and rel_err(a, b) <= TOL[torch.float32]
    layer64 = PointwiseConv2d(3, 2, bias=bias).double()
    assert torch.autograd.gradcheck(layer64, (torch.randn(2, 3, 2, 3, dtype=torch.float64,
                                                          requires_grad=True),))


def test_pointwise_conv2d_under_bf16_autocast_matches_conv2d():
    """Under autocast the product runs in bf16 (as nn.Conv2d's does) and each gradient comes
    back in its input's dtype."""
    from symfast.nn.unet import PointwiseConv2d

    torch.manual_seed(4)
    layer = PointwiseConv2d(16, 8)
    x = torch.randn(4, 16, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        ref = F.conv2d(x, layer.weight, layer.bias)
    assert y.dtype == ref.dtype == torch.bfloat16
    assert rel_err(y, ref) <= TOL[torch.bfloat16]
    # computed in fp32 on a CPU without bf16 arithmetic, rounded once: the product of the bf16
    # operands within half an ulp (bf16 at::bmm ran a scalar loop, ~30x slower than fp32)
    exact = F.conv2d(x.bfloat16().double(), layer.weight.bfloat16().double(), layer.bias.bfloat16().double())
    assert rel_err(y, exact) <= 2 ** -8
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    want = torch.autograd.grad(ref, (x, layer.weight, layer.bias), g)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32 and rel_err(a, b) <= TOL[torch.bfloat16]


def _unfused_copy(model):
    """The same modules and weights, with every GroupNorm + SiLU as plain F.group_norm / F.silu
    (the backend="reference" composition); the tied convolutions keep their own backend."""
    from symfast.nn.unet import _ResBlock

    clone = copy.deepcopy(model)
    for module in clone.modules():
        if isinstance(module, (_ResBlock, UNet)):
            module.backend = "reference"
    return clone


@pytest.mark.parametrize("cls", [EquivariantUNet, UNet])
def test_fused_group_norm_silu_matches_the_unfused_composition(cls):
    """The blocks' norm1+SiLU, norm2+SiLU with the time embedding as the shift, and norm_out+SiLU
    run as symfast::group_norm_silu; output and every parameter gradient must equal those of the
    unfused composition of the same modules to fp32 tolerance."""
    torch.manual_seed(5)
    # Groups of >= 2 channels: with one channel per group, the per-channel constants (conv1's
    # bias, the time embedding) are normalised away and their exact gradients are 0, leaving
    # only rounding to compare.
    fused = cls(2, 2, channels=(16, 32, 32), heads=2)
    unfused = _unfused_copy(fused)
    x = torch.randn(3, 2, 16, 16)
    sigma = _sigma(3)
    out, ref = fused(x, sigma), unfused(x, sigma)
    assert rel_err(out, ref) <= TOL[torch.float32]
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    named = dict(unfused.named_parameters())
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    for name, p in fused.named_parameters():
        assert p.grad is not None and rel_err(p.grad, named[name].grad) <= TOL[torch.float32], name


def test_equivariant_unet_runs_the_fused_op_and_stays_exact(monkeypatch):
    import symfast.nn.unet as unet_module

    calls = []
    real = unet_module.group_norm_silu

    def counting(x, *args, **kwargs):
        calls.append(kwargs.get("shift") is not None)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(unet_module, "group_norm_silu", counting)
    torch.manual_seed(6)
    model = EquivariantUNet(1, 1, group="d4", **SMALL)
    x = torch.randn(2, 1, 32, 32)
    err = equivariance_error(lambda z: model(z, _sigma(2)), x, "d4")
    assert err <= 1e-5
    # per call of the network: 2 per residual block (one with the time shift) + norm_out
    blocks = len(model.down) + 2 + len(model.up)
    assert len(calls) % (2 * blocks + 1) == 0 and sum(calls) == len(calls) // (2 * blocks + 1) * blocks


@pytest.mark.parametrize("cls", ["UNet", "EquivariantUNet"])
def test_a_1x1_bottom_level_with_single_channel_groups_is_refused_clearly(cls):
    """4x4 input, three levels: the bottom is 1x1 and GroupNorm(1, 1) there normalises single
    values (output = bias whatever the input): refused at any batch size, naming the sizes."""
    import symfast.nn as snn
    net = getattr(snn, cls)(1, 1, (4, 8, 1), heads=1)
    for batch in (1, 3):
        with pytest.raises(ValueError, match=r"bottom level would be 1x1.*at least 8x8"):
            net(torch.randn(batch, 1, 4, 4), torch.tensor(0.3))
    assert net(torch.randn(2, 1, 8, 8), torch.tensor(0.3)).shape == (2, 1, 8, 8)
    # 16 channels in 8 groups at the bottom: two values per group, a valid 1x1 bottom level
    wide = getattr(snn, cls)(1, 1, (16, 16, 16))
    assert wide(torch.randn(1, 1, 4, 4), torch.tensor(0.3)).isfinite().all()


def test_pointwise_conv_gradients_are_float64_for_a_float64_layer():
    """Every 1x1 conv of the UNets: its bias gradient was summed in fp32 whatever the dtype."""
    from symfast.nn.unet import PointwiseConv2d
    torch.manual_seed(0)
    pointwise = PointwiseConv2d(3, 2).double()
    conv = torch.nn.Conv2d(3, 2, 1).double()
    conv.load_state_dict(pointwise.state_dict())
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    grad = torch.randn(4, 2, 16, 16, dtype=torch.float64) + 1e-3
    pointwise(x).backward(grad)
    conv(x).backward(grad)
    for mine, ref in ((pointwise.bias.grad, conv.bias.grad), (pointwise.weight.grad, conv.weight.grad)):
        assert (mine - ref).abs().max() <= 1e-12
    small = PointwiseConv2d(3, 2).double()
    assert torch.autograd.gradcheck(small, (torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True),))


def test_tied_conv_takes_the_dtype_autocast_hands_it():
    """Under autocast an nn.Conv2d before it hands over bf16 while its parameters stay fp32 (a
    TypeError before); it runs in the input's dtype, and the gradients reach its fp32 weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=2), TiedConv2d(4, 4, 3, "d4", padding=1))
    x = torch.randn(2, 4, 8, 8)
    full = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), full) <= 0.05
    out.float().sum().backward()
    assert model[1].weight.grad.dtype == torch.float32 and torch.isfinite(model[1].weight.grad).all()


def test_an_fp32_input_under_autocast_runs_in_bf16_as_conv2d_does():
    """A TiedConv2d fed fp32 under bf16 autocast computed in fp32, so an EquivariantUNet (tied
    layers first) ran wholly in fp32 under precision="bf16", where nn.Conv2d's UNet ran in bf16."""
    torch.manual_seed(1)
    tied, conv = TiedConv2d(4, 6, 3, "d4", padding=1), nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tied(x).dtype == conv(x).dtype == torch.bfloat16
        # the bf16 result is the bf16 operands' convolution, rounded once
        want = F.conv2d(x.bfloat16().float(), tied.expanded_weight().bfloat16().float(),
                        tied.bias.bfloat16().float(), padding=1)
        assert rel_err(tied(x).float(), want) <= TOL[torch.bfloat16]
    seen = set()
    net = EquivariantUNet(1, 1, channels=(8, 16), group="d4")
    for module in net.modules():
        if isinstance(module, (TiedConv2d, nn.GroupNorm)):
            module.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 1, 8, 8), torch.zeros(2))
    assert out.dtype == torch.bfloat16 and seen == {torch.bfloat16}


@pytest.mark.parametrize("cls", [UNet, EquivariantUNet])
@pytest.mark.parametrize("kwargs, name", [({"heads": 0}, "heads"), ({"heads": -1}, "heads"),
                                          ({"heads": 2.0}, "heads"), ({"in_channels": 0}, "in_channels"),
                                          ({"out_channels": 0}, "out_channels"),
                                          ({"in_channels": -1}, "in_channels")])
def test_bad_constructor_arguments_are_named(cls, kwargs, name):
    args = dict(in_channels=1, out_channels=1, channels=(4, 8))
    args.update(kwargs)
    extra = {"group": "d4"} if cls is EquivariantUNet else {}
    with pytest.raises(ValueError, match=f"{name} must be a positive int"):
        cls(**args, **extra)
