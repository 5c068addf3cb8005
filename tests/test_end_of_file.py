"""The end of a refined file: no click where a recording ends in silence.

The last partial hop of a signal (up to 255 samples) lies under the last frame's window alone,
where the squared Hann window that normalises the overlap-add falls to zero; inverting the
generated spectrogram without the next frame divides its inconsistencies by that weight.
"""

import os

import numpy as np
import pytest
import torch

from diffiner import pipeline
from diffiner.audio.io import load_audio
from diffiner.checkpoints import load_model
from diffiner.pipeline import Refiner, padded_width
from diffiner.seeding import numpy_rng
from diffiner.spectrogram import PUBLISHED, num_frames, spec_to_wave

HOP_LENGTH = PUBLISHED.hop_length

from conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(ROOT, "demo", "model", "diffiner_demo.pt")  # TINY's settings, trained
CLIP = os.path.join(ROOT, "demo", "audio", "clean", "arctic_a0007.wav")
TAIL, BEFORE = 8, 4000
BOUND = 6.0  # the peak of the last 8 samples may be at most 6 x the rms of the 4,000 before them


def tail_ratio(audio):
    before = np.asarray(audio[-TAIL - BEFORE:-TAIL], dtype=np.float64)
    return float(np.abs(audio[-TAIL:]).max() / np.sqrt(np.mean(before ** 2)))


@pytest.mark.parametrize("samples", [1, 250, 255, 256, 257, 506, 16000, 7 * 256 + 250, 31 * 256 + 250, 160000])
@pytest.mark.parametrize("multiple", [8, 32, 128])
def test_the_network_always_sees_a_frame_past_the_signal(samples, multiple):
    width = padded_width(samples, multiple, max_samples=160000)
    assert width % multiple == 0
    assert width >= num_frames(max(samples, 257)) + 1
    assert width - (num_frames(max(samples, 257)) + 1) < multiple  # and no more padding than that


def without_dc(wave: torch.Tensor, length: int) -> torch.Tensor:
    """What a spectrogram without the DC bin can represent of `wave`, by torch's own STFT."""
    window = torch.hann_window(512, periodic=True)
    stft = torch.stft(wave, 512, HOP_LENGTH, 512, window, center=True, pad_mode="reflect", return_complex=True)
    stft[0] = 0
    return torch.istft(stft, 512, HOP_LENGTH, 512, window, center=True, length=length)


@pytest.mark.parametrize("frames_mod", [0, 3])
def test_the_padding_past_the_signal_is_silence_so_inverting_every_frame_gives_the_window_back(frames_mod):
    """What the network is given at the end is the STFT of the recording followed by silence, not
    zeros appended to the spectrogram: a zero frame is not the next frame of the signal, so the
    inversion would fade the last partial hop out."""
    from diffiner.script_util import create_model_and_diffusion

    model, diffusion = create_model_and_diffusion(**dict(TINY, timestep_respacing="ddim2"))
    refiner = Refiner(model, diffusion)
    samples = 20 * HOP_LENGTH + 250
    while num_frames(samples) % refiner.width_bucket != frames_mod:
        samples += HOP_LENGTH
    wave = torch.from_numpy(numpy_rng(0, "wave").standard_normal(samples).astype(np.float32))
    (segment,) = refiner.prepare(wave.numpy(), wave.numpy(), 16000).segments
    assert segment.width == refiner.padded_width(samples) > num_frames(samples)
    back = spec_to_wave(segment.noisy, segment.samples)
    followed_by_silence = torch.nn.functional.pad(wave, (0, (segment.width - 1) * HOP_LENGTH - samples))
    expected = without_dc(followed_by_silence, samples)
    torch.testing.assert_close(back, expected, rtol=0, atol=1e-5 * wave.abs().max().item())
    # And the end is the signal's, not faded out: the DC bin is all the spectrogram misses.
    assert (back[-TAIL:] - wave[-TAIL:]).abs().max() < 0.1 * wave[-TAIL:].abs().max()


@pytest.fixture(scope="module")
def demo_refiner():
    model, diffusion = load_model(DEMO_MODEL, timestep_respacing="ddim10")  # its settings travel beside it
    return Refiner(model, diffusion, device="cpu")


def ending_in_silence(refiner, frames_mod):
    """The end of a demo clip, then silence, over white noise of rms 0.016: a length whose last
    hop holds 250 samples and whose frame count is `frames_mod` modulo the network's multiple."""
    clean, rate = load_audio(CLIP)
    speech = clean[0, -int(0.3 * rate):]
    samples = (speech.size + 4200) // HOP_LENGTH * HOP_LENGTH + 250
    while num_frames(samples) % refiner.width_bucket != frames_mod:
        samples += HOP_LENGTH
    noise = numpy_rng(0, "tail").standard_normal(samples) * 0.016
    noisy = (np.pad(speech, (0, samples - speech.size)) + noise).astype(np.float32)
    return noisy, 0.9 * noisy


@pytest.mark.parametrize("frames_mod", [0, 3], ids=["frame count a multiple of the network's", "padded frames"])
def test_no_click_at_the_end_of_a_file_that_ends_in_silence(demo_refiner, frames_mod, monkeypatch):
    noisy, processed = ending_in_silence(demo_refiner, frames_mod)
    assert noisy.size % HOP_LENGTH == 250 and num_frames(noisy.size) % demo_refiner.width_bucket == frames_mod
    generated = []
    original = pipeline.spec_to_wave
    monkeypatch.setattr(pipeline, "spec_to_wave",
                        lambda spec, length, *rest: generated.append(spec) or original(spec, length, *rest))
    refined = demo_refiner.refine(noisy, processed, 16000)
    assert refined.shape == noisy.shape
    assert tail_ratio(noisy) < 3  # the input's tail is plain noise
    assert tail_ratio(refined) <= BOUND
    # The same generated spectrogram, cropped to the signal's frames before the inversion instead,
    # clicks at its end: so the bound above can fail, and it tests the inversion.
    (spec,) = generated
    assert spec.shape[-1] > num_frames(noisy.size)
    cropped = spec_to_wave(spec[..., :num_frames(noisy.size)], noisy.size).numpy()
    assert tail_ratio(cropped) > 2 * BOUND
    torch.testing.assert_close(torch.from_numpy(cropped[:-256]), torch.from_numpy(refined[:-256]))
