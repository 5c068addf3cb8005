"""`diffiner-sample` / scripts/sample.py: unconditional samples from a trained prior.

Listening to samples is the quickest check of what a model has learnt. The command checks its
flags, loads the checkpoint with the settings it carries, and hands the work to
`diffiner.sampling`; under torchrun/mpiexec each rank draws its share of the samples.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

import torch

from .. import dist_util
from ..acceleration import execution_flags
from ..checkpoints import load_model, resolve_model_settings
from ..errors import UsageError, usage_errors
from ..flags import (DEVICE_FLAG, MODEL_GROUP, Flag, command_parser, flags_of, precision_from_args, settings_of,
                     values_of)
from ..sampling import SamplingSettings, sample_waves, write_samples
from ..spectrogram import front_end_of
from ..script_util import RESPACING_FLAG, carried_setting_flags
from .common import check_number, check_respacing, resolve_device, run_command, setup_logging

logger = logging.getLogger(__name__)

SAMPLE_WRITER = "diffiner-sample"  # the holder named in the output folder's lock

SAMPLING_FLAGS = (
    Flag("model_path", required=True, help="checkpoint to sample from (a plain state dict, e.g. "
                                           "ema_0.9999_NNNNNN.pt)", metavar="FILE"),
    *flags_of(SamplingSettings),
    Flag("output_dir", "diffiner_samples", "folder for sample_000.wav, sample_001.wav, ...", metavar="DIR"),
    DEVICE_FLAG,
    RESPACING_FLAG,
)
MODEL_FLAGS = carried_setting_flags()


def create_argparser() -> argparse.ArgumentParser:
    return command_parser("Draw unconditional samples from a trained Diffiner model.", {
        "sampling": SAMPLING_FLAGS, "precision": execution_flags("channels_last"), MODEL_GROUP: MODEL_FLAGS}, prog="diffiner-sample")


def check_args(args: argparse.Namespace) -> None:
    """Check the flags before any work; UsageError naming the problem."""
    if not os.path.isfile(args.model_path):
        raise UsageError(f"--model-path {args.model_path}: no such checkpoint file")
    check_number("--seconds", args.seconds, 0, strict=True)
    check_number("--num-samples", args.num_samples, 1)
    check_number("--batch-size", args.batch_size, 1)
    check_number("--seed", args.seed, 0)
    with usage_errors(ValueError):
        args.model_settings = resolve_model_settings(args.model_path, values_of(args, MODEL_FLAGS))
    check_respacing(args.timestep_respacing, args.model_settings.values["diffusion_steps"])


def sample(args: argparse.Namespace) -> int:
    """The command's work, inside the error boundary."""
    check_args(args)
    setup_logging(args.debug)
    requested = resolve_device(args.device)
    with usage_errors(ValueError):
        info = dist_util.setup_dist(device=torch.device(requested).type)
    device = torch.device(requested) if not info.distributed else info.device
    try:
        with usage_errors(ValueError):
            model, diffusion = load_model(args.model_path, args.model_settings,
                                          timestep_respacing=args.timestep_respacing)
        with dist_util.job_output_lock(args.output_dir, SAMPLE_WRITER):
            mine = list(range(info.rank, args.num_samples, info.world_size))
            write_samples(args.output_dir, sample_waves(
                model, diffusion, mine, settings_of(SamplingSettings, args), device=device,
                precision=args.precision, channels_last=args.channels_last, progress=dist_util.is_main()),
                front_end_of(model).sample_rate)
            dist_util.barrier()
        if dist_util.is_main():
            print(f"wrote {args.num_samples} sample(s) of {args.seconds} s to {args.output_dir}")
    finally:
        dist_util.cleanup()
    return 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the flags (argparse's own errors exit with status 2). Resolves `precision`."""
    parser = create_argparser()
    args = parser.parse_args(argv)
    args.precision = precision_from_args(args, parser)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: sample(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
