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
import json
import logging
import os
import signal
import sys
import time
from typing import Callable, Iterator, Optional, Sequence, Tuple

import yaml

from .. import dist_util
from ..audio.io import AudioError, write_text_atomic
from ..checkpoints import model_filename, newest_complete_step, saved_steps
from ..flags import PRECISION_FLAGS, Flag, command_parser, precision_from_args, values_of
from ..schedule_sampler import SAMPLER_NAMES, create_named_schedule_sampler
from ..script_util import MODEL_AND_DIFFUSION_FLAGS, create_model_and_diffusion
from ..seeding import seed_globals
from ..speech_datasets import build_index, load_data
from ..train_util import TrainingInterrupted, TrainLoop, parse_ema_rates, resume_hint
from .common import EXIT_OK, run_command, setup_logging, usage_errors

logger = logging.getLogger(__name__)

# Inference picks its own respacing (diffiner-refine's --timestep-respacing): not part of what
# describes the trained network.
NOT_MODEL_CONFIG = ("timestep_respacing",)

# --resume_checkpoint auto: the newest complete set of the log folder, or a fresh start.
RESUME_AUTO = "auto"

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
        "training": TRAINING_FLAGS, "precision": PRECISION_FLAGS,
        "model and diffusion (default: the published model)": MODEL_AND_DIFFUSION_FLAGS})


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = create_argparser()
    args = parser.parse_args(argv)
    precision_from_args(args, parser)
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


def decided_by_rank0(decide: Callable[[], str]) -> str:
    """Rank 0's result of `decide`, on every rank; rank 0's ValueError is raised on every rank.

    So that all ranks agree (on a timestamp, on the checkpoint to resume from), and all fail
    together rather than some waiting for the others forever.
    """
    result, error = "", ""
    if dist_util.is_main():
        try:
            result = decide()
        except ValueError as exc:
            error = str(exc)
    result, error = dist_util.all_gather_objects((result, error))[0]
    if error:
        raise ValueError(error)
    return result


def resolve_log_dir(args: argparse.Namespace) -> str:
    """--log_dir, else $OPENAI_LOGDIR, else the folder of --resume_checkpoint, else a new one."""
    def decide() -> str:
        log_dir = args.log_dir or os.environ.get("OPENAI_LOGDIR", "")
        resume = args.resume_checkpoint
        if not log_dir and resume == RESUME_AUTO:
            raise ValueError("--resume_checkpoint auto resumes from the log folder: give --log_dir")
        if not log_dir and resume:
            log_dir = resume if os.path.isdir(resume) else os.path.dirname(resume)
        if not log_dir:
            log_dir = f"exp_logs_diffiner_train_{time.strftime('%Y%m%d-%H%M%S')}"
        return os.path.abspath(log_dir)

    return decided_by_rank0(decide)


def resolve_resume(args: argparse.Namespace, log_dir: str) -> str:
    """The modelNNNNNN.pt to resume from ("" for a fresh start), from --resume_checkpoint.

    A folder gives its newest complete checkpoint set (with the EMA files of --ema_rate), `auto`
    the log folder's (or a fresh start when it has no checkpoint). A folder without a complete
    set is refused, unless --allow-fresh-optimizer, which takes the newest model file. A fresh
    start into a log folder that holds checkpoints is refused: it would replace that run's
    settings, progress rows and checkpoints.
    """
    def decide() -> str:
        resume = args.resume_checkpoint
        if not resume:
            earlier = saved_steps(log_dir)
            if earlier:
                raise ValueError(f"{log_dir} holds the checkpoints of an earlier run (newest "
                                 f"{model_filename(earlier[-1])}): continue it with --resume_checkpoint auto, "
                                 "or choose another --log_dir")
            return ""
        folder = log_dir if resume == RESUME_AUTO else resume
        if resume != RESUME_AUTO and not os.path.isdir(resume):
            return resume  # a file (or nothing)
        step = newest_complete_step(folder, parse_ema_rates(args.ema_rate))
        if step is not None:
            return os.path.join(folder, model_filename(step))
        steps = saved_steps(folder)
        if not steps and resume == RESUME_AUTO:
            logger.info("no checkpoint in %s: starting afresh", folder)
            return ""
        if not steps:
            raise ValueError(f"{folder}: no modelNNNNNN.pt checkpoint in this folder")
        if not args.allow_fresh_optimizer:
            raise ValueError(f"{folder}: no complete checkpoint set (no modelNNNNNN.pt has its optimizer and EMA "
                             f"files): give --allow-fresh-optimizer to resume from {model_filename(steps[-1])} "
                             f"with fresh optimizer/EMA states")
        return os.path.join(folder, model_filename(steps[-1]))

    return decided_by_rank0(decide)


def write_settings(log_dir: str, args: argparse.Namespace, world_size: int) -> None:
    """args.json (every setting) and model_config.yml (what inference needs to rebuild the model)."""
    settings = dict(vars(args), log_dir=log_dir, world_size=world_size,
                    global_batch_size=args.batch_size * world_size)
    write_text_atomic(os.path.join(log_dir, "args.json"), json.dumps(settings, indent=2) + "\n")
    model_config = {k: v for k, v in values_of(args, MODEL_AND_DIFFUSION_FLAGS).items() if k not in NOT_MODEL_CONFIG}
    write_text_atomic(os.path.join(log_dir, "model_config.yml"), yaml.safe_dump(model_config, sort_keys=False))


def prepare(args: argparse.Namespace) -> Tuple[TrainLoop, Iterator]:
    """Set up a training job from parsed arguments: (the loop, ready to run; this rank's batches).

    Checks everything that was asked first and writes nothing before: the data folder is
    indexed before the model is built, so a wrong --root fails at once, and the settings files
    are written only once the checkpoint to resume from has been loaded, so that a refused
    resume leaves the run's settings as they were. Raises FileNotFoundError, AudioError or
    ValueError naming the problem.
    """
    info = dist_util.setup_dist()
    if info.rank != 0:
        logging.getLogger("diffiner").setLevel(logging.WARNING)
    log_dir = resolve_log_dir(args)
    resume = resolve_resume(args, log_dir)
    files = build_index(args.root, args.seq_dur)
    logger.info("%d process(es), global batch %d, logging to %s",
                info.world_size, args.batch_size * info.world_size, log_dir)

    # The same initial weights on every rank (sync_params makes sure); then per-rank global
    # generators, which only dropout uses.
    seed_globals(args.seed)
    model, diffusion = create_model_and_diffusion(**values_of(args, MODEL_AND_DIFFUSION_FLAGS))
    if args.image_size % model.downsample_factor:
        raise ValueError(f"image_size {args.image_size} must be a multiple of {model.downsample_factor} "
                         f"for {len(model.channel_mult)} resolution levels")
    seed_globals(args.seed + info.rank)

    loop = TrainLoop(
        model=model, diffusion=diffusion, batch_size=args.batch_size, microbatch=args.microbatch, lr=args.lr,
        ema_rate=args.ema_rate, log_interval=args.log_interval, save_interval=args.save_interval,
        resume_checkpoint=resume, allow_fresh_optimizer=args.allow_fresh_optimizer, use_fp16=args.use_fp16,
        bf16=args.bf16, fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion),
        weight_decay=args.weight_decay, lr_anneal_steps=args.lr_anneal_steps, grad_clip=args.grad_clip,
        max_steps=args.max_steps, seed=args.seed, log_dir=log_dir, channels_last=args.channels_last,
    )
    if info.rank == 0:
        write_settings(log_dir, args, info.world_size)
    data = load_data(
        files, batch_size=args.batch_size, image_size=args.image_size, seq_dur=args.seq_dur, seed=args.seed,
        start_position=loop.data_position, rank=info.rank, world_size=info.world_size,
        num_workers=args.num_workers, pin_memory=info.device.type == "cuda",
    )
    return loop, data


def train(args: argparse.Namespace) -> TrainLoop:
    """Run a training job with parsed arguments; returns the finished loop.

    Raises what `prepare` and `TrainLoop.run_loop` raise (TrainingInterrupted on SIGINT/SIGTERM,
    AudioError for a training file that cannot be read, both after saving the steps done).
    """
    loop, data = prepare(args)
    try:
        loop.run_loop(data)
    finally:
        loop.metrics.close()
    return loop


def run(args: argparse.Namespace) -> int:
    """The command's body: train, and turn a bad request or a stop into its exit status."""
    try:
        with usage_errors(FileNotFoundError, AudioError, ValueError):
            loop, data = prepare(args)
        try:
            # A training file found unreadable mid-run is bad input too (the steps done are saved).
            with usage_errors(AudioError):
                loop.run_loop(data)
        except TrainingInterrupted as stop:
            if dist_util.is_main():
                print(f"\n{interruption_message(stop)}", file=sys.stderr)
            return 128 + stop.signum
        finally:
            loop.metrics.close()
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
