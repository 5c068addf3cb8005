"""An evaluation run: list the folders, check the lengths, score, summarize, write and plot.

Outputs in the output folder: per_file.csv, summary.md, summary.json, spectrograms.png and the
listening page report.html (with its images, and copies of the audio if asked, under report_files/).
"""

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ..audio.folders import check_output_folder, prepare_output_folder, scan_audio_files
from .listening_page import PageData, write_listening_page
from .plots import ovrl_ranking, plot_spectrograms
from . import nisqa
from .report import floored_files, format_summary_markdown, summarize, write_outputs
from .scoring import (FLOORS, EvaluationError, FileTask, check_lengths, metric_columns, resolve_metrics,
                      score_all)

logger = logging.getLogger(__name__)


CLEAN = "clean"

NOISY = "noisy"


@dataclass(frozen=True)
class EvaluationSetup:
    """What to score and where to write it.

    `systems` keeps the command-line order, which decides the table rows and which systems the
    default spectrogram choice compares. `metrics` None means every metric the inputs allow
    (NISQA among them only when its weights are here); naming NISQA there allows downloading
    its weights. `nisqa_weights` is a local nisqa.tar to use instead of torchmetrics' cache.
    `report_copy_audio` copies every played file beside the listening page instead of linking
    to it where it lies.
    """

    systems: Dict[str, str]
    output_dir: str = "eval_results"
    clean: Optional[str] = None
    noisy: Optional[str] = None
    metrics: Optional[Sequence[str]] = None
    workers: int = 1
    plot_files: Optional[Sequence[str]] = None
    num_plot_files: int = 2
    nisqa_weights: Optional[str] = None
    report_copy_audio: bool = False
    progress: bool = True  # progress bars while scoring and drawing

    def scored_systems(self) -> Dict[str, str]:
        """Every scored folder by name: noisy first (when given), then the systems."""
        noisy = {NOISY: self.noisy} if self.noisy else {}
        return {**noisy, **self.systems}


@dataclass
class EvaluationResult:
    """What a run produced, for the caller to report: paths are relative to the input folders."""

    files: List[str]
    missing: Dict[str, List[str]]
    summary: Dict[str, Dict[str, Dict[str, float]]]
    markdown: str
    plotted_files: List[str]
    report_path: str


def _comparison_pair(setup: EvaluationSetup) -> Optional[Tuple[str, str]]:
    """(baseline, target) for the default spectrogram choice: first vs last system, or noisy
    vs the only system, since that is the change a refiner is judged by."""
    names = list(setup.systems)
    if len(names) >= 2:
        return names[0], names[-1]
    if setup.noisy:
        return NOISY, names[-1]
    return None


def _with_nisqa_weights(
    setup: EvaluationSetup, metric_names: Tuple[str, ...]
) -> Tuple[Tuple[str, ...], Optional[str]]:
    """The metrics to compute and the checked NISQA weights (None without NISQA).

    NISQA is left out (with one log line) when its weights are neither given nor cached and
    cannot be downloaded; that is an error only when no other metric is left.
    """
    if "nisqa" not in metric_names:
        if setup.nisqa_weights is not None:
            raise EvaluationError(
                f"--nisqa-weights is given but nisqa is not among the metrics ({', '.join(metric_names)})"
            )
        return metric_names, None
    weights = nisqa.find_weights(setup.nisqa_weights, download=setup.metrics is not None)
    if weights is None:
        metric_names = tuple(name for name in metric_names if name != "nisqa")
        if not metric_names:
            raise EvaluationError("no metric left to compute: NISQA has no weights (see the line above)")
    return metric_names, weights


def list_files(sources: Dict[str, str], output_dir: str) -> Tuple[List[str], Dict[str, List[str]], Dict[str, str]]:
    """The files every system is scored over: every audio file found under any folder, sorted;
    for each folder the files it lacks (not counting those below a folder of it that could not be
    listed), and the folders that could not be listed ({path: reason}).

    No folder is listed below another one, nor below the output folder (the refiner writes
    inside the processed folder, and evaluation compares both). Raises FileNotFoundError when no
    folder holds an audio file.
    """
    exclude = [output_dir, *sources.values()]
    listings = {name: scan_audio_files(root, exclude) for name, root in sources.items()}
    files = sorted(set().union(*(listing.files for listing in listings.values())))
    if not files:
        described = ", ".join(f"{name}={root}" for name, root in sources.items())
        raise FileNotFoundError(f"no audio file (.wav/.flac) under any of: {described}")
    missing, unlisted = {}, {}
    for name, listing in listings.items():
        unlisted.update(listing.unreadable)
        blind = tuple(os.path.relpath(path, sources[name]) + os.sep for path in listing.unreadable)
        found = set(listing.files)
        missing[name] = [f for f in files if f not in found and not f.startswith(blind)]
    for folder, reason in unlisted.items():
        logger.warning("%s: cannot list this folder (%s); files found elsewhere are scored in it by their path",
                       folder, reason)
    return files, missing, unlisted


def evaluate(setup: EvaluationSetup) -> EvaluationResult:
    """List, check, score, summarize, plot and write the listening page; raises EvaluationError,
    NisqaWeightsError, AudioError or FileNotFoundError (no audio file in any folder, missing
    folder) for inputs the user must fix, and FolderError for an output folder that cannot be
    created or written."""
    metric_names = resolve_metrics(setup.metrics, setup.clean is not None)
    systems = setup.scored_systems()
    sources = {**({CLEAN: setup.clean} if setup.clean else {}), **systems}
    check_output_folder(sources, setup.output_dir, "diffiner-evaluate")
    files, missing, unlisted = list_files(sources, setup.output_dir)
    _validate_plot_files(setup.plot_files, files)
    if setup.clean:
        check_lengths(setup.clean, systems, files)
    metric_names, nisqa_weights = _with_nisqa_weights(setup, metric_names)
    # Created once every input is checked; one that cannot be written is refused (FolderError)
    # before anything is scored.
    prepare_output_folder(setup.output_dir)

    level_from = NOISY if setup.noisy else None
    tasks = [FileTask(f, setup.clean, tuple(systems.items()), metric_names, level_from) for f in files]
    rows = score_all(tasks, max(1, min(setup.workers, len(tasks))), nisqa_weights, setup.progress)
    order = {name: index for index, name in enumerate(systems)}
    rows.sort(key=lambda r: (r["file"], order[r["system"]]))

    columns = metric_columns(metric_names)
    summary = summarize(rows, list(systems), columns)
    floors = {name: FLOORS[name] for name in metric_names}
    floored = floored_files(rows, list(systems))
    markdown = format_summary_markdown(summary, columns, len(files), floored, floors, rows, unlisted)
    write_outputs(setup.output_dir, rows, columns, summary, markdown)
    page = PageData(files, sources, CLEAN if setup.clean else None, rows, metric_names, columns, summary, floored,
                    unlisted)
    report_path = write_listening_page(setup.output_dir, page, setup.workers, setup.report_copy_audio,
                                       setup.progress)

    plotted = choose_plot_files(rows, files, setup)
    if plotted:
        plot_spectrograms(os.path.join(setup.output_dir, "spectrograms.png"), plotted, sources)
    else:
        logger.info("no file chosen for plotting; spectrograms.png not written")
    missing = {name: paths for name, paths in missing.items() if paths}
    return EvaluationResult(files, missing, summary, markdown, plotted, report_path)


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
    ranked = ovrl_ranking(rows, *pair)
    chosen = []
    for extremes in zip(ranked, reversed(ranked)):
        chosen.extend(f for f in extremes if f not in chosen)
    return chosen[:count] or list(files[:count])


def _validate_plot_files(plot_files: Optional[Sequence[str]], files: Sequence[str]) -> None:
    """Fail before scoring when --plot-files names a file that is not scored."""
    known = set(files)
    unknown = [f for f in plot_files or () if f not in known]
    if unknown:
        raise EvaluationError(f"--plot-files names file(s) found in no folder: {', '.join(unknown)}")
