"""`diffiner-sample` / scripts/sample.py: unconditional samples from a trained prior.

Listening to samples is the quickest check of what a model has learnt. The command checks its
flags, loads the checkpoint with the settings it carries, and hands the work to
`diffiner.sampling`; under torchrun/mpiexec each rank draws its share of the samples.

Like every writer it keeps a record of what it wrote (`audio.records`): a rerun with the same
checkpoint and sampling settings draws only the samples not there yet (a larger --num-samples
adds to the set), other settings are refused unless --overwrite, and a sample file that no run
recorded is never replaced unasked.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

import torch

from .. import dist_util
from ..acceleration import execution_flags
from ..audio.records import DONE, UNLISTED, OutputRecord, file_sha256
from ..checkpoints import ModelSettings, load_model, resolve_model_settings
from ..errors import usage_errors
from ..flags import (CONSOLE_FLAGS, DEVICE_FLAG, MODEL_GROUP, OVERWRITE_FLAG, Flag, command_parser, flags_of,
                     precision_from_args, settings_of, values_of)
from ..sampling import SamplingSettings, sample_name, sample_waves, write_samples
from ..spectrogram import front_end_of
from ..script_util import RESPACING_FLAG, carried_setting_flags
from .common import (check_number, check_respacing, resolve_device, resolve_model_path, run_command, setup_logging,
                     show_progress)

logger = logging.getLogger(__name__)

SAMPLE_WRITER = "diffiner-sample"  # the holder named in the output folder's lock

SAMPLING_FLAGS = (
    Flag("model_path", required=True, help="checkpoint to sample from (a plain state dict, e.g. "
                                           "ema_0.9999_NNNNNN.pt), or 'published': the published weights, "
                                           "downloaded once into a cache", metavar="FILE|published"),
    *flags_of(SamplingSettings),
    Flag("output_dir", "diffiner_samples", "folder for sample_000.wav, sample_001.wav, ...", metavar="DIR"),
    DEVICE_FLAG,
    RESPACING_FLAG,
    OVERWRITE_FLAG.with_help("draw every sample again; into a folder sampled with other settings: delete the "
                             "samples its record lists first"),
    *CONSOLE_FLAGS,
)
MODEL_FLAGS = carried_setting_flags()


def create_argparser() -> argparse.ArgumentParser:
    return command_parser("Draw unconditional samples from a trained Diffiner model.", {
        "sampling": SAMPLING_FLAGS, "precision": execution_flags("channels_last"), MODEL_GROUP: MODEL_FLAGS},
        prog="diffiner-sample")


def check_args(args: argparse.Namespace) -> None:
    """Check the flags before any work; UsageError naming the problem."""
    check_number("--seconds", args.seconds, 0, strict=True)
    check_number("--num-samples", args.num_samples, 1)
    check_number("--batch-size", args.batch_size, 1)
    check_number("--seed", args.seed, 0)
    args.model_path = resolve_model_path(args.model_path)
    with usage_errors(ValueError):
        args.model_settings = resolve_model_settings(args.model_path, values_of(args, MODEL_FLAGS))
    check_respacing(args.timestep_respacing, args.model_settings.values["diffusion_steps"])


def recorded_settings(args: argparse.Namespace, model_settings: ModelSettings) -> dict:
    """What shapes the samples, as the output record keeps it: the checkpoint's content and
    model settings, and the sampling settings (not --num-samples: more samples add to the set;
    not --batch-size: sample i does not depend on its batch)."""
    return {"model_sha256": file_sha256(args.model_path), "model": model_settings.values,
            "seconds": args.seconds, "seed": args.seed, "use_ddim": args.use_ddim,
            "timestep_respacing": args.timestep_respacing, "precision": args.precision}


def samples_to_draw(args: argparse.Namespace, record: OutputRecord, indices: Sequence[int]) -> list:
    """The indices among `indices` whose sample is not done yet (all of them with --overwrite);
    SettingsError for a sample file there that no run recorded, unless --overwrite."""
    states = {i: record.state(sample_name(i), {}) for i in indices}
    if args.overwrite:
        return list(indices)
    record.refuse_unlisted(args.output_dir, SAMPLE_WRITER,
                           [sample_name(i) for i, state in states.items() if state == UNLISTED])
    return [i for i, state in states.items() if state != DONE]


def sample(args: argparse.Namespace) -> int:
    """The command's work, inside the error boundary."""
    setup_logging(args.debug, args.quiet)  # first: the download of the published weights is logged
    check_args(args)
    requested = resolve_device(args.device)
    with usage_errors(ValueError):
        info = dist_util.setup_dist(device=torch.device(requested).type)
    device = torch.device(requested) if not info.distributed else info.device
    try:
        with usage_errors(ValueError):
            model, diffusion = load_model(args.model_path, args.model_settings,
                                          timestep_respacing=args.timestep_respacing)
        with dist_util.job_output_lock(args.output_dir, SAMPLE_WRITER):
            settings = recorded_settings(args, args.model_settings)
            record = OutputRecord.read(args.output_dir, SAMPLE_WRITER)
            record.check(settings, args.overwrite)  # every rank refuses alike, before any change
            todo = samples_to_draw(args, record, range(args.num_samples))
            if dist_util.is_main():
                record = OutputRecord.open(args.output_dir, SAMPLE_WRITER, settings, args.overwrite)
            dist_util.barrier()
            mine = todo[info.rank::info.world_size]
            try:
                write_samples(args.output_dir, sample_waves(
                    model, diffusion, mine, settings_of(SamplingSettings, args), device=device,
                    precision=args.precision, channels_last=args.channels_last,
                    progress=dist_util.is_main() and show_progress(args)), front_end_of(model).sample_rate, record)
                dist_util.barrier()
            finally:
                if dist_util.is_main():  # every process's samples, from the record's log
                    OutputRecord.read(args.output_dir, SAMPLE_WRITER).save()
        if dist_util.is_main():
            print(f"wrote {len(todo)} sample(s) of {args.seconds} s to {args.output_dir}, "
                  f"{args.num_samples - len(todo)} already there")
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
