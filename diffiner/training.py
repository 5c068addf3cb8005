"""Training a Diffiner prior: from the training settings to a running `TrainLoop`.

The application layer of `diffiner-train` (as `pipeline` and `corpus` are of refining): it
decides the log folder and the checkpoint to resume from (the same on every rank), resolves the
model and diffusion settings (a resumed run's are those its log folder carries), builds the
model, the loop and this rank's data stream, and records the settings beside the checkpoints.
The command only parses flags and reports. `settings` is the parsed flags' namespace (or any
object with the same attributes).

Runs as one process, or as one rank of several under torchrun or mpiexec (see docs/training.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Tuple

from . import dist_util
from .audio.io import AudioError, write_text_atomic
from .checkpoints import (PUBLISHED, ModelSettings, model_filename, newest_complete_step, resolve_model_settings,
                          saved_steps, write_model_config)
from .errors import usage_errors
from .flags import setting, settings_of, values_of
from .schedule_sampler import SAMPLER_NAMES, create_named_schedule_sampler
from .script_util import carried_setting_flags, create_model_and_diffusion, model_and_diffusion_defaults
from .seeding import seed_globals
from .spectrogram import FrontEnd
from .speech_datasets import build_index, load_data
from .train_util import TrainLoop, parse_ema_rates

logger = logging.getLogger(__name__)

TRAIN_WRITER = "diffiner-train"  # the holder named in the log folder's lock
# --resume_checkpoint auto: the newest complete set of the log folder, or a fresh start.
RESUME_AUTO = "auto"
@dataclass(frozen=True)
class TrainingSettings:
    """The training settings: the original's, then this project's additions (grad_clip on).
    Their one declaration: diffiner-train's flags and args.json derive from it."""

    root: str = setting(None, "folder of clean speech (.wav/.flac, searched recursively)", required=True,
                        metavar="DIR")
    log_dir: str = setting("", "where checkpoints and logs go (empty: $OPENAI_LOGDIR, else the folder of "
                               "--resume_checkpoint, else ./exp_logs_diffiner_train_<timestamp>)", metavar="DIR")
    schedule_sampler: str = setting("uniform", "timestep sampler", choices=SAMPLER_NAMES)
    lr: float = setting(1e-4, "AdamW learning rate")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    lr_anneal_steps: int = setting(0, "if > 0, the learning rate falls linearly to 0 at this step, where "
                                      "training stops")
    batch_size: int = setting(1, "examples per process and step; the global batch is batch_size x number of "
                                 "processes")
    microbatch: int = setting(-1, "examples per forward/backward pass, gradients accumulated (-1: the whole "
                                  "batch)")
    ema_rate: str = setting("0.9999", "EMA rate(s) of the weights, comma-separated, e.g. 0.999,0.9999")
    log_interval: int = setting(10, "write metrics every this many steps")
    save_interval: int = setting(10000, "write checkpoints every this many steps (and always at the end)")
    resume_checkpoint: str = setting("", "resume from a modelNNNNNN.pt (its ema_*_NNNNNN.pt and optNNNNNN.pt are "
                                         "found beside it), from the newest complete checkpoint set of a folder, "
                                         "or 'auto': from the newest complete set of the log folder if it has "
                                         "one, else start afresh", metavar="FILE|DIR|auto")
    allow_fresh_optimizer: bool = setting(False, "resume even when the checkpoint's optimizer state or an EMA file "
                                                 "is missing, starting them afresh (the run then differs from an "
                                                 "uninterrupted one)")
    seq_dur: float = setting(4.2, "length of the training excerpts in seconds; shorter files are skipped")
    fp16_scale_growth: float = setting(1e-3, "with --precision fp16: log2 loss-scale increase after each good "
                                             "step")
    grad_clip: float = setting(0.0, "clip the global gradient norm to this value (0: off)")
    max_steps: int = setting(0, "stop when this many steps are done, resumed ones included (0: no limit)")
    keep_last: int = setting(0, "after each save, keep only the newest N complete checkpoint sets (never the "
                                "one a resume needs); 0: keep all")
    num_workers: int = setting(2, "data-loading worker processes per training process")
    seed: int = setting(0, "seed of the model initialisation and of the example stream (>= 0)")

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError("--batch_size must be at least 1")
        if self.seed < 0:
            raise ValueError("--seed must be >= 0")
        if self.log_interval < 1 or self.save_interval < 1:
            raise ValueError("--log_interval and --save_interval must be at least 1")
        if self.keep_last < 0:
            raise ValueError("--keep_last must be >= 0 (0 keeps every checkpoint set)")
        parse_ema_rates(self.ema_rate)


# The model and diffusion settings as flags with no default: absent means "the run's carried
# setting when resuming, else the published value".
MODEL_FLAGS = carried_setting_flags()


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


def resolve_training_settings(args: argparse.Namespace, resume: str) -> ModelSettings:
    """The model and diffusion settings of the run: a resumed run's are those its log folder
    carries (model_config.yml), and a flag may not contradict any of them, since each one shapes
    the network or the process being trained; a fresh run's are the flags, else the published
    defaults."""
    given = values_of(args, MODEL_FLAGS)
    if resume:
        return resolve_model_settings(resume, given, refuse=tuple(model_and_diffusion_defaults()))
    given = {k: v for k, v in given.items() if v is not None}
    return ModelSettings(dict(model_and_diffusion_defaults(), **given), PUBLISHED, {})


def write_settings(log_dir: str, args: argparse.Namespace, world_size: int) -> None:
    """args.json (every setting) and model_config.yml (what inference needs to rebuild the model)."""
    settings = dict(dataclasses.asdict(settings_of(TrainingSettings, args)), precision=args.precision,
                    channels_last=args.channels_last, **args.model_settings.values, log_dir=log_dir,
                    world_size=world_size, global_batch_size=args.batch_size * world_size)
    write_text_atomic(os.path.join(log_dir, "args.json"), json.dumps(settings, indent=2) + "\n")
    write_model_config(log_dir, args.model_settings.values)


def prepare(args: argparse.Namespace, held: contextlib.ExitStack) -> Tuple[TrainLoop, Iterator]:
    """Set up a training job from parsed arguments: (the loop, ready to run; this rank's batches).

    Checks everything that was asked first and writes nothing before: the data folder is
    indexed first, so a wrong --root fails at once; then the log folder is locked for the run
    (into `held`: a second trainer into it is refused, naming the first), and the settings
    files are written only once the checkpoint to resume from has been loaded, so that a refused
    resume leaves the run's settings as they were. Raises FileNotFoundError, AudioError,
    FolderError or ValueError naming the problem.
    """
    info = dist_util.setup_dist()
    if info.rank != 0:
        logging.getLogger("diffiner").setLevel(logging.WARNING)
    # Indexed with the front-end of the flags (a resumed run's carried one may differ: then the
    # index is made again below, for the excerpt lengths at its rate).
    given_front_end = FrontEnd.from_settings(dict(model_and_diffusion_defaults(),
                                                  **{k: v for k, v in values_of(args, MODEL_FLAGS).items()
                                                     if v is not None}))
    files = build_index(args.root, args.seq_dur, given_front_end)
    log_dir = resolve_log_dir(args)
    held.enter_context(dist_util.job_output_lock(log_dir, TRAIN_WRITER))
    resume = resolve_resume(args, log_dir)
    args.model_settings = resolve_training_settings(args, resume)
    settings = args.model_settings.values
    front_end = FrontEnd.from_settings(settings)
    if front_end != given_front_end:
        files = build_index(args.root, args.seq_dur, front_end)
    logger.info("%d process(es), global batch %d, logging to %s",
                info.world_size, args.batch_size * info.world_size, log_dir)

    # The same initial weights on every rank (sync_params makes sure); then per-rank global
    # generators, which only dropout uses.
    seed_globals(args.seed)
    model, diffusion = create_model_and_diffusion(**settings)
    if settings["image_size"] % model.downsample_factor:
        raise ValueError(f"image_size {settings['image_size']} must be a multiple of {model.downsample_factor} "
                         f"for {len(model.channel_mult)} resolution levels")
    seed_globals(args.seed + info.rank)

    loop = TrainLoop(
        model=model, diffusion=diffusion, batch_size=args.batch_size, microbatch=args.microbatch, lr=args.lr,
        ema_rate=args.ema_rate, log_interval=args.log_interval, save_interval=args.save_interval,
        resume_checkpoint=resume, allow_fresh_optimizer=args.allow_fresh_optimizer, precision=args.precision,
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion),
        weight_decay=args.weight_decay, lr_anneal_steps=args.lr_anneal_steps, grad_clip=args.grad_clip,
        max_steps=args.max_steps, seed=args.seed, log_dir=log_dir, channels_last=args.channels_last,
        keep_last=args.keep_last, progress=not (getattr(args, "no_progress", False) or getattr(args, "quiet", False)),
        metric_tables=not getattr(args, "quiet", False),
    )
    if info.rank == 0:
        write_settings(log_dir, args, info.world_size)
    data = load_data(
        files, batch_size=args.batch_size, image_size=settings["image_size"], seq_dur=args.seq_dur, seed=args.seed,
        start_position=loop.data_position, rank=info.rank, world_size=info.world_size,
        num_workers=args.num_workers, pin_memory=info.device.type == "cuda", front_end=front_end,
    )
    return loop, data


def train(args: argparse.Namespace) -> TrainLoop:
    """Prepare and run a training job (`prepare`, then `TrainLoop.run_loop`); returns the
    finished loop.

    Raises UsageError for a problem with what was asked (before anything is written) or for a
    training file found unreadable mid-run (after saving the steps done), and
    TrainingInterrupted on SIGINT/SIGTERM/SIGHUP (after saving the steps done).
    """
    with contextlib.ExitStack() as held:
        with usage_errors(FileNotFoundError, AudioError, ValueError):
            loop, data = prepare(args, held)
        try:
            with usage_errors(AudioError):  # an unreadable training file is bad input too
                loop.run_loop(data)
        finally:
            loop.metrics.close()
    return loop
