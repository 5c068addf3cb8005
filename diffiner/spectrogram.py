"""The signal front-end of the published model (docs/method.md, "The signal front-end").

STFT: 512-point FFT, 512-sample periodic Hann window, hop 256, centred with reflect padding,
not normalised. The DC bin is dropped and real/imaginary parts become two channels, so a
mono clip becomes a (2, 256, frames) tensor of raw STFT values — no scaling of any kind,
since the published weights were trained on exactly these values.
"""

import torch

N_FFT = 512
HOP_LENGTH = 256
WIN_LENGTH = 512
NUM_BINS = N_FFT // 2  # after dropping DC
# The shortest waveform the centred STFT accepts: its reflect padding of N_FFT // 2 samples at
# each end needs more input samples than that.
MIN_SAMPLES = N_FFT // 2 + 1


def _window(device, dtype=torch.float32) -> torch.Tensor:
    return torch.hann_window(WIN_LENGTH, periodic=True, device=device, dtype=dtype)


def num_frames(num_samples: int) -> int:
    """Frames of the centred STFT of `num_samples` samples."""
    return 1 + num_samples // HOP_LENGTH


def wave_to_spec(wave: torch.Tensor) -> torch.Tensor:
    """Waveform (..., samples) -> spectrogram (..., 2, 256, frames); samples >= MIN_SAMPLES."""
    lead = wave.shape[:-1]
    stft = torch.stft(
        wave.reshape(-1, wave.shape[-1]).float(), n_fft=N_FFT, hop_length=HOP_LENGTH,
        win_length=WIN_LENGTH, window=_window(wave.device), center=True, pad_mode="reflect",
        normalized=False, onesided=True, return_complex=True,
    )[:, 1:]
    spec = torch.stack([stft.real, stft.imag], dim=1)
    return spec.reshape(lead + spec.shape[1:])


def spec_to_wave(spec: torch.Tensor, length: int) -> torch.Tensor:
    """Spectrogram (..., 2, 256, frames) -> waveform (..., length); DC is restored as zero.

    Frames past `length` are inverted too and then trimmed away. For a generated spectrogram,
    pass at least num_frames(length) + 1 frames: the last partial hop of a signal is otherwise
    covered by one frame alone, whose squared window is near zero there, so the overlap-add's
    normalisation would amplify any inconsistency between frames into a click.
    """
    lead = spec.shape[:-3]
    flat = spec.reshape((-1,) + spec.shape[-3:]).float()
    stft = torch.complex(flat[:, 0], flat[:, 1])
    stft = torch.cat([torch.zeros_like(stft[:, :1]), stft], dim=1)
    wave = torch.istft(
        stft, n_fft=N_FFT, hop_length=HOP_LENGTH, win_length=WIN_LENGTH, window=_window(spec.device),
        center=True, normalized=False, onesided=True, length=length,
    )
    return wave.reshape(lead + (length,))


def noise_map(noisy_spec: torch.Tensor, processed_spec: torch.Tensor) -> torch.Tensor:
    """Per-bin noise level sigma_y = |noisy - processed| of complex spectrograms.

    Inputs (..., 2, F, T); output (..., 1, F, T), shared by the real and imaginary channel.
    """
    diff = noisy_spec - processed_spec
    return torch.sqrt(diff[..., 0:1, :, :] ** 2 + diff[..., 1:2, :, :] ** 2)
