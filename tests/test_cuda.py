"""The CUDA tier: `pytest -m cuda tests`. Every test here needs a GPU and is skipped, with the reason,
where torch sees none; `.ci/run` runs them with the rest of the suite on a machine that has one.

Tolerances compare the largest difference with the reference's largest magnitude. They were set
from CPU measurements of the same comparisons (tiny model, Diffiner+ ddim4, two 0.5 s recordings;
torch 2.13) with a margin of about 5x for the GPU's own kernels, and are not yet confirmed on a
GPU:

- fp32 (also channels-last, --compile, --cuda-graphs): 5e-3. cuDNN runs float32 convolutions in
  TF32 by default (torch.backends.cudnn.allow_tf32), a 10-bit mantissa like float16's, whose
  refined output differs from float32 by 9.2e-4 on the CPU.
- fp16: 5e-3, from the same 9.2e-4 (the network alone: 1.8e-3).
- bf16: 3e-2, from 5.9e-3 measured on the CPU (8-bit mantissa; the network alone: 1.3e-2).

The CPU and CUDA random generators differ, so the CPU/CUDA comparisons draw the noise from CPU
generators on both sides (copied to the GPU): what is compared is the arithmetic, not the noise.
"""

import os
import subprocess
import tempfile
import warnings

import numpy as np
import pytest
import torch

from diffiner.acceleration import ExecutionSettings, backend_settings, build_runner, max_frames_by_elements
from diffiner.logger import MetricsLogger
from diffiner.pipeline import Refiner, padded_width
from diffiner.refiner import refine
from diffiner.script_util import create_model_and_diffusion, model_and_diffusion_defaults
from diffiner.spectrogram import PUBLISHED, wave_to_spec
from diffiner.train_util import TrainLoop

from conftest import requires_cuda, speech_like, tiny_model_and_diffusion, with_noise

pytestmark = [pytest.mark.cuda, requires_cuda]

# Explicit precisions: "auto" would pick bf16 for the CPU reference on a host CPU with native bf16.
FP32 = ExecutionSettings("fp32")
CONFIGS = {
    "fp32": (FP32, 5e-3),
    "bf16": (ExecutionSettings(precision="bf16"), 3e-2),
    "fp16": (ExecutionSettings(precision="fp16"), 5e-3),
    "fp32+channels-last": (ExecutionSettings("fp32", channels_last=True), 5e-3),
    "fp32+compile": (ExecutionSettings("fp32", compile=True), 5e-3),
    "fp32+cuda-graphs": (ExecutionSettings("fp32", cuda_graphs=True), 5e-3),
}
# The frame widths of VoiceBank-like files (1.5-10 s: 96-640 frames) and shorter.
AUTO_WIDTHS = [32, 64, 128, 320]


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return ((result.float().cpu() - reference.float().cpu()).abs().max() / reference.abs().max()).item()


def observations(refiner: Refiner, count: int = 2, seconds: float = 0.5):
    """Spectrograms and noise maps of `count` noisy/processed pairs of equal width, on the CPU."""
    segments = []
    for seed in range(count):
        clean = speech_like(seconds, 16000, seed)
        segments += refiner.prepare(with_noise(clean, 5.0, seed), clean, 16000, key=str(seed)).segments
    return torch.stack([s.noisy for s in segments]), torch.stack([s.noise_map for s in segments])


def cpu_generators(count: int):
    return [torch.Generator().manual_seed(1000 + k) for k in range(count)]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_refine_on_cuda_matches_the_cpu_within_the_stated_tolerance(config):
    settings, tolerance = CONFIGS[config]
    if settings.compiled and not hasattr(torch, "compile"):
        pytest.skip(f"--compile needs torch >= 2.0 (this is {torch.__version__})")
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="ddim4")
    noisy, sigma = observations(Refiner(model, diffusion, precision="fp32"))
    reference = refine(build_runner(model, FP32), diffusion, noisy, sigma, eta_c=0.3,
                       generator=cpu_generators(2))
    cuda_model, _ = tiny_model_and_diffusion(timestep_respacing="ddim4")
    network = build_runner(cuda_model.cuda(), settings)
    result = refine(network, diffusion, noisy.cuda(), sigma.cuda(), eta_c=0.3, generator=cpu_generators(2))
    assert result.device.type == "cuda" and result.dtype == torch.float32
    error = relative_error(result, reference)
    assert error <= tolerance, f"{config}: {error:.2e} > {tolerance:.0e}"
    if settings.precision != "fp32":
        assert error > 0  # the reduced precision was really used


def test_cuda_runs_search_convolution_algorithms_and_record_the_tf32_switches():
    """Each shape repeats hundreds of times in a reverse process: cuDNN's search pays. The TF32
    switches decide float32's arithmetic, so config.yml records them with it."""
    torch.backends.cudnn.benchmark = False
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="ddim2")
    refiner = Refiner(model, diffusion, device="cuda")
    assert torch.backends.cudnn.benchmark and refiner.precision == "fp32"  # auto on CUDA: fp32 until measured
    recorded = backend_settings(refiner.device)
    assert recorded["cudnn_benchmark"] is True
    assert recorded["tf32_matmul"] == torch.backends.cuda.matmul.allow_tf32
    assert recorded["tf32_cudnn"] == torch.backends.cudnn.allow_tf32


def test_batch_invariance_on_cuda():
    """A segment's result does not depend on its batch: each has its own generator. Tolerance
    5e-3, as fp32 above: cuDNN picks its algorithm (and TF32 accumulation order) per batch size."""
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="ddim4")
    refiner = Refiner(model, diffusion, device="cuda", batch_size=3, eta_c=0.3)
    prepared = [refiner.prepare(*pair, 16000, key=f"f{k}") for k, pair in enumerate(
        (with_noise(speech_like(0.5, 16000, s), 5.0, s), speech_like(0.5, 16000, s)) for s in range(3))]
    segments = [p.segments[0] for p in prepared]
    together = refiner.run_segments(segments)
    refiner.batch_size = 1
    alone = refiner.run_segments(segments[1:2])[0]
    assert relative_error(alone, together[1]) <= 5e-3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_reverse_process_never_synchronises_with_the_host(precision):
    """Under torch.cuda.set_sync_debug_mode("error") every synchronising call raises: Diffiner
    makes none at all; Diffiner+ makes exactly one, after the loop (its count of clamped steps),
    whatever the number of steps."""
    model, diffusion = tiny_model_and_diffusion()
    noisy, sigma = observations(Refiner(model, diffusion, precision="fp32"))
    noisy, sigma = noisy.cuda(), sigma.cuda()
    network = build_runner(model.cuda(), ExecutionSettings(precision=precision))
    for steps in (2, 4):
        _, diffusion = tiny_model_and_diffusion(timestep_respacing=f"ddim{steps}")
        for method in ("diffiner", "diffiner+"):  # warm-up: the schedule tables reach the GPU once
            refine(network, diffusion, noisy, sigma, method=method,
                   generator=[torch.Generator("cuda").manual_seed(k) for k in range(2)])
        generators = [torch.Generator("cuda").manual_seed(k) for k in range(2)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = refine(network, diffusion, noisy, sigma, method="diffiner", generator=generators)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.isfinite(out).all()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                refine(network, diffusion, noisy, sigma, method="diffiner+", generator=generators)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, [str(w.message) for w in syncs]


def published_refiner(**settings) -> Refiner:
    model, diffusion = create_model_and_diffusion(timestep_respacing="ddim2")
    return Refiner(model, diffusion, device="cuda", **settings)


def segments_of_width(refiner: Refiner, width: int, count: int):
    """`count` segments whose padded width is `width` (a recording one frame plus one hop short)."""
    samples = (width - 2) * PUBLISHED.hop_length
    assert refiner.padded_width(samples) == width
    noisy = with_noise(speech_like(samples / 16000, 16000, width), 5.0, width)
    segment = refiner.prepare(noisy, 0.9 * noisy, 16000).segments[0]
    return [segment] * count


@pytest.mark.parametrize("width", AUTO_WIDTHS)
def test_auto_batch_budget_fits_the_published_model_and_uses_most_of_the_free_memory(width):
    """--max-batch-frames auto: a batch sized from the free memory runs without running out of
    it (no halving was needed), and its peak uses at least half of the memory that was free,
    unless the tensor-size cap set the batch (a card with more memory than 2**31-element tensors
    can use)."""
    refiner = published_refiner()
    refiner.auto_max_batch_frames(width)
    assert refiner.max_batch_frames is not None
    count = refiner.batch_size_for(width)
    segments = segments_of_width(refiner, width, count)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    waves = refiner.run_segments(segments)
    peak = torch.cuda.max_memory_allocated() - before
    assert refiner.fitting_batch == {}, f"ran out of memory at {width} frames with {count} segments"
    assert len(waves) == count and all(torch.isfinite(w).all() for w in waves)
    capped = refiner.max_batch_frames >= max_frames_by_elements(refiner.model, width)
    assert capped or peak >= 0.5 * free, \
        f"{width} frames x {count}: peak {peak / 2 ** 30:.1f} GiB of {free / 2 ** 30:.1f} GiB free"


def test_the_published_state_dict_layout_loads_and_refines(tmp_path):
    """A random state dict with every name and shape of the published checkpoint, saved and read
    back through checkpoints.load_model (strict), then one ddim2 refinement on the GPU."""
    model, _ = create_model_and_diffusion(**model_and_diffusion_defaults())
    generator = torch.Generator().manual_seed(0)
    state = {k: 0.02 * torch.randn(v.shape, generator=generator) for k, v in model.state_dict().items()}
    assert len(state) == 612 and sum(v.numel() for v in state.values()) == 164_303_618  # the published layout
    path = str(tmp_path / "published_layout.pt")
    torch.save(state, path)
    del model
    refiner = Refiner.from_checkpoint(path, device="cuda", timestep_respacing="ddim2")
    loaded = refiner.model.state_dict()
    assert all(torch.equal(loaded[k].cpu(), v) for k, v in state.items())
    noisy = with_noise(speech_like(1.3, 16000, 0), 5.0)
    refined = refiner.refine(noisy, 0.9 * noisy, 16000)
    assert refined.shape == noisy.shape and np.isfinite(refined).all()
    assert refiner.padded_width(noisy.size) == padded_width(noisy.size, 32, refiner.max_samples)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_training_steps_in_reduced_precision_stay_finite(precision):
    """TrainLoop on the GPU under autocast: every parameter stays finite and training moves
    them. fp16's loss scale starts at 2^20 and halves on each overflowing step (skipped), so the
    first steps may be skipped; bf16 needs no scaling and takes every step."""
    model, diffusion = tiny_model_and_diffusion()
    model.train()
    with tempfile.TemporaryDirectory() as log_dir:
        loop = TrainLoop(model=model, diffusion=diffusion, batch_size=4, lr=1e-4, log_dir=log_dir,
                         metrics=MetricsLogger(log_dir, columns=["step"], enabled=False),
                         precision=precision)
        assert next(loop.model.parameters()).device.type == "cuda"
        before = [p.detach().clone() for p in loop.model.parameters()]
        # Spectrograms of speech-like audio: the raw STFT values the published model trains on.
        spec = torch.stack([wave_to_spec(torch.from_numpy(speech_like(1.1, 16000, k)))[..., :64] for k in range(4)])
        batch = {"spec": spec, "position": torch.arange(4)}
        took = [loop.run_step(batch) for _ in range(40)]
    if precision == "bf16":
        assert all(took)
    assert sum(took[-10:]) == 10, took  # the loss scale has settled
    assert all(torch.isfinite(p).all() for p in loop.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, loop.model.parameters()))
    with torch.no_grad():
        losses = diffusion.training_losses(loop.network, batch["spec"].cuda(), torch.tensor([0, 1000, 2000, 3999]).cuda())
    assert torch.isfinite(losses["loss"]).all()


def test_a_training_step_synchronises_with_the_host_once():
    """Issue 20, item 6, on the GPU: after a warm-up step, a step makes one synchronising call
    (the read of whether to step: the loss's finiteness and the gradient norm); the batch's noise
    comes from a pinned host buffer in one non-blocking copy, the losses stay on the GPU."""
    model, diffusion = tiny_model_and_diffusion()
    model.train()
    with tempfile.TemporaryDirectory() as log_dir:
        loop = TrainLoop(model=model, diffusion=diffusion, batch_size=4, lr=1e-4, log_dir=log_dir,
                         metrics=MetricsLogger(log_dir, columns=["step"], enabled=False), ema_rate="0.99,0.999",
                         grad_clip=1.0)
        spec = torch.randn(4, 2, 256, 64, generator=torch.Generator().manual_seed(0)).pin_memory()
        loop.run_step({"spec": spec, "position": torch.arange(4)})  # warm-up: tables and optimizer state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loop.run_step({"spec": spec, "position": torch.arange(4, 8)})
        finally:
            torch.cuda.set_sync_debug_mode(0)
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, syncs
        assert len(loop._pending_losses) == 2  # both steps' losses, still on the GPU
        assert loop._pending_losses[0][1]["loss"].device.type == "cuda"


def test_batch_noise_from_cpu_generators_is_the_cpu_stream_in_one_pinned_copy(monkeypatch):
    """The per-example CPU generators of training fill one pinned buffer, copied once: the values
    are bitwise the CPU draws (so a run resumes exactly on another machine)."""
    from diffiner import seeding
    pinned = []
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: pinned.append(k.get("pin_memory")) or empty(*a, **k))
    shape = (3, 2, 256, 64)
    noise = seeding.randn(shape, "cuda", [seeding.stream_generator(0, seeding.STREAM_DIFFUSION, i) for i in range(3)])
    expected = torch.stack([torch.randn(shape[1:], generator=seeding.stream_generator(0, seeding.STREAM_DIFFUSION, i))
                            for i in range(3)])
    assert pinned == [True] and noise.device.type == "cuda"
    assert torch.equal(noise.cpu(), expected)


def test_sampling_draws_on_the_gpu():
    """diffiner-sample's generators live on the GPU, as the refiner's do."""
    from diffiner import sampling
    seen = []

    class Recorder:
        def p_sample_loop(self, network, shape, device, generator):
            seen.extend(g.device.type for g in generator)
            return torch.zeros(shape, device=device)

    sampling.sample_spectrograms(None, Recorder(), [0, 1], (2, 8, 8), seed=0, use_ddim=False,
                                 device=torch.device("cuda"))
    assert seen == ["cuda", "cuda"]


@pytest.mark.slow  # starts a two-process torchrun job
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 GPUs for a 2-process NCCL job")
def test_two_process_nccl_training(tmp_path):
    """torchrun, 2 processes, one GPU each, NCCL (dist_util's default on CUDA): the ranks stay
    bitwise identical (all-reduced gradients are the same on every rank) and the weights finite."""
    from launchers import launcher_env, torchrun
    from test_dist import DRIVER, LAUNCH_TIMEOUT_S
    from test_train import TRAIN_FLAGS, make_corpus

    corpus = make_corpus(str(tmp_path / "clean"))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    rank_file = str(tmp_path / "rank{rank}.pt")
    flags = ["--root", corpus, "--max_steps", "3", *TRAIN_FLAGS, "--log_dir", str(tmp_path / "run"),
             "--batch_size", "1"]
    env = dict(launcher_env(), NCCL_DEBUG="WARN")
    result = subprocess.run(torchrun(str(driver), rank_file, *flags), env=env, capture_output=True, text=True,
                            timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    ranks = [torch.load(rank_file.format(rank=r)) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key
        assert torch.isfinite(value.float()).all(), key
    assert os.path.exists(tmp_path / "run" / "model000003.pt")
