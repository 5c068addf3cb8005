"""Training data: random fixed-length excerpts of clean speech, as spectrograms (guided-diffusion's
`image_datasets.py` for speech; the front-end is described in docs/method.md).

Every .wav/.flac under a folder is indexed once (headers only). A training example is a
random `seq_dur`-second excerpt of one file, read from disk alone (not the whole file),
downmixed to mono, resampled to the model's rate (its front-end's: 16 kHz for the published one)
when the file has another rate, and turned into a (2, bins, image_size) spectrogram (bins =
n_fft / 2: 256 for the published front-end): cut, or zero-padded, to exactly image_size frames.

The stream of examples is a pure function of the seed: example number `position` (counted
over the whole job, all ranks together) takes its file and its excerpt from random generators
seeded with (seed, position) alone. Consequences:

- DataLoader workers need no random state, so their number changes nothing;
- resuming at position P reproduces the stream of an uninterrupted run bitwise;
- rank r of W with a per-rank batch B takes positions step*W*B + r*B + j, so W ranks together
  draw exactly the examples of one process with batch W*B.

Files are visited in a fresh random order every epoch (each file once per epoch), like a
shuffled sampler, and each visit takes a new random excerpt.

A file whose samples cannot be read raises AudioError naming it from the batch iterator, in the
training process, whichever DataLoader worker read it. The workers leave SIGINT, SIGHUP, and
SIGTERM from any other process, to the training process (it stops at a step boundary and saves).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.dataloader import default_collate

from .audio.folders import list_audio_files
from .audio.io import AudioError, audio_info, resample, soundfile_path, to_mono
from .seeding import STREAM_EXCERPT, STREAM_FILE_ORDER, stream_rng
from .spectrogram import PUBLISHED, FrontEnd, wave_to_spec

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class AudioFile:
    """One indexed recording."""

    path: str
    samples: int  # per channel, at the file's own rate
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.samples / self.sample_rate


def excerpt_samples(seq_dur: float, front_end: FrontEnd = PUBLISHED) -> int:
    """Length of an excerpt at the front-end's rate."""
    return int(round(seq_dur * front_end.sample_rate))


def source_samples(seq_dur: float, sample_rate: int, front_end: FrontEnd = PUBLISHED) -> int:
    """Samples to read from a file at `sample_rate` to obtain one excerpt after resampling."""
    return int(math.ceil(excerpt_samples(seq_dur, front_end) * sample_rate / front_end.sample_rate))


def build_index(root: str, seq_dur: float, front_end: FrontEnd = PUBLISHED) -> List[AudioFile]:
    """Index the audio files under `root` that are at least `seq_dur` seconds long.

    Reads headers only. Raises FileNotFoundError naming `root` when it is not a folder or
    holds no audio file, AudioError naming the file when a header cannot be read, and
    ValueError when no file is long enough. Shorter files are skipped with one log line.
    """
    if seq_dur <= 0:
        raise ValueError(f"seq_dur must be positive, got {seq_dur}")
    rels = list_audio_files(root)
    if not rels:
        raise FileNotFoundError(f"{root}: no audio file (.wav/.flac) found in this folder or below it")
    kept, short_count, short_seconds = [], 0, 0.0
    for rel in rels:
        path = os.path.join(root, rel)
        samples, rate, _ = audio_info(path)
        entry = AudioFile(path, samples, rate)
        if samples < source_samples(seq_dur, rate, front_end):
            short_count += 1
            short_seconds += entry.seconds
        else:
            kept.append(entry)
    if short_count:
        logger.warning("skipped %d of %d file(s) shorter than seq_dur = %g s (%.1f s of audio in total)",
                       short_count, len(rels), seq_dur, short_seconds)
    if not kept:
        raise ValueError(f"{root}: none of the {len(rels)} audio file(s) is at least seq_dur = {seq_dur} s long")
    hours = sum(f.seconds for f in kept) / 3600.0
    logger.info("training data: %d file(s), %.2f hours, under %s", len(kept), hours, root)
    return kept


def read_excerpt(entry: AudioFile, start: int, seq_dur: float, front_end: FrontEnd = PUBLISHED) -> np.ndarray:
    """Mono float32 excerpt of `seq_dur` seconds at the front-end's rate, beginning at sample
    `start` of the file.

    Only the excerpt is read from disk; `start` counts samples at the file's own rate.
    """
    stop = start + source_samples(seq_dur, entry.sample_rate, front_end)
    try:
        data, _ = sf.read(soundfile_path(entry.path), start=start, stop=stop, dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for damaged files
        raise AudioError(f"{entry.path}: cannot read samples {start}..{stop} ({exc})") from exc
    if not np.all(np.isfinite(data)):
        raise AudioError(f"{entry.path}: NaN or infinite samples between {start} and {stop}")
    mono = to_mono(data.T)
    return resample(mono, entry.sample_rate, front_end.sample_rate, length=excerpt_samples(seq_dur, front_end))


def fit_frames(spec: torch.Tensor, frames: int) -> torch.Tensor:
    """Cut or zero-pad the last (time) axis of a spectrogram to `frames`."""
    width = spec.shape[-1]
    if width >= frames:
        return spec[..., :frames].contiguous()
    return torch.nn.functional.pad(spec, (0, frames - width))


class ExcerptDataset(Dataset):
    """Example `position` of the stream: a (2, bins, image_size) spectrogram of a random excerpt."""

    def __init__(self, files: List[AudioFile], seq_dur: float, image_size: int, seed: int,
                 front_end: FrontEnd = PUBLISHED):
        if not files:
            raise ValueError("no training files")
        self.files = files
        self.seq_dur = seq_dur
        self.image_size = image_size
        self.seed = seed
        self.front_end = front_end
        self._order_epoch = -1
        self._order: Optional[np.ndarray] = None

    def choose(self, position: int) -> Tuple[AudioFile, int]:
        """(file, start sample) of example `position`."""
        epoch, index = divmod(position, len(self.files))
        if epoch != self._order_epoch:
            rng = stream_rng(self.seed, STREAM_FILE_ORDER, epoch)
            self._order, self._order_epoch = rng.permutation(len(self.files)), epoch
        entry = self.files[int(self._order[index])]
        latest_start = entry.samples - source_samples(self.seq_dur, entry.sample_rate, self.front_end)
        start = int(stream_rng(self.seed, STREAM_EXCERPT, position).integers(0, latest_start + 1))
        return entry, start

    def __getitem__(self, position: int) -> Dict:
        """{"spec", "position"}, or {"error": the AudioError's message, "position"} when the
        excerpt cannot be read (see `collate_examples`)."""
        entry, start = self.choose(position)
        try:
            wave = torch.from_numpy(read_excerpt(entry, start, self.seq_dur, self.front_end))
        except AudioError as exc:
            return {"error": str(exc), "position": position}
        return {"spec": fit_frames(wave_to_spec(wave, self.front_end), self.image_size), "position": position}


def collate_examples(examples: List[Dict]) -> Dict:
    """A batch of examples, or {"error": message} when one could not be read.

    The error travels as data because an exception raised in a DataLoader worker reaches the
    training process wrapped in the worker's traceback (and its type rebuilt from that text);
    `load_data` raises it there with its own message.
    """
    errors = [example["error"] for example in examples if "error" in example]
    if errors:
        return {"error": errors[0]}
    return default_collate(examples)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker start: leave SIGINT, SIGHUP and SIGTERM to the training process.

    Ctrl-C and a closed terminal's SIGHUP reach every process of the terminal's foreground group
    and a scheduler's SIGTERM every process of the job; a worker that died of it would make the training process fail
    on its next batch instead of finishing the step and saving. A SIGTERM from the training
    process itself still ends the worker: that is how the DataLoader and multiprocessing end
    workers that did not stop on their own (torch's own handler makes the same distinction).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # not on macOS or Windows: torch's handler stays
        return
    parent = os.getppid()
    # A Python handler cannot tell who sent a signal; sigwaitinfo can. Blocked here, SIGTERM is
    # blocked in every thread started later too, so only this waiter receives it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def end_when_the_parent_asks() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=end_when_the_parent_asks, name="sigterm-from-parent", daemon=True).start()


class StreamSampler(Sampler):
    """The positions of this rank's examples, forever, starting at global position `start`.

    Step s gives rank r the positions start + s*B*W + r*B + j for j < B (B the per-rank batch,
    W the world size).
    """

    def __init__(self, start: int, batch_size: int, rank: int, world_size: int):
        self.start, self.batch_size, self.rank, self.world_size = start, batch_size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        step = 0
        while True:
            first = self.start + step * self.batch_size * self.world_size + self.rank * self.batch_size
            yield from range(first, first + self.batch_size)
            step += 1


def load_data(files: List[AudioFile], *, batch_size: int, image_size: int, seq_dur: float, seed: int,
              start_position: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
              pin_memory: bool = False, front_end: FrontEnd = PUBLISHED) -> Iterator[Dict[str, torch.Tensor]]:
    """An endless iterator of this rank's batches: {"spec": (B, 2, bins, image_size), "position": (B,)}.

    `start_position` is the number of examples the whole job has consumed so far (0 for a
    fresh run); `batch_size` is per rank. Raises AudioError naming the file when an excerpt
    cannot be read.
    """
    dataset = ExcerptDataset(files, seq_dur, image_size, seed, front_end)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=StreamSampler(start_position, batch_size, rank, world_size),
        num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate_examples,
        worker_init_fn=ignore_stop_signals if num_workers else None,
    )
    return _raise_errors(iter(loader))


def _raise_errors(batches: Iterator[Dict]) -> Iterator[Dict[str, torch.Tensor]]:
    for batch in batches:
        if "error" in batch:
            raise AudioError(batch["error"])
        yield batch
