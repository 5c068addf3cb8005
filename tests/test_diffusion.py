import numpy as np
import pytest
import torch

from diffiner import gaussian_diffusion as gd
from diffiner.respace import space_timesteps
from diffiner.script_util import create_gaussian_diffusion

from gaussian_prior import GaussianDenoiser
from conftest import tiny_model_and_diffusion
from tolerances import rounding_rtol


def test_linear_schedule_is_scaled_to_the_step_count():
    betas = gd.get_named_beta_schedule("linear", 4000)
    assert betas.dtype == np.float64 and len(betas) == 4000
    assert betas[0] == pytest.approx(2.5e-5) and betas[-1] == pytest.approx(5e-3)
    cosine = gd.get_named_beta_schedule("cosine", 1000)
    assert np.all(np.diff(cosine) >= -1e-12) and cosine.max() <= 0.999
    with pytest.raises(ValueError):
        gd.get_named_beta_schedule("quadratic", 10)


def test_ddim200_of_4000_keeps_every_20th_step():
    assert sorted(space_timesteps(4000, "ddim200")) == list(range(0, 4000, 20))


def test_section_counts_follow_guided_diffusion():
    kept = sorted(space_timesteps(300, "10,15,20"))
    assert len(kept) == 45
    assert kept[:10] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert kept[10:12] == [100, 107] and kept[24] == 199
    assert kept[25] == 200 and kept[-1] == 299
    with pytest.raises(ValueError):
        space_timesteps(10, "ddim7")


def test_respaced_process_keeps_the_original_cumulative_alphas():
    base = create_gaussian_diffusion(steps=4000)
    spaced = create_gaussian_diffusion(steps=4000, timestep_respacing="ddim200")
    assert spaced.num_timesteps == 200
    # The spaced betas are 1 - (ratio of kept cumulative alphas), whose cumulative product telescopes
    # back to the kept values: per step a division, a subtraction and a product, each rounding once.
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[::20],
                               rtol=rounding_rtol(torch.float64, 3 * spaced.num_timesteps))


def test_network_is_called_with_original_timestep_indices():
    spaced = create_gaussian_diffusion(steps=4000, timestep_respacing="ddim200")
    model = GaussianDenoiser(create_gaussian_diffusion(steps=4000).alphas_cumprod)
    x = torch.zeros(2, 2, 4, 4)
    spaced.p_mean_variance(model, x, torch.tensor([199, 3]))
    assert model.calls[-1].tolist() == [3980, 60]
    rescaled = create_gaussian_diffusion(steps=4000, timestep_respacing="ddim200", rescale_timesteps=True)
    seen = []
    rescaled.p_mean_variance(lambda x, t: seen.append(t) or torch.zeros_like(x), x, torch.tensor([199, 3]))
    assert seen[0].tolist() == pytest.approx([995.0, 15.0])


def test_q_sample_and_posterior_are_consistent():
    diffusion = create_gaussian_diffusion(steps=100)
    torch.manual_seed(0)
    x0 = torch.randn(4, 2, 8, 8)
    t = torch.tensor([0, 10, 50, 99])
    noise = torch.randn_like(x0)
    xt = diffusion.q_sample(x0, t, noise)
    ab = torch.tensor(diffusion.alphas_cumprod[t.numpy()]).float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    mean, var, _ = diffusion.q_posterior_mean_variance(x0, xt, t)
    assert torch.allclose(mean[0], x0[0], atol=1e-5)  # at t=0 the posterior mean is x0
    assert (var[1:] > 0).all()


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_samplers_with_an_exact_denoiser_reach_the_data_distribution(loop):
    base = create_gaussian_diffusion(steps=1000)
    diffusion = create_gaussian_diffusion(steps=1000, timestep_respacing="ddim50")
    model = GaussianDenoiser(base.alphas_cumprod, variance=4.0)
    gen = torch.Generator().manual_seed(0)
    sample = getattr(diffusion, loop)(model, (8, 2, 32, 32), device="cpu", generator=gen)
    assert abs(sample.var().item() - 4.0) < 0.3


@pytest.mark.parametrize("settings", [
    dict(), dict(learn_sigma=True), dict(learn_sigma=True, use_kl=True), dict(predict_xstart=True),
    dict(learn_sigma=True, rescale_learned_sigmas=True), dict(noise_schedule="cosine"),
])
def test_training_losses_are_finite_and_differentiable(settings):
    model, diffusion = tiny_model_and_diffusion(**settings)
    model.train()
    x0 = torch.randn(2, 2, 256, 8)
    t = torch.tensor([0, 3000])
    losses = diffusion.training_losses(model, x0, t)
    assert losses["loss"].shape == (2,) and torch.isfinite(losses["loss"]).all()
    losses["loss"].mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    if settings.get("learn_sigma") and not settings.get("use_kl"):
        assert "vb" in losses and "mse" in losses


def test_a_chain_of_step_0_alone_returns_its_start_noise():
    # Why ddim1 cannot work: the one step the DDIM stride rule gives is step 0, where the
    # process holds almost no noise, so sampling reads the start noise as nearly clean data.
    # A chain of step 0 alone is the base process's step at t=0 (same alpha_bar, alpha_bar_prev 1).
    base = create_gaussian_diffusion(steps=4000)
    model = GaussianDenoiser(base.alphas_cumprod, variance=4.0)  # the exact denoiser of N(0, 4)
    noise = torch.randn(4, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    sample = base.ddim_sample(model, noise.clone(), torch.zeros(4, dtype=torch.long))["sample"]
    # One step of sqrt(1 - alpha_bar_0) = 0.005 noise removed: the result is the noise, not N(0, 4).
    assert (sample - noise).abs().max().item() < 0.01 and abs(sample.var().item() - 4.0) > 2.0


@pytest.mark.parametrize("respacing", ["ddim1", "1", [1]])
def test_a_respacing_that_keeps_step_0_alone_is_refused_naming_why(respacing):
    with pytest.raises(ValueError, match="keeps only step 0 of 4000.*start noise unchanged"):
        space_timesteps(4000, respacing)
    assert sorted(space_timesteps(4000, "ddim2")) == [0, 2000]
    assert space_timesteps(1, respacing) == {0}  # all of a one-step process is not a respacing


def test_ddim1_on_the_command_line_is_one_line_exit_2():
    from diffiner.commands.common import check_respacing
    from diffiner.errors import UsageError

    with pytest.raises(UsageError, match="^--timestep-respacing 'ddim1' keeps only step 0") as error:
        check_respacing("ddim1", 4000)
    assert error.value.exit_code == 2 and "\n" not in str(error.value)
