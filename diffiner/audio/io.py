"""Audio file I/O and resampling.

Everything the rest of the package touches is float32 numpy of shape (channels, samples).
Writes are atomic: a temporary file in the destination folder is renamed into place, so an
interrupted run never leaves a truncated file behind.
"""

import contextlib
import os
import uuid
from typing import Iterator, Tuple

import numpy as np
import soundfile as sf

MODEL_SAMPLE_RATE = 16000
AUDIO_EXTENSIONS = (".wav", ".flac")


class AudioError(Exception):
    """A file that cannot be used as audio input; the message names the file and the problem."""


def audio_info(path: str) -> Tuple[int, int, int]:
    """Return (samples, sample_rate, channels) without reading the samples."""
    try:
        info = sf.info(path)
    except Exception as exc:  # soundfile raises several types for unreadable files
        raise AudioError(f"{path}: cannot read audio header ({exc})") from exc
    return info.frames, info.samplerate, info.channels


def load_audio(path: str) -> Tuple[np.ndarray, int]:
    """Read a file as float32 (channels, samples) in [-1, 1] and its sample rate.

    Raises AudioError for unreadable or empty files and for non-finite samples.
    """
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(f"{path}: cannot read audio ({exc})") from exc
    if data.shape[0] == 0:
        raise AudioError(f"{path}: file has zero length")
    if not np.all(np.isfinite(data)):
        raise AudioError(f"{path}: file contains NaN or infinite samples")
    return np.ascontiguousarray(data.T), sr


def resample(audio: np.ndarray, sr_in: int, sr_out: int, length: int = None) -> np.ndarray:
    """Resample (channels, samples) audio with soxr (very high quality).

    The output has exactly `length` samples when given, else round(samples * sr_out / sr_in);
    soxr's own length can be off by one, which would break "output length equals input length".
    """
    audio = np.asarray(audio, dtype=np.float32)
    squeeze = audio.ndim == 1
    audio2d = audio[None] if squeeze else audio
    if length is None:
        length = int(round(audio2d.shape[-1] * sr_out / sr_in))
    if sr_in == sr_out:
        out = audio2d
    else:
        import soxr

        out = soxr.resample(audio2d.T, sr_in, sr_out, quality="VHQ").T.astype(np.float32)
    out = fit_length(out, length)
    return out[0] if squeeze else out


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
    so that 16-bit conversion cannot wrap around.
    """
    audio = np.asarray(audio, dtype=np.float32)
    data = audio if audio.ndim == 1 else audio.T
    data = np.clip(data, -1.0, 1.0)
    ext = os.path.splitext(path)[1].lower()
    fmt = "FLAC" if ext == ".flac" else "WAV"
    with atomic_output(path) as tmp:
        sf.write(tmp, data, sample_rate, subtype=subtype, format=fmt)


def write_text_atomic(path: str, text: str) -> None:
    """Write a text file atomically (temporary file, then rename)."""
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`.

    On any error or interruption the temporary file is removed and `path` is untouched, so a
    reader never sees a half-written file.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = _temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _temporary_path(path: str) -> str:
    """A unique hidden name beside `path` with the same extension; files listings skip `.tmp-*`.

    Created with the process's normal permissions (unlike mkstemp's 0600), so the renamed
    result is as readable as any other output.
    """
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".tmp-{uuid.uuid4().hex[:12]}-{name}")
