import math
import pytest
import torch
from conftest import rel_err

from symfast import equivariance_error, groups, symmetrize
from symfast.reference import group_average as reference


class TimeConditionedNet(torch.nn.Module):
    """Deliberately non-equivariant: asymmetric kernels, a position-dependent bias, a time input."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.pos = torch.nn.Parameter(torch.randn(1, 3, 8, 8))
        self.t_scale = torch.nn.Parameter(torch.randn(3))

    def forward(self, x, t, scale=1.0):
        return scale * torch.tanh(self.conv(x) + self.pos) * (1 + self.t_scale[None, :, None, None]
                                                               * t[:, None, None, None])


@pytest.mark.parametrize("name", ["d4", "c4", "flip_h", "c2"])
def test_symmetrized_model_is_exactly_equivariant(name):
    g = groups.get(name)
    net = TimeConditionedNet()
    x, t = torch.randn(5, 3, 8, 8), torch.rand(5)
    assert equivariance_error(lambda z: net(z, t), x, g) > 1e-2  # the control: net itself is not
    fa = symmetrize(net, g)
    assert equivariance_error(lambda z: fa(z, t), x, g) <= 1e-6


def test_symmetrize_matches_the_definition_and_chunking_is_invisible():
    g = groups.get("d4")
    net = TimeConditionedNet()
    x, t = torch.randn(3, 3, 8, 8), torch.rand(3)
    # D̄(x, t) = 1/|G| Σ_k g_k⁻¹ net(g_k x, t), written out with the reference actions
    want = sum(g.act(net(g.act(x, k), t), g.inverse(k)) for k in range(len(g))) / len(g)
    for chunks in (None, 1, 3, 8):
        got = symmetrize(net, g, chunks=chunks)(x, t, scale=1.0)
        assert rel_err(got, want) <= 1e-6


def test_symmetrize_passes_gradients_and_unwraps_diffusers_style_outputs():
    g = groups.get("c4")

    class Out:
        def __init__(self, sample):
            self.sample = sample

    conv = torch.nn.Conv2d(2, 2, 3, padding=1)
    fa = symmetrize(lambda z: Out(conv(z)), g, chunks=2)
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    fa(x).square().sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
    xr = x.detach().requires_grad_()
    reference.orbit_mean(conv(reference.orbit(xr, g)), g).square().sum().backward()
    assert rel_err(x.grad, xr.grad) <= 1e-5


def test_equivariance_error_of_a_non_finite_output_is_nan():
    g, x = groups.get("d4"), torch.randn(2, 1, 6, 6)

    def nan_when_turned(z):
        return z if torch.equal(z, x) else z * float("nan")

    def one_nan_pixel(z):
        out = z.flip(-1).clone()
        out[0, 0, 0, 0] = float("nan")
        return out

    for f in (lambda z: z * float("nan"), nan_when_turned, one_nan_pixel):
        assert math.isnan(equivariance_error(f, x, g))  # max() with NaN kept 0.0 before
    assert equivariance_error(lambda z: z.flip(-1), x, g) > 0.5


def test_equivariance_error_is_measured_in_float64():
    # the outputs were rounded to float32 before subtracting (a float64 map broken by 1e-12
    # measured 0) and the float32 squared norm of outputs near 1e19 overflowed (measured 0)
    g = groups.get("c4")
    x = torch.randn(4, 2, 16, 16, dtype=torch.float64)

    def exact(f):
        fx = f(x)
        return max(float((f(g.act(x, k)) - g.act(fx, k)).norm() / fx.norm()) for k in range(len(g)))

    for eps in (1e-9, 1e-12, 1e-14):
        f = lambda z, eps=eps: z + eps * z.flip(-1)  # noqa: E731
        assert equivariance_error(f, x, g) == pytest.approx(exact(f), rel=1e-6)
    xf = x.float()
    for scale in (1.0, 1e20):
        assert equivariance_error(lambda z: scale * z.flip(-1), xf, g) == pytest.approx(
            equivariance_error(lambda z: z.flip(-1), xf, g), rel=1e-5)
    with pytest.raises(ValueError, match=r"f\(x\) has shape \(2, 1\)"):  # not x, which is fine
        equivariance_error(lambda z: z.mean((-1, -2)), torch.randn(2, 1, 6, 6), "d4")


def test_symmetrize_bad_inputs():
    with pytest.raises(ValueError, match="chunks must be a positive int"):
        symmetrize(torch.nn.Identity(), "d4", chunks=0)
    with pytest.raises(TypeError, match="the model returned str"):
        symmetrize(lambda z: "nope", "d4")(torch.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="returned batch 1 for an orbit batch of 8"):
        symmetrize(lambda z: z[:1], "d4", chunks=1)(torch.randn(1, 1, 4, 4))


def test_empty_batch_in_chunks_and_chunks_must_be_an_int():
    model = symmetrize(lambda z: 2 * z, "d4", chunks=3)
    assert model(torch.zeros(0, 2, 8, 8)).shape == (0, 2, 8, 8)  # range() with a step of 0 before
    with pytest.raises(ValueError, match="chunks must be a positive int"):
        symmetrize(lambda z: z, "d4", chunks=True)
