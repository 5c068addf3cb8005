"""Training metrics: accumulated over a log interval, then written in several formats at once.

Values are collected with `log` (keep the latest) or `log_mean` (average over the interval)
and written by `dump`: a table on stdout (unless `table=False`; written with tqdm.write, so that
it appears above a progress bar instead of inside its line), `progress.csv` and `progress.jsonl` in the log
folder, and TensorBoard events when the tensorboard package is installed. Means are taken
over all ranks of a distributed job; only rank 0 writes anything.

The CSV and JSON-lines files are appended to, so a resumed run continues the same files; the
rows of steps after the resumed one (logged by the interrupted run after its last checkpoint,
and about to be trained again) are dropped first, so every step has one row. Training started
afresh resumes step 0 in this sense: it drops the rows of an earlier attempt in its folder (one
killed before its first checkpoint, say). When a key appears that the CSV header lacks, the file
is rewritten with the wider header (earlier rows get empty cells), as guided-diffusion's logger
does. Rewrites are atomic. Both files are opened by `audio.io.open_regular`: one that is not
a regular file (a FIFO would block the open for ever) is refused with ValueError naming it.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, TextIO, Tuple, Union

from tqdm.auto import tqdm

from . import dist_util
from .audio.io import atomic_output, open_regular

logger = logging.getLogger(__name__)

Number = Union[int, float]


class MetricsLogger:
    """Key/value metrics per log interval.

    :param log_dir: folder for progress.csv / progress.jsonl / TensorBoard; None: stdout only.
    :param columns: keys expected in every row, in this order; they fix the CSV header up
        front so that it rarely needs rewriting.
    :param enabled: whether this process writes; default: only rank 0.
    :param resume_step: the step training continues from (0 for a fresh start): rows of later
        steps are dropped. None: every row is kept.
    :param table: print each dump as a table on `stdout` (default sys.stdout).
    """

    def __init__(self, log_dir: Optional[str], columns: Sequence[str] = (), enabled: Optional[bool] = None,
                 stdout: Optional[TextIO] = None, tensorboard: bool = True, resume_step: Optional[int] = None,
                 table: bool = True):
        self.enabled = dist_util.is_main() if enabled is None else enabled
        self._latest: Dict[str, Number] = {}
        self._sums: Dict[str, float] = {}
        self._counts: Dict[str, float] = {}
        self._writers: List = []
        if not self.enabled:
            return
        if table:
            self._writers.append(TableWriter(stdout or sys.stdout))
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self._writers.append(CSVWriter(os.path.join(log_dir, "progress.csv"), columns, resume_step))
            self._writers.append(JSONLinesWriter(os.path.join(log_dir, "progress.jsonl"), resume_step))
            if tensorboard:
                writer = TensorBoardWriter.create(log_dir, resume_step)
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
    """A boxed key/value table, as guided-diffusion prints it; whole lines above any progress bar
    that shows on the same terminal (tqdm.write clears the bar, writes, and draws it again)."""

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
        tqdm.write("\n".join(lines), file=self.stream)
        self.stream.flush()

    def close(self) -> None:
        """The stream belongs to the caller."""


def _after(row_step, resume_step: Optional[int]) -> bool:
    """Whether a row of `row_step` (a number, text, or None) was logged after `resume_step`."""
    if resume_step is None or row_step in (None, ""):
        return False
    try:
        return int(row_step) > resume_step
    except (TypeError, ValueError):
        return False


class CSVWriter:
    """progress.csv: one row per dump, header widened (file rewritten) when new keys appear."""

    def __init__(self, path: str, columns: Sequence[str] = (), resume_step: Optional[int] = None):
        self.path = path
        self.columns, rows = self._read()
        kept = rows if resume_step is None else [row for row in rows if not _after(row.get("step"), resume_step)]
        if len(kept) < len(rows):
            logger.info("%s: dropped %d row(s) of steps after %d, logged by an earlier run or attempt in this folder",
                        path, len(rows) - len(kept), resume_step)
        wanted = [c for c in columns if c not in self.columns]
        self.columns += wanted
        if wanted or len(kept) < len(rows):
            self._rewrite(kept)

    def write(self, step: int, values: Dict[str, Number]) -> None:
        new = [k for k in values if k not in self.columns]
        if new:
            rows = self._read()[1]
            self.columns += new
            self._rewrite(rows)
        with open_regular(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, restval="").writerow(values)

    def _read(self) -> Tuple[List[str], List[Dict[str, str]]]:
        """(the header, the rows) of the file; ([], []) when it is absent or empty."""
        if not os.path.exists(self.path):
            return [], []
        with open_regular(self.path, "r", newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)

    def _rewrite(self, rows: List[Dict[str, str]]) -> None:
        """Rewrite the file with the header `self.columns` and `rows`."""
        with atomic_output(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)

    def close(self) -> None:
        """Every write opens and closes the file: nothing is held open."""


class JSONLinesWriter:
    """progress.jsonl: one JSON object per dump; non-finite numbers become null (strict JSON)."""

    def __init__(self, path: str, resume_step: Optional[int] = None):
        if resume_step is not None and os.path.exists(path):
            with open_regular(path, "r") as f:
                lines = f.readlines()
            # A line that does not parse was cut by a kill: dropped too.
            kept = [line for line, step in zip(lines, map(_json_step, lines))
                    if step is not None and not _after(step, resume_step)]
            if len(kept) < len(lines):
                with atomic_output(path) as tmp, open(tmp, "w") as f:
                    f.writelines(kept)
        self.file = open_regular(path, "a")

    def write(self, step: int, values: Dict[str, Number]) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in values.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _json_step(line: str) -> Optional[int]:
    """The step of a progress.jsonl line; None when it is not a whole JSON object with a step."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


class TensorBoardWriter:
    """Scalars for TensorBoard, available only when the tensorboard package is installed."""

    def __init__(self, summary_writer):
        self.summary_writer = summary_writer

    @classmethod
    def create(cls, log_dir: str, resume_step: Optional[int] = None) -> Optional["TensorBoardWriter"]:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as exc:  # ImportError, or a tensorboard/protobuf mismatch failing on import
            logger.info("TensorBoard logging off (%s: %s)", type(exc).__name__, exc)
            return None
        purge = None if resume_step is None else resume_step + 1  # TensorBoard hides later events
        return cls(SummaryWriter(log_dir=os.path.join(log_dir, "tb"), purge_step=purge))

    def write(self, step: int, values: Dict[str, Number]) -> None:
        for key, value in values.items():
            self.summary_writer.add_scalar(key, value, step)
        self.summary_writer.flush()

    def close(self) -> None:
        self.summary_writer.close()
