"""`diffiner-train` / scripts/train.py: train a Diffiner prior on clean speech.

Runs as one process, or as several under `torchrun` or `mpiexec` (see docs/training.md).
`--batch_size` is per process: the global batch is batch_size × number of processes.

Exit status: 0 when training reached its stop step; 2 for a problem with what was asked (a flag,
the data folder, a checkpoint that cannot be resumed from) or a training file that cannot be
read mid-run (after saving the steps done); 130 / 129 / 143 when stopped by SIGINT (Ctrl-C) /
SIGHUP / SIGTERM, after saving the steps done; 1 when training diverged (non-finite losses for
10 consecutive steps, after saving the last good state) or failed otherwise.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Optional, Sequence

from .. import dist_util
from ..acceleration import execution_flags
from ..flags import NO_PROGRESS_FLAG, QUIET_FLAG, command_parser, flags_of, precision_from_args, settings_of
from ..train_util import TrainingInterrupted, resume_hint
from ..errors import EXIT_OK
from ..training import MODEL_FLAGS, TrainingSettings, train
from .common import run_command, setup_logging

def create_argparser() -> argparse.ArgumentParser:
    return command_parser("Train a Diffiner diffusion model on clean speech.", {
        "training": flags_of(TrainingSettings), "precision": execution_flags("channels_last"),
        "display": (NO_PROGRESS_FLAG.with_help("no progress bar (the metric tables still print every --log_interval "
                                               "steps)"),
                    QUIET_FLAG.with_help("warnings and errors only: no progress bar, no metric tables, no "
                                         "informational lines (progress.csv, progress.jsonl and TensorBoard are "
                                         "still written)")),
        "model and diffusion (default: when resuming, the run's model_config.yml; else the published model)":
            MODEL_FLAGS}, prog="diffiner-train")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = create_argparser()
    args = parser.parse_args(argv)
    args.precision = precision_from_args(args, parser, default="fp32")
    if args.precision == "auto":
        parser.error("training takes an explicit --precision (fp32, bf16 or fp16), not auto")
    args.channels_last = bool(args.channels_last)  # training runs in the default layout unless told
    try:
        settings_of(TrainingSettings, args)  # checks the values
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
    setup_logging(args.debug, args.quiet)
    return run_command(lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
