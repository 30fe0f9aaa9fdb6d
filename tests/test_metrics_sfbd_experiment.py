"""symfast.metrics (pixel Fréchet distance, exact posterior error) and the SFBD experiment's
--quick mode end to end."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from symfast.data import gaussian_mixture
from symfast.metrics import frechet_distance, posterior_mse, sampler_equivariance

REPO = Path(__file__).resolve().parent.parent


def test_frechet_distance_matches_the_closed_form_for_gaussians():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 1, 2, 2, generator=gen)
    b = 1.5 * torch.randn(20000, 1, 2, 2, generator=gen) + 0.5
    # N(0, I) vs N(0.5, 2.25 I) in 4 dims: 4 * (0.25 + 1 + 2.25 - 2 * 1.5) = 2
    assert frechet_distance(a, b, "pixels") == pytest.approx(2.0, abs=0.08)
    assert frechet_distance(a, a, "pixels") == pytest.approx(0.0, abs=1e-9)
    # a feature map is applied to both sets
    assert frechet_distance(a, b, features=lambda x: x.flatten(1)[:, :1]) == pytest.approx(0.5, abs=0.04)


@pytest.mark.parametrize("bad, match", [(torch.zeros(1, 4), "at least 2"), ([1.0, 2.0], "tensor"),
                                        (torch.full((3, 4), math.nan), "non-finite")])
def test_frechet_distance_rejects_bad_input(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        frechet_distance(bad, torch.zeros(3, 4), "pixels")
    with pytest.raises(ValueError, match="features"):
        frechet_distance(torch.randn(3, 4), torch.randn(3, 5), "pixels")
    for shape_of in (lambda x: x.flatten(), lambda x: x[:, None], lambda x: x[:2]):
        with pytest.raises(ValueError, match=r"features must map samples \(3 images\) to a tensor"):
            frechet_distance(torch.randn(3, 4), torch.randn(3, 4), shape_of)


class _Exact(nn.Module):
    """A 'denoiser' that is the mixture's exact posterior mean (zero error by definition)."""

    def __init__(self, mixture):
        super().__init__()
        self.mixture, self.model = mixture, nn.Linear(1, 1)

    def forward(self, y, sigma):
        return self.mixture.posterior_mean(y, sigma)


def test_posterior_mse_is_zero_for_the_exact_denoiser_and_positive_otherwise():
    mixture = gaussian_mixture("d4", size=4, channels=1, seed=0)
    assert posterior_mse(_Exact(mixture), mixture, (0.1, 1.0), n=64) == [0.0, 0.0]
    from symfast import Denoiser
    from symfast.nn import UNet
    errors = posterior_mse(Denoiser(UNet(1, 1, (8, 16)), "edm"), mixture, (0.1, 1.0), n=64)
    assert all(e > 1e-4 for e in errors)
    with pytest.raises(TypeError, match="mixture"):
        posterior_mse(_Exact(mixture), "gmm", (0.1,))
    # a Denoiser of a plain function (documented) has no parameters to find a device by
    plain = Denoiser(lambda x, t: torch.zeros_like(x), "edm")
    assert all(e > 0 for e in posterior_mse(plain, mixture, (0.1,), n=16))
    # a squared distance: rounding took FD(x, x) below 0
    for seed in range(20):
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(seed))
        assert 0.0 <= frechet_distance(x, x, "pixels") <= 1e-9


def test_posterior_mse_takes_a_plain_callable():
    """The docstring allows any callable; it has no ``model`` to find a device by."""
    mixture = gaussian_mixture("d4", size=4, channels=1, seed=0)
    assert posterior_mse(lambda y, sigma: mixture.posterior_mean(y, sigma), mixture, (0.5,), n=8) == [0.0]


class _Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x)


@pytest.mark.parametrize("measured", ["flip_h", "c2", "c4", "d4"])
def test_stochastic_sampler_equivariance_over_a_subgroup_of_the_denoisers_group(measured):
    """transform_noise indexes the denoiser's group: flip_h's flip is d4's element 4, not 1 (the
    measure reported 1.3 for an exactly equivariant sampler)."""
    from symfast import Denoiser
    torch.manual_seed(0)
    denoiser = Denoiser(_Conv(), "edm", group="d4")
    with torch.no_grad():
        assert sampler_equivariance(denoiser, measured, "euler_ancestral", (2, 1, 6, 6), steps=3) < 1e-5


def test_stochastic_sampler_equivariance_over_a_group_the_denoiser_lacks_is_refused():
    from symfast import Denoiser
    torch.manual_seed(0)
    denoiser = Denoiser(_Conv(), "edm", group="c4")
    with torch.no_grad(), pytest.raises(ValueError, match="element 4 is not an element of the denoiser's group c4"):
        sampler_equivariance(denoiser, "d4", "euler_ancestral", (2, 1, 6, 6), steps=3)
    # a deterministic sampler draws no noise, so it is measured over any group (a c4-averaged 3×3
    # conv is also d4-symmetric)
    with torch.no_grad():
        assert sampler_equivariance(denoiser, "d4", "heun", (2, 1, 6, 6), steps=3) < 1e-5
        assert sampler_equivariance(denoiser, "d4", "euler_ancestral", (2, 1, 6, 6), steps=3, eta=0.0) < 1e-5


def test_sfbd_experiment_quick_mode_writes_its_table(tmp_path):
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        import sfbd_gmm
    finally:
        sys.path.pop(0)
    sfbd_gmm.main(["--quick", "--seeds", "1", "--out", str(tmp_path / "runs"),
                   "--results", str(tmp_path / "res")])
    result = json.loads((tmp_path / "res" / "sfbd_gmm_quick.json").read_text())
    models = [r["model"] for r in result["table"]]
    assert models[:2] == ["noisy only", "clean only"] and models[-1].startswith("floor")
    run = result["runs"][0]
    assert [s["stage"] for s in run["sfbd"]] == ["pretrain", "round 1", "round 2"]
    assert all(math.isfinite(s["pixel_fd"]) and s["posterior_mse"] > 0 for s in run["sfbd"])
