import numpy as np
import pytest
import torch

from diffiner.acceleration import (ExecutionSettings, NetworkRunner, autocast, build_runner, frames_that_fit,
                                  largest_tensor_per_frame, max_frames_by_elements, measurement_batches, memory_model)
from diffiner.pipeline import Refiner
from diffiner.script_util import create_model_and_diffusion

from conftest import requires_cuda, tiny_model_and_diffusion

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


@pytest.mark.slow
def test_compile_switch_buckets_widths_and_matches_eager():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile needs torch >= 2.0")
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="ddim2")
    refiner = Refiner(model, diffusion, compile=True)
    assert refiner.width_bucket == 128 and refiner.padded_width(16000) == 128
    runner = build_runner(model, ExecutionSettings(precision="fp32", compile=True))
    _, x, t = network_io()
    with torch.no_grad():
        eager = NetworkRunner(model)(x, t)
        try:
            compiled = runner(x, t)
        except Exception as exc:  # no working C++ toolchain for inductor on this machine
            pytest.skip(f"torch.compile unavailable here: {type(exc).__name__}: {exc}")
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4 * eager.abs().max().item())


MB = 2 ** 20


def test_the_batch_budget_separates_fixed_memory_from_memory_per_frame():
    # A network call needing 300 MB whatever its size (workspaces) plus 2 MB per frame, measured
    # on 128 and 256 frames, with 10 GB free of which 80% may be used; the cap is far away.
    small, large = (128, 300 * MB + 256 * MB), (256, 300 * MB + 512 * MB)
    assert memory_model(small, large) == (2 * MB, 300 * MB)
    assert frames_that_fit(small, large, 10000 * MB, 0.8, 32, 10 ** 6) == (8000 - 300) // 2 == 3850
    # Dividing one peak by its frames would count the 300 MB once per frame: 2522 frames, a third
    # fewer. That ratio is only the fallback for a larger batch that measured no more memory.
    assert memory_model((128, 812 * MB), (256, 812 * MB)) == (812 * MB / 256, 0.0)
    assert frames_that_fit(small, large, 100 * MB, 0.8, 32, 10 ** 6) == 32  # never less than one segment


def test_the_slope_is_fitted_over_enough_frames_to_drown_workspace_noise():
    """At 32 frames, one segment more adds about as much as cuDNN's workspace
    choice varies (30 MB). Fitted over at least 128 frames, such a swing moves the per-frame
    estimate by under a quarter; over one 32-frame segment it doubled it."""
    assert measurement_batches(32) == (4, 8) and measurement_batches(64) == (2, 4)
    assert measurement_batches(640) == (2, 4)  # never fewer than 2 and 4 segments
    for width in (32, 64, 128, 320, 640):
        small, large = measurement_batches(width)
        fixed, per_frame, swing = 2000 * MB, 1 * MB, 30 * MB
        measured = [(n * width, fixed + per_frame * n * width) for n in (small, large)]
        noisy = [measured[0], (measured[1][0], measured[1][1] + swing)]
        assert (large - small) * width >= 128
        assert abs(memory_model(*noisy)[0] / per_frame - 1) < 0.25, width


def test_the_budget_keeps_every_tensor_below_2_to_the_31_elements():
    """The published network's widest tensor per frame is a decoder input at full resolution:
    128 upsampled + 128 skip channels x 256 bins. With the memory of an 80 GB card (1.1 MB per
    frame measured) the budget would be about 58,000 frames; the cap holds it to 32,767."""
    model, _ = create_model_and_diffusion()
    assert largest_tensor_per_frame(model, 640) == 256 * 256
    cap = max_frames_by_elements(model, 640)
    assert cap == 32767 and cap * 256 * 256 < 2 ** 31 <= (cap + 1) * 256 * 256
    measured = [(n * 640, 1500 * MB + n * 640 * 1.1 * MB) for n in measurement_batches(640)]
    uncapped = frames_that_fit(*measured, 80 * 1024 * MB, 0.8, 640, 10 ** 9)
    assert uncapped > 55000
    assert frames_that_fit(*measured, 80 * 1024 * MB, 0.8, 640, cap) == cap


def test_the_per_frame_bound_covers_every_tensor_a_forward_passes_between_blocks():
    """Every input and output of every module in a real forward (the decoder's concatenations
    included) stays within the bound, and the widest of them reaches it: the bound is tight."""
    model, _ = tiny_model_and_diffusion()
    seen = []

    def note(module, inputs, output):
        for tensor in list(inputs) + [output]:
            if isinstance(tensor, torch.Tensor):
                seen.append(tensor.numel())

    handles = [m.register_forward_hook(note) for m in model.modules()]
    batch, width = 2, 32
    with torch.no_grad():
        model(torch.zeros(batch, 2, 256, width), torch.zeros(batch, dtype=torch.long))
    for handle in handles:
        handle.remove()
    bound = largest_tensor_per_frame(model, width)
    assert max(seen) == bound * batch * width


@pytest.mark.cuda
@requires_cuda
def test_auto_budget_with_cuda_graphs_runs_every_width_without_running_out_of_memory():
    """--cuda-graphs with the auto budget: the graph pool recorded while sizing stays allocated,
    and batches of two widths, each filling the budget, then record their graphs in what is left.
    Free memory is cut to 3 GiB by a ballast tensor, so that memory, not the tensor-size cap,
    sets the budget."""
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="ddim2")
    refiner = Refiner(model, diffusion, device="cuda", cuda_graphs=True, width_bucket=32)
    free, _ = torch.cuda.mem_get_info()
    ballast = torch.empty(free - 3 * 2 ** 30, dtype=torch.uint8, device="cuda")
    refiner.auto_max_batch_frames(128)
    assert refiner.max_batch_frames is not None
    assert refiner.max_batch_frames < max_frames_by_elements(refiner.model, 128)
    for width in (128, 64):
        samples = (width - 2) * 256  # one frame and one hop short of `width`: padded to it
        assert refiner.padded_width(samples) == width
        noisy = np.sin(np.arange(samples) / 9.0).astype(np.float32) * 0.1
        segment = refiner.prepare(noisy, 0.9 * noisy, 16000).segments[0]
        waves = refiner.run_segments([segment] * refiner.batch_size_for(width))
        assert all(torch.isfinite(w).all() for w in waves)
    assert refiner.fitting_batch == {}, "a batch ran out of memory and was split"
    del ballast


def cast_counter():
    """A dispatch mode counting the dtype conversions (aten._to_copy) that run inside it."""
    dispatch = pytest.importorskip("torch.utils._python_dispatch")
    if not hasattr(dispatch, "TorchDispatchMode"):
        pytest.skip(f"torch {torch.__version__} has no TorchDispatchMode (torch >= 1.13)")

    class CastCounter(dispatch.TorchDispatchMode):
        casts = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten._to_copy:
                self.casts += 1
            return func(*args, **(kwargs or {}))

    return CastCounter()


def test_a_bf16_reverse_process_converts_only_the_networks_inputs_and_output():
    """Issue 20 item 3: autocast is entered once per reverse process, so the weights are
    converted to bf16 once, not at every step, and GroupNorm normalises bf16 activations without
    converting them to float32 and back. What a call still converts is what crosses its
    boundary: the timesteps and their embedding, the input spectrogram and the output. Before,
    every layer's weights and every GroupNorm's input and output were converted at every step
    (more than 100 conversions per call on this tiny model)."""
    if not supports("bf16"):
        pytest.skip("this torch cannot autocast to bf16 on the CPU")
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="ddim4")
    refiner = Refiner(model, diffusion, precision="bf16", channels_last=True)
    prepared = refiner.prepare(np.sin(np.arange(8000) / 7.0).astype(np.float32) * 0.1,
                               np.sin(np.arange(8000) / 7.0).astype(np.float32) * 0.05, 16000)
    calls = []
    predict = refiner.diffusion.predict_start
    refiner.diffusion.predict_start = lambda *args, **kwargs: calls.append(None) or predict(*args, **kwargs)
    counter = cast_counter()
    with torch.no_grad():
        refiner.run_batch(prepared.segments)  # the first call converts the weights
        first = len(calls)
        with counter:
            refiner.run_batch(prepared.segments)
    steps = len(calls) - first
    assert steps == first == 4
    boundary = 4  # timesteps to float, their embedding to bf16, the input to bf16, the output to float32
    # The reverse process's own float32 arithmetic converts nothing; the first step's weights do.
    weights = sum(1 for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)))
    assert counter.casts <= steps * boundary + 2 * weights + 1, counter.casts  # + the method's one mask


def test_sdpa_gets_contiguous_4d_tensors_in_reduced_precision_and_float32_keeps_its_kernel(monkeypatch):
    """Fused SDPA kernels need contiguous (batch, heads, positions, channels) inputs; float32
    keeps the transposed 3-D views of before, whose math kernel gave every float32 output so far."""
    from diffiner.unet import QKVAttention

    if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        pytest.skip(f"torch {torch.__version__} has no scaled_dot_product_attention (it came in 2.0)")
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v: seen.append((q.dim(), q.is_contiguous(), k.is_contiguous(), v.is_contiguous()))
                        or sdpa(q, k, v))
    attention = QKVAttention(n_heads=2)
    if not attention.use_sdpa:
        pytest.skip("this torch has no scaled_dot_product_attention")
    qkv = torch.randn(3, 2 * 3 * 16, 40, generator=torch.Generator().manual_seed(0))
    reduced = attention(qkv.bfloat16())
    reference = attention(qkv)
    assert seen == [(4, True, True, True), (3, False, False, False)]
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(t.reshape(3, 2, 16, 40).transpose(2, 3) for t in qkv.reshape(6, 48, 40).split(16, dim=1)))
    torch.testing.assert_close(reference, expected.transpose(2, 3).reshape(3, 32, 40), rtol=0, atol=0)
    # bf16 against float32: 8 significant bits, a softmax-weighted mean of unit-scale values.
    torch.testing.assert_close(reduced.float(), reference, rtol=0, atol=8 * torch.finfo(torch.bfloat16).eps)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_group_norm_of_bf16_activations_matches_normalising_them_in_float32(layout):
    from diffiner.nn import GroupNorm32

    norm = GroupNorm32(8, 32)
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(1))
        norm.bias.normal_(generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, 32, 16, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    x = x.contiguous(memory_format=layout)
    with torch.no_grad():
        out = norm(x)
        in_float32 = torch.nn.functional.group_norm(x.float(), 8, norm.weight, norm.bias, norm.eps)
        # Float32 runs exactly as GroupNorm itself.
        torch.testing.assert_close(norm(x.float()), in_float32, rtol=0, atol=0)
    assert out.dtype == torch.bfloat16
    # Both round one float32 result to bf16: at most one bf16 step apart (plus float32 summation
    # order, far below it).
    step = torch.finfo(torch.bfloat16).eps * in_float32.abs()
    assert ((out.float() - in_float32).abs() <= step + 1e-6).all()
