"""`diffiner-evaluate` / scripts/evaluate.py: score enhanced speech folders file by file."""

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..audio.io import AudioError
from ..evaluation.run import CLEAN, NOISY, EvaluationSetup, evaluate
from ..evaluation.scoring import ALL_METRICS, EvaluationError
from ..flags import Flag, command_parser
from .common import setup_logging


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


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for integers >= minimum."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


FOLDER_FLAGS = (
    Flag("system", required=True, help="a system's output folder; repeat for several systems", type=_system_spec,
         action="append", metavar="NAME=DIR"),
    Flag("clean", help="clean references (enables PESQ, ESTOI and SI-SDR)", metavar="DIR"),
    Flag("noisy", help="noisy inputs, scored as system 'noisy'", metavar="DIR"),
    Flag("output_dir", "./eval_results", "where per_file.csv, summary.md, summary.json and spectrograms.png go",
         metavar="DIR"),
)
SCORING_FLAGS = (
    Flag("metrics", None, f"comma list from {','.join(ALL_METRICS)} (default: all that the inputs allow)",
         type=_metric_list, metavar="LIST"),
    Flag("workers", os.cpu_count() or 1, "worker processes (1 scores in-process; default: number of CPUs)",
         type=_int_at_least(1), metavar="N"),
)
PLOT_FLAGS = (
    Flag("plot_files", None, "comma list of relative paths to draw spectrograms of", type=_path_list,
         metavar="LIST"),
    Flag("num_plot_files", 2, "files to draw when --plot-files is not given: largest DNSMOS OVRL gain and loss",
         type=_int_at_least(0), metavar="N"),
)


def build_parser() -> argparse.ArgumentParser:
    return command_parser("Score enhanced speech folders (PESQ, ESTOI, SI-SDR, DNSMOS) file by file.", {
        "folders": FOLDER_FLAGS, "scoring": SCORING_FLAGS, "spectrograms": PLOT_FLAGS}, prog="diffiner-evaluate")


def _setup_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EvaluationSetup:
    """Check the flags that argparse cannot check alone and build the setup."""
    names = [name for name, _ in args.system]
    reserved = ([CLEAN] if args.clean else []) + ([NOISY] if args.noisy else [])
    taken = names + reserved
    duplicates = sorted({n for n in taken if taken.count(n) > 1})
    if duplicates:
        parser.error(f"system name(s) used twice or reserved: {', '.join(duplicates)}")
    return EvaluationSetup(
        systems=dict(args.system),
        output_dir=args.output_dir,
        clean=args.clean,
        noisy=args.noisy,
        metrics=args.metrics,
        workers=args.workers,
        plot_files=args.plot_files,
        num_plot_files=args.num_plot_files,
    )


def _print_missing(missing: Dict[str, List[str]]) -> None:
    """List files that were skipped because some folder lacks them."""
    for name, paths in missing.items():
        print(f"not scored: {len(paths)} file(s) missing under {name}:")
        for path in paths:
            print(f"  {path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `diffiner-evaluate` / scripts/evaluate.py; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup = _setup_from_args(parser, args)
    setup_logging()
    try:
        result = evaluate(setup)
    except (EvaluationError, AudioError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_missing(result.missing)
    print(result.markdown, end="")
    print(f"results written to {setup.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
