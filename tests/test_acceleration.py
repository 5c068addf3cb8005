import numpy as np
import pytest
import torch

from diffiner.acceleration import ExecutionSettings, NetworkRunner, autocast, build_runner, frames_that_fit
from diffiner.pipeline import Refiner

from conftest import tiny_model_and_diffusion

# Stated tolerances of reduced precision against float32: the largest output difference relative
# to the output's largest magnitude, for the network alone. Measured on this tiny model on the
# CPU: bf16 1.3e-2 with torch 2.13 and 9.2e-2 with torch 1.11 (its CPU autocast keeps more ops
# in bf16); fp16 1.8e-3 with torch 2.13 (torch 1.11 cannot run fp16 on the CPU).
TOLERANCE = {"bf16": 1e-1, "fp16": 5e-3}


def supports(precision: str) -> bool:
    try:
        with autocast("cpu", {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]):
            torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1))
        return True
    except ValueError:
        return False


def network_io(seed=0):
    model, _ = tiny_model_and_diffusion(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 2, 256, 32, generator=g)
    return model, x, torch.tensor([10, 3000])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_network_stays_within_the_stated_tolerance(precision):
    if not supports(precision):
        pytest.skip(f"this torch cannot autocast to {precision} on the CPU")
    model, x, t = network_io()
    with torch.no_grad():
        reference = NetworkRunner(model, "fp32")(x, t)
        reduced = NetworkRunner(model, precision)(x, t)
    assert reduced.dtype == torch.float32  # the diffusion arithmetic receives float32
    error = (reduced - reference).abs().max() / reference.abs().max()
    assert 0 < error <= TOLERANCE[precision]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_refiner_arithmetic_stays_float32_under_autocast(precision):
    if not supports(precision):
        pytest.skip(f"this torch cannot autocast to {precision} on the CPU")
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="ddim2")
    refiner = Refiner(model, diffusion, precision=precision)
    prepared = refiner.prepare(np.sin(np.arange(8000) / 7.0).astype(np.float32) * 0.1,
                               np.sin(np.arange(8000) / 7.0).astype(np.float32) * 0.05, 16000)
    seen = []
    original = refiner.diffusion.predict_start

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append({k: v.dtype for k, v in out.items() if v is not None})
        return out

    refiner.diffusion.predict_start = spy
    waves = refiner.run_segments(prepared.segments)
    assert all(dtype == torch.float32 for step in seen for dtype in step.values())
    assert waves[0].dtype == torch.float32 and torch.isfinite(waves[0]).all()


def test_channels_last_matches_the_default_layout():
    model, x, t = network_io()
    with torch.no_grad():
        reference = NetworkRunner(model, "fp32")(x, t)
        model_cl, _ = tiny_model_and_diffusion(0)
        result = NetworkRunner(model_cl, "fp32", channels_last=True)(x, t)
    torch.testing.assert_close(result, reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())


def test_unsupported_autocast_is_a_clear_error():
    with pytest.raises(ValueError, match="not supported"):
        with autocast("cuda" if not torch.cuda.is_available() else "meta", torch.float16):
            pass


def test_compile_switch_buckets_widths_and_matches_eager():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile needs torch >= 2.0")
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="ddim2")
    refiner = Refiner(model, diffusion, compile=True)
    assert refiner.width_bucket == 128 and refiner.padded_width(16000) == 128
    runner = build_runner(model, ExecutionSettings(compile=True))
    _, x, t = network_io()
    with torch.no_grad():
        eager = NetworkRunner(model)(x, t)
        try:
            compiled = runner(x, t)
        except Exception as exc:  # no working C++ toolchain for inductor on this machine
            pytest.skip(f"torch.compile unavailable here: {type(exc).__name__}: {exc}")
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4 * eager.abs().max().item())


def test_the_batch_budget_separates_fixed_memory_from_memory_per_frame():
    mb = 2 ** 20
    # A network call needing 300 MB whatever its size (workspaces) plus 2 MB per frame, measured
    # on one and two segments of 32 frames, with 10 GB free of which 80% may be used.
    one, two = 300 * mb + 64 * mb, 300 * mb + 128 * mb
    assert frames_that_fit(one, two, 32, 10000 * mb, 0.8) == (8000 - 300) // 2 == 3850
    # Scaling the one-segment peak alone counts the 300 MB per frame: 5.5x too few frames.
    assert frames_that_fit(one, one, 32, 10000 * mb, 0.8) == int(8000 / (364 / 32)) == 703
    assert frames_that_fit(one, two, 32, 100 * mb, 0.8) == 32  # never less than one segment
