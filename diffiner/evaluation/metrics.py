"""Speech quality metrics on mono float signals.

PESQ (wide-band), ESTOI, SI-SDR and DNSMOS take 1-D numpy signals at SCORING_RATE (16 kHz): wide-band
PESQ and DNSMOS are defined at 16 kHz, ESTOI resamples to 10 kHz inside. The log-spectral
distance above 8 kHz (`lsd_high`) takes signals at the file's own rate, where that band lives.
Resampling and channel mixing are the caller's job, so that a score never silently depends on a
hidden conversion.
The heavy back-ends (pesq, pystoi, speechmos/onnxruntime, scipy.stats) are imported inside the
functions, so `import diffiner.evaluation.metrics` stays cheap for code that only needs one
metric.

A score that cannot be computed is an exception, never a made-up number, and the exception says
whose fault it is: `MetricError` when the scored signal (a system's output) is at fault, e.g. it is
silent; `UnscorableFile` when the file itself is, e.g. its clean reference is silent or too short,
so that no system's version of it can be scored.
"""

import math
import warnings
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

# The rate of the wide-band metrics: P.862.2 and DNSMOS are defined at 16 kHz (not the model's
# rate: a 48 kHz prior's outputs are scored at 16 kHz by these, and above 8 kHz by lsd_high).
SCORING_RATE = 16000

# A perfect estimate leaves no residual: its SI-SDR is capped here instead of +inf, which would
# poison averages. The cap is relative to the target's energy, so the metric stays invariant to
# the estimate's level (an absolute epsilon on both energies made a -120 dBFS noise score -7 dB).
SI_SDR_CEILING_DB = 150.0

# Lowest scores: an output on which a metric is undefined (a silent one) gets its metric's floor,
# and a computed score below the floor is raised to it, so a failed output never scores above a
# working one. PESQ-WB's mapping (P.862.2) tends to 0.999 and never reaches it; ESTOI is a
# correlation that only noise makes negative; SI-SDR has no lower bound; the MOS estimators
# (DNSMOS, NISQA) rate on the 1-to-5 absolute category rating scale.
PESQ_FLOOR = 1.0
ESTOI_FLOOR = 0.0
SI_SDR_FLOOR_DB = -50.0
MOS_FLOOR = 1.0
# The log-spectral distance is lower for better outputs: its worst value, given to an output on
# which it is undefined, is that of a difference of 100 dB in every bin (a silent output against
# speech at a normal level comes out near 6).
LSD_CEILING = 10.0


class MetricError(ValueError):
    """A metric is undefined for the scored signal (e.g. it is silent): that signal's fault."""


class UnscorableFile(MetricError):
    """A metric is undefined for the file itself, whatever system's version of it is scored
    (e.g. its clean reference is silent or too short)."""


def is_silent(signal: np.ndarray) -> bool:
    """True for a constant signal (digital silence, or silence with a DC offset)."""
    return bool(np.ptp(signal) == 0.0)


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


# The same words from every metric, so that a caller can report several metrics in one line.
SILENT_REFERENCE = "the clean reference is silent"
SILENT_SIGNAL = "the scored signal is silent"


def _check_reference(reference: np.ndarray) -> None:
    """A silent reference leaves the file unscorable by an intrusive metric."""
    if is_silent(reference):
        raise UnscorableFile(SILENT_REFERENCE)


def check_signal(signal: np.ndarray) -> None:
    """Nothing to score in a silent signal: that output's failure."""
    if is_silent(signal):
        raise MetricError(SILENT_SIGNAL)


# Near-silence. PESQ and DNSMOS normalise the level of what they score, so an output that is
# almost silent but not constant (dither, a faint hiss) is amplified to a normal level and can
# outscore the noisy input. An output whose level is more than NEAR_SILENCE_DB below its file's
# reference level has lost the speech along with the noise: 40 dB is a hundredth of the
# amplitude, so with the reference played at conversational loudness (about 60 dB SPL) the output
# is at about 20 dB SPL, below the background of a quiet room. An enhancer attenuates the noise,
# not the speech it keeps, and never comes near that.
NEAR_SILENCE_DB = 40.0
# The reference level where a file has no usable clean reference and no noisy input: the active
# speech level test material is normalised to (ITU-T P.56, -26 dBov), here in dB re full scale.
NOMINAL_SPEECH_LEVEL_DB = -26.0


def level_db(signal: np.ndarray) -> float:
    """RMS level about the mean, in dB re full scale (1.0): a DC offset is no sound; -inf for a
    constant signal."""
    signal = _as_signal(signal, "signal")
    if is_silent(signal):  # the mean of a constant is off by rounding, which would leave a "level"
        return -math.inf
    power = float(np.mean(np.square(signal - signal.mean())))
    return 10.0 * math.log10(power) if power > 0.0 else -math.inf  # 0 when squares underflow


def near_silence(signal: np.ndarray, reference_level: float, reference_name: str) -> Optional[str]:
    """Why `signal` counts as silent (its level is more than NEAR_SILENCE_DB below
    `reference_level`, that of the file's `reference_name`), or None when it does not."""
    level = level_db(signal)
    if level >= reference_level - NEAR_SILENCE_DB:
        return None
    if level == -math.inf:
        return SILENT_SIGNAL
    return (f"near-silent: {reference_level - level:.1f} dB below {reference_name} "
            f"(more than {NEAR_SILENCE_DB:g} dB counts as silent)")


def si_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant SDR in dB (Le Roux et al., 2019), after removing each signal's mean.

    The reference is scaled by the least-squares gain onto the estimate, so a louder or
    quieter but otherwise perfect estimate is not penalised; at most SI_SDR_CEILING_DB, and -inf
    for an estimate orthogonal to the reference. Raises UnscorableFile for a constant reference
    (no target) and MetricError for a constant estimate.
    """
    reference, estimate = _as_pair(reference, estimate)
    _check_reference(reference)
    check_signal(estimate)
    reference = reference - reference.mean()
    estimate = estimate - estimate.mean()
    gain = np.dot(estimate, reference) / np.dot(reference, reference)
    target = gain * reference
    residual = estimate - target
    target_energy = np.dot(target, target)
    if target_energy == 0.0:  # an estimate orthogonal to the reference holds none of it
        return -math.inf
    residual_energy = max(np.dot(residual, residual), target_energy * 10.0 ** (-SI_SDR_CEILING_DB / 10.0))
    return float(10.0 * np.log10(target_energy / residual_energy))


def pesq_wb(reference: np.ndarray, degraded: np.ndarray) -> float:
    """Wide-band PESQ (ITU-T P.862.2), a MOS-LQO from about 1.0 to 4.64.

    Raises UnscorableFile when PESQ cannot use the reference (silent, shorter than 0.25 s, no
    utterance detected in it) and MetricError when it cannot use the degraded signal (silent,
    on which the pesq package fails with an obscure ValueError, or no utterance found in it).
    Telling the two apart costs one more PESQ call, only when a score is undefined.
    """
    from pesq import PesqError, pesq

    reference, degraded = _as_pair(reference, degraded)
    _check_reference(reference)
    if is_silent(degraded):
        failure = SILENT_SIGNAL
    else:
        try:
            return float(pesq(SCORING_RATE, reference, degraded, "wb"))
        except PesqError as exc:
            failure = f"PESQ refused the output: {_pesq_message(exc)}"
    # PesqError does not say which signal it refused: if the reference cannot even be scored
    # against itself, the file is at fault (for every system), else the degraded signal is.
    try:
        pesq(SCORING_RATE, reference, reference, "wb")
    except PesqError as exc:
        raise UnscorableFile(f"PESQ cannot use the clean reference: {_pesq_message(exc)}") from exc
    raise MetricError(failure)


def _pesq_message(exc: Exception) -> str:
    """The pesq package's C messages arrive as bytes: b'No utterances detected'."""
    message = exc.args[0] if exc.args else exc
    return message.decode(errors="replace") if isinstance(message, bytes) else str(message)


def estoi(reference: np.ndarray, degraded: np.ndarray) -> float:
    """Extended STOI (Jensen & Taal, 2016), intelligibility in [0, 1] (can dip slightly below 0).

    Raises UnscorableFile when the reference has fewer than 30 frames (about 0.4 s) of speech left
    after pystoi drops its silent frames: pystoi then returns 1e-5 with a RuntimeWarning, a
    number that must not enter a mean. MetricError for a silent degraded signal.
    """
    from pystoi import stoi

    reference, degraded = _as_pair(reference, degraded)
    _check_reference(reference)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = float(stoi(reference, degraded, SCORING_RATE, extended=True))
    # Silent frames are chosen on the reference alone, so too few of them is the file's problem
    # (checked first: then a silent output is not floored for a file left out for every system).
    if any(str(w.message).startswith("Not enough STFT frames") for w in caught):
        raise UnscorableFile("the clean reference has under 30 frames (about 0.4 s) of speech for ESTOI")
    check_signal(degraded)
    return score


def dnsmos(signal: np.ndarray) -> Dict[str, float]:
    """Non-intrusive DNSMOS P.835 (SIG, BAK, OVRL) and P.808 scores, each about 1 to 5.

    Uses the ONNX models shipped inside the speechmos wheel, so it works offline. Samples are
    clipped to [-1, 1] first because speechmos rejects anything outside, and resampling can
    overshoot full scale by a hair. Raises MetricError for a silent signal: there is no speech
    to rate, and the networks' numbers for it (above those of noisy speech) mean nothing.
    """
    from speechmos import dnsmos as speechmos_dnsmos

    signal = np.clip(_as_signal(signal, "signal"), -1.0, 1.0).astype(np.float32)
    check_signal(signal)
    scores = speechmos_dnsmos.run(signal, sr=SCORING_RATE)
    return {
        "SIG": float(scores["sig_mos"]),
        "BAK": float(scores["bak_mos"]),
        "OVRL": float(scores["ovrl_mos"]),
        "P808": float(scores["p808_mos"]),
    }


# The band of lsd_high: what a 16 kHz refiner cannot produce. The analysis takes 32 ms windows,
# hop a quarter of that, and a power floor 100 dB below the reference's loudest bin, so that a
# bin silent in one signal gives a large but finite distance whatever the file's level.
LSD_LOW_HZ = 8000.0
LSD_WINDOW_S = 0.032
LSD_FLOOR_DB = 100.0


def lsd_high(reference: np.ndarray, degraded: np.ndarray, sample_rate: int) -> float:
    """Log-spectral distance above 8 kHz between equal-length signals at `sample_rate`:
    the mean over frames of the RMS over the bins from LSD_LOW_HZ to Nyquist of
    log10(P_reference / P_degraded), with P the power spectrum (the unit of the bandwidth-
    extension literature, e.g. NU-Wave: 1.0 is 10 dB RMS). 0 for identical signals; lower is better.

    Raises UnscorableFile when the rate holds no band above 8 kHz (at most 16 kHz) or the
    reference is silent, MetricError for a silent degraded signal.
    """
    from scipy import signal as sps

    reference, degraded = _as_pair(reference, degraded)
    if sample_rate <= 2 * LSD_LOW_HZ:
        raise UnscorableFile(f"the file's rate ({sample_rate} Hz) holds no band above {LSD_LOW_HZ / 1000:g} kHz")
    _check_reference(reference)
    check_signal(degraded)
    window = int(2 ** math.ceil(math.log2(LSD_WINDOW_S * sample_rate)))
    window = min(window, reference.size)
    spectra = [np.abs(sps.stft(x, fs=sample_rate, nperseg=window, noverlap=window - window // 4)[2]) ** 2
               for x in (reference, degraded)]
    freqs = np.fft.rfftfreq(window, 1.0 / sample_rate)
    band = freqs >= LSD_LOW_HZ
    floor = spectra[0].max() * 10.0 ** (-LSD_FLOOR_DB / 10.0)
    ratio = np.log10(np.maximum(spectra[0][band], floor) / np.maximum(spectra[1][band], floor))
    return float(np.mean(np.sqrt(np.mean(ratio ** 2, axis=0))))


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
