"""`diffiner-refine` / scripts/run_refiner.py: refine a folder of SE outputs against the noisy
recordings they came from.

The command validates its flags, joins the process group under torchrun/mpiexec, makes the
processed folder with a preceding enhancer when asked (`--baseline`), builds a `Refiner`, and hands
the files to `diffiner.corpus`; then it records the settings (`config.yml`) and the outcome
(`summary.json`) beside the outputs.
"""

import argparse
import json
import os
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

import torch
import yaml

from .. import __version__, dist_util, spectrogram
from ..audio.enhancers import ENHANCERS, enhance_folder
from ..audio.folders import is_inside
from ..audio.io import MODEL_SAMPLE_RATE, write_text_atomic
from ..corpus import RunSummary, output_folder_name, plan_jobs, refine_files, shard_jobs
from ..flags import MODEL_GROUP, PRECISION_FLAGS, Flag, command_parser, precision_from_args, values_of
from ..pipeline import Refiner
from ..refiner import DEFAULT_ETAS
from ..script_util import model_and_diffusion_flags
from .common import report_folder, setup_logging

INPUT_FLAGS = (
    Flag("root_noisy", required=True, help="folder of noisy recordings (searched recursively)", metavar="DIR"),
    Flag("root_proc", help="folder of the SE model's outputs, same relative paths (with --baseline: where the "
                           "baseline writes them, default ./diffiner_<baseline>)", metavar="DIR"),
    Flag("model_path", required=True, help="checkpoint: a plain state dict (published or from train.py)",
         metavar="FILE"),
    Flag("output_dir", help="where to write; default <root-proc>/<method>_etaA=..._etaB=...", metavar="DIR"),
    Flag("baseline", choices=ENHANCERS,
         help="make the processed files with this SE baseline from the noisy ones, then refine them"),
)
METHOD_FLAGS = (
    Flag("simple_diffiner", False, "use Diffiner instead of Diffiner+"),
    Flag("etas", None, "eta_a eta_b [eta_c eta_d]; default 0.4 0.6 0.0 0.6 (Diffiner+) or 0.9 0.9 (Diffiner)",
         type=float, nargs="+", metavar="ETA"),
    Flag("clip_denoised", False, "clamp the predicted x0 to [-1, 1] at every step"),
    Flag("seed", 0, "seed; each file's noise depends only on it and the file's relative path"),
)
RUN_FLAGS = (
    Flag("max_dur", 10.0, "longer files are refined in overlapping segments of this many seconds"),
    Flag("segment_overlap", 1.0, "overlap between segments, seconds (cross-faded)"),
    Flag("batch_size", 8, "segments of equal width refined together"),
    Flag("max_batch_frames", "auto", "instead of --batch-size: a budget of spectrogram frames per batch (short "
         "files run in large batches, long ones in small), or 'auto': sized from free GPU memory on CUDA, "
         "--batch-size on the CPU", metavar="N|auto"),
    Flag("device", None, "torch device, e.g. cuda:1 (default: cuda if available, else cpu)", metavar="DEVICE"),
    Flag("no_gpu", False, "run on the CPU (same as --device cpu)"),
    *PRECISION_FLAGS,
    Flag("compile", False, "torch.compile the network (widths bucketed to 128 frames)"),
    Flag("cuda_graphs", False, "capture each step's network call as a CUDA graph (torch.compile mode "
                               "reduce-overhead)"),
    Flag("keep_sample_rate", False, "write outputs at the processed file's sample rate instead of 16 kHz"),
    Flag("overwrite", False, "refine files whose output already exists"),
    Flag("loaders", 2, "threads reading and preparing upcoming files"),
    Flag("dist_timeout", 7200.0, "seconds a rank waits for the others at the end of a torchrun/mpiexec run"),
    Flag("no_progress", False, "no progress bar"),
)
MODEL_FLAGS = model_and_diffusion_flags(timestep_respacing="ddim200")


def build_parser() -> argparse.ArgumentParser:
    return command_parser("Refine the output of a speech-enhancement model with Diffiner / Diffiner+.", {
        "inputs and outputs": INPUT_FLAGS, "method": METHOD_FLAGS, "how to run": RUN_FLAGS, MODEL_GROUP: MODEL_FLAGS})


def parse_etas(method: str, values: Optional[Sequence[float]]) -> Dict[str, Optional[float]]:
    """{eta name: value} of the etas given on the command line, in the method's order."""
    names = list(DEFAULT_ETAS[method])
    values = list(values or [])
    if len(values) > len(names):
        raise ValueError(f"{method} takes at most {len(names)} etas ({' '.join(names)}), got {len(values)}")
    return dict(zip(names, values))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse and check the flags; usage errors exit with status 2. Adds `method`, `etas_given`
    and `precision`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.method = "diffiner" if args.simple_diffiner else "diffiner+"
    args.precision = precision_from_args(args, parser)
    if args.max_batch_frames not in (None, "auto") and not args.max_batch_frames.isdigit():
        parser.error(f"--max-batch-frames takes a number of frames or 'auto', got {args.max_batch_frames!r}")
    try:
        args.etas_given = parse_etas(args.method, args.etas)
    except ValueError as exc:
        parser.error(str(exc))
    if not os.path.isdir(args.root_noisy):
        parser.error(f"{args.root_noisy}: not a folder")
    if args.root_proc is None and args.baseline is None:
        parser.error("give --root-proc (the SE outputs) or --baseline to make them")
    if args.root_proc is not None and args.baseline is None and not os.path.isdir(args.root_proc):
        parser.error(f"{args.root_proc}: not a folder")
    if not os.path.isfile(args.model_path):
        parser.error(f"{args.model_path}: no such checkpoint file")
    return args


def resolve_device(args: argparse.Namespace) -> str:
    if args.no_gpu:
        return "cpu"
    if args.device:
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_refiner(args: argparse.Namespace, device: str) -> Tuple[Refiner, Dict]:
    """The refiner the flags describe, and the model settings to record in config.yml."""
    model_settings = values_of(args, MODEL_FLAGS)
    refiner = Refiner.from_checkpoint(
        args.model_path, device=device, timestep_respacing=model_settings["timestep_respacing"],
        model_settings={k: v for k, v in model_settings.items() if k != "timestep_respacing"},
        method=args.method, clip_denoised=args.clip_denoised, max_dur=args.max_dur,
        segment_overlap=args.segment_overlap, batch_size=args.batch_size,
        max_batch_frames=None if args.max_batch_frames in (None, "auto") else int(args.max_batch_frames),
        precision=args.precision, channels_last=args.channels_last, compile=args.compile,
        cuda_graphs=args.cuda_graphs, **args.etas_given,
    )
    return refiner, model_settings


def write_config(path: str, args: argparse.Namespace, refiner: Refiner, model_settings: Dict, device: str,
                 processes: int) -> None:
    """config.yml: every setting that shaped the files beside it."""
    config = {
        "diffiner_version": __version__,
        "torch_version": str(torch.__version__),
        "model_path": os.path.abspath(args.model_path),
        "model": model_settings,
        "data": {"root_noisy": os.path.abspath(args.root_noisy), "root_proc": os.path.abspath(args.root_proc),
                 "output_dir": os.path.abspath(os.path.dirname(path))},
        "stft": {"sample_rate": MODEL_SAMPLE_RATE, "n_fft": spectrogram.N_FFT, "win_length": spectrogram.WIN_LENGTH,
                 "hop_length": spectrogram.HOP_LENGTH, "window": "hann (periodic)", "center": True,
                 "pad_mode": "reflect", "dc_bin": "dropped"},
        "refiner": {"method": refiner.method, **refiner.etas, "timestep_respacing": model_settings["timestep_respacing"],
                    "clip_denoised": args.clip_denoised, "max_dur": args.max_dur,
                    "segment_overlap": args.segment_overlap, "batch_size": args.batch_size,
                    "baseline": args.baseline},
        "seed": args.seed,
        "device": device,
        "processes": processes,
        "dtype": refiner.precision,
        "acceleration": {"channels_last": args.channels_last, "compile": args.compile,
                         "cuda_graphs": args.cuda_graphs, "max_batch_frames": refiner.max_batch_frames,
                         "width_bucket": refiner.width_bucket},
        "output_sample_rate": "input" if args.keep_sample_rate else MODEL_SAMPLE_RATE,
    }
    write_text_atomic(path, yaml.safe_dump(config, sort_keys=False))


def make_processed(args: argparse.Namespace, rank: int) -> None:
    """With --baseline: write the enhancer's outputs to --root-proc (process 0; the others wait)."""
    args.root_proc = args.root_proc or f"diffiner_{args.baseline}"
    if rank == 0:
        made = enhance_folder(args.baseline, args.root_noisy, args.root_proc, overwrite=args.overwrite)
        report_folder(made, f"baseline {args.baseline} in {args.root_proc}")
    dist_util.barrier()


def report(summary: RunSummary, output_dir: str, world_size: int) -> None:
    """Print the closing lines and write summary.json beside the outputs."""
    for rel, reason in sorted(summary.failed.items()):
        print(f"FAILED {rel}: {reason}", file=sys.stderr)
    print(f"refined {len(summary.refined)} file(s), skipped {len(summary.skipped)}, failed {len(summary.failed)}; "
          f"{summary.audio_seconds:.1f} s of audio in {summary.wall_seconds:.1f} s (RTF {summary.rtf:.3f})")
    record = {"refined": len(summary.refined), "skipped": len(summary.skipped), "failed": summary.failed,
              "audio_seconds": summary.audio_seconds, "wall_seconds": summary.wall_seconds,
              "real_time_factor": summary.rtf, "processes": world_size}
    write_text_atomic(os.path.join(output_dir, "summary.json"), json.dumps(record, indent=2) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging()
    device = resolve_device(args)
    rank, world_size = 0, 1
    if dist_util.launched_by_torchrun() or dist_util.launched_by_mpi():
        info = dist_util.setup_dist(device=torch.device(device).type, timeout_s=args.dist_timeout)
        device, rank, world_size = str(info.device), info.rank, info.world_size
    if args.baseline is not None:
        make_processed(args, rank)
    try:
        refiner, model_settings = build_refiner(args, device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output_dir = args.output_dir or os.path.join(args.root_proc, output_folder_name(args.method, refiner.etas))
    if is_inside(args.root_noisy, output_dir) or is_inside(args.root_proc, output_dir):
        print(f"error: --output-dir {output_dir} contains an input folder; choose another", file=sys.stderr)
        return 2

    summary = RunSummary()
    start = time.time()
    try:
        jobs = plan_jobs(args.root_noisy, args.root_proc, output_dir, refiner, args.overwrite, summary)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        write_config(os.path.join(output_dir, "config.yml"), args, refiner, model_settings, device, world_size)
        print(f"{len(jobs)} file(s) to refine, {len(summary.skipped)} already done, "
              f"{len(summary.failed)} unreadable; output: {output_dir}")
    jobs = shard_jobs(jobs, rank, world_size)
    if args.max_batch_frames == "auto" and jobs:
        refiner.auto_max_batch_frames(max(job.width for job in jobs))
    try:
        refine_files(refiner, jobs, summary, seed=args.seed, keep_sample_rate=args.keep_sample_rate,
                     progress=not args.no_progress and rank == 0, loaders=args.loaders)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(summary.refined)} file(s) written; rerun to finish the rest", file=sys.stderr)
        return 130
    if world_size > 1:
        print(f"rank {rank}: refined {len(summary.refined)} file(s), {summary.audio_seconds:.1f} s of audio")
    total = RunSummary.merge(dist_util.all_gather_objects(summary), time.time() - start)
    if rank == 0:
        report(total, output_dir, world_size)
    dist_util.cleanup()
    return 1 if total.failed else 0


if __name__ == "__main__":
    sys.exit(main())
