"""Refining a corpus: two folder trees of paired recordings in (or one pair of files), one tree of
refined files out.

The engine behind `diffiner-refine` (scripts/run_refiner.py). Noisy and processed files are
paired by relative path. Files are sorted by the width their spectrogram is padded to, so that
equal widths share batches, and each finished file is written at once (atomically), so an
interrupted run loses nothing already written and a rerun picks up where it stopped.

A file of any length is read, refined and written segment by segment (`stream_pair`,
`Refiner.refine_segments`, `Refiner.stream_output`): what a run holds is a few segments per file
being read ahead, a batch, and the windows being joined, never a whole long file. Under
torchrun/mpiexec every process takes its share of the files (`shard_jobs`).

Whatever goes wrong with one file (unreadable, too different from its partner, an error of the
model on it) is recorded in the run's summary under that file's name and the others go on
(`audio.folders.file_errors`, the one per-file error boundary); a write that fails (disk full)
stops the run, since every file after it would fail the same way.
"""

import itertools
import logging
import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from .audio.folders import REFINE_WRITER, describe_failure, file_errors, output_path, pair_folders
from .audio.records import CHANGED, DONE, UNLISTED, OutputRecord, fingerprint
from .audio import crossover
from .audio.io import (AudioError, BlockWriter, audio_info, check_input_rate, fit_length,
                       fit_stream, load_audio, read_blocks, resample, resample_stream, resampled_length)
from .pipeline import Layout, Refiner, Segment, SegmentDone

logger = logging.getLogger(__name__)

LENGTH_TOLERANCE_S = 0.1  # noisy/processed length difference accepted (and fixed) silently


@dataclass
class FileJob:
    """One pair of recordings on its way through the refiner."""

    rel: str
    noisy_path: str
    processed_path: str
    output_path: str
    width: int = 0  # padded spectrogram width of its segments
    seconds: float = 0.0
    segments: int = 0  # how many segments it is refined in (the progress bar counts them)
    inputs: Dict[str, Dict] = field(default_factory=dict)  # {role: fingerprint}, taken before reading

    def input_paths(self) -> Dict[str, str]:
        """{role: path} of the files the output is made from, as the output record keys them."""
        return {"noisy": self.noisy_path, "processed": self.processed_path}


@dataclass
class RunSummary:
    refined: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)
    redone: List[str] = field(default_factory=list)  # planned again: an input changed since it was refined
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def rtf(self) -> Optional[float]:
        """Wall seconds per second of audio refined; None when nothing was refined."""
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else None

    @classmethod
    def merge(cls, parts: Sequence["RunSummary"], wall_seconds: float) -> "RunSummary":
        """One summary from every process's: files added up, wall time of the whole run."""
        merged = cls(wall_seconds=wall_seconds)
        for part in parts:
            merged.refined += part.refined
            merged.skipped = part.skipped  # every process saw the same finished files
            merged.redone = part.redone
            merged.failed.update(part.failed)
            merged.audio_seconds += part.audio_seconds
        return merged


def plan_jobs(root_noisy: str, root_proc: str, output_dir: str, refiner: Refiner, overwrite: bool,
              summary: RunSummary, record: Optional[OutputRecord] = None) -> List[FileJob]:
    """Pair the files, drop those already refined, and sort the rest by padded width.

    Already refined: `record` (by default the output folder's, as it is on disk) lists the output, made from the same noisy and processed files,
    unchanged since (`records.OutputRecord.state`); one whose input changed is planned again and
    named in `summary.redone`. With `overwrite` every pair is planned. Without it, files at output
    paths that `record` does not list are refused (SettingsError): they are not ours to replace.

    Two folders pair by relative path; neither is read below the other one or below the output
    folder. A noisy file pairs with the processed file `root_proc` (or, `root_proc` being a
    folder, its file of the same name, where --baseline writes it), and its output is
    `<output_dir>/<processed file's name>`. Folders that cannot be listed and files whose header
    cannot be read go into `summary.failed`. Raises FileNotFoundError when no file pairs.
    """
    if record is None:
        record = OutputRecord.read(output_dir, REFINE_WRITER)
    if os.path.isfile(root_noisy):
        processed = root_proc if os.path.isfile(root_proc) else os.path.join(root_proc, os.path.basename(root_noisy))
        if not os.path.isfile(processed):
            raise FileNotFoundError(f"{processed}: no processed file for {root_noisy}")
        pairs = [(os.path.basename(processed), root_noisy, processed)]
    else:
        pairing = pair_folders({"noisy": root_noisy, "processed": root_proc}, exclude=[output_dir])
        summary.failed.update(pairing.unreadable)
        pairs = [(rel, os.path.join(root_noisy, rel), os.path.join(root_proc, rel)) for rel in pairing.common]
    jobs = []
    unlisted = []
    for rel, noisy_path, processed_path in pairs:
        job = FileJob(rel, noisy_path, processed_path, os.path.join(output_dir, rel))
        state = record.state(rel, job.input_paths())
        if not overwrite:
            if state == DONE:
                summary.skipped.append(rel)
                continue
            if state == UNLISTED:
                unlisted.append(rel)
                continue
            if state == CHANGED:
                logger.info("%s: its noisy or processed file changed since it was refined; redone", job.output_path)
                summary.redone.append(rel)
        with file_errors(summary.failed, rel, job.processed_path):
            job.output_path = output_path(output_dir, rel)  # refuses a link leading out of output_dir
            job.inputs = {role: fingerprint(path) for role, path in job.input_paths().items()}
            samples, rate, channels = audio_info(job.processed_path)
            noisy_rate, noisy_channels = audio_info(job.noisy_path)[1:]
            check_input_rate(job.processed_path, rate)
            check_input_rate(job.noisy_path, noisy_rate)
            job.seconds = samples / rate
            samples16 = resampled_length(samples, rate, refiner.sample_rate)
            job.width = refiner.padded_width(samples16)
            job.segments = refiner.layout(samples16, max(channels, noisy_channels), rate, samples).segments_count
            jobs.append(job)
    record.refuse_unlisted(output_dir, record.writer, unlisted)
    jobs.sort(key=lambda j: (j.width, j.rel))
    return jobs


def shard_jobs(jobs: Sequence[FileJob], rank: int, world_size: int) -> List[FileJob]:
    """This rank's share of the jobs, balanced by audio duration rather than file count.

    Longest first, each job goes to the rank with the least audio so far (ties: lowest rank);
    every rank computes the same assignment from the same sorted list, with no communication.
    """
    if world_size == 1:
        return list(jobs)
    load = [0.0] * world_size
    mine = []
    for job in sorted(jobs, key=lambda j: (-j.seconds, j.rel)):
        target = min(range(world_size), key=lambda r: (load[r], r))
        load[target] += job.seconds
        if target == rank:
            mine.append(job)
    return sorted(mine, key=lambda j: (j.width, j.rel))


def load_pair(noisy_path: str, processed_path: str) -> Tuple[np.ndarray, np.ndarray, int]:
    """Read a pair and bring the noisy side to the processed side's rate and length.

    Returns (noisy, processed, sample_rate). Raises AudioError naming the files on mismatch.
    """
    noisy, noisy_rate = load_audio(noisy_path)
    processed, rate = load_audio(processed_path)
    if noisy_rate != rate:
        noisy = resample(noisy, noisy_rate, rate)
    check_pair_lengths(noisy_path, processed_path, noisy.shape[-1], processed.shape[-1], rate)
    return fit_length(noisy, processed.shape[-1]), processed, rate


def check_pair_lengths(noisy_path: str, processed_path: str, noisy_samples: int, samples: int, rate: int) -> None:
    """AudioError naming both files when the noisy file (brought to `rate`) and the processed
    file differ in length by more than LENGTH_TOLERANCE_S."""
    diff = abs(noisy_samples - samples) / rate
    if diff > LENGTH_TOLERANCE_S:
        raise AudioError(
            f"{noisy_path} and {processed_path}: lengths differ by {diff:.3f} s "
            f"(more than {LENGTH_TOLERANCE_S} s); are they the same utterance?"
        )


def stream_pair(refiner: Refiner, noisy_path: str, processed_path: str) -> Tuple[Layout, Iterator[np.ndarray],
                                                                                  Iterator[np.ndarray]]:
    """A pair as `load_pair` and `Refiner.prepare` make it, streamed: (its layout, the noisy and
    the processed blocks at the model's rate covering the layout's windows). The headers are checked here
    (rates, lengths, channels), before a sample is read; the blocks hold the same samples as the
    whole-file path, block for block."""
    noisy_samples, noisy_rate, noisy_channels = audio_info(noisy_path)
    samples, rate, channels_processed = audio_info(processed_path)
    check_input_rate(noisy_path, noisy_rate)
    check_input_rate(processed_path, rate)
    at_rate = resampled_length(noisy_samples, noisy_rate, rate)
    check_pair_lengths(noisy_path, processed_path, at_rate, samples, rate)
    channels = max(noisy_channels, channels_processed)
    if {noisy_channels, channels_processed} - {1, channels}:
        raise ValueError(f"channel counts differ: noisy {noisy_channels}, processed {channels_processed}")
    samples16 = resampled_length(samples, rate, refiner.sample_rate)
    layout = refiner.layout(samples16, channels, rate, samples)
    covered = layout.bounds[-1][1]
    noisy = fit_stream(resample_stream(read_blocks(noisy_path), noisy_rate, rate, at_rate), samples)
    noisy16 = fit_stream(resample_stream(noisy, rate, refiner.sample_rate, samples16), covered)
    processed16 = fit_stream(resample_stream(read_blocks(processed_path), rate, refiner.sample_rate, samples16),
                             covered)
    return layout, noisy16, processed16


def with_high_band(blocks: Iterable[np.ndarray], processed_path: str, layout: Layout, rate: int,
                   model_rate: int) -> Iterator[np.ndarray]:
    """The refined `blocks` at `rate` (the processed file's own) joined to the processed file's
    band above the model's, read block by block beside them: `Refiner.assemble`'s crossover
    (`crossover.StreamingJoin`, which holds back half a kernel until the next block or the end)."""
    join = crossover.StreamingJoin(rate, model_rate)
    processed = fit_stream(read_blocks(processed_path), layout.output_length(rate))
    buffer = np.zeros((1, 0), dtype=np.float32)
    for block in blocks:
        while buffer.shape[-1] < block.shape[-1]:
            buffer = np.concatenate([buffer, next(processed)], axis=-1) if buffer.size else next(processed)
        high, buffer = buffer[:, :block.shape[-1]], buffer[:, block.shape[-1]:]
        joined = join.push(block, np.broadcast_to(high, block.shape))
        if joined.shape[-1]:
            yield joined
    yield join.finish()


def started_ahead(items: Sequence, start: Callable, lookahead: int) -> Iterator[Tuple]:
    """Yield (item, start(item)) in order, with `start` called for up to `lookahead` items ahead."""
    items = iter(items)
    queue = deque((item, start(item)) for item in itertools.islice(items, lookahead))
    while queue:
        item, started = queue.popleft()
        for nxt in itertools.islice(items, 1):
            queue.append((nxt, start(nxt)))
        yield item, started


class SegmentsAhead:
    """A recording's segments made in a loader thread, at most `ahead` of them waiting.

    `make` returns (its layout, its segments); `layout` is set before the first segment comes
    out. Iterating gives the segments, or raises what making them raised. After `close` the thread
    stops at its next segment, and iterating ends.
    """

    def __init__(self, pool: ThreadPoolExecutor, make: Callable[[], Tuple[Layout, Iterator]], ahead: int):
        self.layout: Optional[Layout] = None
        self._queue: "queue.Queue" = queue.Queue(ahead)
        self._closed = threading.Event()
        pool.submit(self._fill, make)

    def _fill(self, make: Callable[[], Tuple[Layout, Iterator]]) -> None:
        segments = None
        if self._closed.is_set():
            return
        try:
            self.layout, segments = make()
            for segment in segments:
                if not self._put((segment,)):
                    return
        except Exception as exc:  # handed to the consumer, whose boundary names the file
            self._put(exc)
            return
        finally:
            if segments is not None:
                segments.close()  # the files it reads are closed now, not when collected
        self._put(None)

    def _put(self, entry: Any) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Segment]:
        while not self._closed.is_set():
            try:
                entry = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if entry is None:
                return
            if isinstance(entry, Exception):
                raise entry
            yield entry[0]

    def close(self) -> None:
        self._closed.set()


# How often a loader or writer waiting on a queue checks whether it has been stopped.
_POLL_S = 0.1
# Segments made ahead per file being read (each about 2 MB for 10 s segments).
SEGMENTS_AHEAD = 8


class _Abandoned(Exception):
    """The recording being written failed: its output is not made."""


_ABANDON = object()  # put on a writer's queue: the recording failed, leave nothing


class _Output:
    """One recording being written in the writer thread, from the waves put on its queue (at most
    SEGMENTS_AHEAD waiting: a writer that falls behind holds up the network, not memory)."""

    def __init__(self) -> None:
        self.waves: "queue.Queue" = queue.Queue(SEGMENTS_AHEAD)
        self.stopped = False  # the writer is done (or failed): nothing put from now on is taken

    def put(self, wave: Any) -> None:
        """Hand the writer a wave, the end (None) or _ABANDON; dropped once the writer has stopped."""
        while not self.stopped:
            try:
                self.waves.put(wave, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def taken(self) -> Iterator:
        while True:
            wave = self.waves.get()
            if wave is None:
                return
            if wave is _ABANDON:
                raise _Abandoned()
            yield wave


def refine_files(refiner: Refiner, jobs: Sequence[FileJob], summary: RunSummary, *, seed: int,
                 keep_sample_rate: bool, progress: bool = True, loaders: int = 2,
                 check_peers: Callable[[], None] = lambda: None, record: Optional[OutputRecord] = None) -> None:
    """Refine the jobs in width order, batching segments of equal width across files.

    Reading and cutting upcoming files (`loaders` threads, each file a few segments ahead) and
    writing finished segments (one thread) overlap the network's work. Results go into
    `summary`, and each file written into `record`; a file that fails is recorded there and the
    others go on. Raises OutputError as soon as a write fails. The progress bar counts segments.
    `check_peers` is called as each file starts and as each segment is refined; it raises to stop
    the run (another process of the job has failed: `dist_util.shared_fate`).
    """
    bar = tqdm(total=sum(job.segments for job in jobs), desc="refining", unit="segment", disable=not progress)
    streams: Dict[int, SegmentsAhead] = {}
    outputs: Dict[int, _Output] = {}
    done: Dict[int, int] = {}

    def start(numbered: Tuple[int, FileJob]) -> SegmentsAhead:
        number, job = numbered
        check_peers()

        def make() -> Tuple[Layout, Iterator]:
            layout, noisy16, processed16 = stream_pair(refiner, job.noisy_path, job.processed_path)
            return layout, refiner.stream_segments(layout, noisy16, processed16, seed=seed, key=job.rel)

        streams[number] = SegmentsAhead(load_pool, make, SEGMENTS_AHEAD)
        return streams[number]

    def write(job: FileJob, layout: Layout, output: _Output) -> None:
        """The one place where a recording's refined blocks are written; a per-block step at the
        output rate (one with a lookahead holds back that many samples until the next block or
        the end) goes between `stream_output` and the writer."""
        rate = layout.sample_rate if keep_sample_rate else refiner.sample_rate
        with file_errors(summary.failed, job.rel, job.processed_path):
            try:
                with BlockWriter(job.output_path, rate, layout.channels) as writer:
                    blocks = refiner.stream_output(layout, output.taken(), rate)
                    if refiner.high_band_applies(rate, layout.sample_rate):
                        blocks = with_high_band(blocks, job.processed_path, layout, rate, refiner.sample_rate)
                    for block in blocks:
                        writer.write(block)
            except _Abandoned:
                return
            finally:
                output.stopped = True
            if record is not None:
                record.add(job.rel, job.inputs)
            summary.refined.append(job.rel)
            summary.audio_seconds += job.seconds

    writes: "deque[Future]" = deque()
    with ThreadPoolExecutor(loaders) as load_pool, ThreadPoolExecutor(1) as write_pool:
        try:
            recordings = started_ahead(list(enumerate(jobs)), start, lookahead=2 * loaders)
            for event in refiner.refine_segments((number, stream) for (number, _), stream in recordings):
                check_peers()
                number = event.item
                job = jobs[number]
                if isinstance(event, SegmentDone):
                    bar.update(1)
                    done[number] = done.get(number, 0) + 1
                    if number not in outputs:
                        outputs[number] = _Output()
                        writes.append(write_pool.submit(write, job, streams[number].layout, outputs[number]))
                    if outputs[number].stopped:
                        streams[number].close()  # its write failed: no use refining the rest
                    outputs[number].put(event.wave)
                else:
                    streams.pop(number).close()
                    output = outputs.pop(number, None)
                    if event.error is not None:
                        summary.failed[job.rel] = describe_failure(job.processed_path, event.error)
                    bar.update(max(0, job.segments - done.get(number, 0)))  # those it will never refine
                    if output is not None:
                        output.put(_ABANDON if event.error is not None else None)
                while writes and writes[0].done():
                    writes.popleft().result()  # a failed write (disk full) stops the run here
            for pending in writes:
                pending.result()
        finally:
            # Nothing may wait for ever: loaders blocked on a full queue, writers on an empty one.
            for stream in streams.values():
                stream.close()
            for output in outputs.values():
                output.put(_ABANDON)
            bar.close()
