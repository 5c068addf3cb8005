"""Objective evaluation of enhanced speech folders: per-file scores, summary with CIs, spectrograms.

Folders are paired by relative path (files missing somewhere are reported and skipped), every
signal is mixed to mono and resampled to 16 kHz, and each file is scored in a worker process.
Intrusive metrics (PESQ, ESTOI, SI-SDR) need --clean; DNSMOS needs no reference. Outputs in the
output folder: per_file.csv, summary.md, summary.json and spectrograms.png, all written
atomically so an interrupted run never leaves a half-written result behind.
"""

import argparse
import csv
import importlib.util
import io
import json
import logging
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import metrics
from .audio import (
    MODEL_SAMPLE_RATE,
    AudioError,
    atomic_output,
    audio_info,
    load_audio,
    resample,
    to_mono,
    write_text_atomic,
)
from .files import pair_files

logger = logging.getLogger(__name__)

INTRUSIVE_METRICS = ("pesq", "estoi", "sisdr")
ALL_METRICS = INTRUSIVE_METRICS + ("dnsmos",)
INTRUSIVE_FUNCTIONS = {"pesq": metrics.pesq_wb, "estoi": metrics.estoi, "sisdr": metrics.si_sdr}
DNSMOS_COLUMNS = ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808")
# Modules each metric imports. speechmos imports onnxruntime, librosa and requests without
# declaring any of them as dependencies, so they are checked here too.
METRIC_BACKENDS = {
    "pesq": ("pesq",),
    "estoi": ("pystoi",),
    "sisdr": (),
    "dnsmos": ("speechmos", "onnxruntime", "librosa", "requests"),
}
# Exact rational seconds, so that a difference of exactly 10 ms is not rejected by rounding.
MAX_LENGTH_DIFFERENCE = Fraction(1, 100)
CLEAN = "clean"
NOISY = "noisy"
SPECTROGRAM_RANGE_DB = 80.0


class EvaluationError(Exception):
    """An input problem the user has to fix; main() prints it and exits with status 2."""


@dataclass(frozen=True)
class EvaluationSetup:
    """What to score and where to write it.

    `systems` keeps the command-line order, which decides the table rows and which systems the
    default spectrogram choice compares. `metrics` None means every metric the inputs allow.
    """

    systems: Dict[str, str]
    output_dir: str = "eval_results"
    clean: Optional[str] = None
    noisy: Optional[str] = None
    metrics: Optional[Sequence[str]] = None
    workers: int = 1
    plot_files: Optional[Sequence[str]] = None
    num_plot_files: int = 2

    def scored_systems(self) -> Dict[str, str]:
        """Every scored folder by name: noisy first (when given), then the systems."""
        noisy = {NOISY: self.noisy} if self.noisy else {}
        return {**noisy, **self.systems}


@dataclass(frozen=True)
class FileTask:
    """One relative path to score for every system; small and picklable for worker processes."""

    relative_path: str
    clean_root: Optional[str]
    system_roots: Tuple[Tuple[str, str], ...]
    metrics: Tuple[str, ...]


@dataclass
class EvaluationResult:
    """What a run produced, for the caller to report: paths are relative to the input folders."""

    files: List[str]
    missing: Dict[str, List[str]]
    summary: Dict[str, Dict[str, Dict[str, float]]]
    markdown: str
    plotted_files: List[str]


def _missing_backends(metric: str) -> List[str]:
    """Modules a metric needs that are not installed (looked up without importing them)."""
    modules = METRIC_BACKENDS[metric]
    return [module for module in modules if importlib.util.find_spec(module) is None]


def _default_metrics(has_clean: bool) -> Tuple[str, ...]:
    """Every metric the inputs allow and whose back-end is installed; skipped ones are logged."""
    chosen = []
    for metric in ALL_METRICS:
        if metric in INTRUSIVE_METRICS and not has_clean:
            continue
        missing = _missing_backends(metric)
        if missing:
            logger.warning("%s skipped: %s not installed", metric, ", ".join(missing))
        else:
            chosen.append(metric)
    if not chosen:
        raise EvaluationError("no metric can be computed: pass --clean DIR or install speechmos")
    return tuple(chosen)


def resolve_metrics(requested: Optional[Sequence[str]], has_clean: bool) -> Tuple[str, ...]:
    """Validate a metric selection, in canonical order; None picks all that can be computed.

    Missing back-ends are caught here, before any scoring, not as an ImportError in a worker.
    """
    if requested is None:
        return _default_metrics(has_clean)
    unknown = sorted(set(requested) - set(ALL_METRICS))
    if unknown:
        raise EvaluationError(
            f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(ALL_METRICS)}"
        )
    if not requested:
        raise EvaluationError("no metric selected")
    needs_clean = [m for m in ALL_METRICS if m in requested and m in INTRUSIVE_METRICS]
    if needs_clean and not has_clean:
        raise EvaluationError(f"{', '.join(needs_clean)} need a clean reference: pass --clean DIR")
    for metric in requested:
        missing = _missing_backends(metric)
        if missing:
            names = " ".join(missing)
            raise EvaluationError(f"{metric} needs {names} installed: pip install {names}")
    return tuple(m for m in ALL_METRICS if m in requested)


def metric_columns(metric_names: Sequence[str]) -> List[str]:
    """Result column names: one per metric, four for DNSMOS."""
    columns = []
    for name in metric_names:
        columns.extend(DNSMOS_COLUMNS if name == "dnsmos" else (name,))
    return columns


def load_mono_16k(path: str) -> np.ndarray:
    """Read a file as the mono 16 kHz float signal that every metric expects."""
    audio, sample_rate = load_audio(path)
    return resample(to_mono(audio), sample_rate, MODEL_SAMPLE_RATE)


def _duration(path: str) -> Fraction:
    """Exact duration of a file in seconds, from its header only."""
    frames, sample_rate, _ = audio_info(path)
    return Fraction(frames, sample_rate)


def check_lengths(clean_root: str, system_roots: Dict[str, str], files: Sequence[str]) -> None:
    """Fail before any scoring when a degraded file's duration is off its reference by > 10 ms.

    Such a gap means misaligned or wrongly paired files, which would give meaningless scores;
    smaller gaps (codec or resampler padding) are trimmed away during scoring.
    """
    for relative_path in files:
        reference = os.path.join(clean_root, relative_path)
        reference_duration = _duration(reference)
        for root in system_roots.values():
            degraded = os.path.join(root, relative_path)
            difference = abs(_duration(degraded) - reference_duration)
            if difference > MAX_LENGTH_DIFFERENCE:
                raise EvaluationError(
                    f"{reference} and {degraded} differ in length by "
                    f"{float(difference) * 1000:.1f} ms (more than 10 ms allowed)"
                )


def _compute_metric(
    name: str, signal: np.ndarray, reference: Optional[np.ndarray]
) -> Dict[str, float]:
    """One metric's columns for one signal; intrusive ones get equal-length signals."""
    if name == "dnsmos":
        scores = metrics.dnsmos(signal)
        return {f"dnsmos_{key.lower()}": value for key, value in scores.items()}
    length = min(reference.size, signal.size)
    return {name: INTRUSIVE_FUNCTIONS[name](reference[:length], signal[:length])}


def score_signal(
    signal: np.ndarray, reference: Optional[np.ndarray], metric_names: Sequence[str], label: str
) -> Dict[str, float]:
    """All selected metrics for one signal; a metric undefined for it is recorded as NaN."""
    scores = {}
    for name in metric_names:
        try:
            scores.update(_compute_metric(name, signal, reference))
        except metrics.MetricError as exc:
            logger.warning("%s: %s is undefined (%s); recorded as NaN", label, name, exc)
            scores.update(dict.fromkeys(metric_columns([name]), math.nan))
    return scores


def score_file(task: FileTask) -> List[Dict[str, object]]:
    """Rows (file, system, metric columns...) for one relative path; runs in a worker process."""
    reference = None
    if task.clean_root:
        reference = load_mono_16k(os.path.join(task.clean_root, task.relative_path))
    rows = []
    for system, root in task.system_roots:
        signal = load_mono_16k(os.path.join(root, task.relative_path))
        label = f"{system}: {task.relative_path}"
        row = {"file": task.relative_path, "system": system}
        row.update(score_signal(signal, reference, task.metrics, label))
        rows.append(row)
    return rows


def score_all(tasks: Sequence[FileTask], workers: int) -> List[Dict[str, object]]:
    """Score every task with a progress bar; workers == 1 stays in-process (easy to debug)."""
    from tqdm import tqdm

    rows = []
    with tqdm(total=len(tasks), desc="scoring", unit="file") as progress:
        if workers == 1:
            for task in tasks:
                rows.extend(score_file(task))
                progress.update()
            return rows
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(score_file, task) for task in tasks]
            try:
                for future in as_completed(futures):
                    rows.extend(future.result())
                    progress.update()
            finally:
                # On an error or Ctrl-C, drop the queued files instead of scoring them first
                # (shutdown's cancel_futures would do this, but needs Python 3.9).
                for future in futures:
                    future.cancel()
    return rows


def summarize(
    rows: Sequence[Dict[str, object]], systems: Sequence[str], columns: Sequence[str]
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """system -> column -> {mean, ci95, n} over the files where the metric is defined."""
    summary = {}
    for system in systems:
        summary[system] = {}
        for column in columns:
            values = [r[column] for r in rows if r["system"] == system]
            values = [v for v in values if math.isfinite(v)]
            mean, half_width = metrics.confidence_interval(values)
            summary[system][column] = {"mean": mean, "ci95": half_width, "n": len(values)}
    return summary


def _format_cell(stats: Dict[str, float], num_files: int) -> str:
    """'mean ± ci95' for the table, noting n when some files had the metric undefined."""
    if stats["n"] == 0:
        return "n/a"
    text = f"{stats['mean']:.3f}"
    if math.isfinite(stats["ci95"]):
        text += f" ± {stats['ci95']:.3f}"
    if stats["n"] != num_files:
        text += f" (n={stats['n']})"
    return text


def format_summary_markdown(
    summary: Dict[str, Dict[str, Dict[str, float]]], columns: Sequence[str], num_files: int
) -> str:
    """Markdown table: one row per system, one column per metric."""
    lines = [
        "| system | " + " | ".join(columns) + " |",
        "| --- | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for system, per_column in summary.items():
        cells = [_format_cell(per_column[c], num_files) for c in columns]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Mean ± half-width of the 95% confidence interval (Student's t) over {num_files} file(s)."
    )
    return "\n".join(lines) + "\n"


def _json_ready(summary: Dict[str, Dict[str, Dict[str, float]]]) -> Dict:
    """Replace NaN by None: NaN is not valid JSON and breaks strict parsers."""
    return {
        system: {
            column: {key: None if _is_nan(value) else value for key, value in stats.items()}
            for column, stats in per_column.items()
        }
        for system, per_column in summary.items()
    }


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def format_per_file_csv(rows: Sequence[Dict[str, object]], columns: Sequence[str]) -> str:
    """CSV text with columns file, system, then the metric columns."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["file", "system", *columns], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _comparison_pair(setup: EvaluationSetup) -> Optional[Tuple[str, str]]:
    """(baseline, target) for the default spectrogram choice: first vs last system, or noisy
    vs the only system, since that is the change a refiner is judged by."""
    names = list(setup.systems)
    if len(names) >= 2:
        return names[0], names[-1]
    if setup.noisy:
        return NOISY, names[-1]
    return None


def _ovrl_ranking(rows: Sequence[Dict[str, object]], baseline: str, target: str) -> List[str]:
    """Files ordered from the largest DNSMOS OVRL gain of `target` over `baseline` to the
    largest loss; files where either score is undefined are left out."""
    ovrl = {(r["system"], r["file"]): r["dnsmos_ovrl"] for r in rows}
    changes = []
    for file in sorted({r["file"] for r in rows}):
        change = ovrl[(target, file)] - ovrl[(baseline, file)]
        if math.isfinite(change):
            changes.append((change, file))
    return [file for _, file in sorted(changes, reverse=True)]


def choose_plot_files(
    rows: Sequence[Dict[str, object]], files: Sequence[str], setup: EvaluationSetup
) -> List[str]:
    """Files to draw: the ones given, else most improved / most degraded by DNSMOS OVRL
    (alternating), else the first files when there is nothing to rank by."""
    if setup.plot_files is not None:
        return list(setup.plot_files)
    count = setup.num_plot_files
    pair = _comparison_pair(setup)
    has_ovrl = bool(rows) and "dnsmos_ovrl" in rows[0]
    if pair is None or not has_ovrl:
        return list(files[:count])
    ranked = _ovrl_ranking(rows, *pair)
    chosen = []
    for extremes in zip(ranked, reversed(ranked)):
        chosen.extend(f for f in extremes if f not in chosen)
    return chosen[:count] or list(files[:count])


def _validate_plot_files(plot_files: Optional[Sequence[str]], files: Sequence[str]) -> None:
    """Fail before scoring when --plot-files names a file that is not scored."""
    known = set(files)
    unknown = [f for f in plot_files or () if f not in known]
    if unknown:
        raise EvaluationError(
            f"--plot-files names file(s) not found in every folder: {', '.join(unknown)}"
        )


def _log_spectrogram(signal: np.ndarray) -> np.ndarray:
    """Log-magnitude STFT in dB (32 ms window, 8 ms hop), frequency on the first axis."""
    from scipy.signal import stft

    _, _, spectrum = stft(signal, fs=MODEL_SAMPLE_RATE, nperseg=512, noverlap=384)
    return 20.0 * np.log10(np.abs(spectrum) + 1e-10)


def _save_figure_atomic(figure, path: str) -> None:
    """Save a PNG under a temporary name in the destination folder, then rename it into place."""
    with atomic_output(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def plot_spectrograms(path: str, files: Sequence[str], sources: Dict[str, str]) -> None:
    """One row per file, one column per source folder (clean, noisy, systems).

    Each row shares one colour scale (its loudest bin down to 80 dB below), so columns can be
    compared by eye. Uses the Agg canvas directly, never pyplot's global state or backend.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.2 * len(sources), 2.6 * len(files)), layout="constrained")
    axes = figure.subplots(len(files), len(sources), squeeze=False)
    for row, relative_path in enumerate(files):
        signals = {
            name: load_mono_16k(os.path.join(root, relative_path)) for name, root in sources.items()
        }
        spectra = {name: _log_spectrogram(signal) for name, signal in signals.items()}
        top = max(float(s.max()) for s in spectra.values())
        for column, (name, spectrum) in enumerate(spectra.items()):
            axis = axes[row][column]
            duration = signals[name].size / MODEL_SAMPLE_RATE
            image = axis.imshow(
                spectrum, origin="lower", aspect="auto", cmap="magma",
                extent=(0.0, duration, 0.0, MODEL_SAMPLE_RATE / 2000.0),
                vmin=top - SPECTROGRAM_RANGE_DB, vmax=top,
            )
            axis.set_title(f"{name}\n{relative_path}", fontsize=8)
            axis.set_xlabel("time [s]" if row == len(files) - 1 else "")
            axis.set_ylabel("frequency [kHz]" if column == 0 else "")
        figure.colorbar(image, ax=axes[row].tolist(), label="dB")
    _save_figure_atomic(figure, path)


def _write_outputs(
    output_dir: str, rows: Sequence[Dict[str, object]], columns: Sequence[str],
    summary: Dict[str, Dict[str, Dict[str, float]]], markdown: str,
) -> None:
    """per_file.csv, summary.md and summary.json, each written atomically."""
    write_text_atomic(os.path.join(output_dir, "per_file.csv"), format_per_file_csv(rows, columns))
    write_text_atomic(os.path.join(output_dir, "summary.md"), markdown)
    write_text_atomic(
        os.path.join(output_dir, "summary.json"), json.dumps(_json_ready(summary), indent=2) + "\n"
    )


def evaluate(setup: EvaluationSetup) -> EvaluationResult:
    """Pair, check, score, summarize and plot; raises EvaluationError, AudioError or
    FileNotFoundError (no common file, missing folder) for inputs the user must fix."""
    metric_names = resolve_metrics(setup.metrics, setup.clean is not None)
    systems = setup.scored_systems()
    sources = {**({CLEAN: setup.clean} if setup.clean else {}), **systems}
    # A system folder may hold another's (the refiner writes inside the processed folder):
    # listing one folder never descends into another given folder.
    files, missing = pair_files(sources, exclude=[setup.output_dir, *sources.values()])
    _validate_plot_files(setup.plot_files, files)
    if setup.clean:
        check_lengths(setup.clean, systems, files)

    tasks = [FileTask(f, setup.clean, tuple(systems.items()), metric_names) for f in files]
    rows = score_all(tasks, max(1, min(setup.workers, len(tasks))))
    order = {name: index for index, name in enumerate(systems)}
    rows.sort(key=lambda r: (r["file"], order[r["system"]]))

    columns = metric_columns(metric_names)
    summary = summarize(rows, list(systems), columns)
    markdown = format_summary_markdown(summary, columns, len(files))
    os.makedirs(setup.output_dir, exist_ok=True)
    _write_outputs(setup.output_dir, rows, columns, summary, markdown)

    plotted = choose_plot_files(rows, files, setup)
    if plotted:
        plot_spectrograms(os.path.join(setup.output_dir, "spectrograms.png"), plotted, sources)
    else:
        logger.info("no file chosen for plotting; spectrograms.png not written")
    missing = {name: paths for name, paths in missing.items() if paths}
    return EvaluationResult(files, missing, summary, markdown, plotted)


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


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface; multi-word flags accept dashes and underscores alike."""
    parser = argparse.ArgumentParser(
        prog="diffiner-evaluate",
        description="Score enhanced speech folders (PESQ, ESTOI, SI-SDR, DNSMOS) file by file.",
    )
    parser.add_argument(
        "--clean", metavar="DIR", help="clean references (enables PESQ, ESTOI and SI-SDR)"
    )
    parser.add_argument("--noisy", metavar="DIR", help="noisy inputs, scored as system 'noisy'")
    parser.add_argument(
        "--system", metavar="NAME=DIR", action="append", required=True, type=_system_spec,
        help="a system's output folder; repeat for several systems",
    )
    parser.add_argument(
        "--output-dir", "--output_dir", dest="output_dir", metavar="DIR", default="./eval_results",
        help="where per_file.csv, summary.md, summary.json and spectrograms.png go",
    )
    parser.add_argument(
        "--workers", metavar="N", type=_int_at_least(1), default=os.cpu_count() or 1,
        help="worker processes (1 scores in-process); default: number of CPUs",
    )
    parser.add_argument(
        "--metrics", metavar="LIST", type=_metric_list, default=None,
        help=f"comma list from {','.join(ALL_METRICS)}; default: all that the inputs allow",
    )
    parser.add_argument(
        "--nisqa-weights", "--nisqa_weights", dest="nisqa_weights", metavar="FILE",
        help="NISQA model weights (not supported yet)",
    )
    parser.add_argument(
        "--plot-files", "--plot_files", dest="plot_files", metavar="LIST", type=_path_list,
        default=None,
        help="comma list of relative paths to draw spectrograms of",
    )
    parser.add_argument(
        "--num-plot-files", "--num_plot_files", dest="num_plot_files", metavar="N",
        type=_int_at_least(0), default=2,
        help="files to draw when --plot-files is not given: largest DNSMOS OVRL gain and loss",
    )
    return parser


def _setup_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> EvaluationSetup:
    """Check the flags that argparse cannot check alone and build the setup."""
    if args.nisqa_weights:
        parser.error(metrics.NISQA_UNSUPPORTED)
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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
