"""The written results of an evaluation: per-file CSV, summary statistics with 95% confidence
intervals as Markdown and JSON. Every file is written atomically.

Besides the scores, each says what was not plain measurement: scores set to their metric's floor
(`floored`, a system's failure) and files a metric could not score for any system (`not_scored`);
see scoring.py for the rule.
"""

import csv
import io
import json
import math
import os
from typing import Dict, List, Sequence

from ..audio.io import write_text_atomic
from . import metrics

NOTE_COLUMNS = ("floored", "not_scored")


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


def summary_notes(
    summary: Dict[str, Dict[str, Dict[str, float]]], columns: Sequence[str], num_files: int,
    floors: Dict[str, float],
) -> List[str]:
    """The sentences under the summary table (Markdown and the listening page share them): what
    the numbers are, what the floors are and which files were not scored."""
    notes = [f"Mean ± half-width of the 95% confidence interval (Student's t) over {num_files} file(s)."]
    floor_text = ", ".join(f"{name} {value:g}{' dB' if name == 'sisdr' else ''}" for name, value in floors.items())
    notes.append(
        f"floored: files on which a score of the system was set to its metric's floor ({floor_text}): "
        "the metric was undefined for the output (e.g. silent), or the score was lower; per metric in "
        "summary.json, per file in per_file.csv."
    )
    first = next(iter(summary.values()), {})
    left_out = [f"{c} {first[c]['not_scored']}" for c in columns if first[c]["not_scored"]]
    if left_out:
        notes.append(
            f"Not scored for any system, as undefined for the file itself (e.g. a silent or too short clean "
            f"reference), file(s) per column: {', '.join(left_out)}; listed in per_file.csv (not_scored)."
        )
    return notes


def format_summary_markdown(
    summary: Dict[str, Dict[str, Dict[str, float]]], columns: Sequence[str], num_files: int,
    floored: Dict[str, int], floors: Dict[str, float],
) -> str:
    """Markdown table: one row per system, one column per metric, then the system's floored
    files; notes below say what the floors are and which files were not scored."""
    lines = [
        "| system | " + " | ".join(columns) + " | floored |",
        "| --- | " + " | ".join("---:" for _ in columns) + " | ---: |",
    ]
    for system, per_column in summary.items():
        cells = [format_cell(per_column[c], num_files) for c in columns]
        lines.append(f"| {system} | " + " | ".join(cells) + f" | {floored[system]} |")
    lines.append("")
    lines.extend(summary_notes(summary, columns, num_files, floors))
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
    (the row's columns set to the floor / left out for every system, space-separated)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["file", "system", *columns, *NOTE_COLUMNS], lineterminator="\n")
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
