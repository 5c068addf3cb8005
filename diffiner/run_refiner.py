"""Refining folders of recordings: the engine behind `scripts/run_refiner.py` / `diffiner-refine`.

Noisy and processed files are paired by relative path. Files are sorted by the width their
spectrogram is padded to, so that only equal widths share a batch, and each finished file is
written at once (atomically), so an interrupted run loses nothing already written and a rerun
picks up where it stopped.
"""

import argparse
import itertools
import json
import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from . import __version__, dist_util
from .audio import MODEL_SAMPLE_RATE, AudioError, audio_info, fit_length, load_audio, resample, save_audio, write_text_atomic
from .files import is_inside, pair_files
from .pipeline import Prepared, Refiner
from .refiner import DEFAULT_ETAS
from .script_util import add_dict_to_argparser, flag_spellings, model_and_diffusion_defaults
from . import spectrogram

logger = logging.getLogger(__name__)

LENGTH_TOLERANCE_S = 0.1  # noisy/processed length difference accepted (and fixed) silently


def output_folder_name(method: str, etas: Dict[str, float]) -> str:
    """`diffiner+_etaA=0.4_etaB=0.6_etaC=0.0_etaD=0.6`, as the original named its outputs."""
    parts = [f"eta{name[-1].upper()}={etas[name]}" for name in ("eta_a", "eta_b", "eta_c", "eta_d") if name in etas]
    return "_".join([method] + parts)


@dataclass
class FileJob:
    """One pair of recordings on its way through the refiner."""

    rel: str
    noisy_path: str
    processed_path: str
    output_path: str
    width: int = 0  # padded spectrogram width of its segments
    seconds: float = 0.0
    prepared: Optional[Prepared] = None
    waves: Dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class RunSummary:
    refined: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def rtf(self) -> float:
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else float("nan")


def plan_jobs(root_noisy: str, root_proc: str, output_dir: str, refiner: Refiner, overwrite: bool,
              summary: RunSummary) -> List[FileJob]:
    """Pair the files, drop those already refined, and sort the rest by padded width."""
    rels, _ = pair_files({"noisy": root_noisy, "processed": root_proc}, exclude=[output_dir])
    jobs = []
    for rel in rels:
        job = FileJob(rel, os.path.join(root_noisy, rel), os.path.join(root_proc, rel), os.path.join(output_dir, rel))
        if os.path.exists(job.output_path) and not overwrite:
            summary.skipped.append(rel)
            continue
        try:
            samples, rate, _ = audio_info(job.processed_path)
            audio_info(job.noisy_path)
        except AudioError as exc:
            summary.failed[rel] = str(exc)
            continue
        job.seconds = samples / rate
        job.width = refiner.padded_width(int(round(samples * MODEL_SAMPLE_RATE / rate)))
        jobs.append(job)
    jobs.sort(key=lambda j: (j.width, j.rel))
    return jobs


def shard_jobs(jobs: Sequence[FileJob], rank: int, world_size: int) -> List[FileJob]:
    """This rank's share of the jobs, balanced by audio duration rather than file count.

    Longest first, each job goes to the rank with the least audio so far (ties: lowest rank);
    every rank computes the same assignment from the same sorted list, with no communication.
    """
    if world_size == 1:
        return list(jobs)
    load = [0.0] * world_size
    mine = []
    for job in sorted(jobs, key=lambda j: (-j.seconds, j.rel)):
        target = min(range(world_size), key=lambda r: (load[r], r))
        load[target] += job.seconds
        if target == rank:
            mine.append(job)
    return sorted(mine, key=lambda j: (j.width, j.rel))


def load_pair(job: FileJob):
    """Read a pair and bring the noisy side to the processed side's rate and length.

    Returns (noisy, processed, sample_rate). Raises AudioError naming the files on mismatch.
    """
    noisy, noisy_rate = load_audio(job.noisy_path)
    processed, rate = load_audio(job.processed_path)
    if noisy_rate != rate:
        noisy = resample(noisy, noisy_rate, rate)
    diff = abs(noisy.shape[-1] - processed.shape[-1]) / rate
    if diff > LENGTH_TOLERANCE_S:
        raise AudioError(
            f"{job.noisy_path} and {job.processed_path}: lengths differ by {diff:.3f} s "
            f"(more than {LENGTH_TOLERANCE_S} s); are they the same utterance?"
        )
    return fit_length(noisy, processed.shape[-1]), processed, rate


def prefetched(pool: ThreadPoolExecutor, items: Sequence, fn, lookahead: int) -> Iterator[Tuple]:
    """Yield (item, future of fn(item)) in order, keeping `lookahead` calls running ahead."""
    items = iter(items)
    queue = deque((item, pool.submit(fn, item)) for item in itertools.islice(items, lookahead))
    while queue:
        item, future = queue.popleft()
        for nxt in itertools.islice(items, 1):
            queue.append((nxt, pool.submit(fn, nxt)))
        yield item, future


def refine_jobs(refiner: Refiner, jobs: Sequence[FileJob], summary: RunSummary, *, seed: int,
                keep_sample_rate: bool, progress: bool = True, loaders: int = 2) -> None:
    """Refine the jobs in width order, batching segments of equal width across files.

    Reading and preparing upcoming files (`loaders` threads) and writing finished ones (one
    thread) overlap the network's work.
    """
    pending: List[Tuple[FileJob, int]] = []  # segments waiting for a batch
    writes = []
    bar = tqdm(total=len(jobs), desc="refining", unit="file", disable=not progress)

    def prepare(job: FileJob) -> Prepared:
        noisy, processed, rate = load_pair(job)
        return refiner.prepare(noisy, processed, rate, seed=seed, key=job.rel)

    def finish(job: FileJob, prepared: Prepared, waves: List[torch.Tensor]) -> None:
        rate = prepared.sample_rate if keep_sample_rate else MODEL_SAMPLE_RATE
        audio = refiner.assemble(prepared, waves, rate)
        if not np.all(np.isfinite(audio)):
            summary.failed[job.rel] = f"{job.processed_path}: the refined audio is not finite"
        else:
            save_audio(job.output_path, audio, rate)
            summary.refined.append(job.rel)
            summary.audio_seconds += job.seconds
        bar.update(1)

    def run_batch(write_pool: ThreadPoolExecutor) -> None:
        count = refiner.batch_size_for(pending[0][0].width)
        batch, pending[:] = pending[:count], pending[count:]
        waves = refiner.refine_batch([job.prepared.segments[i] for job, i in batch])
        for (job, i), wave in zip(batch, waves):
            job.waves[i] = wave
            if len(job.waves) == len(job.prepared.segments):
                ordered = [job.waves[k] for k in range(len(job.waves))]
                writes.append(write_pool.submit(finish, job, job.prepared, ordered))
                job.prepared, job.waves = None, {}

    try:
        with ThreadPoolExecutor(loaders) as load_pool, ThreadPoolExecutor(1) as write_pool:
            for job, future in prefetched(load_pool, jobs, prepare, lookahead=2 * loaders):
                try:
                    job.prepared = future.result()
                except (AudioError, ValueError) as exc:
                    summary.failed[job.rel] = str(exc)
                    bar.update(1)
                    continue
                if pending and pending[0][0].width != job.width:
                    while pending:
                        run_batch(write_pool)
                pending.extend((job, i) for i in range(len(job.prepared.segments)))
                while pending and len(pending) >= refiner.batch_size_for(job.width):
                    run_batch(write_pool)
            while pending:
                run_batch(write_pool)
            for write in writes:
                write.result()  # a failed write (disk full, permissions) stops the run loudly
    finally:
        bar.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Refine the output of a speech-enhancement model with Diffiner / Diffiner+.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument

    def both(name, **kwargs):
        dest = name.replace("-", "_")
        add(*flag_spellings(dest), dest=dest, **kwargs)

    both("root-noisy", required=True, help="folder of noisy recordings (searched recursively)")
    both("root-proc", default=None, help="folder of the SE model's outputs, same relative paths "
         "(with --baseline: where the baseline writes them, default ./diffiner_<baseline>)")
    both("model-path", required=True, help="checkpoint: a plain state dict (published or from train.py)")
    both("output-dir", default=None, help="where to write; default <root-proc>/<method>_etaA=..._etaB=...")
    both("simple-diffiner", action="store_true", help="use Diffiner instead of Diffiner+")
    add("--etas", type=float, nargs="+", default=None, metavar="ETA",
        help="eta_a eta_b [eta_c eta_d]; default 0.4 0.6 0.0 0.6 (Diffiner+) or 0.9 0.9 (Diffiner)")
    both("max-dur", type=float, default=10.0, help="longer files are refined in overlapping segments of this many seconds")
    both("segment-overlap", type=float, default=1.0, help="overlap between segments, seconds (cross-faded)")
    both("batch-size", type=int, default=8, help="segments of equal width refined together")
    both("max-batch-frames", default="auto",
         help="instead of --batch-size: a budget of spectrogram frames per batch (short files run in large "
              "batches, long ones in small), or 'auto': sized from free GPU memory on CUDA, "
              "--batch-size on the CPU")
    add("--baseline", default=None, choices=["noisereduce"],
        help="make the processed files with this SE baseline from the noisy ones, then refine them")
    both("clip-denoised", action="store_true", help="clamp the predicted x0 to [-1, 1] at every step")
    both("seed", type=int, default=0, help="seed; each file's noise depends only on it and the file's relative path")
    both("device", default=None, help="torch device (default: cuda if available, else cpu)")
    both("no-gpu", action="store_true", help="run on the CPU (same as --device cpu)")
    both("use-fp16", action="store_true", help="run the network under float16 autocast")
    add("--bf16", action="store_true", help="run the network under bfloat16 autocast")
    both("keep-sample-rate", action="store_true", help="write outputs at the processed file's sample rate instead of 16 kHz")
    add("--overwrite", action="store_true", help="refine files whose output already exists")
    both("no-progress", action="store_true", help="no progress bar")
    both("channels-last", action="store_true", help="run the network in channels-last memory format")
    add("--compile", action="store_true", help="torch.compile the network (widths bucketed to 128 frames)")
    both("cuda-graphs", action="store_true",
         help="capture each step's network call as a CUDA graph (torch.compile mode reduce-overhead)")
    add("--loaders", type=int, default=2, help="threads reading and preparing upcoming files")
    both("dist-timeout", type=float, default=7200.0,
         help="seconds a rank waits for the others at the end of a torchrun/mpiexec run")
    model_defaults = refiner_model_defaults()
    group = parser.add_argument_group("model and diffusion settings (must match the checkpoint)")
    add_dict_to_argparser(group, model_defaults)
    group.add_argument("--noise-scheduler", "--noise_scheduler", dest="noise_schedule",
                       help="alias of --noise_schedule, as spelled by the original script")
    return parser


def refiner_model_defaults() -> Dict:
    """Model/diffusion settings the refiner exposes: all but use_fp16 (see --use-fp16), ddim200."""
    defaults = model_and_diffusion_defaults()
    del defaults["use_fp16"]
    defaults["timestep_respacing"] = "ddim200"
    return defaults


def parse_etas(method: str, values: Optional[Sequence[float]]) -> Dict[str, Optional[float]]:
    names = list(DEFAULT_ETAS[method])
    values = list(values or [])
    if len(values) > len(names):
        raise ValueError(f"{method} takes at most {len(names)} etas ({' '.join(names)}), got {len(values)}")
    return dict(zip(names, values))


def resolve_device(args) -> str:
    if args.no_gpu:
        return "cpu"
    if args.device:
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def write_config(path: str, args, refiner: Refiner, model_settings: Dict, device: str, processes: int) -> None:
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
                    "clip_denoised": refiner.clip_denoised, "max_dur": args.max_dur,
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


def build_refiner(args, method: str, etas: Dict, device) -> Tuple[Refiner, Dict]:
    """The refiner the flags describe, and the model settings to record in config.yml."""
    model_settings = {k: getattr(args, k) for k in refiner_model_defaults()}
    respacing = model_settings.pop("timestep_respacing")
    refiner = Refiner.from_checkpoint(
        args.model_path, device=device, timestep_respacing=respacing, model_settings=model_settings,
        method=method, clip_denoised=args.clip_denoised, max_dur=args.max_dur,
        segment_overlap=args.segment_overlap, batch_size=args.batch_size,
        max_batch_frames=None if args.max_batch_frames in (None, "auto") else int(args.max_batch_frames),
        precision="fp16" if args.use_fp16 else "bf16" if args.bf16 else "fp32",
        channels_last=args.channels_last, compile=args.compile, cuda_graphs=args.cuda_graphs, **etas,
    )
    model_settings["timestep_respacing"] = respacing
    return refiner, model_settings


def merge_summaries(parts: Sequence[RunSummary], wall_seconds: float) -> RunSummary:
    merged = RunSummary(wall_seconds=wall_seconds)
    for part in parts:
        merged.refined += part.refined
        merged.skipped = part.skipped  # every rank saw the same finished files
        merged.failed.update(part.failed)
        merged.audio_seconds += part.audio_seconds
    return merged


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    method = "diffiner" if args.simple_diffiner else "diffiner+"
    if args.use_fp16 and args.bf16:
        parser.error("choose one of --use-fp16 and --bf16")
    if args.max_batch_frames not in (None, "auto") and not args.max_batch_frames.isdigit():
        parser.error(f"--max-batch-frames takes a number of frames or 'auto', got {args.max_batch_frames!r}")
    try:
        etas = parse_etas(method, args.etas)
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

    device = resolve_device(args)
    info = None
    if dist_util.launched_by_torchrun() or dist_util.launched_by_mpi():
        info = dist_util.setup_dist(device=torch.device(device).type, timeout_s=args.dist_timeout)
        device = str(info.device)
    rank, world_size = (info.rank, info.world_size) if info else (0, 1)
    if args.baseline is not None:
        args.root_proc = args.root_proc or f"diffiner_{args.baseline}"
        if rank == 0:
            from .baseline import baseline_folder

            made = baseline_folder(args.baseline, args.root_noisy, args.root_proc, overwrite=args.overwrite)
            made.report(f"baseline {args.baseline} in {args.root_proc}")
        dist_util.barrier()
    try:
        refiner, model_settings = build_refiner(args, method, etas, device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    output_dir = args.output_dir or os.path.join(args.root_proc, output_folder_name(method, refiner.etas))
    if is_inside(args.root_noisy, output_dir) or is_inside(args.root_proc, output_dir):
        parser.error(f"--output-dir {output_dir} contains an input folder; choose another")

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
        refine_jobs(refiner, jobs, summary, seed=args.seed, keep_sample_rate=args.keep_sample_rate,
                    progress=not args.no_progress and rank == 0, loaders=args.loaders)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(summary.refined)} file(s) written; rerun to finish the rest", file=sys.stderr)
        return 130
    if world_size > 1:
        print(f"rank {rank}: refined {len(summary.refined)} file(s), {summary.audio_seconds:.1f} s of audio")
    total = merge_summaries(dist_util.all_gather_objects(summary), time.time() - start)
    if rank == 0:
        report(total, output_dir, world_size)
    dist_util.cleanup()
    return 1 if total.failed else 0


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


if __name__ == "__main__":
    sys.exit(main())
