"""`diffiner-refine` / scripts/run_refiner.py: refine a folder of SE outputs (or one file) against
the noisy recordings they came from.

The command checks its flags and folders before any work, joins the process group under
torchrun/mpiexec, builds a `Refiner`, makes the processed folder with a preceding enhancer when
asked (`--baseline`), and hands the files to `diffiner.corpus`; it records the settings
(`config.yml`) and the outcome (`summary.json`) beside the outputs.

`config.yml` always describes the files beside it: a run into a folder whose config.yml records
other settings (anything that changes the audio: model file, model, method, etas, seed,
respacing, precision, ...) is refused, unless --overwrite, which then redoes every file.
"""

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

from .. import __version__, dist_util
from ..audio.enhancers import ENHANCERS, check_available, enhance_folder
from ..audio.enhancers import WRITER as ENHANCE_WRITER
from ..audio.folders import REFINE_WRITER, RUN_RECORD, check_write_rules, read_run_record, scan_audio_files
from ..audio.records import OutputRecord, describe_differences, file_sha256, setting_differences
from ..audio.io import write_text_atomic
from ..corpus import RunSummary, plan_jobs, refine_files, shard_jobs
from ..flags import (CONSOLE_FLAGS, DEVICE_FLAG, MODEL_GROUP, OVERWRITE_FLAG, Flag, command_parser, flags_of,
                     precision_from_args, values_of)
from ..methods import DEFAULT_METHOD, get_method, method_names, resolve_etas
from ..acceleration import backend_settings, execution_flags
from ..pipeline import BatchSettings, MethodSettings, OutputSettings, Refiner, RefinerSettings, SegmentSettings
from ..checkpoints import ModelSettings, resolve_model_settings
from ..script_util import RESPACING_FLAG, carried_setting_flags
from ..errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, UsageError, usage_errors
from .common import (check_number, check_respacing, note, print_failures, resolve_device, resolve_model_path,
                     run_command, setup_logging, show_progress)

INPUT_FLAGS = (
    Flag("root_noisy", required=True, help="folder of noisy recordings (searched recursively), or one noisy file",
         metavar="DIR|FILE"),
    Flag("root_proc", help="folder of the SE model's outputs, same relative paths, or the one processed file "
                           "(with --baseline: the folder the baseline writes them into, default "
                           "./diffiner_<baseline>)", metavar="DIR|FILE"),
    Flag("model_path", required=True, help="checkpoint: a plain state dict (published or from train.py), or "
                                           "'published': the published weights, downloaded once into a cache",
         metavar="FILE|published"),
    Flag("output_dir", help="where to write (a folder, also for one file); default <root-proc>/<method>_etaA=..., "
                            "for one file beside it", metavar="DIR"),
    Flag("baseline", choices=ENHANCERS,
         help="make the processed files with this SE baseline from the noisy ones, then refine them"),
)
SAMPLING_FLAGS = (
    RESPACING_FLAG,
    *flags_of(MethodSettings),
    Flag("seed", 0, "seed; each file's noise depends only on it and the file's relative path"),
)


def method_flags() -> Tuple[Flag, ...]:
    """The method flags; built when a parser is, so that `--method` offers every registered method
    (plug-ins included)."""
    def etas_text(name: str) -> str:
        method = get_method(name)
        return f"{' '.join(method.eta_names())} = {' '.join(str(v) for v in method.etas_type().as_dict().values())}"

    return (
        Flag("method", DEFAULT_METHOD, "reverse process: " + "; ".join(
            f"{name} ({get_method(name).description})" for name in method_names()), choices=method_names()),
        Flag("simple_diffiner", False, "the same as --method diffiner (the original's switch)"),
        Flag("etas", None, "the method's etas in order, defaults: " + "; ".join(
            f"{name}: {etas_text(name)}" for name in method_names()), type=float, nargs="+", metavar="ETA"),
        *SAMPLING_FLAGS,
    )


RUN_FLAGS = (
    *flags_of(SegmentSettings),
    *flags_of(BatchSettings, max_batch_frames=Flag(
        "max_batch_frames", "auto", "instead of --batch-size: a budget of spectrogram frames per batch (short "
        "files run in large batches, long ones in small), or 'auto': sized from free GPU memory on CUDA, "
        "--batch-size on the CPU", metavar="N|auto")),
    DEVICE_FLAG,
    Flag("no_gpu", False, "run on the CPU (same as --device cpu)"),
    *execution_flags(),
    Flag("keep_sample_rate", False, "write outputs at the processed file's sample rate instead of the model's"),
    *flags_of(OutputSettings),
    OVERWRITE_FLAG.with_help("refine every file, also those already done; into a folder refined with other "
                             "settings: delete the files its record lists, then redo every file"),
    Flag("loaders", 2, "threads reading and preparing upcoming files"),
    Flag("dist_timeout", 7200.0, "seconds a rank waits for the others at the end of a torchrun/mpiexec run"),
    *CONSOLE_FLAGS,
)
MODEL_FLAGS = carried_setting_flags()

# config.yml keys (dotted) that say how a run went, not what the files are: they may differ
# between the runs that filled a folder. Every other key must match for a run to add files.
EXECUTION_KEYS = ("diffiner_version", "torch_version", "model_path", "model_settings_from", "data.output_dir", "device",
                  "processes", "acceleration", "runs")
SUMMARY_FILE = "summary.json"


def build_parser() -> argparse.ArgumentParser:
    return command_parser("Refine the output of a speech-enhancement model with Diffiner / Diffiner+.", {
        "inputs and outputs": INPUT_FLAGS, "method": method_flags(), "how to run": RUN_FLAGS,
        MODEL_GROUP: MODEL_FLAGS}, prog="diffiner-refine")


def parse_etas(method: str, values: Optional[Sequence[float]]) -> Dict[str, Optional[float]]:
    """{eta name: value} of the etas given on the command line, in the method's order."""
    names = get_method(method).eta_names()
    values = list(values or [])
    if len(values) > len(names):
        raise ValueError(f"{method} takes at most {len(names)} etas ({' '.join(names)}), got {len(values)}")
    return dict(zip(names, values))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse the flags (argparse's own errors exit with status 2). Adds `method` and `precision`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.simple_diffiner:
        if args.method not in (DEFAULT_METHOD, "diffiner"):
            parser.error(f"--simple-diffiner means --method diffiner, which contradicts --method {args.method}")
        args.method = "diffiner"
    args.precision = precision_from_args(args, parser)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Check every flag and folder before any work; UsageError (or FolderError, for a layout the
    write rules refuse) naming the problem. Adds `etas_given` and `etas` (those the method uses)
    and fills in the default `root_proc` (with --baseline) and `output_dir`."""
    frames = args.max_batch_frames
    if frames not in (None, "auto") and (not frames.isdigit() or int(frames) < 1):
        raise UsageError(f"--max-batch-frames takes a number of frames >= 1 or 'auto', got {frames!r}")
    with usage_errors(ValueError):
        args.etas_given = parse_etas(args.method, args.etas)
        args.etas = resolve_etas(args.method, **args.etas_given)
    check_number("--max-dur", args.max_dur, 0, strict=True)
    check_number("--segment-overlap", args.segment_overlap, 0)
    if args.segment_overlap >= args.max_dur:
        raise UsageError(f"--segment-overlap ({args.segment_overlap} s) must be shorter than --max-dur "
                         f"({args.max_dur} s)")
    check_number("--batch-size", args.batch_size, 1)
    check_number("--loaders", args.loaders, 1)
    check_number("--dist-timeout", args.dist_timeout, 0, strict=True)
    args.model_path = resolve_model_path(args.model_path, progress=not args.no_progress)
    with usage_errors(ValueError):
        args.model_settings = resolve_model_settings(args.model_path, values_of(args, MODEL_FLAGS))
    check_respacing(args.timestep_respacing, args.model_settings.values["diffusion_steps"])
    noisy_is_file = _is_file_or_folder("--root-noisy", args.root_noisy)
    if args.root_proc is None and args.baseline is None:
        raise UsageError("give --root-proc (the SE outputs) or --baseline to make them")
    args.root_proc = args.root_proc or f"diffiner_{args.baseline}"
    if args.baseline is None:
        proc_is_file = _is_file_or_folder("--root-proc", args.root_proc)
        if noisy_is_file != proc_is_file:
            raise UsageError(f"--root-noisy {args.root_noisy} is a {'file' if noisy_is_file else 'folder'} but "
                             f"--root-proc {args.root_proc} is not; give two files or two folders")
    elif noisy_is_file and os.path.isfile(args.root_proc):
        raise UsageError(f"--root-proc {args.root_proc}: with --baseline it is the folder the baseline writes into, "
                         "not a file")
    folder_name = MethodSettings(args.method, args.etas).folder_name
    # The default output folder: inside --root-proc, or for one processed file beside it.
    beside = os.path.dirname(args.root_proc) if os.path.isfile(args.root_proc) else args.root_proc
    args.output_dir = args.output_dir or os.path.join(beside, folder_name)
    inputs = {"--root-noisy": args.root_noisy, "--root-proc": args.root_proc}
    check_write_rules(inputs, args.output_dir, REFINE_WRITER)
    if args.baseline is not None:
        check_write_rules({"--root-noisy": args.root_noisy}, args.root_proc, ENHANCE_WRITER)
        with usage_errors(ImportError, FileNotFoundError):  # its package not installed, or broken
            check_available(args.baseline)


def _is_file_or_folder(flag: str, path: str) -> bool:
    """Whether the input `path` of `flag` is one file (True) or a folder (False); UsageError when
    it is neither."""
    if os.path.isfile(path):
        return True
    if os.path.isdir(path):
        return False
    raise UsageError(f"{flag} {path}: no such file or folder")


def refiner_settings(args: argparse.Namespace) -> RefinerSettings:
    """The Refiner's settings from the parsed flags: each group takes the flags named as its fields."""
    values = {name: getattr(args, name) for group in dataclasses.fields(RefinerSettings)
              for name in (f.name for f in dataclasses.fields(group.type)) if hasattr(args, name)}
    values["etas"] = args.etas_given
    values["max_batch_frames"] = None if args.max_batch_frames in (None, "auto") else int(args.max_batch_frames)
    return RefinerSettings.from_flat(**values)


def build_refiner(args: argparse.Namespace, device: str) -> Tuple[Refiner, ModelSettings]:
    """The refiner the flags describe, and the model settings it was built with (to record in
    config.yml); UsageError for a flag that contradicts the checkpoint's settings, or a
    checkpoint that cannot be read or does not fit them."""
    model_settings = args.model_settings
    with usage_errors(ValueError):
        refiner = Refiner.from_checkpoint(args.model_path, device=device, model_settings=model_settings,
                                          timestep_respacing=args.timestep_respacing, settings=refiner_settings(args))
    return refiner, model_settings


def describe_settings(args: argparse.Namespace, refiner: Refiner, model_settings: ModelSettings, model_sha256: str,
                      device: str, processes: int) -> Dict[str, Any]:
    """config.yml without its run history: every setting that shaped the files beside it, then
    how this run went (the EXECUTION_KEYS)."""
    shaping, execution = refiner.settings.describe(refiner.width_bucket)
    return {
        "diffiner_version": __version__,
        "torch_version": str(torch.__version__),
        "model_path": os.path.abspath(args.model_path),
        "model_sha256": model_sha256,
        "model": model_settings.values,
        "model_settings_from": model_settings.source,
        "data": {"root_noisy": os.path.abspath(args.root_noisy), "root_proc": os.path.abspath(args.root_proc),
                 "output_dir": os.path.abspath(args.output_dir)},
        "stft": refiner.front_end.describe(),
        "refiner": {**shaping, "timestep_respacing": args.timestep_respacing},
        "seed": args.seed,
        "dtype": refiner.precision,
        "output_sample_rate": "input" if args.keep_sample_rate else refiner.sample_rate,
        "device": device,
        "processes": processes,
        # The result for a file does not depend on its batch (up to float rounding).
        "acceleration": dict(execution, max_batch_frames=refiner.max_batch_frames, **backend_settings(refiner.device)),
    }


def config_differences(recorded: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """"key: recorded -> current" for every setting, outside the EXECUTION_KEYS, in which the
    two configs differ."""
    return [difference for difference in setting_differences(recorded, current, ignore=EXECUTION_KEYS)
            if not _same_place(recorded, current, difference.split(":", 1)[0])]


def _same_place(recorded: Dict[str, Any], current: Dict[str, Any], key: str) -> bool:
    """Whether `key` is an input root ("data.root_noisy", "data.root_proc") that lies where it
    lay from the output folder: a project moved whole (or reached by another path) reruns, a
    root elsewhere from the output folder is another run's. The output folder alone moved keeps
    its roots' absolute paths, which the caller compares."""
    if key not in ("data.root_noisy", "data.root_proc"):
        return False
    name = key.split(".", 1)[1]
    places = []
    for config in (recorded, current):
        data = config.get("data")
        if not (isinstance(data, dict) and isinstance(data.get(name), str) and isinstance(data.get("output_dir"), str)):
            return False  # not a record of ours: compared as written
        places.append(os.path.relpath(data[name], data["output_dir"]))
    return places[0] == places[1]


def read_record(output_dir: str) -> Optional[Dict[str, Any]]:
    """The config.yml of an earlier run into `output_dir`, or None for a folder without audio
    files and without one. UsageError for a folder whose audio no run of ours recorded, or
    whose config.yml is not ours: its files would pass for refined ones."""
    record = read_run_record(output_dir)
    if record is not None:
        return record
    path = os.path.join(output_dir, RUN_RECORD)
    if os.path.exists(path):
        raise UsageError(f"{path} was not written by diffiner-refine; choose another --output-dir")
    if scan_audio_files(output_dir).files:
        raise UsageError(f"{output_dir} holds audio files that no refinement recorded (it has no {RUN_RECORD}); "
                         "move them away or choose another --output-dir")
    return None


def check_record(args: argparse.Namespace, settings: Dict[str, Any]) -> Tuple[Optional[Dict[str, Any]], List[str]]:
    """(the output folder's earlier record, the settings in which it differs from this run's).

    The record is None when there is none; differing settings are refused with a UsageError
    naming them, unless --overwrite (then they are returned, and the record is to be replaced).
    """
    recorded = read_record(args.output_dir)
    differences = config_differences(recorded, settings) if recorded is not None else []
    if differences and not args.overwrite:
        raise UsageError(f"{args.output_dir} holds files refined with other settings "
                         f"({describe_differences(differences)}); rerun with "
                         "--overwrite to redo them all, or choose another --output-dir")
    return recorded, differences


def open_output_record(args: argparse.Namespace, differences: List[str]) -> OutputRecord:
    """The output folder's record of refined files (process 0). With other settings (and
    --overwrite) the files it lists are deleted first, and the summary of their run: nothing
    else, so the user's own files in the folder stay; config.yml is then rewritten."""
    record = OutputRecord.open(args.output_dir, REFINE_WRITER, None, args.overwrite, replace=bool(differences))
    if differences:
        if os.path.exists(os.path.join(args.output_dir, SUMMARY_FILE)):
            os.remove(os.path.join(args.output_dir, SUMMARY_FILE))
        note(args, f"--overwrite: removed {record.removed} file(s) refined with other settings "
                   f"({describe_differences(differences, 3)})")
    return record


def write_record(output_dir: str, settings: Dict[str, Any], recorded: Optional[Dict[str, Any]],
                 args: argparse.Namespace, jobs: int) -> None:
    """config.yml: the settings, and the history of the runs that wrote files here. A run with
    nothing to do changes nothing but the file's time (run_example.sh finds the latest folder by
    it) and the folders' paths, which a move may have changed."""
    runs = list(recorded.get("runs", [])) if recorded else []
    if recorded and not jobs:
        # Where the inputs and outputs are now: the same ones, maybe moved (`_same_place`).
        record = dict(recorded, data=settings["data"])
    else:
        record = dict(settings)
        runs.append({"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "files": jobs, "device": settings["device"], "processes": settings["processes"],
                     "baseline": args.baseline, "diffiner_version": __version__,
                     "torch_version": settings["torch_version"]})
    record["runs"] = runs
    write_text_atomic(os.path.join(output_dir, RUN_RECORD), yaml.safe_dump(record, sort_keys=False))


def make_processed(args: argparse.Namespace, rank: int, summary: RunSummary) -> None:
    """With --baseline: write the enhancer's outputs to --root-proc (process 0; the others wait
    for it at the end of the caller's stage). Files the baseline could not make are failures of
    the run."""
    if rank == 0:
        made = enhance_folder(args.baseline, args.root_noisy, args.root_proc, overwrite=args.overwrite,
                              progress=show_progress(args))
        for rel, reason in made.failed.items():
            summary.failed[rel] = f"baseline {args.baseline}: {reason}"
        note(args, f"baseline {args.baseline} in {args.root_proc}: {made.describe()}")


def report(summary: RunSummary, output_dir: str, world_size: int) -> None:
    """Print the closing lines and write summary.json beside the outputs."""
    print_failures(summary.failed)
    speed = f" (RTF {summary.rtf:.3f})" if summary.rtf is not None else ""
    redone = f" ({len(summary.redone)} redone: their input changed)" if summary.redone else ""
    print(f"refined {len(summary.refined)} file(s){redone}, skipped {len(summary.skipped)}, "
          f"failed {len(summary.failed)}; {summary.audio_seconds:.1f} s of audio in {summary.wall_seconds:.1f} s{speed}")
    record = {"refined": len(summary.refined), "skipped": len(summary.skipped), "failed": summary.failed,
              "audio_seconds": summary.audio_seconds, "wall_seconds": summary.wall_seconds,
              "real_time_factor": summary.rtf, "processes": world_size}
    write_text_atomic(os.path.join(output_dir, SUMMARY_FILE), json.dumps(record, indent=2) + "\n")


def refine_corpus(args: argparse.Namespace) -> int:
    """The command's work, inside the error boundary; returns the exit status."""
    setup_logging(args.debug, args.quiet)  # first: the download of the published weights is logged
    check_args(args)
    device = resolve_device(args.device, args.no_gpu)
    if args.cuda_graphs and torch.device(device).type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA device (this run is on {device})")
    rank, world_size = 0, 1
    if dist_util.launched_by_torchrun() or dist_util.launched_by_mpi():
        with usage_errors(ValueError):
            info = dist_util.setup_dist(device=torch.device(device).type, timeout_s=args.dist_timeout)
        device, rank, world_size = str(info.device), info.rank, info.world_size
    refiner, model_settings = build_refiner(args, device)
    # One run at a time writes a folder: a second one, started while this one runs, is refused.
    with dist_util.job_output_lock(args.output_dir, REFINE_WRITER):
        return refine_into_folder(args, refiner, model_settings, device, rank, world_size)


def refine_into_folder(args: argparse.Namespace, refiner: Refiner, model_settings: ModelSettings, device: str,
                       rank: int, world_size: int) -> int:
    """Check the output folder's record, plan, refine and report, holding the folder's lock.

    Each stage ends on every process together (`dist_util.shared_fate`): a process that fails
    makes the others stop, each with one line naming it, instead of leaving them to wait for it.
    """
    settings = describe_settings(args, refiner, model_settings, file_sha256(args.model_path), device, world_size)
    summary = RunSummary()
    start = time.time()
    with dist_util.shared_fate():
        recorded, differences = check_record(args, settings)
        if args.baseline is not None:
            make_processed(args, rank, summary)
    with dist_util.shared_fate():
        record = OutputRecord.read(args.output_dir, REFINE_WRITER)
        with usage_errors(FileNotFoundError):
            jobs = plan_jobs(args.root_noisy, args.root_proc, args.output_dir, refiner, args.overwrite, summary,
                             record)
        if rank == 0:
            record = open_output_record(args, differences)
            if differences:
                recorded = None
            write_record(args.output_dir, settings, recorded, args, len(jobs))
            redone = f" ({len(summary.redone)} because their input changed)" if summary.redone else ""
            note(args, f"{len(jobs)} file(s) to refine{redone}, {len(summary.skipped)} already done, "
                       f"{len(summary.failed)} unreadable; output: {args.output_dir}")
    jobs = shard_jobs(jobs, rank, world_size)
    try:
        with dist_util.shared_fate() as check_peers:
            if args.max_batch_frames == "auto" and jobs:
                refiner.auto_max_batch_frames(max(job.width for job in jobs))
            refine_files(refiner, jobs, summary, seed=args.seed, keep_sample_rate=args.keep_sample_rate,
                         progress=show_progress(args) and rank == 0, loaders=args.loaders, record=record,
                         check_peers=check_peers)
    except KeyboardInterrupt:
        if rank == 0:
            OutputRecord.read(args.output_dir, REFINE_WRITER).save()
        print(f"\ninterrupted: {len(summary.refined)} file(s) written; rerun to finish the rest", file=sys.stderr)
        return EXIT_INTERRUPTED
    if world_size > 1:
        note(args, f"rank {rank}: refined {len(summary.refined)} file(s), {summary.audio_seconds:.1f} s of audio")
    total = RunSummary.merge(dist_util.all_gather_objects(summary), time.time() - start)
    if rank == 0:
        # Every process has added its files to the record's log: folded into the record whole.
        OutputRecord.read(args.output_dir, REFINE_WRITER).save()
        report(total, args.output_dir, world_size)
    dist_util.cleanup()
    return EXIT_FAILED if total.failed else EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: refine_corpus(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
