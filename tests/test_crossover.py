"""The complementary crossover that keeps the processed file's band above the model's."""

import numpy as np
import pytest

from diffiner.audio import crossover
from diffiner.audio.io import resample

MODEL_RATE = 16000


def band_levels_db(reference: np.ndarray, other: np.ndarray, rate: int, low: float, high: float, width: float):
    """Level of `other` against `reference`, in dB, in consecutive bands of `width` Hz from `low` to `high`."""
    spectrum_ref, spectrum = np.abs(np.fft.rfft(reference)) ** 2, np.abs(np.fft.rfft(other)) ** 2
    freqs = np.fft.rfftfreq(reference.size, 1.0 / rate)
    levels = []
    for start in np.arange(low, high, width):
        band = (freqs >= start) & (freqs < start + width)
        levels.append(10 * np.log10(spectrum[band].sum() / spectrum_ref[band].sum()))
    return np.array(levels)


@pytest.mark.parametrize("rate", [48000, 44100])
def test_splitting_and_summing_white_noise_gives_it_back(rate):
    noise = np.random.default_rng(0).standard_normal(2 * rate)
    low, high = crossover.split(noise, rate, MODEL_RATE)
    error_db = 10 * np.log10(np.sum((low + high - noise) ** 2) / np.sum(noise ** 2))
    assert error_db < -60
    # Both branches carry signal: the sum is not one branch passing everything.
    assert np.std(low) > 0.3 * np.std(noise) and np.std(high) > 0.3 * np.std(noise)


@pytest.mark.parametrize("rate", [48000, 44100, 24000])
def test_the_branches_are_linear_phase_and_split_where_stated(rate):
    kernel = crossover.lowpass_kernel(rate, MODEL_RATE)
    assert kernel.size % 2 == 1 and np.array_equal(kernel, kernel[::-1])
    response = np.abs(np.fft.rfft(kernel, 1 << 17))
    freqs = np.fft.rfftfreq(1 << 17, 1.0 / rate)
    nyquist = MODEL_RATE / 2
    passband, stopband = freqs <= crossover.PASS_EDGE * nyquist, freqs >= crossover.STOP_EDGE * nyquist
    # Kaiser's design for 80 dB: ripple of 10**(-80/20) in both bands.
    assert np.abs(response[passband] - 1).max() < 2e-4 and response[stopband].max() < 2e-4


@pytest.mark.parametrize("rate", [48000, 44100])
def test_an_unchanged_low_band_through_the_resampler_has_no_seam_at_the_crossover(rate):
    """What a refiner that changes nothing gives: the processed signal down to the model's rate
    and back, joined with the processed signal. Within 1 dB in every 100 Hz band around the
    crossover (a transition above the resampler's passband, e.g. 7.0-7.8 kHz, notches by
    several dB at 7.5-7.8 kHz)."""
    noise = np.random.default_rng(1).standard_normal(4 * rate).astype(np.float32)
    refined = resample(resample(noise, rate, MODEL_RATE), MODEL_RATE, rate)
    joined = crossover.join(refined, noise, rate, MODEL_RATE)
    levels = band_levels_db(noise, joined, rate, 5000, 10000, 100)
    assert np.abs(levels).max() < 1.0


def test_the_high_band_comes_from_the_processed_side_and_the_low_band_from_the_refined():
    rate = 48000
    rng = np.random.default_rng(2)
    refined, processed = rng.standard_normal((2, 2, rate))
    joined = crossover.join(refined, processed, rate, MODEL_RATE)
    assert joined.shape == (2, rate) and joined.dtype == np.float32
    assert np.abs(band_levels_db(processed[0], joined[0], rate, 9000, 23000, 1000)).max() < 0.1
    assert np.abs(band_levels_db(refined[1], joined[1], rate, 100, 6500, 500)).max() < 0.1


def test_a_rate_without_room_above_the_model_band_is_refused():
    assert not crossover.applies(16000, 48000, MODEL_RATE) and not crossover.applies(48000, 16000, MODEL_RATE)
    assert crossover.applies(22050, 48000, MODEL_RATE)
    with pytest.raises(ValueError, match="needs an output rate above"):
        crossover.lowpass_kernel(14000, MODEL_RATE)


@pytest.mark.parametrize("chunk", [1000, 97, 48000])
def test_the_streaming_join_gives_the_whole_join_chunk_by_chunk(chunk):
    rate = 48000
    rng = np.random.default_rng(3)
    refined, processed = rng.standard_normal((2, 2, rate + 333))
    stream = crossover.StreamingJoin(rate, MODEL_RATE)
    parts = [stream.push(refined[:, k:k + chunk], processed[:, k:k + chunk])
             for k in range(0, refined.shape[-1], chunk)]
    streamed = np.concatenate(parts + [stream.finish()], axis=-1)
    whole = crossover.join(refined, processed, rate, MODEL_RATE)
    assert streamed.shape == whole.shape
    # Float64 convolutions of one kernel (347 taps, |h| summing to about 1.5) in another order,
    # rounded to float32: the float32 rounding of values of a few units dominates.
    assert np.abs(streamed - whole).max() < 8 * np.finfo(np.float32).eps * np.abs(whole).max()
