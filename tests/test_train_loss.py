"""Denoiser.loss against the objectives written out by hand: EDM's weighted loss, DDPM's ε, v and
x0 regression, the Reg term, and frame-averaged training."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import rel_err
from symfast import Denoiser, symmetrize
from symfast.groups import get
from symfast.nn import EquivariantUNet, UNet
from symfast.nn.regularizer import act_per_sample
from symfast.schedules import DDPMSchedule, EDMSchedule, VESchedule

SMALL = dict(channels=(8, 16), heads=2)


def _batch(seed=0, b=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 8, 8, generator=g), torch.randn(b, 1, 8, 8, generator=g)


def test_edm_loss_is_the_weighted_denoising_error():
    """EDM: λ(σ)·‖D(x0 + σε, σ) − x0‖², λ = (σ² + σd²)/(σ σd)², with D the Denoiser itself."""
    torch.manual_seed(0)
    d = Denoiser(UNet(1, 1, **SMALL), "edm", EDMSchedule(sigma_data=0.5))
    x0, eps = _batch()
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 60.0])
    with torch.no_grad():
        terms = d.loss(x0, sigma, eps, reduction="none")
    for b, s in enumerate(sigma.tolist()):
        den = d(x0[b:b + 1] + s * eps[b:b + 1], s).detach()
        weight = (s * s + 0.25) / (s * 0.5) ** 2
        expected = weight * (den - x0[b:b + 1]).double().pow(2).mean()
        assert abs(float(terms.dsm[b]) - float(expected)) <= 1e-5 * float(expected)
    assert torch.equal(terms.total, terms.dsm) and terms.reg is None
    with torch.no_grad():
        mean = d.loss(x0, sigma, eps)
    assert float(mean) == pytest.approx(float(terms.total.mean()), rel=1e-6)


def test_loss_runs_in_the_models_dtype():
    """A bf16/fp16 model with data of its dtype was refused (a float32 c_in promoted its input);
    a float64 model's loss was computed in float32."""
    torch.manual_seed(0)
    x0, eps = _batch()
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 60.0], dtype=torch.float64)
    net = UNet(1, 1, **SMALL).double()
    d = Denoiser(net, "edm", EDMSchedule(sigma_data=0.5))
    x0, eps = x0.double(), eps.double()
    loss = d.loss(x0, sigma, eps)
    assert loss.dtype == torch.float64
    s = sigma.reshape(-1, 1, 1, 1)  # EDM's loss, written out in float64
    c_skip, c_out, c_in = 0.25 / (s * s + 0.25), s * 0.5 / (s * s + 0.25).sqrt(), 1 / (s * s + 0.25).sqrt()
    x = x0 + s * eps
    want = (net(c_in * x, sigma.log() / 4) - (x0 - c_skip * x) / c_out).pow(2).mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-12)
    for dtype in (torch.bfloat16, torch.float16):
        for prediction in ("edm", "eps"):  # eps on EDM: c_in is the host float 1.0
            low = Denoiser(UNet(1, 1, **SMALL).to(dtype), prediction)
            loss = low.loss(x0.to(dtype), sigma, eps.to(dtype))
            loss.backward()
            assert loss.dtype == torch.float32 and torch.isfinite(loss)
            assert all(p.grad.dtype == dtype for p in low.parameters())


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_ddpm_losses_regress_the_usual_targets(prediction):
    """On a DDPM schedule the network sees x_t = √ᾱ x0 + √(1−ᾱ) ε and the timestep t, and
    regresses ε, v = √ᾱ ε − √(1−ᾱ) x0, or x0 (diffusers' training targets)."""
    torch.manual_seed(1)
    net = UNet(1, 1, **SMALL)
    sched = DDPMSchedule()
    d = Denoiser(net, prediction, sched)
    x0, eps = _batch(1)
    t = torch.tensor([0, 10, 250, 700, 999])
    ac = sched.alphas_cumprod[t].double()
    sigma = ((1 - ac) / ac).sqrt().float()
    terms = d.loss(x0, sigma, eps, t=t.float(), reduction="none")
    a, s = ac.sqrt().float().view(-1, 1, 1, 1), (1 - ac).sqrt().float().view(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    target = {"eps": eps, "v": a * eps - s * x0, "x0": x0}[prediction]
    expected = (net(x_t, t.float()) - target).pow(2).flatten(1).mean(1)
    assert rel_err(terms.dsm, expected) <= 1e-5


@pytest.mark.parametrize("schedule", [EDMSchedule(), DDPMSchedule(), VESchedule()])
def test_training_noise_levels(schedule):
    u = (torch.arange(20000, dtype=torch.float64) + 0.5) / 20000
    sigma, t = schedule.training_levels(u)
    assert sigma.dtype == t.dtype == torch.float32 and torch.isfinite(sigma).all()
    if isinstance(schedule, EDMSchedule):  # lognormal(P_mean, P_std), t = ln σ / 4
        log = sigma.double().log()
        assert abs(float(log.mean()) - schedule.p_mean) < 1e-3
        assert abs(float(log.std()) - schedule.p_std) < 1e-2
        assert rel_err(t, log / 4) <= 1e-6
    elif isinstance(schedule, DDPMSchedule):  # uniform integer timesteps
        assert torch.equal(t, t.round()) and t.min() == 0 and t.max() == 999
        assert torch.bincount(t.long()).min() == torch.bincount(t.long()).max() == 20
        assert torch.equal(sigma, torch.from_numpy(schedule.sigma_table)[t.long()])
    else:  # log-uniform over [σ_min, σ_max], t = σ
        assert sigma.min() >= schedule.sigma_min * 0.999 and sigma.max() <= schedule.sigma_max * 1.001
        assert abs(float(sigma.log().mean()) - math.log(math.sqrt(0.01 * 50))) < 1e-3
        assert torch.equal(sigma, t)


def test_drawn_noise_levels_and_noise_follow_the_generator():
    d = Denoiser(UNet(1, 1, **SMALL), "edm")
    x0, _ = _batch()
    a = d.loss(x0, generator=torch.Generator().manual_seed(3), reduction="none")
    b = d.loss(x0, generator=torch.Generator().manual_seed(3), reduction="none")
    c = d.loss(x0, generator=torch.Generator().manual_seed(4), reduction="none")
    assert torch.equal(a.sigma, b.sigma) and torch.equal(a.total, b.total)
    assert not torch.equal(a.sigma, c.sigma)


def test_reg_term_vanishes_for_equivariant_networks_and_stops_the_gradient():
    torch.manual_seed(5)
    x0, eps = _batch(5)
    sigma = torch.full((5,), 0.7)
    elements = torch.tensor([1, 2, 3, 5, 7])
    for net, zero in ((EquivariantUNet(1, 1, group="d4", **SMALL), True), (UNet(1, 1, **SMALL), False)):
        target = type(net)(1, 1, **SMALL, **({"group": "d4"} if zero else {}))
        target.load_state_dict(net.state_dict())
        d = Denoiser(net, "edm", group="d4", frame_average=False)
        terms = d.loss(x0, sigma, eps, reduction="none", reg_weight=2.0, reg_target=target,
                       reg_elements=elements)
        assert rel_err(terms.total, terms.dsm + 2.0 * terms.reg) <= 1e-6
        if zero:
            assert float(terms.reg.detach().max()) <= 1e-10 * float(terms.dsm.detach().mean())
        else:
            assert float(terms.reg.detach().min()) > 1e-4 * float(terms.dsm.detach().mean())
            terms.total.mean().backward()
            assert all(p.grad is None for p in target.parameters())
            assert all(p.grad is not None for p in net.parameters())
            # the term by hand: ‖F(x_in) − g⁻¹ F_target(g x_in)‖² with x_in = c_in·x
            g = get("d4")
            c_in = 1 / math.sqrt(0.49 + 0.25)
            x_in = (x0 + 0.7 * eps) * c_in
            t = torch.full((5,), math.log(0.7) / 4)
            with torch.no_grad():
                pulled = act_per_sample(target(act_per_sample(x_in, elements, g), t),
                                        torch.tensor([g.inverse(int(k)) for k in elements]), g)
                expected = (net(x_in, t) - pulled).pow(2).flatten(1).mean(1)
            assert rel_err(terms.reg, expected) <= 1e-5


def test_frame_averaged_training_equals_training_the_symmetrized_network():
    torch.manual_seed(6)
    net = UNet(1, 1, **SMALL)
    x0, eps = _batch(6, b=3)
    sigma = torch.tensor([0.2, 1.0, 3.0])
    fa = Denoiser(net, "edm", group="d4", frame_average=True)
    loss = fa.loss(x0, sigma, eps)
    loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    ref = Denoiser(symmetrize(net, "d4"), "edm").loss(x0, sigma, eps)
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    for g, p in zip(grads, net.parameters()):
        assert rel_err(g, p.grad) <= 1e-5


def test_loss_rejects_bad_input():
    d = Denoiser(UNet(1, 1, **SMALL), "edm")
    x0, eps = _batch()
    with pytest.raises(TypeError, match="x0"):
        d.loss(x0.long())
    with pytest.raises(ValueError, match="sigma"):
        d.loss(x0, torch.ones(3))
    with pytest.raises(ValueError, match="noise"):
        d.loss(x0, 0.5, eps[:2])
    with pytest.raises(ValueError, match="reduction"):
        d.loss(x0, reduction="sum")
    with pytest.raises(ValueError, match="reg_weight needs a denoiser with a group"):
        d.loss(x0, reg_weight=1.0)
    with pytest.raises(ValueError, match="t is the conditioning"):
        d.loss(x0, t=torch.zeros(5))
