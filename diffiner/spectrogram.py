"""The signal front-end: waveform <-> the spectrogram tensor the network sees (docs/method.md,
"The signal front-end").

A `FrontEnd` is the sample rate, FFT size, hop and window a prior was trained with; they are
model settings, carried with the checkpoint (script_util.FRONT_END_FLAGS). The STFT is centred
with reflect padding and not normalised, the window as long as the FFT and periodic. The DC bin
is dropped and real/imaginary parts become two channels, so a mono clip becomes a
(2, n_fft / 2, frames) tensor of raw STFT values, with no scaling of any kind, since the
published weights were trained on exactly these values.

The published front-end (`PUBLISHED`): 16 kHz, 512-point FFT, periodic Hann window, hop 256:
(2, 256, frames). A 48 kHz prior, e.g. n_fft 1536 and hop 384: (2, 768, frames).
"""

from dataclasses import dataclass
from typing import Any, Dict, Mapping

import torch

WINDOWS = {"hann": torch.hann_window, "hamming": torch.hamming_window}


@dataclass(frozen=True)
class FrontEnd:
    """The STFT a prior works in."""

    sample_rate: int = 16000
    n_fft: int = 512
    hop_length: int = 256
    window: str = "hann"

    def __post_init__(self):
        if self.sample_rate <= 0 or self.n_fft < 4 or self.n_fft % 2:
            raise ValueError(f"the front-end needs sample_rate > 0 and an even n_fft >= 4, got sample_rate "
                             f"{self.sample_rate} and n_fft {self.n_fft}")
        # Hops longer than half the window leave samples that no frame weighs enough to invert.
        if not 0 < self.hop_length <= self.n_fft // 2:
            raise ValueError(f"hop_length must be in 1..n_fft / 2 = {self.n_fft // 2}, got {self.hop_length}")
        if self.window not in WINDOWS:
            raise ValueError(f"window must be one of {', '.join(WINDOWS)}, got {self.window!r}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "FrontEnd":
        """The front-end of a model's settings (model_and_diffusion_defaults' keys)."""
        return cls(settings["sample_rate"], settings["n_fft"], settings["hop_length"], settings["window"])

    @property
    def win_length(self) -> int:
        return self.n_fft

    @property
    def num_bins(self) -> int:
        """Frequency bins of the spectrogram tensor: the one-sided STFT without its DC bin."""
        return self.n_fft // 2

    @property
    def min_samples(self) -> int:
        """The shortest waveform the centred STFT accepts: its reflect padding of n_fft / 2 samples
        at each end needs more input samples than that."""
        return self.n_fft // 2 + 1

    def describe(self) -> Dict[str, Any]:
        """The front-end as config.yml records it."""
        return {"sample_rate": self.sample_rate, "n_fft": self.n_fft, "win_length": self.win_length,
                "hop_length": self.hop_length, "window": f"{self.window} (periodic)", "center": True,
                "pad_mode": "reflect", "dc_bin": "dropped", "bins": self.num_bins}

    def _window(self, device) -> torch.Tensor:
        return WINDOWS[self.window](self.win_length, periodic=True, device=device, dtype=torch.float32)


PUBLISHED = FrontEnd()


def front_end_of(model: torch.nn.Module) -> FrontEnd:
    """The front-end a network was built for: script_util.create_model_and_diffusion records it
    as `model.front_end`; a network built otherwise is taken to be the published one's."""
    return getattr(model, "front_end", PUBLISHED)


def num_frames(num_samples: int, front_end: FrontEnd = PUBLISHED) -> int:
    """Frames of the centred STFT of `num_samples` samples."""
    return 1 + num_samples // front_end.hop_length


def wave_to_spec(wave: torch.Tensor, front_end: FrontEnd = PUBLISHED) -> torch.Tensor:
    """Waveform (..., samples) -> spectrogram (..., 2, bins, frames); samples >= min_samples."""
    lead = wave.shape[:-1]
    stft = torch.stft(
        wave.reshape(-1, wave.shape[-1]).float(), n_fft=front_end.n_fft, hop_length=front_end.hop_length,
        win_length=front_end.win_length, window=front_end._window(wave.device), center=True, pad_mode="reflect",
        normalized=False, onesided=True, return_complex=True,
    )[:, 1:]
    spec = torch.stack([stft.real, stft.imag], dim=1)
    return spec.reshape(lead + spec.shape[1:])


def spec_to_wave(spec: torch.Tensor, length: int, front_end: FrontEnd = PUBLISHED) -> torch.Tensor:
    """Spectrogram (..., 2, bins, frames) -> waveform (..., length); DC is restored as zero.

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
        stft, n_fft=front_end.n_fft, hop_length=front_end.hop_length, win_length=front_end.win_length,
        window=front_end._window(spec.device), center=True, normalized=False, onesided=True, length=length,
    )
    return wave.reshape(lead + (length,))


def noise_map(noisy_spec: torch.Tensor, processed_spec: torch.Tensor) -> torch.Tensor:
    """Per-bin noise level sigma_y = |noisy - processed| of complex spectrograms.

    Inputs (..., 2, F, T); output (..., 1, F, T), shared by the real and imaginary channel.
    """
    diff = noisy_spec - processed_spec
    return torch.sqrt(diff[..., 0:1, :, :] ** 2 + diff[..., 1:2, :, :] ** 2)
