"""The written results of an evaluation: per-file CSV, summary statistics with 95% confidence
intervals as Markdown and JSON. Every file is written atomically."""

import csv
import io
import json
import math
import os
from typing import Dict, Sequence

from ..audio.io import write_text_atomic
from . import metrics


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
