import logging
import math

import pytest
import torch

from diffiner.methods import resolve_etas
from diffiner.methods.diffiner import diffiner_update
from diffiner.methods.diffiner_plus import diffiner_plus_update
from diffiner.refiner import refine
from diffiner.script_util import create_gaussian_diffusion

from gaussian_prior import GaussianDenoiser

SHAPE = (2, 2, 16, 12)


def gaussian_setup(respacing="ddim200", variance=1.0):
    base = create_gaussian_diffusion(steps=4000)
    return GaussianDenoiser(base.alphas_cumprod, variance), create_gaussian_diffusion(
        steps=4000, timestep_respacing=respacing)


def observation(seed=0, variance=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g) * math.sqrt(variance)


def generators(seed=1, n=SHAPE[0]):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def rms(x):
    return x.pow(2).mean().sqrt().item()


@pytest.mark.parametrize("method", ["diffiner", "diffiner+"])
def test_vanishing_observation_noise_with_eta_b_one_returns_the_observation(method):
    model, diffusion = gaussian_setup()
    y = observation()
    tiny_noise = torch.full((SHAPE[0], 1) + SHAPE[2:], 1e-6)
    out = refine(model, diffusion, y, tiny_noise, method=method, eta_b=1.0, generator=generators())
    # The last step keeps the exact denoiser's x0, one step of size sqrt(1 - alpha_bar_20) away.
    assert rms(out - y) / rms(y) < 0.05
    unreliable = refine(model, diffusion, y, torch.full_like(tiny_noise, 1e3), method=method, eta_b=1.0,
                        generator=generators())
    assert rms(unreliable - y) / rms(y) > 0.5


def test_diffiner_plus_with_eta_c_zero_ignores_y_where_the_observation_noise_dominates():
    g = torch.Generator().manual_seed(0)
    x0, eps, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
    sigma_y = torch.rand((SHAPE[0], 1) + SHAPE[2:], generator=g) * 2
    a, s = 0.8, 0.6
    y1, y2 = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    out1, _ = diffiner_plus_update(x0, eps, y1, sigma_y, a, s, z, 0.4, 0.6, 0.0, 0.6)
    out2, _ = diffiner_plus_update(x0, eps, y2, sigma_y, a, s, z, 0.4, 0.6, 0.0, 0.6)
    observed = (s <= a * sigma_y).expand(SHAPE)
    assert observed.any() and (~observed).any()
    assert torch.equal(out1[observed], out2[observed])
    assert not torch.allclose(out1[~observed], out2[~observed])
    expected = a * x0 + 0.4 * s * eps + s * math.sqrt(1 - 0.4 ** 2) * z
    torch.testing.assert_close(out1[observed], expected[observed])


def test_diffiner_update_follows_both_branches_of_the_spec():
    g = torch.Generator().manual_seed(0)
    x0, y, z = (torch.randn(SHAPE, generator=g) for _ in range(3))
    sigma_y = torch.rand((SHAPE[0], 1) + SHAPE[2:], generator=g)
    a, s, eta_a, eta_b = 0.7, math.sqrt(1 - 0.49), 0.9, 0.8
    out = diffiner_update(x0, y, sigma_y, a, s, z, eta_a, eta_b)
    sig = sigma_y.expand(SHAPE)
    branch1 = (1 - eta_b) * a * x0 + eta_b * a * y + torch.sqrt(s ** 2 - eta_b ** 2 * a ** 2 * sig ** 2) * z
    branch2 = a * x0 + math.sqrt(1 - eta_a ** 2) * (s / (sig + 1e-5)) * (y - x0) + eta_a * s * z
    dominated = s > a * sig
    torch.testing.assert_close(out[dominated], branch1[dominated])
    torch.testing.assert_close(out[~dominated], branch2[~dominated])


def test_inpainting_uses_the_variance_preserving_noise_scale():
    z = torch.ones(SHAPE)
    zeros = torch.zeros(SHAPE)
    sigma_y = torch.full((SHAPE[0], 1) + SHAPE[2:], 10.0)  # every bin in the second branch
    out, _ = diffiner_plus_update(zeros, zeros, zeros, sigma_y, 0.6, 0.8, z, 0.4, 0.6, 0.0, 0.6,
                                  inpaint_mask=torch.ones((SHAPE[0], 1) + SHAPE[2:]))
    torch.testing.assert_close(out, torch.full(SHAPE, 0.8 * math.sqrt(1 - 0.6 ** 2)))


def test_rho_is_computed_per_batch_item():
    g = torch.Generator().manual_seed(0)
    x0, eps, y, z = (torch.randn(SHAPE, generator=g) for _ in range(4))
    sigma_y = torch.full((SHAPE[0], 1) + SHAPE[2:], 5.0)
    out, variance = diffiner_plus_update(x0, eps, y, sigma_y, 0.9, 0.4, z, 0.5, 0.6, 0.5, 0.6)
    y_other = y.clone()
    y_other[1] = -y_other[1] * 3
    out_other, variance_other = diffiner_plus_update(x0, eps, y_other, sigma_y, 0.9, 0.4, z, 0.5, 0.6, 0.5, 0.6)
    assert variance[0] == variance_other[0] and variance[1] != variance_other[1]
    assert torch.equal(out[0], out_other[0])


@pytest.mark.parametrize("etas", [
    dict(eta_a=0.0, eta_b=0.0, eta_c=0.0, eta_d=0.0), dict(eta_a=1.0, eta_b=1.0, eta_c=0.0, eta_d=1.0),
    dict(eta_a=0.6, eta_b=0.5, eta_c=0.8, eta_d=0.3), dict(eta_a=0.0, eta_b=1.0, eta_c=1.0, eta_d=0.5),
    dict(eta_a=0.4, eta_b=0.6, eta_c=0.5, eta_d=0.6),
])
def test_outputs_are_finite_for_valid_etas(etas):
    model, diffusion = gaussian_setup("ddim20")
    y = observation()
    sigma = torch.rand((SHAPE[0], 1) + SHAPE[2:], generator=torch.Generator().manual_seed(3))
    mask = torch.zeros_like(sigma)
    mask[..., :4] = 1
    out = refine(model, diffusion, y, sigma, method="diffiner+", generator=generators(), inpaint_mask=mask, **etas)
    assert torch.isfinite(out).all()
    simple = refine(model, diffusion, y, sigma, method="diffiner", eta_a=etas["eta_a"], eta_b=etas["eta_b"],
                    generator=generators())
    assert torch.isfinite(simple).all()


def test_negative_noise_variance_is_clamped_with_a_warning(caplog):
    model, diffusion = gaussian_setup("ddim20")
    y = observation()
    # The SE output equals y + small noise: the observation direction aligns with eps, rho > 0.
    sigma = torch.full((SHAPE[0], 1) + SHAPE[2:], 0.5)
    with caplog.at_level(logging.WARNING, logger="diffiner.methods"):
        out = refine(model, diffusion, y, sigma, eta_a=0.6, eta_c=0.8, generator=generators())
    assert torch.isfinite(out).all()
    assert "clamped" in caplog.text


@pytest.mark.parametrize("method, etas, message", [
    ("diffiner+", dict(eta_a=1.2), "eta_a"),
    ("diffiner+", dict(eta_b=-0.1), "eta_b"),
    ("diffiner+", dict(eta_a=0.9, eta_c=0.9), "eta_a\\^2 \\+ eta_c\\^2"),
    ("diffiner", dict(eta_c=0.1), "not used"),
    ("ddrm", dict(), "unknown method"),
])
def test_invalid_etas_raise_before_any_work(method, etas, message):
    def model(*_):
        raise AssertionError("the network must not be called")

    _, diffusion = gaussian_setup("ddim4")
    with pytest.raises(ValueError, match=message):
        refine(model, diffusion, observation(), torch.ones((SHAPE[0], 1) + SHAPE[2:]), method=method, **etas)


def test_defaults_are_the_papers_and_the_given_eta_b_is_used():
    assert resolve_etas("diffiner+") == dict(eta_a=0.4, eta_b=0.6, eta_c=0.0, eta_d=0.6)
    assert resolve_etas("diffiner") == dict(eta_a=0.9, eta_b=0.9)
    assert resolve_etas("diffiner+", eta_a=0.4, eta_b=0.6)["eta_b"] == 0.6


def test_same_generators_give_the_same_result_and_batch_items_are_independent():
    model, diffusion = gaussian_setup("ddim10")
    y = observation()
    sigma = torch.rand((SHAPE[0], 1) + SHAPE[2:], generator=torch.Generator().manual_seed(2))
    a = refine(model, diffusion, y, sigma, eta_c=0.3, generator=generators())
    b = refine(model, diffusion, y, sigma, eta_c=0.3, generator=generators())
    assert torch.equal(a, b)
    alone = refine(model, diffusion, y[1:], sigma[1:], eta_c=0.3, generator=generators()[1:])
    torch.testing.assert_close(alone[0], a[1], rtol=0, atol=1e-5 * a[1].abs().max().item())
