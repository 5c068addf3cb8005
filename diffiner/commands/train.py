"""`diffiner-train` / scripts/train.py: train a Diffiner prior on clean speech.

Runs as one process, or as several under `torchrun` or `mpiexec` (see docs/training.md).
`--batch_size` is per process: the global batch is batch_size × number of processes.

Exit status: 0 when training reached its stop step; 2 for a problem with what was asked (a flag,
the data folder, a checkpoint that cannot be resumed from) or a training file that cannot be
read mid-run (after saving the steps done); 130 / 143 when stopped by SIGINT (Ctrl-C) / SIGTERM,
after saving the steps done; 1 when training failed otherwise.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Optional, Sequence

from .. import dist_util
from ..acceleration import execution_flags
from ..flags import Flag, command_parser, precision_from_args
from ..schedule_sampler import SAMPLER_NAMES
from ..train_util import TrainingInterrupted, parse_ema_rates, resume_hint
from ..errors import EXIT_OK
from ..training import MODEL_FLAGS, train
from .common import run_command, setup_logging

# The original's training flags, plus this project's additions (grad_clip onwards).
TRAINING_FLAGS = (
    Flag("root", required=True, help="folder of clean speech (.wav/.flac, searched recursively)", metavar="DIR"),
    Flag("log_dir", "", "where checkpoints and logs go (empty: $OPENAI_LOGDIR, else the folder of "
                        "--resume_checkpoint, else ./exp_logs_diffiner_train_<timestamp>)", metavar="DIR"),
    Flag("schedule_sampler", "uniform", "timestep sampler", choices=SAMPLER_NAMES),
    Flag("lr", 1e-4, "AdamW learning rate"),
    Flag("weight_decay", 0.0, "AdamW weight decay"),
    Flag("lr_anneal_steps", 0, "if > 0, the learning rate falls linearly to 0 at this step, where training stops"),
    Flag("batch_size", 1, "examples per process and step; the global batch is batch_size x number of processes"),
    Flag("microbatch", -1, "examples per forward/backward pass, gradients accumulated (-1: the whole batch)"),
    Flag("ema_rate", "0.9999", "EMA rate(s) of the weights, comma-separated, e.g. 0.999,0.9999"),
    Flag("log_interval", 10, "write metrics every this many steps"),
    Flag("save_interval", 10000, "write checkpoints every this many steps (and always at the end)"),
    Flag("resume_checkpoint", "", "resume from a modelNNNNNN.pt (its ema_*_NNNNNN.pt and optNNNNNN.pt are found "
                                  "beside it), from the newest complete checkpoint set of a folder, or 'auto': "
                                  "from the newest complete set of the log folder if it has one, else start afresh",
         metavar="FILE|DIR|auto"),
    Flag("allow_fresh_optimizer", False, "resume even when the checkpoint's optimizer state or an EMA file is "
                                         "missing, starting them afresh (the run then differs from an "
                                         "uninterrupted one)"),
    Flag("seq_dur", 4.2, "length of the training excerpts in seconds; shorter files are skipped"),
    Flag("fp16_scale_growth", 1e-3, "with --use_fp16: log2 loss-scale increase after each good step"),
    Flag("grad_clip", 0.0, "clip the global gradient norm to this value (0: off)"),
    Flag("max_steps", 0, "stop when this many steps are done, resumed ones included (0: no limit)"),
    Flag("num_workers", 2, "data-loading worker processes per training process"),
    Flag("seed", 0, "seed of the model initialisation and of the example stream (>= 0)"),
)


def create_argparser() -> argparse.ArgumentParser:
    return command_parser("Train a Diffiner diffusion model on clean speech.", {
        "training": TRAINING_FLAGS, "precision": execution_flags("channels_last"),
        "model and diffusion (default: when resuming, the run's model_config.yml; else the published model)":
            MODEL_FLAGS})


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = create_argparser()
    args = parser.parse_args(argv)
    args.precision = precision_from_args(args, parser)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    if args.log_interval < 1 or args.save_interval < 1:
        parser.error("--log_interval and --save_interval must be at least 1")
    try:
        parse_ema_rates(args.ema_rate)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def run(args: argparse.Namespace) -> int:
    """The command's body: train, and turn a stop into its exit status."""
    try:
        train(args)
    except TrainingInterrupted as stop:
        if dist_util.is_main():
            print(f"\n{interruption_message(stop)}", file=sys.stderr)
        return 128 + stop.signum
    finally:
        dist_util.cleanup()
    return EXIT_OK


def interruption_message(stop: TrainingInterrupted) -> str:
    name = signal.Signals(stop.signum).name
    if stop.checkpoint is None:
        return f"interrupted by {name} before the first step: nothing to save"
    # The loop saves the step it stopped at (or had just saved it, or resumed from it).
    return (f"interrupted by {name} at step {stop.step}: saved as {stop.checkpoint} with its EMA and optimizer "
            f"files; {resume_hint(stop.checkpoint)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging(args.debug)
    return run_command(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
