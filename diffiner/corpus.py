"""Refining a corpus: two folder trees of paired recordings in (or one pair of files), one tree of
refined files out.

The engine behind `diffiner-refine` (scripts/run_refiner.py). Noisy and processed files are
paired by relative path. Files are sorted by the width their spectrogram is padded to, so that
equal widths share batches, and each finished file is written at once (atomically), so an
interrupted run loses nothing already written and a rerun picks up where it stopped. Under
torchrun/mpiexec every process takes its share of the files (`shard_jobs`).

Whatever goes wrong with one file (unreadable, too different from its partner, an error of the
model on it) is recorded in the run's summary under that file's name and the others go on
(`audio.folders.file_errors`, the one per-file error boundary); a write that fails (disk full)
stops the run, since every file after it would fail the same way.
"""

import itertools
import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from .audio.folders import describe_failure, file_errors, output_path, pair_folders
from .audio.io import AudioError, audio_info, fit_length, load_audio, resample, resampled_length, save_audio
from .pipeline import Prepared, Refiner

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


@dataclass
class RunSummary:
    refined: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)
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
            merged.failed.update(part.failed)
            merged.audio_seconds += part.audio_seconds
        return merged


def plan_jobs(root_noisy: str, root_proc: str, output_dir: str, refiner: Refiner, overwrite: bool,
              summary: RunSummary) -> List[FileJob]:
    """Pair the files, drop those already refined, and sort the rest by padded width.

    Two folders pair by relative path; neither is read below the other one or below the output
    folder. A noisy file pairs with the processed file `root_proc` (or, `root_proc` being a
    folder, its file of the same name, where --baseline writes it), and its output is
    `<output_dir>/<processed file's name>`. Folders that cannot be listed and files whose header
    cannot be read go into `summary.failed`. Raises FileNotFoundError when no file pairs.
    """
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
    for rel, noisy_path, processed_path in pairs:
        job = FileJob(rel, noisy_path, processed_path, os.path.join(output_dir, rel))
        if os.path.exists(job.output_path) and not overwrite:
            summary.skipped.append(rel)
            continue
        with file_errors(summary.failed, rel, job.processed_path):
            job.output_path = output_path(output_dir, rel)  # refuses a link leading out of output_dir
            samples, rate, _ = audio_info(job.processed_path)
            audio_info(job.noisy_path)
            job.seconds = samples / rate
            job.width = refiner.padded_width(resampled_length(samples, rate, refiner.sample_rate))
            jobs.append(job)
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
    diff = abs(noisy.shape[-1] - processed.shape[-1]) / rate
    if diff > LENGTH_TOLERANCE_S:
        raise AudioError(
            f"{noisy_path} and {processed_path}: lengths differ by {diff:.3f} s "
            f"(more than {LENGTH_TOLERANCE_S} s); are they the same utterance?"
        )
    return fit_length(noisy, processed.shape[-1]), processed, rate


def prefetched(pool: ThreadPoolExecutor, items: Sequence, fn: Callable, lookahead: int) -> Iterator[Tuple]:
    """Yield (item, future of fn(item)) in order, keeping `lookahead` calls running ahead."""
    items = iter(items)
    queue = deque((item, pool.submit(fn, item)) for item in itertools.islice(items, lookahead))
    while queue:
        item, future = queue.popleft()
        for nxt in itertools.islice(items, 1):
            queue.append((nxt, pool.submit(fn, nxt)))
        yield item, future


def refine_files(refiner: Refiner, jobs: Sequence[FileJob], summary: RunSummary, *, seed: int,
                 keep_sample_rate: bool, progress: bool = True, loaders: int = 2) -> None:
    """Refine the jobs in width order, batching segments of equal width across files.

    Reading and preparing upcoming files (`loaders` threads) and writing finished ones (one
    thread) overlap the network's work. Results go into `summary`; a file that fails is recorded
    there and the others go on. Raises OutputError as soon as a write fails.
    """
    bar = tqdm(total=len(jobs), desc="refining", unit="file", disable=not progress)

    def prepare(job: FileJob) -> Prepared:
        noisy, processed, rate = load_pair(job.noisy_path, job.processed_path)
        return refiner.prepare(noisy, processed, rate, seed=seed, key=job.rel)

    def readable(load_pool: ThreadPoolExecutor) -> Iterator[Tuple[Tuple[FileJob, Prepared], List]]:
        for job, future in prefetched(load_pool, jobs, prepare, lookahead=2 * loaders):
            prepared = None
            with file_errors(summary.failed, job.rel, job.processed_path):
                prepared = future.result()
            if prepared is None:
                bar.update(1)
                continue
            yield (job, prepared), prepared.segments

    def finish(job: FileJob, prepared: Prepared, waves: List) -> None:
        with file_errors(summary.failed, job.rel, job.processed_path):
            rate = prepared.sample_rate if keep_sample_rate else refiner.sample_rate
            audio = refiner.assemble(prepared, waves, rate)
            if not np.all(np.isfinite(audio)):
                raise ValueError("the refined audio is not finite")
            save_audio(job.output_path, audio, rate)
            summary.refined.append(job.rel)
            summary.audio_seconds += job.seconds
        bar.update(1)

    try:
        with ThreadPoolExecutor(loaders) as load_pool, ThreadPoolExecutor(1) as write_pool:
            writes: "deque[Future]" = deque()
            for done in refiner.refine_stream(readable(load_pool)):
                job, prepared = done.item
                if done.error is not None:
                    summary.failed[job.rel] = describe_failure(job.processed_path, done.error)
                    bar.update(1)
                else:
                    writes.append(write_pool.submit(finish, job, prepared, done.waves))
                while writes and writes[0].done():
                    writes.popleft().result()  # a failed write (disk full) stops the run here
            for write in writes:
                write.result()
    finally:
        bar.close()
