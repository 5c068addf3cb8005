"""Scoring: which metrics a run computes, and every file's scores, in worker processes.

Folders are paired by relative path; every signal is mixed to mono and resampled to 16 kHz
before scoring. Intrusive metrics (PESQ, ESTOI, SI-SDR) need the clean reference; DNSMOS does not.
"""

import importlib.util
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..audio.io import MODEL_SAMPLE_RATE, audio_info, load_audio, resample, to_mono
from . import metrics

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


class EvaluationError(Exception):
    """An input problem the user has to fix; main() prints it and exits with status 2."""


@dataclass(frozen=True)
class FileTask:
    """One relative path to score for every system; small and picklable for worker processes."""

    relative_path: str
    clean_root: Optional[str]
    system_roots: Tuple[Tuple[str, str], ...]
    metrics: Tuple[str, ...]


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
