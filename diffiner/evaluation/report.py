"""The written results of an evaluation: per-file CSV, summary statistics with 95% confidence
intervals as Markdown and JSON. Every file is written atomically.

Besides the scores, each says what was not plain measurement: scores set to their metric's floor
(`floored`, a system's failure), outputs that could not be scored at all (`failed`: missing,
unreadable, NaN samples, silent or near-silent; every score floored), files a metric could not
score for any system (`not_scored`) and folders that could not be listed; see scoring.py for the
rule.
"""

import csv
import io
import json
import math
import os
from typing import Dict, List, Mapping, Sequence

from ..audio.io import write_text_atomic
from . import metrics

NOTE_COLUMNS = ("floored", "not_scored")  # lists of columns, written space-separated

# Files named per system in the note on failed outputs; the rest are counted (per_file.csv has all).
MAX_NAMED_FAILURES = 10


def summarize(
    rows: Sequence[Dict[str, object]], systems: Sequence[str], columns: Sequence[str]
) -> Dict[str, Dict[str, Dict[str, float]]]:
    """system -> column -> {mean, ci95, n, floored, not_scored}: the mean is over n files, the
    same for every system; `floored` of them were set to the floor; `not_scored` files were left
    out for every system."""
    summary = {}
    for system in systems:
        own = [r for r in rows if r["system"] == system]
        summary[system] = {}
        for column in columns:
            values = [r[column] for r in own if math.isfinite(r[column])]
            mean, half_width = metrics.confidence_interval(values)
            summary[system][column] = {
                "mean": mean, "ci95": half_width, "n": len(values),
                "floored": sum(column in r["floored"] for r in own), "not_scored": len(own) - len(values),
            }
    for column in columns:
        counts = {summary[system][column]["n"] for system in systems}
        if len(counts) > 1:  # scoring.score_file guarantees this; a mean over other files misleads
            raise RuntimeError(f"{column} is averaged over different numbers of files per system: {counts}")
    return summary


def floored_files(rows: Sequence[Dict[str, object]], systems: Sequence[str]) -> Dict[str, int]:
    """system -> number of its files with at least one score set to the floor."""
    return {system: sum(1 for r in rows if r["system"] == system and r["floored"]) for system in systems}


def format_cell(stats: Dict[str, float], num_files: int) -> str:
    """'mean ± ci95' for the table, noting n when some files could not be scored."""
    if stats["n"] == 0:
        return "n/a"
    text = f"{stats['mean']:.3f}"
    if math.isfinite(stats["ci95"]):
        text += f" ± {stats['ci95']:.3f}"
    if stats["n"] != num_files:
        text += f" (n={stats['n']})"
    return text


def _failure_note(rows: Sequence[Dict[str, object]]) -> List[str]:
    """The note naming the outputs that could not be scored at all, per system (none: no note)."""
    failures: Dict[str, List[str]] = {}
    for row in rows:
        if row["failed"]:
            failures.setdefault(row["system"], []).append(f"{row['file']} ({row['failed']})")
    if not failures:
        return []
    parts = []
    for system, named in failures.items():
        more = len(named) - MAX_NAMED_FAILURES
        parts.append(f"{system}: {', '.join(named[:MAX_NAMED_FAILURES])}" + (f" and {more} more" if more > 0 else ""))
    return [f"Outputs that could not be scored at all, every score floored (per_file.csv: failed): {'; '.join(parts)}."]


def summary_notes(
    summary: Dict[str, Dict[str, Dict[str, float]]], columns: Sequence[str], num_files: int,
    floors: Dict[str, float], rows: Sequence[Dict[str, object]], unlisted: Mapping[str, str],
) -> List[str]:
    """The sentences under the summary table (Markdown and the listening page share them): what
    the numbers are, what the floors are, which outputs failed, which files were not scored and
    which folders could not be listed (`unlisted`: {folder: reason})."""
    notes = [f"Mean ± half-width of the 95% confidence interval (Student's t) over {num_files} file(s), "
             "every file found in any folder, for every system."]
    floor_text = ", ".join(f"{name} {value:g}{' dB' if name == 'sisdr' else ''}" for name, value in floors.items())
    notes.append(
        f"floored: files on which a score of the system was set to its metric's floor ({floor_text}): the output "
        f"was missing, unreadable, held NaN samples or was silent or near-silent (more than "
        f"{metrics.NEAR_SILENCE_DB:g} dB below the clean reference's level; without one, the noisy input's, else "
        f"{metrics.NOMINAL_SPEECH_LEVEL_DB:g} dB re full scale), the metric was undefined for it, or the score was "
        "lower; per metric in summary.json, per file in per_file.csv."
    )
    notes.extend(_failure_note(rows))
    first = next(iter(summary.values()), {})
    left_out = [f"{c} {first[c]['not_scored']}" for c in columns if first[c]["not_scored"]]
    if left_out:
        notes.append(
            f"Not scored for any system, as undefined for the file itself (e.g. a missing, silent or too short "
            f"clean reference), file(s) per column: {', '.join(left_out)}; listed in per_file.csv (not_scored)."
        )
    if unlisted:
        folders = ", ".join(f"{folder} ({reason})" for folder, reason in unlisted.items())
        notes.append(f"Folders that could not be listed: {folders}. A file found elsewhere was still scored in "
                     "them by its path; a file only there is unknown to this evaluation.")
    return notes


def format_summary_markdown(
    summary: Dict[str, Dict[str, Dict[str, float]]], columns: Sequence[str], num_files: int,
    floored: Dict[str, int], floors: Dict[str, float], rows: Sequence[Dict[str, object]],
    unlisted: Mapping[str, str],
) -> str:
    """Markdown table: one row per system, one column per metric, then the system's floored
    files; notes below (`summary_notes`) say what was not plain measurement."""
    lines = [
        "| system | " + " | ".join(columns) + " | floored |",
        "| --- | " + " | ".join("---:" for _ in columns) + " | ---: |",
    ]
    for system, per_column in summary.items():
        cells = [format_cell(per_column[c], num_files) for c in columns]
        lines.append(f"| {system} | " + " | ".join(cells) + f" | {floored[system]} |")
    lines.append("")
    lines.extend(summary_notes(summary, columns, num_files, floors, rows, unlisted))
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
    """CSV text with columns file, system, the metric columns, then `floored` and `not_scored`
    (the row's columns set to the floor / left out for every system, space-separated) and
    `failed` (why the output could not be scored at all; empty when it could)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["file", "system", *columns, *NOTE_COLUMNS, "failed"],
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, **{note: " ".join(row[note]) for note in NOTE_COLUMNS}})
    return buffer.getvalue()


def write_outputs(
    output_dir: str, rows: Sequence[Dict[str, object]], columns: Sequence[str],
    summary: Dict[str, Dict[str, Dict[str, float]]], markdown: str,
) -> None:
    """per_file.csv, summary.md and summary.json, each written atomically."""
    write_text_atomic(os.path.join(output_dir, "per_file.csv"), format_per_file_csv(rows, columns))
    write_text_atomic(os.path.join(output_dir, "summary.md"), markdown)
    write_text_atomic(
        os.path.join(output_dir, "summary.json"), json.dumps(_json_ready(summary), indent=2) + "\n"
    )
