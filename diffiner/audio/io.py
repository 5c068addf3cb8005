"""Audio file I/O and resampling.

Everything the rest of the package touches is float32 numpy of shape (channels, samples).
Writes are atomic: a temporary file in the destination folder is renamed into place, so an
interrupted run never leaves a truncated file behind. A write that fails (full disk, read-only
folder) raises `OutputError` naming the file: the caller cannot go on writing, unlike a bad input
or a non-finite result, which concern one file only (`AudioError`).

Long files are read, resampled and written block by block (`read_blocks`, `resample_stream`,
`BlockWriter`), with exactly the samples the whole-file functions give (soxr's stream carries its
filter state across blocks), so a file's length never sets the memory a run needs.

Records that runs leave beside their outputs (YAML) are read by `read_yaml_record`, which bounds
what a hostile or broken file can cost: a size cap and no anchors or aliases.
"""

import contextlib
import errno
import logging
import os
import shutil
import stat
import struct
import sys
import uuid
from typing import IO, Any, Iterable, Iterator, Optional, Tuple

import numpy as np
import soundfile as sf
import yaml

from ..errors import EXIT_USAGE, DiffinerError, error_text

AUDIO_EXTENSIONS = (".wav", ".flac")
# Names of files being written (atomic_output); folder listings skip them.
TEMPORARY_PREFIX = ".tmp-"
# The longest file name, in bytes, of the file systems this runs on (NAME_MAX of ext4, XFS, btrfs,
# tmpfs, ZFS and APFS): a temporary name longer than this cannot be created, whatever the folder.
NAME_MAX = 255
# Records (config.yml and the like) are a few kB; a larger file is not one of ours.
RECORD_MAX_BYTES = 1 << 20
# Below this rate a recording holds less than 2 kHz of band, no speech the 16 kHz model can use; a
# header that claims such a rate (a WAV "at 1 Hz") would make each of its samples 16000 or more at
# 16 kHz: a few hundred kB of file, days of refinement.
MIN_INPUT_SAMPLE_RATE = 4000
# Frames read (or written) at a time by the block functions: 1 s at 64 kHz, a few hundred kB.
BLOCK_FRAMES = 1 << 16
# What libsndfile raises for a failed write (soundfile < 0.11 raised a plain RuntimeError).
_SOUNDFILE_ERROR = getattr(sf, "LibsndfileError", RuntimeError)


logger = logging.getLogger(__name__)


class AudioError(DiffinerError):
    """A file that cannot be used as audio input, or audio that must not be written to it (NaN or
    infinite samples); the message names the file and the problem."""


class OutputError(DiffinerError, OSError):
    """A file that cannot be written (disk full, folder read-only); the message names the file.

    An OSError, so that code handling failed writes in general handles it too.
    """


class RecordError(DiffinerError, ValueError):
    """A record file that cannot be read as one (too large, not a regular file, not YAML, or YAML
    with anchors or aliases); the message is one line naming the file. Exit status 2: the user
    has to remove or mend it."""

    exit_code = EXIT_USAGE


def soundfile_path(path: str) -> Any:
    """`path` as soundfile can open it. soundfile encodes a str path strictly, so a name that is
    not valid in the file system's encoding (held by Python as surrogate escapes: a Latin-1 name
    on a UTF-8 system) could not be opened at all; such a name goes as its bytes."""
    try:
        path.encode(sys.getfilesystemencoding())
    except UnicodeEncodeError:
        return os.fsencode(path)
    return path


def audio_info(path: str) -> Tuple[int, int, int]:
    """Return (samples, sample_rate, channels) without reading the samples."""
    try:
        info = sf.info(soundfile_path(path))
    except Exception as exc:  # soundfile raises several types for unreadable files
        raise AudioError(f"{path}: cannot read audio header ({exc})") from exc
    return info.frames, info.samplerate, info.channels


def load_audio(path: str) -> Tuple[np.ndarray, int]:
    """Read a file as float32 (channels, samples) in [-1, 1] and its sample rate.

    Raises AudioError for unreadable or empty files and for non-finite samples. A WAV file cut
    short (its header promises more samples than it holds) is read at the length it holds, with a
    warning naming both lengths.
    """
    try:
        data, sr = sf.read(soundfile_path(path), dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(f"{path}: cannot read audio ({exc})") from exc
    _check_length(path, data.shape[0])
    _check_finite(path, data)
    return np.ascontiguousarray(data.T), sr


def _check_length(path: str, held: int) -> None:
    """AudioError for an empty file; a warning for a WAV that holds less than its header promises."""
    if held == 0:
        raise AudioError(f"{path}: file has zero length")
    promised = wav_header_samples(path)
    if promised is not None and promised > held:
        # libsndfile silently clamps the length to what the file holds: a truncated copy would
        # otherwise pass for a complete recording.
        logger.warning("%s: the header promises %d samples but the file holds %d (truncated?); using %d",
                       path, promised, held, held)


def _check_finite(path: str, samples: np.ndarray) -> None:
    if not np.all(np.isfinite(samples)):
        raise AudioError(f"{path}: file contains NaN or infinite samples")


def check_input_rate(path: str, rate: int) -> None:
    """AudioError naming `path` for a sample rate below MIN_INPUT_SAMPLE_RATE; checked from the
    header, before a sample is read or a buffer sized by the file's length is made."""
    if rate < MIN_INPUT_SAMPLE_RATE:
        raise AudioError(f"{path}: sample rate {rate} Hz is below {MIN_INPUT_SAMPLE_RATE} Hz; not a recording the "
                         "refiner can use (is the header damaged?)")


def read_blocks(path: str, frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """The samples of `path` as float32 (channels, n) blocks of at most `frames`, the values
    `load_audio` reads, with its checks (AudioError for an unreadable or empty file and for
    non-finite samples, raised at the block that holds them; the warning for a WAV cut short).

    Exactly `audio_info(path)[0]` samples come out: a file that ends before its header's length
    (a FLAC cut short; libsndfile already counts a WAV by what it holds) is an AudioError, since
    the caller has planned its work by that length.
    """
    try:
        handle = sf.SoundFile(soundfile_path(path))
    except Exception as exc:
        raise AudioError(f"{path}: cannot read audio ({exc})") from exc
    with handle:
        expected = handle.frames
        _check_length(path, expected)
        done = 0
        while done < expected:
            try:
                block = handle.read(min(frames, expected - done), dtype="float32", always_2d=True)
            except Exception as exc:
                raise AudioError(f"{path}: cannot read audio ({exc})") from exc
            if block.shape[0] == 0:
                raise AudioError(f"{path}: the file ends after {done} of the {expected} samples its header promises")
            _check_finite(path, block)
            done += block.shape[0]
            yield np.ascontiguousarray(block.T)


def wav_header_samples(path: str) -> Optional[int]:
    """The sample count a RIFF/WAVE file's header promises (data chunk size / block size), or
    None for other containers, streamed WAVs of unknown length and headers that cannot be read."""
    try:
        with open(path, "rb") as f:
            riff = f.read(12)
            if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
                return None
            block_align = None
            while True:
                header = f.read(8)
                if len(header) < 8:
                    return None
                chunk_id, size = header[:4], struct.unpack("<I", header[4:])[0]
                if chunk_id == b"fmt ":
                    fmt = f.read(size + (size & 1))
                    if len(fmt) < 14:
                        return None
                    block_align = struct.unpack("<H", fmt[12:14])[0]
                elif chunk_id == b"data":
                    if not block_align or size in (0, 0xFFFFFFFF):  # 0/~0: length left to the reader
                        return None
                    return size // block_align
                else:
                    f.seek(size + (size & 1), os.SEEK_CUR)
    except OSError:
        return None


def resampled_length(samples: int, sr_in: int, sr_out: int) -> int:
    """Samples of `samples` at `sr_in` after resampling to `sr_out` (what `resample` returns)."""
    return int(round(samples * sr_out / sr_in))


def resample(audio: np.ndarray, sr_in: int, sr_out: int, length: Optional[int] = None) -> np.ndarray:
    """Resample (channels, samples) audio with soxr (very high quality).

    The output has exactly `length` samples when given, else `resampled_length`; soxr's own
    length can be off by one, which would break "output length equals input length".
    """
    audio = np.asarray(audio, dtype=np.float32)
    squeeze = audio.ndim == 1
    audio2d = audio[None] if squeeze else audio
    if length is None:
        length = resampled_length(audio2d.shape[-1], sr_in, sr_out)
    if sr_in == sr_out:
        out = audio2d
    else:
        import soxr

        out = soxr.resample(audio2d.T, sr_in, sr_out, quality="VHQ").T.astype(np.float32)
    out = fit_length(out, length)
    return out[0] if squeeze else out


def resample_stream(blocks: Iterable[np.ndarray], sr_in: int, sr_out: int, length: int) -> Iterator[np.ndarray]:
    """`resample` of the concatenated (channels, n) `blocks`, as blocks: the same samples, exactly
    `length` of them (the stream's end is trimmed or zero-padded, as `fit_length` does)."""
    if sr_in == sr_out:
        return fit_stream(blocks, length)
    return fit_stream(_soxr_stream(blocks, sr_in, sr_out), length)


def _soxr_stream(blocks: Iterable[np.ndarray], sr_in: int, sr_out: int) -> Iterator[np.ndarray]:
    """soxr's streaming resampler over (channels, n) float32 blocks; its output equals that of one
    soxr.resample call over the whole signal, sample for sample."""
    import soxr

    stream = None
    pending = None  # one block held back, so that the last one goes in with last=True
    for block in blocks:
        block = np.asarray(block, dtype=np.float32)
        if stream is None:
            stream = soxr.ResampleStream(sr_in, sr_out, block.shape[0], dtype="float32", quality="VHQ")
        if pending is not None:
            yield stream.resample_chunk(np.ascontiguousarray(pending.T)).T
        pending = block
    if pending is not None:
        yield stream.resample_chunk(np.ascontiguousarray(pending.T), last=True).T


def fit_stream(blocks: Iterable[np.ndarray], length: int) -> Iterator[np.ndarray]:
    """`fit_length` over a stream of (channels, n) blocks: the first `length` samples, then zeros
    (in blocks of at most BLOCK_FRAMES) up to `length`."""
    done, channels = 0, None
    for block in blocks:
        take = max(0, min(block.shape[-1], length - done))
        if take or channels is None:  # an empty first block still tells the next stage the channels
            yield np.ascontiguousarray(block[:, :take])
            done += take
        channels = block.shape[0]
    while done < length:
        if channels is None:
            raise ValueError("cannot pad an empty stream: its channel count is unknown")
        take = min(BLOCK_FRAMES, length - done)
        yield np.zeros((channels, take), dtype=np.float32)
        done += take


def fit_length(audio: np.ndarray, length: int) -> np.ndarray:
    """Trim or zero-pad the last axis to `length` samples."""
    n = audio.shape[-1]
    if n >= length:
        return np.ascontiguousarray(audio[..., :length])
    pad = [(0, 0)] * (audio.ndim - 1) + [(0, length - n)]
    return np.pad(audio, pad)


def to_mono(audio: np.ndarray) -> np.ndarray:
    """Average the channels of (channels, samples) audio."""
    return audio.mean(axis=0)


def save_audio(path: str, audio: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Write (channels, samples) or (samples,) audio atomically, creating parent folders.

    The container follows the extension (.wav or .flac). Samples are clipped to [-1, 1]
    so that 16-bit conversion cannot wrap around. Raises AudioError naming `path`, and writes
    nothing, when a sample is NaN or infinite: a clipped NaN becomes full-scale DC (-32768 in
    16-bit PCM), a wrong result that would pass for a written file.
    """
    audio = np.asarray(audio, dtype=np.float32)
    bad = audio.size - int(np.count_nonzero(np.isfinite(audio)))
    if bad:
        raise AudioError(f"{path}: the audio to write has {bad} NaN or infinite sample(s) of {audio.size}; "
                         "not written")
    data = audio if audio.ndim == 1 else audio.T
    data = np.clip(data, -1.0, 1.0)
    with atomic_output(path) as tmp:
        sf.write(soundfile_path(tmp), data, sample_rate, subtype=subtype, format=_container(path))


class BlockWriter:
    """A file written block by block as `save_audio` writes it whole, byte for byte: 16-bit PCM by
    default, the container by the extension, samples clipped to [-1, 1], atomically.

    Use as a context manager: the file appears at `path` when the block exits normally after
    `write` took every block; on an error (a non-finite block is an AudioError naming `path`) or an
    interruption nothing is left but what was there before.
    """

    def __init__(self, path: str, sample_rate: int, channels: int, subtype: str = "PCM_16"):
        self.path, self.sample_rate, self.channels, self.subtype = path, sample_rate, channels, subtype
        self._stack = contextlib.ExitStack()
        self._file: Optional[sf.SoundFile] = None

    def __enter__(self) -> "BlockWriter":
        with self._stack as stack:
            tmp = stack.enter_context(atomic_output(self.path))
            # Opened inside atomic_output, so that a failure to create the file is an OutputError.
            with _soundfile_errors(self.path):
                self._file = stack.enter_context(sf.SoundFile(
                    soundfile_path(tmp), "w", self.sample_rate, self.channels, self.subtype, format=_container(self.path)))
            self._stack = stack.pop_all()
        return self

    def write(self, audio: np.ndarray) -> None:
        """Append (channels, n) float audio."""
        audio = np.asarray(audio, dtype=np.float32)
        if not np.all(np.isfinite(audio)):
            raise AudioError(f"{self.path}: the audio to write has NaN or infinite samples; not written")
        with _soundfile_errors(self.path):
            self._file.write(np.clip(audio.T, -1.0, 1.0))

    def __exit__(self, *exc_info) -> None:
        self._stack.__exit__(*exc_info)


@contextlib.contextmanager
def _soundfile_errors(path: str) -> Iterator[None]:
    """libsndfile's write errors as OutputError naming `path` (atomic_output's rule, for errors
    raised between its entry and exit)."""
    try:
        yield
    except _SOUNDFILE_ERROR as exc:
        raise OutputError(f"{path}: cannot write ({error_text(exc)}"
                          f"{free_space_hint(os.path.dirname(os.path.abspath(path)))})") from exc


def _container(path: str) -> str:
    """The container a written file takes from its extension: FLAC for .flac, else WAV."""
    return "FLAC" if os.path.splitext(path)[1].lower() == ".flac" else "WAV"


def write_text_atomic(path: str, text: str) -> None:
    """Write a text file atomically (temporary file, then rename)."""
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`.

    On any error or interruption the temporary file is removed and `path` is untouched, so a
    reader never sees a half-written file. Failures of the file system (creating the folder,
    writing, renaming; libsndfile's errors included) raise OutputError naming `path`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = _temporary_path(path)
    try:
        os.makedirs(folder, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except (OSError, _SOUNDFILE_ERROR) as exc:
        if isinstance(exc, OutputError):
            raise
        # libsndfile reports a full disk only as "System error.": the free space tells.
        hint = free_space_hint(folder) if isinstance(exc, _SOUNDFILE_ERROR) else ""
        raise OutputError(f"{path}: cannot write ({error_text(exc)}{hint})") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def free_space_hint(folder: str) -> str:
    """"; N MB free on that disk", or nothing where that cannot be told."""
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        return f"; {shutil.disk_usage(folder).free / 1e6:.0f} MB free on that disk"
    except OSError:
        return ""


def _temporary_path(path: str) -> str:
    """A unique hidden name beside `path`, `<TEMPORARY_PREFIX><12 hex digits>-<name>`, with `name`
    shortened where the whole would pass NAME_MAX (audio.folders' listings skip names that start
    with TEMPORARY_PREFIX; the hex digits alone make the name unique).

    Created with the process's normal permissions (unlike mkstemp's 0600), so the renamed
    result is as readable as any other output.
    """
    folder, name = os.path.split(os.path.abspath(path))
    tag = f"{TEMPORARY_PREFIX}{uuid.uuid4().hex[:12]}-"
    return os.path.join(folder, tag + _shortened(name, NAME_MAX - len(tag)))


def _shortened(name: str, room: int) -> str:
    """`name` within `room` bytes as the file system stores it: unchanged when it fits, else cut
    by whole characters (a multi-byte UTF-8 character, or an undecodable byte, is never split)
    before its extension, which is kept where it is short."""
    if len(os.fsencode(name)) <= room:
        return name
    stem, ext = os.path.splitext(name)
    if len(os.fsencode(ext)) > room // 2:  # "a.<200 bytes>": an extension only in name
        stem, ext = name, ""
    while len(os.fsencode(stem + ext)) > room:
        stem = stem[:-1]
    return stem + ext


class _RecordLoader(yaml.SafeLoader):
    """yaml.SafeLoader without anchors and aliases (`&a`, `*a`): no record of ours uses them, and
    they let a few hundred bytes expand to gigabytes ("billion laughs") or make a structure that
    contains itself, on which any recursive comparison ends in RecursionError."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if event.anchor is not None:  # an AliasEvent's anchor is the name it refers to
            raise yaml.composer.ComposerError(None, None, "anchors and aliases (&, *) are not allowed in a record",
                                              event.start_mark)
        return super().compose_node(parent, index)


# How `open_regular` opens for each mode: reading, or appending (a log, created when absent).
_OPEN_FLAGS = {"r": os.O_RDONLY, "a": os.O_WRONLY | os.O_APPEND | os.O_CREAT}


def open_regular(path: str, mode: str = "rb", newline: Optional[str] = None) -> IO:
    """`path` opened as a file object with `mode` ("r", "rb", "a"), refusing anything but a
    regular file with ValueError naming it.

    A plain open() of a FIFO blocks until another process opens its other end, so a FIFO given
    the name of a checkpoint or a log would hang training for ever: the file is opened
    non-blocking (which changes nothing for a regular file) and checked before a byte is read or
    written.
    """
    flags = _OPEN_FLAGS[mode[0]] | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # ENXIO: a FIFO opened for writing while no one reads it
            raise
        raise ValueError(f"{path}: not a regular file (a FIFO?); not used") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path}: not a regular file (a FIFO, device or socket?); not used")
    return os.fdopen(fd, mode, newline=newline) if "b" not in mode else os.fdopen(fd, mode)


def read_yaml_record(path: str, max_bytes: int = RECORD_MAX_BYTES) -> Any:
    """The YAML document in the file `path`, read safely whoever wrote it.

    Raises RecordError (one line naming the file) for a file that is not a regular file (a FIFO
    would block the open for ever: it is opened non-blocking and checked), is larger than
    `max_bytes`, is not UTF-8 or YAML, uses anchors or aliases, or nests too deeply; OSError when
    it cannot be opened.
    """
    try:
        f = open_regular(path, "rb")
    except ValueError as exc:
        raise RecordError(str(exc)) from exc
    with f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise RecordError(f"{path}: larger than {max_bytes} bytes; not a record, not read")
    try:
        return yaml.load(data.decode("utf-8"), Loader=_RecordLoader)
    except UnicodeDecodeError as exc:
        raise RecordError(f"{path}: not UTF-8 text ({error_text(exc)})") from exc
    except yaml.YAMLError as exc:
        raise RecordError(f"{path}: not a usable record ({error_text(exc)})") from exc
    except RecursionError as exc:  # the composer recurses once per level of nesting
        raise RecordError(f"{path}: nested too deeply to be a record") from exc
