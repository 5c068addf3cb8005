"""Refinement throughput: audio seconds per second, real-time factor and achieved TFLOP/s.

Runs Diffiner+ on synthetic recordings whose lengths follow the VoiceBank+DEMAND test set,
with random weights (speed does not depend on them), once per precision/switch, and once in
the original code's strategy (every file padded to 768 frames, fp32, batches of 8) so that
the speed-up is measured side by side in one run.

On CUDA it uses the published-size model and ddim200 over all 824 files. On a CPU-only machine
that would take days, so it uses a small model, a few files and few steps, and says so.

Each configuration refines with its own copy of the model, so that no switch (channels-last
converts the weights in place) carries over to the configurations after it. Its refined audio
is compared with fp32's from the same run (relative rms difference over all files; the same
seeds, so only the arithmetic differs), and the fastest configuration within --tolerance of it
is printed: the candidate for the default precision. Compiled configurations run at fp32's
widths for that comparison, not at --compile's 128-frame buckets.

How long the full CUDA run takes is estimated from FLOP counts in BENCHMARKS.md (section "GPU
acceptance"). `--configs` and `--num-files` / `--steps` run a part of it.
"""

import argparse
import copy
import time
from typing import Dict, List, Tuple

import numpy as np
import torch

from common import markdown_table, record, voicebank_like_durations
from diffiner.pipeline import Refiner
from diffiner.script_util import create_model_and_diffusion

try:
    from torch.utils.flop_counter import FlopCounterMode
except ImportError:  # torch < 2.1 (the torch 1.11 image) has no FLOP counter: TFLOP/s is left out
    FlopCounterMode = None

SMALL_MODEL = dict(num_channels=32, num_res_blocks=1, channel_mult="1,1,2,2", attention_resolutions="8", num_heads=2)
# Dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
                    "A10G": 70.0, "L4": 121.0, "RTX 4090": 165.0}
CONFIGS = {
    "fp32": dict(precision="fp32"),
    "bf16": dict(precision="bf16"),
    "fp16": dict(precision="fp16"),
    "fp32+channels-last": dict(precision="fp32", channels_last=True),
    "bf16+channels-last": dict(precision="bf16", channels_last=True),
    "bf16+compile": dict(precision="bf16", compile=True),
    "bf16+cuda-graphs": dict(precision="bf16", cuda_graphs=True),
    "original (768 frames; fp32; batch 8)": dict(precision="fp32", width_bucket=768, batch_size=8,
                                                  max_batch_frames=None),
}


def without_zero_layers(model: torch.nn.Module) -> torch.nn.Module:
    """Give the layers that a fresh initialisation zeroes (each residual branch's last
    convolution, the attention projections, the output layer) a default random initialisation.

    With them zero the network outputs exactly zero: speed is the same, but every precision
    would then refine to the same audio, and the comparison with fp32 would mean nothing.
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)) and not module.weight.any():
            module.reset_parameters()
    return model


def peak_tflops(override: float) -> Tuple[float, str]:
    """The device's peak and where the figure comes from.

    GPUs: the dense bf16 tensor-core peak of the data sheet. CPUs have no such table here, so
    the peak is measured the same way round: the best of a few large bfloat16 matrix products
    (float32 where bfloat16 is slower), an attainable upper bound rather than a theoretical one.
    """
    if override:
        return override, "given"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        for key, value in PEAK_BF16_TFLOPS.items():
            if key in name:
                return value, f"{key} bf16 data sheet"
        return float("nan"), "unknown GPU"
    n = 2048
    rates = {}
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        rates[str(dtype).replace("torch.", "")] = 2 * n ** 3 / best / 1e12
    dtype = max(rates, key=rates.get)
    return rates[dtype], f"best measured {n}x{n} {dtype} matmul on this CPU"


def network_flops(refiner: Refiner, batch: int, width: int, cache: Dict) -> float:
    """FLOPs of one network call on a (batch, 2, bins, width) input, counted by torch; NaN where
    this torch cannot count them."""
    if FlopCounterMode is None:
        return float("nan")
    if (batch, width) not in cache:
        x = torch.zeros(batch, 2, refiner.front_end.num_bins, width, device=refiner.device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            refiner.model(x, torch.zeros(batch, dtype=torch.long, device=refiner.device))
        cache[(batch, width)] = float(counter.get_total_flops())
    return cache[(batch, width)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_shapes(refiner, segments) -> List[Tuple[int, int]]:
    """(segments, width) of each batch the refiner runs `segments` in (`run_segments` batches
    the segments of each width in turn, `batch_size_for` that width at a time)."""
    counts: Dict[int, int] = {}
    for seg in segments:
        counts[seg.width] = counts.get(seg.width, 0) + 1
    shapes = []
    for width, count in counts.items():
        size = refiner.batch_size_for(width)
        shapes += [(min(size, count - start), width) for start in range(0, count, size)]
    return shapes


def run_config(name: str, settings: Dict, model, diffusion, recordings: List[np.ndarray], args, flop_cache: Dict):
    """Refine every recording with one configuration, on a copy of `model`; the timing covers the
    network's work only."""
    options = dict(batch_size=args.batch_size, max_batch_frames=args.max_batch_frames, device=args.device)
    if settings.get("compile") or settings.get("cuda_graphs"):
        # fp32's widths (the network's multiple): a segment's noise is drawn at its padded width,
        # so only at the same widths can the audio be compared with fp32's.
        options["width_bucket"] = model.downsample_factor
    options.update(settings)
    refiner = Refiner(copy.deepcopy(model), diffusion, **options)
    segments = [seg for k, wave in enumerate(recordings)
                for seg in refiner.prepare(wave, wave * 0.8, 16000, key=str(k)).segments]
    if refiner.device.type == "cuda" and args.max_batch_frames is None and "max_batch_frames" not in settings:
        refiner.auto_max_batch_frames(max(seg.width for seg in segments))
    batches = batch_shapes(refiner, segments)
    with torch.no_grad():  # warm-up: one call per batch shape (compilation happens here)
        for shape in sorted(set(batches)):
            x = torch.zeros(shape[0], 2, refiner.front_end.num_bins, shape[1], device=refiner.device)
            refiner.network(x, torch.zeros(shape[0], dtype=torch.long, device=refiner.device))
    synchronize(refiner.device)
    start = time.perf_counter()
    waves = refiner.run_segments(segments)
    synchronize(refiner.device)
    wall = time.perf_counter() - start
    steps = diffusion.num_timesteps
    flops = steps * sum(network_flops(refiner, size, width, flop_cache) for size, width in batches)
    return dict(wall=wall, frames=sum(seg.width for seg in segments), flops=flops, waves=waves,
                width_bucket=refiner.width_bucket, batches=len(batches), max_batch=max(size for size, _ in batches))


def relative_difference(waves: List[torch.Tensor], reference: List[torch.Tensor]) -> float:
    """rms(waves - reference) / rms(reference) over all segments."""
    error = sum(float(((a - b) ** 2).sum()) for a, b in zip(waves, reference))
    energy = sum(float((b ** 2).sum()) for b in reference)
    return (error / energy) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--num-files", type=int, default=824 if cuda else 8)
    parser.add_argument("--steps", type=int, default=200 if cuda else 5, help="DDIM steps (ddimN)")
    parser.add_argument("--small", action="store_true", default=not cuda, help="small model instead of the published size")
    parser.add_argument("--configs", default=None, help="comma list of: " + ", ".join(CONFIGS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-batch-frames", type=int, default=None, help="default: auto on CUDA, batch-size on CPU")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak in TFLOP/s (default: data sheet for known GPUs, a measured fp32 matmul on the CPU)")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="largest relative rms difference from fp32's refined audio for a configuration to count "
                             "as equivalent (default 0.01: the difference 40 dB below the signal)")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to BENCHMARKS.md")
    args = parser.parse_args()

    if args.configs:
        names = args.configs.split(",")
    else:
        # On a CPU, fp16 autocast is emulated (about 50x slower than fp32) and CUDA graphs do not
        # exist; compile is left out by default for its minutes of compilation.
        names = [n for n in CONFIGS if cuda or not any(k in n for k in ("fp16", "compile", "cuda-graphs"))]
    durations = voicebank_like_durations()[:args.num_files]
    rng = np.random.default_rng(0)
    recordings = [(0.1 * rng.standard_normal(int(d * 16000))).astype(np.float32) for d in durations]
    audio_seconds = float(sum(durations))
    audio_frames = sum(1 + int(d * 16000) // 256 for d in durations)
    settings = dict(SMALL_MODEL) if args.small else {}
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(timestep_respacing=f"ddim{args.steps}", **settings)
    without_zero_layers(model)
    peak, peak_source = peak_tflops(args.peak_tflops)
    flop_cache: Dict = {}
    rows = []
    reference = None  # fp32's result
    equivalent = {}  # configuration -> wall seconds, for those within the tolerance of fp32
    for name in names:
        try:
            result = run_config(name, CONFIGS[name], model, diffusion, recordings, args, flop_cache)
        except (ValueError, RuntimeError) as exc:
            rows.append([name, "unsupported: " + str(exc).splitlines()[0][:80]] + [""] * 7)
            continue
        if name == "fp32":
            reference = result
        # Only at fp32's widths: a segment's noise is drawn at its padded width, so other widths
        # (the original's 768 frames) give other noise, not other arithmetic.
        if reference is None:
            difference, shown = float("nan"), "n/a (fp32 not run)"
        elif result["width_bucket"] != reference["width_bucket"]:
            difference, shown = float("nan"), "n/a (other widths)"
        else:
            difference = relative_difference(result["waves"], reference["waves"])
            shown = f"{difference:.1e}"
        if difference <= args.tolerance:
            equivalent[name] = result["wall"]
        tflops = result["flops"] / result["wall"] / 1e12
        counted = tflops == tflops  # NaN where torch has no FLOP counter
        rows.append([
            name, f"{audio_seconds / result['wall']:.2f}", f"{result['wall'] / audio_seconds:.4f}",
            f"{result['wall']:.1f}", f"{result['frames'] / audio_frames:.3f}", result["max_batch"],
            f"{tflops:.2f}" if counted else "n/a",
            f"{100 * tflops / peak:.1f}%" if counted and peak == peak else "n/a", shown,
        ])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    table = markdown_table(["config", "audio s/s", "RTF", "wall s", "frames per audio frame", "max batch",
                            "TFLOP/s", "of peak", "difference from fp32"], rows)
    if equivalent:
        fastest = min(equivalent, key=equivalent.get)
        verdict = (f"Fastest configuration within {args.tolerance:g} of fp32's audio: {fastest} "
                   f"({audio_seconds / equivalent[fastest]:.2f} audio s/s).")
    else:
        verdict = "No configuration could be compared with fp32 (fp32 was not run, or failed)."
    print(verdict)
    model_desc = ("SMALL model " + str(SMALL_MODEL) + " (a CPU stand-in, not the published size)") if args.small \
        else "published-size model (164.3 M parameters, random weights)"
    notes = (f"Diffiner+ ddim{args.steps}, {len(durations)} files ({audio_seconds:.1f} s of audio), {model_desc}. "
             "Network time only: reading and writing files is overlapped by the CLI's threads and not timed here. "
             "TFLOP/s counts the network's FLOPs (torch.utils.flop_counter; n/a on torch < 2.1) over the timed run; "
             f"peak: {peak:.3f} TFLOP/s ({peak_source}). Difference from fp32: relative rms difference of the "
             "refined audio from fp32's in this run, same seeds; n/a where fp32 had not run yet, or where the "
             f"padded widths, and with them the noise drawn, differ. Random weights (none zero). {verdict}")
    record("Refinement throughput", table, notes, save=not args.no_record)


if __name__ == "__main__":
    main()
