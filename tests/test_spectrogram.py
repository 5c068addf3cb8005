import pytest
import torch

from diffiner.spectrogram import PUBLISHED, FrontEnd, front_end_of, noise_map, num_frames, spec_to_wave, wave_to_spec

from conftest import tiny_model_and_diffusion

N_FFT, HOP_LENGTH = PUBLISHED.n_fft, PUBLISHED.hop_length


def _without_dc(wave):
    window = torch.hann_window(N_FFT, periodic=True)
    stft = torch.stft(wave, N_FFT, HOP_LENGTH, N_FFT, window, center=True, pad_mode="reflect", return_complex=True)
    stft[..., 0, :] = 0
    return torch.istft(stft, N_FFT, HOP_LENGTH, N_FFT, window, center=True, length=wave.shape[-1])


def test_shape_follows_the_spec():
    wave = torch.zeros(16000 * 2 + 77)
    spec = wave_to_spec(wave)
    assert spec.shape == (2, 256, 1 + wave.numel() // 256) == (2, 256, num_frames(wave.numel()))


def test_round_trip_of_random_audio_is_exact_apart_from_the_dropped_dc_bin():
    g = torch.Generator().manual_seed(0)
    wave = torch.rand(3, 20011, generator=g) * 2 - 1
    back = spec_to_wave(wave_to_spec(wave), wave.shape[-1])
    assert back.shape == wave.shape
    assert (back - _without_dc(wave)).abs().max() < 1e-5


def test_values_are_the_raw_unnormalised_stft():
    wave = torch.sin(2 * torch.pi * 1000 * torch.arange(16000) / 16000)
    spec = wave_to_spec(wave)
    bin_1k = round(1000 / (16000 / N_FFT)) - 1  # DC dropped
    magnitude = torch.sqrt(spec[0] ** 2 + spec[1] ** 2)
    # A unit sine under a periodic Hann window of 512 gives |X| = 512 / 4 = 128 at its bin.
    assert abs(magnitude[bin_1k, 10:-10].mean().item() - 128.0) < 0.5


def test_noise_map_is_complex_magnitude_of_the_difference():
    noisy = torch.zeros(1, 2, 4, 3)
    processed = torch.zeros(1, 2, 4, 3)
    noisy[0, 0], noisy[0, 1] = 3.0, 4.0
    sigma = noise_map(noisy, processed)
    assert sigma.shape == (1, 1, 4, 3)
    assert torch.allclose(sigma, torch.full_like(sigma, 5.0))


FULL_BAND = FrontEnd(48000, 1536, 384)


def test_a_48_khz_front_end_gives_768_bins_and_inverts_exactly():
    g = torch.Generator().manual_seed(1)
    wave = torch.rand(2, 48000 + 77, generator=g) * 2 - 1
    spec = wave_to_spec(wave, FULL_BAND)
    assert spec.shape == (2, 2, 768, num_frames(wave.shape[-1], FULL_BAND)) == (2, 2, 768, 1 + wave.shape[-1] // 384)
    back = spec_to_wave(spec, wave.shape[-1], FULL_BAND)
    window = torch.hann_window(1536, periodic=True)
    stft = torch.stft(wave, 1536, 384, 1536, window, center=True, pad_mode="reflect", return_complex=True)
    stft[..., 0, :] = 0
    without_dc = torch.istft(stft, 1536, 384, 1536, window, center=True, length=wave.shape[-1])
    assert (back - without_dc).abs().max() < 1e-5


def test_front_end_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match="even n_fft"):
        FrontEnd(48000, 1535, 384)
    with pytest.raises(ValueError, match="hop_length must be in 1..n_fft / 2"):
        FrontEnd(48000, 1536, 1000)
    with pytest.raises(ValueError, match="window must be one of hann, hamming"):
        FrontEnd(window="kaiser")
    # 1534 (SGMSE+'s EARS-WHAM size) gives 767 bins: no multiple of the tiny network's 8.
    with pytest.raises(ValueError, match="n_fft 1534 gives 767 frequency bins, not a multiple of 8"):
        tiny_model_and_diffusion(sample_rate=48000, n_fft=1534, hop_length=384)


def test_the_published_model_is_built_for_the_published_front_end():
    model, _ = tiny_model_and_diffusion()
    assert front_end_of(model) == PUBLISHED == FrontEnd(16000, 512, 256, "hann")
    assert front_end_of(torch.nn.Linear(1, 1)) is PUBLISHED
