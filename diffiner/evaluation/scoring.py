"""Scoring: which metrics a run computes, and every file's scores, in worker processes.

Folders are paired by relative path; every signal is mixed to mono. PESQ (wide-band), ESTOI,
SI-SDR and DNSMOS score it resampled to 16 kHz (`metrics.SCORING_RATE`); NISQA scores it at the
file's own rate (torchmetrics resamples to NISQA's 48 kHz inside), and the log-spectral distance
above 8 kHz (lsd) at the clean reference's rate, the degraded file resampled to it. Intrusive
metrics (PESQ, ESTOI, SI-SDR, LSD) need the clean reference; DNSMOS and NISQA do not.

Every system is scored on the same files (every file found in any folder), so that no system's
mean leaves out the files it failed on. A score that cannot be computed is handled by whose
fault it is:
- the output's: the score is set to the metric's floor (FLOORS) and counted as floored, so a
  failed output never scores above a working one. For one metric where it is undefined for the
  output (`metrics.MetricError`, e.g. PESQ finds no utterance) or a computed score is below the
  floor; for every metric where the output cannot be scored at all (`failed`: the file is
  missing, unreadable or holds NaN samples, or it is silent or near-silent by
  `metrics.near_silence`);
- the file's (e.g. its clean reference is missing, silent or too short: `metrics.UnscorableFile`):
  that metric is not scored for the file in any system (NaN, counted as not scored), with a warning.
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

from ..audio.io import AudioError, audio_info, load_audio, resample, to_mono
from ..errors import UsageError
from . import metrics, nisqa

logger = logging.getLogger(__name__)


INTRUSIVE_METRICS = ("pesq", "estoi", "sisdr", "lsd")

ALL_METRICS = INTRUSIVE_METRICS + ("dnsmos", "nisqa")

# Scored only when asked for (--metrics): the band above 8 kHz exists only in files above 16 kHz,
# and a 16 kHz corpus would have every file reported unscorable for it.
ON_REQUEST = ("lsd",)

# Metrics where lower is better: their FLOORS entry is the worst value, a ceiling.
LOWER_IS_BETTER = ("lsd",)

INTRUSIVE_FUNCTIONS = {"pesq": metrics.pesq_wb, "estoi": metrics.estoi, "sisdr": metrics.si_sdr}

DNSMOS_COLUMNS = ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808")

METRIC_COLUMNS = {"pesq": ("pesq",), "estoi": ("estoi",), "sisdr": ("sisdr",), "lsd": ("lsd",),
                  "dnsmos": DNSMOS_COLUMNS, "nisqa": nisqa.COLUMNS}

FLOORS = {"pesq": metrics.PESQ_FLOOR, "estoi": metrics.ESTOI_FLOOR, "sisdr": metrics.SI_SDR_FLOOR_DB,
          "lsd": metrics.LSD_CEILING, "dnsmos": metrics.MOS_FLOOR, "nisqa": metrics.MOS_FLOOR}

# The rate each metric scores at (the listening page and the README say it): None for the file's.
SCORING_RATES = {"pesq": metrics.SCORING_RATE, "estoi": metrics.SCORING_RATE, "sisdr": metrics.SCORING_RATE,
                 "dnsmos": metrics.SCORING_RATE, "lsd": None, "nisqa": None}

# Modules each metric imports. speechmos imports onnxruntime, librosa and requests without
# declaring any of them as dependencies, so they are checked here too; torchmetrics' NISQA
# needs librosa and requests as well.
METRIC_BACKENDS = {
    "pesq": ("pesq",),
    "estoi": ("pystoi",),
    "sisdr": (),
    "lsd": (),
    "dnsmos": ("speechmos", "onnxruntime", "librosa", "requests"),
    "nisqa": ("torchmetrics", "librosa", "requests"),
}

# Exact rational seconds, so that a difference of exactly 10 ms is not rejected by rounding.
MAX_LENGTH_DIFFERENCE = Fraction(1, 100)


class EvaluationError(UsageError):
    """An input problem the user has to fix: a usage error (exit 2)."""


@dataclass(frozen=True)
class FileTask:
    """One relative path to score for every system; small and picklable for worker processes."""

    relative_path: str
    clean_root: Optional[str]
    system_roots: Tuple[Tuple[str, str], ...]
    metrics: Tuple[str, ...]
    # The system whose file (the noisy input) sets the level near-silence is judged by where the
    # file has no usable clean reference; None: the nominal speech level.
    level_from: Optional[str] = None


def _missing_backends(metric: str) -> List[str]:
    """Modules a metric needs that are not installed (looked up without importing them)."""
    modules = METRIC_BACKENDS[metric]
    return [module for module in modules if importlib.util.find_spec(module) is None]


def _default_metrics(has_clean: bool) -> Tuple[str, ...]:
    """Every metric the inputs allow and whose back-end is installed; skipped ones are logged."""
    chosen = []
    for metric in ALL_METRICS:
        if metric in ON_REQUEST or (metric in INTRUSIVE_METRICS and not has_clean):
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
    """Result column names: one per metric, four for DNSMOS, five for NISQA."""
    return [column for name in metric_names for column in METRIC_COLUMNS[name]]


@dataclass(frozen=True)
class Signal:
    """One file as the metrics take it: mono, at 16 kHz and at its own rate."""

    at_16k: np.ndarray
    native: np.ndarray
    rate: int


def load_mono(path: str) -> Signal:
    """Read a file as mono float, at the wide-band metrics' rate and at its own."""
    audio, sample_rate = load_audio(path)
    mono = to_mono(audio)
    return Signal(resample(mono, sample_rate, metrics.SCORING_RATE), mono, sample_rate)


# The reason a file that is not there gets, in per_file.csv's `failed` column and the logs.
MISSING = "missing"


def read_signal(path: str) -> Tuple[Optional[Signal], str]:
    """`load_mono`, or None and why the file cannot be scored: MISSING, or the reader's words
    (unreadable, empty, NaN or infinite samples). One file's problem never stops a run: whose
    failure it is decides what it costs (see the module's docstring)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return None, MISSING
    except OSError as exc:  # e.g. inside a folder without search permission
        return None, f"cannot read ({exc.strerror or exc})"
    try:
        return load_mono(path), ""
    except AudioError as exc:
        message = str(exc)  # "<path>: <problem>": the path is said where the reason is shown
        return None, message[len(path) + 2:] if message.startswith(f"{path}: ") else message


def _duration(path: str) -> Optional[Fraction]:
    """Exact duration of a file in seconds, from its header only; None when the file is missing
    or its header unreadable (scoring reports it as that file's failure)."""
    try:
        frames, sample_rate, _ = audio_info(path)
    except AudioError:
        return None
    return Fraction(frames, sample_rate)


def check_lengths(clean_root: str, system_roots: Dict[str, str], files: Sequence[str]) -> None:
    """Fail before any scoring when a degraded file's duration is off its reference by > 10 ms.

    Such a gap means misaligned or wrongly paired files, which would give meaningless scores;
    smaller gaps (codec or resampler padding) are trimmed away during scoring. A pair with a
    missing or unreadable file is left to scoring, which counts it as a failure.
    """
    for relative_path in files:
        reference = os.path.join(clean_root, relative_path)
        reference_duration = _duration(reference)
        for root in system_roots.values():
            degraded = os.path.join(root, relative_path)
            duration = _duration(degraded)
            if reference_duration is None or duration is None:
                continue
            difference = abs(duration - reference_duration)
            if difference > MAX_LENGTH_DIFFERENCE:
                raise EvaluationError(
                    f"{reference} and {degraded} differ in length by "
                    f"{float(difference) * 1000:.1f} ms (more than 10 ms allowed)"
                )


def _compute_metric(
    name: str, signal: Signal, reference: Optional[Signal]
) -> Dict[str, float]:
    """One metric's columns for one signal; intrusive ones get equal-length signals."""
    if name == "dnsmos":
        scores = metrics.dnsmos(signal.at_16k)
        return {f"dnsmos_{key.lower()}": value for key, value in scores.items()}
    if name == "nisqa":
        return nisqa.scores(signal.native, signal.rate)
    if name == "lsd":
        degraded = resample(signal.native, signal.rate, reference.rate)
        length = min(reference.native.size, degraded.size)
        return {name: metrics.lsd_high(reference.native[:length], degraded[:length], reference.rate)}
    length = min(reference.at_16k.size, signal.at_16k.size)
    return {name: INTRUSIVE_FUNCTIONS[name](reference.at_16k[:length], signal.at_16k[:length])}


def _at_least_floor(name: str, scores: Dict[str, float]) -> Tuple[Dict[str, float], List[str]]:
    """The scores with every undefined (NaN) or worse one set to the metric's floor (for a
    metric in LOWER_IS_BETTER: its ceiling), and the columns that were."""
    floor = FLOORS[name]
    if name in LOWER_IS_BETTER:
        floored = [column for column, value in scores.items() if not value <= floor]
    else:
        floored = [column for column, value in scores.items() if not value >= floor]
    return {column: floor if column in floored else value for column, value in scores.items()}, floored


def _by_reason(reasons: Dict[str, str]) -> str:
    """'pesq, sisdr (the scored signal is silent); estoi (...)' from {metric: reason}."""
    names: Dict[str, List[str]] = {}
    for name, reason in reasons.items():
        names.setdefault(reason, []).append(name)
    return "; ".join(f"{', '.join(group)} ({reason})" for reason, group in names.items())


def score_signal(
    signal: Signal, reference: Optional[Signal], metric_names: Sequence[str]
) -> Tuple[Dict[str, float], Dict[str, str], Dict[str, str]]:
    """One signal's scores (NaN where a metric is undefined for the signal), {metric: why} for
    those, and {metric: why} for the metrics undefined for the file itself (no scores)."""
    scores: Dict[str, float] = {}
    undefined: Dict[str, str] = {}
    unscorable: Dict[str, str] = {}
    for name in metric_names:
        try:
            values = _compute_metric(name, signal, reference)
        except metrics.UnscorableFile as exc:
            unscorable[name] = str(exc)
            continue
        except metrics.MetricError as exc:
            undefined[name] = str(exc)
            values = dict.fromkeys(METRIC_COLUMNS[name], math.nan)
        scores.update(values)
    return scores, undefined, unscorable


def _reference_level(
    reference: Optional[Signal], signals: Dict[str, Tuple[Optional[Signal], str]], level_from: Optional[str]
) -> Tuple[float, str]:
    """The level near-silence is judged by, and its name: the clean reference's; where it is
    missing, unreadable or silent, the noisy input's (`level_from`); else the nominal level."""
    noisy = signals[level_from][0] if level_from else None
    for signal, name in ((reference, "the clean reference's level"), (noisy, f"the {level_from} input's level")):
        level = -math.inf if signal is None else metrics.level_db(signal.at_16k)
        if math.isfinite(level):
            return level, name
    level = metrics.NOMINAL_SPEECH_LEVEL_DB
    return level, f"the nominal speech level ({level:g} dB re full scale)"


def score_file(task: FileTask) -> List[Dict[str, object]]:
    """Rows for one relative path, one per system: file, system, the metric columns, `floored`
    and `not_scored` (lists of columns) and `failed` (why the output could not be scored at all,
    '' when it could). Runs in a worker process. NISQA scores with the weights loaded into the
    process beforehand (`score_all` sees to it)."""
    reference = None
    unscorable: Dict[str, str] = {}
    if task.clean_root:
        reference, problem = read_signal(os.path.join(task.clean_root, task.relative_path))
        if reference is None:
            unscorable = {name: f"no usable clean reference: {problem}"
                          for name in task.metrics if name in INTRUSIVE_METRICS}
    signals = {system: read_signal(os.path.join(root, task.relative_path)) for system, root in task.system_roots}
    level, level_name = _reference_level(reference, signals, task.level_from)
    rows = []
    undefined: Dict[str, Dict[str, str]] = {}
    for system, _ in task.system_roots:
        signal, failure = signals[system]
        if signal is not None:
            failure = metrics.near_silence(signal.at_16k, level, level_name) or ""
        if failure:
            # Nothing of this output is scored: every metric gets its floor below, unless the
            # file turns out unscorable for it (then no system is scored on it).
            scores = dict.fromkeys(metric_columns(task.metrics), math.nan)
            undefined[system] = {}
        else:
            remaining = [name for name in task.metrics if name not in unscorable]
            scores, undefined[system], found = score_signal(signal, reference, remaining)
            unscorable.update(found)
        rows.append({"file": task.relative_path, "system": system, **scores, "failed": failure})
    # A metric undefined for the file is left out for every system, also those scored before
    # the problem showed, so that every system's mean is over the same files.
    left_out = metric_columns([name for name in task.metrics if name in unscorable])
    for row in rows:
        floored = []
        for name in task.metrics:
            if name not in unscorable:
                values, at_floor = _at_least_floor(name, {c: row[c] for c in METRIC_COLUMNS[name]})
                row.update(values)
                floored.extend(at_floor)
        row.update(dict.fromkeys(left_out, math.nan), floored=floored, not_scored=left_out)
        if row["failed"]:
            logger.warning("%s: %s: every score set to the floor: %s", row["system"], task.relative_path,
                           row["failed"])
        reasons = {k: v for k, v in undefined[row["system"]].items() if k not in unscorable}
        if reasons:
            logger.warning("%s: %s: set to the floor: %s", row["system"], task.relative_path, _by_reason(reasons))
    if unscorable:
        logger.warning("%s: not scored for any system: %s", task.relative_path, _by_reason(unscorable))
    return rows


def _start_worker(nisqa_weights: str) -> None:
    """Runs once in each worker process of a run that scores NISQA (the other metrics need no
    torch): one torch thread, since the workers already share out the cores and NISQA's network
    would otherwise start a thread per core in every worker, and the NISQA weights, loaded once
    here (a no-op in a forked worker, which inherits the parent's)."""
    import torch

    torch.set_num_threads(1)
    nisqa.load_weights(nisqa_weights)


def score_all(
    tasks: Sequence[FileTask], workers: int, nisqa_weights: Optional[str] = None, show_progress: bool = True
) -> List[Dict[str, object]]:
    """Score every task, with a progress bar unless not `show_progress`; workers == 1 stays
    in-process (easy to debug).

    `nisqa_weights` (required when a task scores NISQA) are loaded once per process: here for
    one worker (a no-op when the caller already loaded them), else by each worker as it starts.
    """
    from tqdm import tqdm

    rows = []
    with tqdm(total=len(tasks), desc="scoring", unit="file", disable=not show_progress) as progress:
        if workers == 1:
            if nisqa_weights is not None:
                nisqa.load_weights(nisqa_weights)
            for task in tasks:
                rows.extend(score_file(task))
                progress.update()
            return rows
        setup = dict(initializer=_start_worker, initargs=(nisqa_weights,)) if nisqa_weights is not None else {}
        with ProcessPoolExecutor(max_workers=workers, **setup) as pool:
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
