"""symfast's networks inside symfast's Denoiser inside its samplers, for every prediction type:
finite samples, and exact equivariance where the construction promises it."""
from __future__ import annotations

import pytest
import torch

from conftest import rel_err
from symfast import Denoiser, equivariance_error, sample, symmetrize
from symfast.metrics import sampler_equivariance
from symfast.groups import get
from symfast.nn import EquivariantUNet, UNet
from symfast.schedules import DDPMSchedule, EDMSchedule

SMALL = dict(channels=(8, 16), heads=2)
PREDICTIONS = [("edm", EDMSchedule), ("eps", DDPMSchedule), ("v", DDPMSchedule), ("x0", DDPMSchedule)]


def _networks():
    torch.manual_seed(0)
    nets = {"unet": UNet(1, 1, **SMALL), "equivariant_unet": EquivariantUNet(1, 1, group="d4", **SMALL),
            "symmetrized_unet": symmetrize(UNet(1, 1, **SMALL), "d4")}
    try:
        from diffusers import UNet2DModel
        nets["diffusers_unet"] = UNet2DModel(sample_size=8, in_channels=1, out_channels=1,
                                             block_out_channels=(8, 16), layers_per_block=1,
                                             norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                                             up_block_types=("UpBlock2D",) * 2)
    except ImportError:
        pass
    return nets


NETWORKS = _networks()


def test_the_reported_case_samples_finite_values():
    """Denoiser(UNet(1, 1, channels=(16, 32)), "edm") used to sample all NaN: UNet took the log
    of the conditioning, which is ln σ / 4 < 0 for EDM and the timestep 0 for DDPM."""
    torch.manual_seed(1)
    for prediction in ("edm", "eps"):
        d = Denoiser(UNet(1, 1, channels=(16, 32)), prediction=prediction)
        x = sample(d, (2, 1, 8, 8), steps=5, progress=False)
        assert torch.isfinite(x).all(), prediction


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("prediction,schedule", PREDICTIONS)
@pytest.mark.parametrize("sampler", ["heun", "ddim", "euler_ancestral"])
def test_every_network_in_a_denoiser_samples_finite(name, prediction, schedule, sampler):
    net = NETWORKS[name].eval()
    d = Denoiser(net, prediction, schedule())
    x = sample(d, (2, 1, 8, 8), sampler=sampler, steps=4, seed=3, progress=False)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    assert x.abs().max() < 1e3


class _Counting(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls, self.group = net, 0, getattr(net, "group", None)

    def forward(self, x, t):
        self.calls += 1
        return self.net(x, t)


def _equivariance_errors(d, x_t, sampler, **kw):
    group = d.group
    base = sample(d, x_t, sampler=sampler, steps=4, progress=False, **kw)
    errors = []
    for k in range(1, len(group)):
        extra = {"transform_noise": k} if sampler in ("euler_ancestral", "ddpm") else {}
        moved = sample(d, group.act(x_t, k), sampler=sampler, steps=4, progress=False, **kw, **extra)
        errors.append(rel_err(moved, group.act(base, k)))
    return errors


@pytest.mark.parametrize("prediction,schedule", [("edm", EDMSchedule), ("eps", DDPMSchedule)])
def test_ode_sampling_is_exactly_equivariant_for_wt_and_fa(prediction, schedule):
    torch.manual_seed(2)
    x_t = torch.randn(2, 1, 8, 8)
    wt = Denoiser(_Counting(EquivariantUNet(1, 1, group="d4", **SMALL)), prediction, schedule(),
                  group="d4")
    fa = Denoiser(UNet(1, 1, **SMALL), prediction, schedule(), group="d4")
    plain = Denoiser(UNet(1, 1, **SMALL), prediction, schedule())
    assert not wt.frame_average and fa.frame_average
    assert max(_equivariance_errors(wt, x_t, "heun")) <= 1e-5
    assert max(_equivariance_errors(fa, x_t, "heun")) <= 1e-5
    plain.group = get("d4")  # only to reuse the measuring helper: plain is not equivariant
    assert min(_equivariance_errors(plain, x_t, "heun")) > 1e-3


@pytest.mark.parametrize("sampler,prediction,schedule",
                         [("euler_ancestral", "edm", EDMSchedule), ("ddpm", "eps", DDPMSchedule)])
def test_stochastic_sampling_with_an_equivariant_network_is_equivariant_at_one_call(
        sampler, prediction, schedule):
    torch.manual_seed(4)
    net = _Counting(EquivariantUNet(1, 1, group="d4", **SMALL))
    d = Denoiser(net, prediction, schedule(), group="d4")
    x_t = torch.randn(3, 1, 8, 8)
    net.calls = 0
    sample(d, x_t, sampler=sampler, steps=4, seed=7, progress=False)
    assert net.calls == 4  # one network call per step, not |G| = 8
    assert max(_equivariance_errors(d, x_t, sampler, seed=7)) <= 1e-5
    # the noise transform is what makes it equivariant
    moved = sample(d, get("d4").act(x_t, 1), sampler=sampler, steps=4, seed=7, progress=False)
    base = sample(d, x_t, sampler=sampler, steps=4, seed=7, progress=False)
    assert rel_err(moved, get("d4").act(base, 1)) > 1e-2


def test_frame_average_choice():
    eq = EquivariantUNet(1, 1, group="d4", **SMALL)
    assert not Denoiser(eq, group="d4").frame_average
    # a d4-equivariant network is c4-equivariant: one call per step (it averaged 4 calls), and
    # ODE sampling is exactly c4-equivariant all the same
    within = Denoiser(eq, group="c4")
    assert not within.frame_average
    assert sampler_equivariance(within, "c4", "heun", (2, 1, 8, 8), steps=3) <= 1e-5
    assert Denoiser(EquivariantUNet(1, 1, group="c4", **SMALL), group="d4").frame_average  # c4 ⊉ d4
    assert Denoiser(EquivariantUNet(1, 1, group="flip_h", **SMALL), group="flip_v").frame_average
    # c2 (identity, rotation by 180°) holds no vertical flip: the network is averaged, and the
    # denoiser is flip_v-equivariant (it was not: 0.63); a d4 network needs no flip_h averaging
    c2 = Denoiser(EquivariantUNet(1, 1, group="c2", **SMALL), group="flip_v")
    assert c2.frame_average
    assert equivariance_error(lambda z: c2(z, 1.0), torch.randn(2, 1, 8, 8), "flip_v") <= 1e-6
    assert not Denoiser(eq, group="flip_h").frame_average
    assert Denoiser(eq, group="d4", frame_average=True).frame_average
    assert Denoiser(UNet(1, 1, **SMALL), group="d4").frame_average
    assert not Denoiser(UNet(1, 1, **SMALL), group="d4", frame_average=False).frame_average
    with pytest.raises(ValueError, match="frame_average=True needs group"):
        Denoiser(eq, frame_average=True)
    with pytest.raises(TypeError, match="frame_average"):
        Denoiser(eq, group="d4", frame_average="yes")


def test_wt_denoiser_calls_once_fa_denoiser_calls_per_element():
    x = torch.randn(2, 1, 8, 8)
    wt = _Counting(EquivariantUNet(1, 1, group="d4", **SMALL))
    fa = _Counting(UNet(1, 1, **SMALL))
    Denoiser(wt, group="d4")(x, 0.5)
    Denoiser(fa, group="d4", chunks=8)(x, 0.5)
    assert (wt.calls, fa.calls) == (1, 8)


def test_sampling_from_a_shape_draws_in_the_network_s_dtype():
    """A float64 or bf16 model sampled from a shape was refused with a TypeError about x_T's dtype,
    which the user never made (user tryout): x_T is drawn in the parameters' dtype now."""
    for dtype in (torch.float64, torch.bfloat16):
        den = Denoiser(UNet(1, 1, **SMALL).to(dtype), "edm")
        out = sample(den, (2, 1, 8, 8), steps=2, progress=False)
        assert out.dtype == dtype and torch.isfinite(out).all()
    fn = Denoiser(lambda x, t: x, "edm")  # a function has no parameters: float32
    assert sample(fn, (1, 1, 4, 4), steps=2, progress=False).dtype == torch.float32
    with pytest.raises(TypeError, match=r"compile its network instead: denoiser.model = torch.compile"):
        sample(torch.compile(fn), (1, 1, 4, 4), steps=2)
