"""`diffiner-sample` / scripts/sample.py: unconditional samples from a trained prior.

Listening to samples is the quickest check of what a model has learnt. Sample i starts from
noise drawn with a generator seeded by (seed, i) alone, so it does not depend on the batch
size or on how samples are shared among processes (torchrun/mpiexec split them by rank).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .. import dist_util
from ..acceleration import NetworkRunner
from ..audio.folders import prepare_output_folder
from ..audio.io import MODEL_SAMPLE_RATE, save_audio
from ..checkpoints import load_model
from ..flags import MODEL_GROUP, PRECISION_FLAGS, Flag, command_parser, precision_from_args, values_of
from ..pipeline import padded_width
from ..script_util import SAMPLING_RESPACING, model_and_diffusion_flags
from ..seeding import STREAM_SAMPLING, stream_generator
from ..spectrogram import NUM_BINS, spec_to_wave
from .common import UsageError, check_number, check_respacing, resolve_device, run_command, setup_logging, usage_errors

logger = logging.getLogger(__name__)

SAMPLING_FLAGS = (
    Flag("model_path", required=True, help="checkpoint to sample from (a plain state dict, e.g. "
                                           "ema_0.9999_NNNNNN.pt)", metavar="FILE"),
    Flag("num_samples", 8, "how many samples to write"),
    Flag("seconds", 4.0, "length of each sample in seconds"),
    Flag("batch_size", 4, "samples generated together"),
    Flag("seed", 0, "seed; sample i depends only on it and i"),
    Flag("output_dir", "diffiner_samples", "folder for sample_000.wav, sample_001.wav, ...", metavar="DIR"),
    Flag("device", "", "torch device (empty: cuda if available, else cpu)", metavar="DEVICE"),
    Flag("use_ddim", False, "DDIM sampling (deterministic given the start noise) instead of DDPM ancestral sampling"),
)
MODEL_FLAGS = model_and_diffusion_flags(timestep_respacing=SAMPLING_RESPACING)


def create_argparser() -> argparse.ArgumentParser:
    return command_parser("Draw unconditional samples from a trained Diffiner model.", {
        "sampling": SAMPLING_FLAGS, "precision": PRECISION_FLAGS, MODEL_GROUP: MODEL_FLAGS})


def sample_spectrograms(network, diffusion, indices: Sequence[int], shape: Sequence[int], *, seed: int,
                        use_ddim: bool, device: torch.device) -> torch.Tensor:
    """Spectrograms (len(indices), *shape) of the samples numbered `indices`, drawn by `network`."""
    generators = [stream_generator(seed, STREAM_SAMPLING, i) for i in indices]
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    return loop(network, (len(indices), *shape), device=device, generator=generators)


def check_args(args: argparse.Namespace) -> None:
    """Check the flags before any work; UsageError naming the problem."""
    if not os.path.isfile(args.model_path):
        raise UsageError(f"--model-path {args.model_path}: no such checkpoint file")
    check_number("--seconds", args.seconds, 0, strict=True)
    check_number("--num-samples", args.num_samples, 1)
    check_number("--batch-size", args.batch_size, 1)
    check_number("--seed", args.seed, 0)
    check_respacing(args.timestep_respacing, args.diffusion_steps)


def sample(args: argparse.Namespace, precision: str) -> int:
    """The command's work, inside the error boundary."""
    check_args(args)
    setup_logging(args.debug)
    requested = resolve_device(args.device)
    with usage_errors(ValueError):
        info = dist_util.setup_dist(device=torch.device(requested).type)
    device = torch.device(requested) if not info.distributed else info.device
    try:
        with usage_errors(ValueError):
            model, diffusion = load_model(args.model_path, values_of(args, MODEL_FLAGS))
        prepare_output_folder(args.output_dir)
        network = NetworkRunner(model.to(device).eval(), precision, args.channels_last)

        samples = int(round(args.seconds * MODEL_SAMPLE_RATE))
        shape = (model.in_channels, NUM_BINS, padded_width(samples, model.downsample_factor, samples))
        mine: List[int] = list(range(info.rank, args.num_samples, info.world_size))
        batches = [mine[lo:lo + args.batch_size] for lo in range(0, len(mine), args.batch_size)]
        for indices in tqdm(batches, desc="sampling", unit="batch", disable=not dist_util.is_main()):
            spec = sample_spectrograms(network, diffusion, indices, shape, seed=args.seed, use_ddim=args.use_ddim,
                                       device=device)
            waves = spec_to_wave(spec.float().cpu(), samples)  # every frame, then trim: no end click
            for index, wave in zip(indices, waves):
                save_audio(os.path.join(args.output_dir, f"sample_{index:03d}.wav"), wave.numpy(), MODEL_SAMPLE_RATE)
        dist_util.barrier()
        if dist_util.is_main():
            print(f"wrote {args.num_samples} sample(s) of {args.seconds} s to {args.output_dir}")
    finally:
        dist_util.cleanup()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = create_argparser()
    args = parser.parse_args(argv)
    precision = precision_from_args(args, parser)
    return run_command(lambda: sample(args, precision), args.debug)


if __name__ == "__main__":
    sys.exit(main())
