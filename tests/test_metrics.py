"""Tests of diffiner.evaluation.metrics on synthetic, seeded speech-like signals."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffiner.evaluation import metrics

from conftest import speech_like, with_noise

SR = 16000
# speechmos tiles a clip by doubling until it covers 9.01 s, then scores one window per
# second: 2.4 s doubles to 9.6 s, a single window, which keeps DNSMOS fast in tests.
CLIP_SECONDS = 2.4


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return speech_like(CLIP_SECONDS)


def test_pesq_of_identical_signals_is_near_maximum(clean):
    assert metrics.pesq_wb(clean, clean) >= 4.5


def test_si_sdr_of_identical_signals_is_very_high(clean):
    assert metrics.si_sdr(clean, clean) >= 50.0


def test_si_sdr_ignores_gain_and_offset(clean):
    assert metrics.si_sdr(clean, 0.3 * clean + 0.05) >= 50.0


def test_si_sdr_is_scale_invariant_down_to_very_quiet_estimates(clean):
    """An absolute epsilon added to the energies made a -120 dBFS noise score about -7 dB
    instead of its true -46 dB: quiet garbage must not beat a loud noisy input."""
    noise = np.random.default_rng(0).standard_normal(clean.size)
    loud = metrics.si_sdr(clean, 0.1 * noise)
    assert loud < -40.0
    for gain in (1e-3, 1e-6, 1e-9):
        assert metrics.si_sdr(clean, gain * noise) == pytest.approx(loud, abs=1e-6)
    assert metrics.si_sdr(1e-6 * clean, 1e-6 * clean) >= 50.0


def test_si_sdr_matches_the_added_noise_level(clean):
    assert metrics.si_sdr(clean, with_noise(clean, 10.0)) == pytest.approx(10.0, abs=0.3)


@pytest.mark.parametrize("metric", [metrics.pesq_wb, metrics.estoi, metrics.si_sdr])
def test_more_noise_scores_lower(clean, metric):
    assert metric(clean, with_noise(clean, 20.0)) > metric(clean, with_noise(clean, 5.0))


def test_estoi_of_identical_signals_is_one(clean):
    assert metrics.estoi(clean, clean) == pytest.approx(1.0, abs=1e-6)


def test_dnsmos_returns_four_scores_between_1_and_5(clean):
    scores = metrics.dnsmos(clean)
    assert set(scores) == {"SIG", "BAK", "OVRL", "P808"}
    for value in scores.values():
        assert math.isfinite(value) and 1.0 <= value <= 5.0


def test_dnsmos_background_score_drops_with_noise(clean):
    assert metrics.dnsmos(with_noise(clean, 5.0))["BAK"] < metrics.dnsmos(clean)["BAK"]


def test_intrusive_metrics_reject_length_mismatch_and_multichannel(clean):
    with pytest.raises(ValueError, match="length"):
        metrics.si_sdr(clean, clean[:-1])
    with pytest.raises(ValueError, match="1-D"):
        metrics.pesq_wb(np.stack([clean, clean]), np.stack([clean, clean]))


@pytest.mark.parametrize("metric", [metrics.pesq_wb, metrics.estoi, metrics.si_sdr])
@pytest.mark.parametrize("level", [0.0, 0.1])
def test_silent_estimate_is_undefined_for_the_estimate_only(clean, metric, level):
    """A constant (silent) output makes the score undefined for that output: MetricError, but not
    UnscorableFile, so the caller sets it to the floor instead of leaving the file out."""
    with pytest.raises(metrics.MetricError) as raised:
        metric(clean, np.full_like(clean, level))
    assert not isinstance(raised.value, metrics.UnscorableFile)


@pytest.mark.parametrize("metric", [metrics.pesq_wb, metrics.estoi, metrics.si_sdr])
def test_silent_reference_makes_the_file_unscorable(clean, metric):
    with pytest.raises(metrics.UnscorableFile, match="reference"):
        metric(np.zeros_like(clean), clean)


def test_reference_too_short_for_estoi_and_pesq_is_unscorable(clean):
    """pystoi returns 1e-5 with a warning under 30 frames of reference speech (here 0.5 s), and
    PESQ refuses under 0.25 s: both are properties of the file, not of one system's output."""
    half_second = clean[: SR // 2]
    with pytest.raises(metrics.UnscorableFile, match="ESTOI"):
        metrics.estoi(half_second, with_noise(half_second, 10.0))
    with pytest.raises(metrics.UnscorableFile, match="PESQ"):
        metrics.pesq_wb(clean[:2000], with_noise(clean[:2000], 10.0))


def test_dnsmos_of_silence_is_undefined(clean):
    with pytest.raises(metrics.MetricError):
        metrics.dnsmos(np.zeros_like(clean))


def test_confidence_interval_uses_t_distribution():
    mean, half_width = metrics.confidence_interval([1.0, 2.0, 3.0, 4.0])
    # sd = 1.290994, sem = 0.645497, t(0.975, df=3) = 3.182446
    assert mean == pytest.approx(2.5)
    assert half_width == pytest.approx(3.182446 * 0.645497, rel=1e-5)


def test_confidence_interval_of_too_few_values_is_nan():
    mean, half_width = metrics.confidence_interval([3.0])
    assert mean == 3.0 and math.isnan(half_width)
    assert all(math.isnan(v) for v in metrics.confidence_interval([]))


@pytest.mark.slow  # imports in a fresh Python subprocess
def test_import_does_not_load_heavy_backends():
    code = (
        "import sys, diffiner.evaluation.metrics; "
        "heavy = {'pesq', 'pystoi', 'speechmos', 'onnxruntime', 'librosa', 'scipy.stats'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    repo_root = Path(__file__).resolve().parents[1]
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo_root
    )
    assert output.stdout.strip() == "[]"


# float64 mean of squares over 16000 samples: relative error below n * eps = 3.6e-12, which is
# 1.6e-11 dB (10 / ln 10 per unit of relative power); 1e-9 dB is far above that and far below any
# level difference the rule cares about.
LEVEL_ATOL_DB = 1e-9


def test_level_is_the_rms_about_the_mean_in_db_full_scale():
    tone = np.sin(2 * np.pi * 1000 * np.arange(SR) / SR)  # 1000 whole periods: mean square 1/2
    assert metrics.level_db(tone) == pytest.approx(-10 * math.log10(2), abs=LEVEL_ATOL_DB)
    assert metrics.level_db(0.01 * tone + 0.5) == pytest.approx(-40 - 10 * math.log10(2), abs=LEVEL_ATOL_DB)
    assert metrics.level_db(np.full(SR, 0.3)) == -math.inf


def test_near_silence_is_more_than_40_db_below_the_reference_level(clean):
    reference = metrics.level_db(clean)
    # 1 dB either side of the limit: far beyond the level's rounding (LEVEL_ATOL_DB)
    assert metrics.near_silence(clean * 10 ** (-39 / 20), reference, "the clean reference") is None
    reason = metrics.near_silence(clean * 10 ** (-41 / 20), reference, "the clean reference")
    assert reason.startswith("near-silent: 41.0 dB below the clean reference")
    dither = np.random.default_rng(0).integers(-1, 2, clean.size) / 32768  # ±1 LSB of 16 bits
    assert metrics.near_silence(dither, reference, "the clean reference") is not None
    assert metrics.near_silence(np.zeros_like(clean), reference, "x") == metrics.SILENT_SIGNAL


def full_band_speech(rate: int = 48000) -> np.ndarray:
    """Speech-like audio with its own content up to 20 kHz (the band lsd_high measures)."""
    from scipy import signal

    speech = speech_like(1.5, rate, seed=3).astype(np.float64)
    sos = signal.butter(6, (9000, 20000), btype="bandpass", fs=rate, output="sos")
    rng = np.random.default_rng(4)
    air = signal.sosfilt(sos, rng.standard_normal(speech.size))
    # And white noise 14 dB down, so that almost no bin is below lsd_high's power floor, 100 dB
    # below the loudest bin (it counts bins silent in both signals as equal).
    return speech + 0.05 * air / np.sqrt(np.mean(air ** 2)) + 0.1 * rng.standard_normal(speech.size)


def test_lsd_above_8_khz_measures_the_high_band_only():
    from scipy import signal

    rate = 48000
    clean = full_band_speech(rate)
    assert metrics.lsd_high(clean, clean, rate) == 0.0
    # Every bin 6 dB down: log10(4) in every bin, frame and band alike, except the bins where the
    # white floor's power (exponentially distributed) falls below lsd_high's floor, 60 dB under
    # its mean: a fraction of about 1e-6 of the bins, each off by at most log10(4).
    assert metrics.lsd_high(clean, 0.5 * clean, rate) == pytest.approx(math.log10(4.0), rel=1e-4)
    # A change below 8 kHz alone leaves it near zero; the band cut away (a 16 kHz refiner's output) does not.
    low = signal.sosfiltfilt(signal.butter(8, 6000, fs=rate, output="sos"), clean)
    below = clean + 0.3 * low
    narrow = signal.sosfiltfilt(signal.butter(12, 7500, fs=rate, output="sos"), clean)
    assert metrics.lsd_high(clean, below, rate) < 0.05
    assert metrics.lsd_high(clean, narrow, rate) > 2.0


def test_lsd_is_undefined_without_a_band_above_8_khz_or_for_silence():
    clean = full_band_speech(48000)
    with pytest.raises(metrics.UnscorableFile, match="holds no band above 8 kHz"):
        metrics.lsd_high(clean[:16000], clean[:16000], 16000)
    with pytest.raises(metrics.MetricError, match="silent"):
        metrics.lsd_high(clean, np.zeros_like(clean), 48000)
    with pytest.raises(metrics.UnscorableFile, match="silent"):
        metrics.lsd_high(np.zeros_like(clean), clean, 48000)


def test_lsd_scores_outputs_at_the_reference_rate_and_floors_a_failed_one_at_its_ceiling():
    from diffiner.evaluation import scoring
    from diffiner.audio.io import resample

    clean = full_band_speech(48000).astype(np.float32)
    signal_of = lambda audio, rate: scoring.Signal(resample(audio, rate, 16000), audio, rate)  # noqa: E731
    reference = signal_of(clean, 48000)
    kept, _, _ = scoring.score_signal(signal_of(0.9 * clean, 48000), reference, ["lsd"])
    # An output written at 16 kHz is brought to the reference's 48 kHz, where it has no high band.
    at_16k, _, _ = scoring.score_signal(signal_of(resample(clean, 48000, 16000), 16000), reference, ["lsd"])
    assert kept["lsd"] == pytest.approx(2 * math.log10(1 / 0.9), rel=1e-4) and at_16k["lsd"] > 2.0
    values, floored = scoring._at_least_floor("lsd", {"lsd": math.nan})
    assert values == {"lsd": metrics.LSD_CEILING} and floored == ["lsd"]
    assert scoring._at_least_floor("lsd", {"lsd": 3.0}) == ({"lsd": 3.0}, [])
    assert "lsd" not in scoring.resolve_metrics(None, has_clean=True)
    assert scoring.resolve_metrics(["lsd", "pesq"], has_clean=True) == ("pesq", "lsd")
