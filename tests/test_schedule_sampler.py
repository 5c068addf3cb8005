import numpy as np
import pytest
import torch

from diffiner.schedule_sampler import LossSecondMomentResampler, UniformSampler, create_named_schedule_sampler
from diffiner.script_util import create_gaussian_diffusion
from tolerances import rounding_rtol


@pytest.fixture
def diffusion():
    return create_gaussian_diffusion(steps=50)


def generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_named_samplers(diffusion):
    assert isinstance(create_named_schedule_sampler("uniform", diffusion), UniformSampler)
    assert isinstance(create_named_schedule_sampler("loss-second-moment", diffusion), LossSecondMomentResampler)
    with pytest.raises(ValueError, match="uniform"):
        create_named_schedule_sampler("nonsense", diffusion)


def test_uniform_sampler_covers_all_steps_with_unit_weights(diffusion):
    sampler = UniformSampler(diffusion)
    t, w = sampler.sample(5000, "cpu", torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 49
    assert torch.all(w == 1)
    counts = np.bincount(t.numpy(), minlength=50)
    assert counts.min() > 50  # about 100 each


def test_per_example_generators_make_draws_independent_of_the_batch(diffusion):
    sampler = UniformSampler(diffusion)
    together, _ = sampler.sample(3, "cpu", generators(1, 2, 3))
    apart = torch.cat([sampler.sample(1, "cpu", generators(s))[0] for s in (1, 2, 3)])
    assert torch.equal(together, apart)
    with pytest.raises(ValueError):
        sampler.sample(2, "cpu", generators(1, 2, 3))


def test_loss_second_moment_prefers_high_loss_steps_after_warm_up(diffusion):
    sampler = LossSecondMomentResampler(diffusion, history_per_term=2, uniform_prob=0.01)
    assert np.all(sampler.weights() == 1)
    losses = [10.0 if t == 7 else 1.0 for t in range(50)]
    sampler.update_with_all_losses(list(range(50)), losses)
    assert np.all(sampler.weights() == 1)  # not warmed up: one loss per step so far
    sampler.update_with_all_losses(list(range(50)), losses)
    p = sampler.weights() / sampler.weights().sum()
    assert p[7] == pytest.approx(0.99 * 10 / 59 + 0.01 / 50)
    t, w = sampler.sample(4000, "cpu", torch.Generator().manual_seed(0))
    assert 0.12 < (t == 7).float().mean() < 0.22
    # Importance weights undo the non-uniform draw: E_p[w * f(t)] = uniform mean of f.
    # The float32 weights against float64 arithmetic: a cast and a division or two in float32.
    np.testing.assert_allclose(w.numpy(), 1.0 / (50 * p[t.numpy()]), rtol=rounding_rtol(torch.float32, 3))
    # The history keeps only the latest values per step.
    sampler.update_with_all_losses([7, 7], [1.0, 1.0])
    assert sampler.weights()[7] == pytest.approx(sampler.weights()[8])


def test_loss_aware_state_round_trip_continues_identically(diffusion):
    rng = np.random.default_rng(0)
    sampler = LossSecondMomentResampler(diffusion, history_per_term=3)
    for _ in range(4):
        sampler.update_with_all_losses(list(range(50)), rng.uniform(0.5, 2.0, 50).tolist())
    restored = LossSecondMomentResampler(diffusion, history_per_term=3)
    restored.load_state_dict(sampler.state_dict())
    for s in range(3):
        sampler.update_with_local_losses(torch.tensor([s, 10 + s]), torch.tensor([3.0, 0.1]))
        restored.update_with_local_losses(torch.tensor([s, 10 + s]), torch.tensor([3.0, 0.1]))
    a = sampler.sample(8, "cpu", torch.Generator().manual_seed(5))
    b = restored.sample(8, "cpu", torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="diffusion_steps"):
        LossSecondMomentResampler(create_gaussian_diffusion(steps=40)).load_state_dict(sampler.state_dict())
