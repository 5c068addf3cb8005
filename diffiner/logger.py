"""Training metrics: accumulated over a log interval, then written in several formats at once.

Values are collected with `log` (keep the latest) or `log_mean` (average over the interval)
and written by `dump`: a table on stdout, `progress.csv` and `progress.jsonl` in the log
folder, and TensorBoard events when the tensorboard package is installed. Means are taken
over all ranks of a distributed job; only rank 0 writes anything.

The CSV and JSON-lines files are appended to, so a resumed run continues the same files.
When a key appears that the CSV header lacks, the file is rewritten with the wider header
(earlier rows get empty cells), as guided-diffusion's logger does.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, TextIO, Union

from . import dist_util

logger = logging.getLogger(__name__)

Number = Union[int, float]


class MetricsLogger:
    """Key/value metrics per log interval.

    :param log_dir: folder for progress.csv / progress.jsonl / TensorBoard; None: stdout only.
    :param columns: keys expected in every row, in this order; they fix the CSV header up
        front so that it rarely needs rewriting.
    :param enabled: whether this process writes; default: only rank 0.
    """

    def __init__(self, log_dir: Optional[str], columns: Sequence[str] = (), enabled: Optional[bool] = None,
                 stdout: Optional[TextIO] = None, tensorboard: bool = True):
        self.enabled = dist_util.is_main() if enabled is None else enabled
        self._latest: Dict[str, Number] = {}
        self._sums: Dict[str, float] = {}
        self._counts: Dict[str, float] = {}
        self._writers: List = []
        if not self.enabled:
            return
        self._writers.append(TableWriter(stdout or sys.stdout))
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self._writers.append(CSVWriter(os.path.join(log_dir, "progress.csv"), columns))
            self._writers.append(JSONLinesWriter(os.path.join(log_dir, "progress.jsonl")))
            if tensorboard:
                writer = TensorBoardWriter.create(log_dir)
                if writer is not None:
                    self._writers.append(writer)

    def log(self, key: str, value: Number) -> None:
        """Record `value` for `key`; the last value of the interval is written."""
        self._latest[key] = value

    def log_mean(self, key: str, value: float, count: float = 1.0) -> None:
        """Add `count` observations whose mean is `value`; their overall mean is written."""
        self._sums[key] = self._sums.get(key, 0.0) + float(value) * count
        self._counts[key] = self._counts.get(key, 0.0) + count

    def dump(self, step: int) -> Dict[str, Number]:
        """Write the interval's values and start a new interval; returns what was written.

        In a distributed job every rank must call it (the means are combined across ranks).
        """
        sums, counts = self._sums, self._counts
        if dist_util.is_distributed():
            totals_sums: Dict[str, float] = {}
            totals_counts: Dict[str, float] = {}
            for rank_sums, rank_counts in dist_util.all_gather_objects((sums, counts)):
                for key, value in rank_sums.items():
                    totals_sums[key] = totals_sums.get(key, 0.0) + value
                    totals_counts[key] = totals_counts.get(key, 0.0) + rank_counts[key]
            sums, counts = totals_sums, totals_counts
        values: Dict[str, Number] = dict(self._latest)
        values.update({key: sums[key] / counts[key] for key in sorted(sums) if counts[key]})
        self._latest, self._sums, self._counts = {}, {}, {}
        for writer in self._writers:
            writer.write(step, values)
        return values

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers = []


def _format(value: Number) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class TableWriter:
    """A boxed key/value table, as guided-diffusion prints it."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, step: int, values: Dict[str, Number]) -> None:
        if not values:
            return
        cells = [(key, _format(value)) for key, value in values.items()]
        key_width = max(len(k) for k, _ in cells)
        value_width = max(len(v) for _, v in cells)
        rule = "-" * (key_width + value_width + 7)
        lines = [rule] + [f"| {k:<{key_width}} | {v:<{value_width}} |" for k, v in cells] + [rule]
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()

    def close(self) -> None:
        """The stream belongs to the caller."""


class CSVWriter:
    """progress.csv: one row per dump, header widened (file rewritten) when new keys appear."""

    def __init__(self, path: str, columns: Sequence[str] = ()):
        self.path = path
        self.columns: List[str] = []
        if os.path.exists(path) and os.path.getsize(path):
            with open(path, newline="") as f:
                self.columns = next(csv.reader(f), [])
        wanted = [c for c in columns if c not in self.columns]
        if wanted:
            self._widen(wanted)

    def write(self, step: int, values: Dict[str, Number]) -> None:
        new = [k for k in values if k not in self.columns]
        if new:
            self._widen(new)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, restval="").writerow(values)

    def _widen(self, new_columns: List[str]) -> None:
        rows = []
        if os.path.exists(self.path):
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
        self.columns = self.columns + new_columns
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def close(self) -> None:
        """Every write opens and closes the file: nothing is held open."""


class JSONLinesWriter:
    """progress.jsonl: one JSON object per dump; non-finite numbers become null (strict JSON)."""

    def __init__(self, path: str):
        self.file = open(path, "a")

    def write(self, step: int, values: Dict[str, Number]) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in values.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardWriter:
    """Scalars for TensorBoard, available only when the tensorboard package is installed."""

    def __init__(self, summary_writer):
        self.summary_writer = summary_writer

    @classmethod
    def create(cls, log_dir: str) -> Optional["TensorBoardWriter"]:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as exc:  # ImportError, or a tensorboard/protobuf mismatch failing on import
            logger.info("TensorBoard logging off (%s: %s)", type(exc).__name__, exc)
            return None
        return cls(SummaryWriter(log_dir=os.path.join(log_dir, "tb")))

    def write(self, step: int, values: Dict[str, Number]) -> None:
        for key, value in values.items():
            self.summary_writer.add_scalar(key, value, step)
        self.summary_writer.flush()

    def close(self) -> None:
        self.summary_writer.close()
