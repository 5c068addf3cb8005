"""`diffiner-evaluate` / scripts/evaluate.py: score enhanced speech folders file by file."""

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from ..audio.io import AudioError
from ..errors import UsageError, usage_errors
from ..evaluation.nisqa import CACHE_DIR, WEIGHTS_LICENCE, WEIGHTS_NAME
from ..evaluation.run import CLEAN, NOISY, EvaluationSetup, evaluate
from ..evaluation.scoring import ALL_METRICS
from ..flags import CONSOLE_FLAGS, Flag, command_parser
from .common import check_number, run_command, setup_logging, show_progress

# What the user has to fix (a folder, a file, a flag): one line and exit status 2.
# Raised by readers of the user's files: what was asked is wrong (EvaluationError and
# NisqaWeightsError are usage errors of their own).
INPUT_ERRORS = (AudioError, FileNotFoundError)


def _system_spec(text: str) -> Tuple[str, str]:
    """Parse NAME=DIR for argparse."""
    name, sep, folder = text.partition("=")
    if not sep or not name.strip() or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name.strip(), folder


def _path_list(text: str) -> List[str]:
    """Parse a comma-separated list of relative paths, so that './a.wav' matches 'a.wav'."""
    return [os.path.normpath(item.strip()) for item in text.split(",") if item.strip()]


def _metric_list(text: str) -> List[str]:
    """Parse --metrics: lower-case names, so 'PESQ,SISDR' works too."""
    return [item.strip().lower() for item in text.split(",") if item.strip()]


FOLDER_FLAGS = (
    Flag("system", required=True, help="a system's output folder; repeat for several systems", type=_system_spec,
         action="append", metavar="NAME=DIR"),
    Flag("clean", help="clean references (enables PESQ, ESTOI and SI-SDR)", metavar="DIR"),
    Flag("noisy", help="noisy inputs, scored as system 'noisy'", metavar="DIR"),
    Flag("output_dir", "./eval_results", "where per_file.csv, summary.md, summary.json, spectrograms.png and the "
         "listening page report.html go", metavar="DIR"),
)
SCORING_FLAGS = (
    Flag("metrics", None, f"comma list from {','.join(ALL_METRICS)} (default: every one the inputs allow: pesq, "
         "estoi, sisdr need --clean; nisqa needs its weights, given or in the cache; lsd, the log-spectral distance "
         "above 8 kHz, needs --clean and is scored only when named). Naming nisqa here "
         "downloads its weights into the cache on first use; offline, nisqa is left out with one line",
         type=_metric_list, metavar="LIST"),
    Flag("nisqa_weights", None, f"NISQA's weights: a local file named nisqa.tar (the published weights, "
         f"{WEIGHTS_LICENCE}; never shipped with this project). Default: torchmetrics' cache "
         f"{os.path.join(CACHE_DIR, WEIGHTS_NAME)} when it holds them", metavar="FILE"),
    Flag("workers", os.cpu_count() or 1, "worker processes (1 scores in-process; default: the number of CPUs, "
         "here %(default)s)",
         type=int, metavar="N"),
)
REPORT_FLAGS = (
    Flag("report_copy_audio", False, "copy every played file under DIR/report_files/audio, so that the output "
         "folder holds everything report.html plays and can be zipped and shared (default: the page links to "
         "the files where they lie, by relative paths)"),
)
PLOT_FLAGS = (
    Flag("plot_files", None, "comma list of relative paths to draw spectrograms of", type=_path_list,
         metavar="LIST"),
    Flag("num_plot_files", 2, "files to draw when --plot-files is not given: largest DNSMOS OVRL gain and loss",
         type=int, metavar="N"),
)


def build_parser() -> argparse.ArgumentParser:
    return command_parser("Score enhanced speech folders (PESQ, ESTOI, SI-SDR, DNSMOS, NISQA) file by file. "
                          "Every system is scored over every file found in any folder. A system's output gets "
                          "every metric's floor where it is missing, unreadable, holds NaN samples or is "
                          "(near-)silent, and one metric's floor where that metric is undefined for it or its "
                          "score is lower; a file whose clean reference is missing or unusable is left out of "
                          "the intrusive metrics for every system.", {
        "folders": FOLDER_FLAGS, "scoring": SCORING_FLAGS, "listening page": REPORT_FLAGS,
        "spectrograms": PLOT_FLAGS, "console": CONSOLE_FLAGS}, prog="diffiner-evaluate")


def _setup_from_args(args: argparse.Namespace) -> EvaluationSetup:
    """Check the flags that argparse cannot check alone and build the setup."""
    check_number("--workers", args.workers, 1)
    check_number("--num-plot-files", args.num_plot_files, 0)
    names = [name for name, _ in args.system]
    reserved = ([CLEAN] if args.clean else []) + ([NOISY] if args.noisy else [])
    taken = names + reserved
    duplicates = sorted({n for n in taken if taken.count(n) > 1})
    if duplicates:
        raise UsageError(f"system name(s) used twice or reserved: {', '.join(duplicates)}")
    return EvaluationSetup(
        systems=dict(args.system),
        output_dir=args.output_dir,
        clean=args.clean,
        noisy=args.noisy,
        metrics=args.metrics,
        workers=args.workers,
        plot_files=args.plot_files,
        num_plot_files=args.num_plot_files,
        nisqa_weights=args.nisqa_weights,
        report_copy_audio=args.report_copy_audio,
        progress=show_progress(args),
    )


def _print_missing(missing: Dict[str, List[str]]) -> None:
    """List the files some folder lacks: still scored, as failures of that folder's system (or,
    for the clean folder, left out of the intrusive metrics); the notes of the summary say so."""
    for name, paths in missing.items():
        print(f"missing under {name}: {len(paths)} file(s):")
        for path in paths:
            print(f"  {path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `diffiner-evaluate` / scripts/evaluate.py; returns the exit status."""
    args = build_parser().parse_args(argv)
    setup_logging(args.debug, args.quiet)

    def body() -> int:
        setup = _setup_from_args(args)
        with usage_errors(*INPUT_ERRORS):
            result = evaluate(setup)
        if not args.quiet:  # the table and the lists: in summary.md and per_file.csv too
            _print_missing(result.missing)
            print(result.markdown, end="")
            print(f"listening page: {result.report_path}")
        print(f"results written to {setup.output_dir}")
        return 0

    return run_command(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
