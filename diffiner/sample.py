"""Unconditional samples from a trained model: the engine of `scripts/sample.py` / `diffiner-sample`.

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

from . import dist_util
from .audio import MODEL_SAMPLE_RATE, save_audio
from .data import STREAM_SAMPLING, indexed_generator
from .pipeline import load_model, padded_width
from .script_util import add_dict_to_argparser, args_to_dict, model_and_diffusion_defaults
from .spectrogram import NUM_BINS, num_frames, spec_to_wave

logger = logging.getLogger(__name__)


def sampling_defaults() -> dict:
    return dict(
        model_path="",
        num_samples=8,
        seconds=4.0,
        batch_size=4,
        seed=0,
        output_dir="diffiner_samples",
        device="",
    )


SAMPLING_HELP = {
    "model_path": "checkpoint to sample from (a plain state dict, e.g. ema_0.9999_NNNNNN.pt)",
    "num_samples": "how many samples to write",
    "seconds": "length of each sample in seconds",
    "batch_size": "samples generated together",
    "seed": "seed; sample i depends only on it and i",
    "output_dir": "folder for sample_000.wav, sample_001.wav, ...",
    "device": "torch device (default: cuda if available, else cpu)",
}


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Draw unconditional samples from a trained Diffiner model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sampling = parser.add_argument_group("sampling")
    add_dict_to_argparser(sampling, sampling_defaults(), SAMPLING_HELP)
    add_dict_to_argparser(sampling, dict(use_ddim=False, use_fp16=False), dict(
        use_ddim="DDIM sampling (deterministic given the start noise) instead of DDPM ancestral sampling",
        use_fp16="run the network under float16 autocast"))
    model_defaults = {k: v for k, v in model_and_diffusion_defaults().items() if k != "use_fp16"}
    model_defaults["timestep_respacing"] = "ddim200"
    add_dict_to_argparser(parser.add_argument_group("model and diffusion (must match the checkpoint)"),
                          model_defaults)
    return parser


def sample_spectrograms(model: torch.nn.Module, diffusion, indices: Sequence[int], frames: int, *, seed: int,
                        use_ddim: bool, device: torch.device) -> torch.Tensor:
    """Spectrograms (len(indices), 2, 256, frames) of the samples numbered `indices`."""
    generators = [indexed_generator(seed, i, STREAM_SAMPLING) for i in indices]
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    shape = (len(indices), model.in_channels, NUM_BINS, frames)
    return loop(model, shape, device=device, generator=generators)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = create_argparser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.model_path or not os.path.isfile(args.model_path):
        parser.error(f"--model_path {args.model_path!r}: no such checkpoint file")
    if args.seconds <= 0 or args.num_samples < 1 or args.batch_size < 1:
        parser.error("--seconds, --num_samples and --batch_size must be positive")
    if args.seed < 0:
        parser.error("--seed must be >= 0")

    try:
        info = dist_util.setup_dist(device=args.device or None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device(args.device) if args.device and not info.distributed else info.device
    try:
        try:
            model, diffusion = load_model(args.model_path, args_to_dict(args, model_and_diffusion_defaults()))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        model.to(device).eval()

        samples = int(round(args.seconds * MODEL_SAMPLE_RATE))
        frames = padded_width(samples, model.downsample_factor, samples)
        mine: List[int] = list(range(info.rank, args.num_samples, info.world_size))
        batches = [mine[lo:lo + args.batch_size] for lo in range(0, len(mine), args.batch_size)]
        for indices in tqdm(batches, desc="sampling", unit="batch", disable=not dist_util.is_main()):
            spec = sample_spectrograms(model, diffusion, indices, frames, seed=args.seed, use_ddim=args.use_ddim,
                                       device=device)
            waves = spec_to_wave(spec[..., :num_frames(samples)].float().cpu(), samples)
            for index, wave in zip(indices, waves):
                save_audio(os.path.join(args.output_dir, f"sample_{index:03d}.wav"), wave.numpy(), MODEL_SAMPLE_RATE)
        dist_util.barrier()
        if dist_util.is_main():
            print(f"wrote {args.num_samples} sample(s) of {args.seconds} s to {args.output_dir}")
    finally:
        dist_util.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
