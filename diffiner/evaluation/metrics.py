"""Speech quality metrics on 16 kHz mono float signals.

Every function takes 1-D numpy signals at MODEL_SAMPLE_RATE (16 kHz): resampling and channel
mixing are the caller's job, so that a score never silently depends on a hidden conversion.
The heavy back-ends (pesq, pystoi, speechmos/onnxruntime, scipy.stats) are imported inside the
functions, so `import diffiner.metrics` stays cheap for code that only needs one metric.
"""

import math
from typing import Dict, Sequence, Tuple

import numpy as np

from ..audio.io import MODEL_SAMPLE_RATE

# Added to both energies of SI-SDR: a perfect estimate then scores a large finite value
# (above 100 dB for speech at normal level) instead of +inf, which would poison averages.
SI_SDR_EPS = 1e-8

class MetricError(ValueError):
    """A signal on which a metric is undefined (e.g. PESQ finds no speech in it)."""


def _as_signal(signal: np.ndarray, name: str) -> np.ndarray:
    """Validate a mono signal and return it as float64, the precision the metrics work in."""
    signal = np.asarray(signal, dtype=np.float64)
    if signal.ndim != 1:
        raise ValueError(f"{name} must be 1-D (mono), got shape {signal.shape}")
    if signal.size == 0:
        raise ValueError(f"{name} is empty")
    return signal


def _as_pair(reference: np.ndarray, other: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Validate an intrusive metric's inputs; equal lengths are required, not trimmed here."""
    reference = _as_signal(reference, "reference")
    other = _as_signal(other, "estimate")
    if reference.shape != other.shape:
        raise ValueError(
            f"reference and estimate differ in length ({reference.size} vs {other.size} samples)"
        )
    return reference, other


def si_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant SDR in dB (Le Roux et al., 2019), after removing each signal's mean.

    The reference is scaled by the least-squares gain onto the estimate, so a louder or
    quieter but otherwise perfect estimate is not penalised. Raises MetricError when either
    signal is constant: there is then no target or no estimate to compare.
    """
    reference, estimate = _as_pair(reference, estimate)
    reference = reference - reference.mean()
    estimate = estimate - estimate.mean()
    if not np.any(reference) or not np.any(estimate):
        raise MetricError("SI-SDR is undefined for a silent (constant) signal")
    gain = np.dot(estimate, reference) / np.dot(reference, reference)
    target = gain * reference
    residual = estimate - target
    ratio = (np.dot(target, target) + SI_SDR_EPS) / (np.dot(residual, residual) + SI_SDR_EPS)
    return float(10.0 * np.log10(ratio))


def pesq_wb(reference: np.ndarray, degraded: np.ndarray) -> float:
    """Wide-band PESQ (ITU-T P.862.2), a MOS-LQO from about 1.0 to 4.64.

    Raises MetricError when PESQ refuses the pair (e.g. no utterance detected) and for an
    all-zero degraded signal, on which the pesq package fails with an obscure ValueError; so
    callers can tell "undefined for this file" from a programming error.
    """
    from pesq import PesqError, pesq

    reference, degraded = _as_pair(reference, degraded)
    if not np.any(degraded):
        raise MetricError("PESQ is undefined for an all-zero degraded signal")
    try:
        return float(pesq(MODEL_SAMPLE_RATE, reference, degraded, "wb"))
    except PesqError as exc:
        raise MetricError(f"PESQ failed: {exc}") from exc


def estoi(reference: np.ndarray, degraded: np.ndarray) -> float:
    """Extended STOI (Jensen & Taal, 2016), intelligibility in [0, 1] (can dip slightly below 0)."""
    from pystoi import stoi

    reference, degraded = _as_pair(reference, degraded)
    return float(stoi(reference, degraded, MODEL_SAMPLE_RATE, extended=True))


def dnsmos(signal: np.ndarray) -> Dict[str, float]:
    """Non-intrusive DNSMOS P.835 (SIG, BAK, OVRL) and P.808 scores, each about 1 to 5.

    Uses the ONNX models shipped inside the speechmos wheel, so it works offline. Samples are
    clipped to [-1, 1] first because speechmos rejects anything outside, and resampling can
    overshoot full scale by a hair.
    """
    from speechmos import dnsmos as speechmos_dnsmos

    signal = np.clip(_as_signal(signal, "signal"), -1.0, 1.0).astype(np.float32)
    scores = speechmos_dnsmos.run(signal, sr=MODEL_SAMPLE_RATE)
    return {
        "SIG": float(scores["sig_mos"]),
        "BAK": float(scores["bak_mos"]),
        "OVRL": float(scores["ovrl_mos"]),
        "P808": float(scores["p808_mos"]),
    }


def confidence_interval(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and half-width of its 95% confidence interval from Student's t distribution.

    The t distribution (not the normal one) keeps the interval honest for the small test sets
    speech enhancement papers use. The half-width is NaN for fewer than two values, and both
    numbers are NaN for none: there is no interval to report then.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return math.nan, math.nan
    mean = float(values.mean())
    if values.size < 2:
        return mean, math.nan
    from scipy import stats

    sem = values.std(ddof=1) / math.sqrt(values.size)
    return mean, float(stats.t.ppf(0.975, values.size - 1) * sem)
