"""No host synchronisation inside the sampling loop, checked on the CPU.

On a GPU, reading a tensor's value from Python (bool(), int(), float(), .item(), .tolist(), ...)
and blocking host-to-device copies make the host wait for the device at that point; inside the
reverse-process loop that would happen at every step. Here the conversions are counted through
spies on torch.Tensor, and the host-to-device copies (of schedule arrays, of the respaced
process's timestep map) through spies on torch.tensor, torch.as_tensor and torch.from_numpy:
their number must not grow with the number of steps. (tests/test_cuda.py runs the same loop under
torch.cuda.set_sync_debug_mode("error") when a GPU is present.)
"""

import collections
import contextlib

import numpy as np
import pytest
import torch

from diffiner import gaussian_diffusion as gd
from diffiner.acceleration import NetworkRunner
from diffiner.refiner import refine

from conftest import tiny_model_and_diffusion
from gaussian_prior import GaussianDenoiser
from tolerances import rounding_rtol

CONVERSIONS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "__array__")
# The ways an array or a Python value becomes a tensor: on a GPU, a host-to-device copy.
COPIES = ("from_numpy", "as_tensor", "tensor")


@contextlib.contextmanager
def counting(monkeypatch, *targets):
    """Count the calls of the attributes `names` of `owner`, for each (owner, names) pair of
    `targets` (the originals still run); one counter, keyed by name."""
    counts = collections.Counter()
    for owner, names in targets:
        for name in names:
            original = getattr(owner, name)

            def spy(*args, _name=name, _original=original, **kwargs):
                counts[_name] += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(owner, name, spy)
    yield counts
    monkeypatch.undo()


def refine_inputs(steps, seed=0):
    model, diffusion = tiny_model_and_diffusion(timestep_respacing=f"ddim{steps}")
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(2, 2, 256, 8, generator=g)
    sigma = torch.rand(2, 1, 256, 8, generator=g)
    return NetworkRunner(model), diffusion, noisy, sigma


@pytest.mark.parametrize("method, etas", [("diffiner+", dict(eta_a=0.6, eta_c=0.8)), ("diffiner", {})])
def test_the_refiner_reads_no_tensor_value_and_copies_nothing_per_step(monkeypatch, method, etas):
    """On the respaced process the refiner really uses (ddimN): its timestep map and schedule
    tables are copied to the device once, not at every step."""
    reads, copies = {}, {}
    for steps in (2, 5):
        network, diffusion, noisy, sigma = refine_inputs(steps)
        assert diffusion.num_timesteps == steps and len(diffusion.timestep_map) == steps  # respaced
        generators = [torch.Generator().manual_seed(k) for k in range(2)]
        with counting(monkeypatch, (torch.Tensor, CONVERSIONS), (torch, COPIES)) as seen:
            out = refine(network, diffusion, noisy, sigma, method=method, generator=generators, **etas)
        assert torch.isfinite(out).all()
        reads[steps] = sum(seen[name] for name in CONVERSIONS)
        copies[steps] = {name: seen[name] for name in COPIES}
    # Diffiner+ reads one value after the loop: how many steps clamped the noise variance.
    assert reads[2] == reads[5] == (1 if method == "diffiner+" else 0)
    assert copies[2] == copies[5], copies  # per array used, whatever the step count


def plain_diffusion(steps):
    """A process that is not respaced: its methods alone are what is measured."""
    return gd.GaussianDiffusion(betas=gd.get_named_beta_schedule("linear", steps), model_mean_type=gd.ModelMeanType.EPSILON,
                                model_var_type=gd.ModelVarType.FIXED_LARGE, loss_type=gd.LossType.MSE)


@pytest.mark.parametrize("loop", ["ddim_sample_loop", "p_sample_loop"])
def test_schedule_coefficients_are_copied_to_the_device_once_not_per_step(monkeypatch, loop):
    copies = {}
    for steps in (25, 50):
        diffusion = plain_diffusion(steps)
        model = GaussianDenoiser(diffusion.alphas_cumprod)
        with counting(monkeypatch, (torch, COPIES)) as seen:
            getattr(diffusion, loop)(model, (2, 2, 16, 8), device="cpu", generator=torch.Generator().manual_seed(0))
        copies[steps] = sum(seen.values())
    assert copies[25] == copies[50] > 0  # one copy per schedule array used, whatever the step count


def test_schedule_tensors_are_cached_per_device_and_match_the_arrays():
    diffusion = plain_diffusion(40)
    table = diffusion.schedule_tensor("sqrt_alphas_cumprod", "cpu")
    assert table is diffusion.schedule_tensor("sqrt_alphas_cumprod", torch.device("cpu"))
    assert table.dtype == torch.float32
    np.testing.assert_array_equal(table.numpy(), diffusion.sqrt_alphas_cumprod.astype(np.float32))
    # The lookups at given timesteps: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise.
    t = torch.tensor([0, 17, 39])
    x = torch.ones(3, 2, 4, 4)
    signal = diffusion.q_sample(x, t, noise=torch.zeros_like(x))
    noise = diffusion.q_sample(torch.zeros_like(x), t, noise=x)
    # The float32 table's cast of the float64 value, then a product with 1 and a sum with 0: one
    # rounding, or two where the lookup computes in another way.
    np.testing.assert_allclose(signal[:, 0, 0, 0].numpy(), diffusion.sqrt_alphas_cumprod[[0, 17, 39]],
                               rtol=rounding_rtol(torch.float32, 2))
    np.testing.assert_allclose(noise[:, 0, 0, 0].numpy(), diffusion.sqrt_one_minus_alphas_cumprod[[0, 17, 39]],
                               rtol=rounding_rtol(torch.float32, 2))


def test_a_respaced_process_has_its_own_tables():
    _, spaced = tiny_model_and_diffusion(timestep_respacing="ddim4")
    _, full = tiny_model_and_diffusion()
    assert spaced.schedule_tensor("alphas_cumprod", "cpu").shape == (4,)
    assert full.schedule_tensor("alphas_cumprod", "cpu").shape == (4000,)
    np.testing.assert_allclose(spaced.schedule_tensor("alphas_cumprod", "cpu").numpy(),
                               full.alphas_cumprod[::1000].astype(np.float32),
                               rtol=rounding_rtol(torch.float32, 2))  # each a cast of a float64 product
    assert spaced.schedule_tensor("timestep_map", "cpu").dtype == torch.int64  # integer arrays keep their type
