"""`diffiner-train` / scripts/train.py: train a Diffiner prior on clean speech.

Runs as one process, or as several under `torchrun` or `mpiexec` (see docs/training.md).
`--batch_size` is per process: the global batch is batch_size × number of processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

import yaml

from .. import dist_util
from ..audio.io import AudioError, write_text_atomic
from ..flags import PRECISION_FLAGS, Flag, command_parser, precision_from_args, values_of
from ..schedule_sampler import SAMPLER_NAMES, create_named_schedule_sampler
from ..script_util import MODEL_AND_DIFFUSION_FLAGS, create_model_and_diffusion
from ..seeding import seed_globals
from ..speech_datasets import build_index, load_data
from ..train_util import TrainLoop, parse_ema_rates
from .common import setup_logging

logger = logging.getLogger(__name__)

# Inference picks its own respacing (diffiner-refine's --timestep-respacing): not part of what
# describes the trained network.
NOT_MODEL_CONFIG = ("timestep_respacing",)

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
    Flag("resume_checkpoint", "", "a modelNNNNNN.pt to resume from; its ema_*_NNNNNN.pt and optNNNNNN.pt are "
                                  "found beside it", metavar="FILE"),
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


def resolve_log_dir(args: argparse.Namespace) -> str:
    """--log_dir, else $OPENAI_LOGDIR, else the resumed checkpoint's folder, else a new one.

    Rank 0 decides, so that all ranks agree even on the timestamp.
    """
    log_dir = args.log_dir or os.environ.get("OPENAI_LOGDIR", "")
    if not log_dir and args.resume_checkpoint:
        log_dir = os.path.dirname(os.path.abspath(args.resume_checkpoint))
    if not log_dir:
        log_dir = os.path.abspath(f"exp_logs_diffiner_train_{time.strftime('%Y%m%d-%H%M%S')}")
    return dist_util.all_gather_objects(log_dir)[0]


def write_settings(log_dir: str, args: argparse.Namespace, world_size: int) -> None:
    """args.json (every setting) and model_config.yml (what inference needs to rebuild the model)."""
    settings = dict(vars(args), log_dir=log_dir, world_size=world_size,
                    global_batch_size=args.batch_size * world_size)
    write_text_atomic(os.path.join(log_dir, "args.json"), json.dumps(settings, indent=2) + "\n")
    model_config = {k: v for k, v in values_of(args, MODEL_AND_DIFFUSION_FLAGS).items() if k not in NOT_MODEL_CONFIG}
    write_text_atomic(os.path.join(log_dir, "model_config.yml"), yaml.safe_dump(model_config, sort_keys=False))


def train(args: argparse.Namespace) -> TrainLoop:
    """Run a training job with parsed arguments; returns the finished loop.

    The data folder is indexed before the model is built, so a wrong --root fails at once.
    """
    info = dist_util.setup_dist()
    if info.rank != 0:
        logging.getLogger("diffiner").setLevel(logging.WARNING)
    log_dir = resolve_log_dir(args)
    files = build_index(args.root, args.seq_dur)
    if info.rank == 0:
        write_settings(log_dir, args, info.world_size)
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
        resume_checkpoint=args.resume_checkpoint, use_fp16=args.use_fp16, bf16=args.bf16,
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion),
        weight_decay=args.weight_decay, lr_anneal_steps=args.lr_anneal_steps, grad_clip=args.grad_clip,
        max_steps=args.max_steps, seed=args.seed, log_dir=log_dir, channels_last=args.channels_last,
    )
    data = load_data(
        files, batch_size=args.batch_size, image_size=args.image_size, seq_dur=args.seq_dur, seed=args.seed,
        start_position=loop.data_position, rank=info.rank, world_size=info.world_size,
        num_workers=args.num_workers, pin_memory=info.device.type == "cuda",
    )
    loop.run_loop(data)
    loop.metrics.close()
    return loop


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        train(args)
    except (FileNotFoundError, AudioError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: resume from the last modelNNNNNN.pt with --resume_checkpoint", file=sys.stderr)
        return 130
    finally:
        dist_util.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
