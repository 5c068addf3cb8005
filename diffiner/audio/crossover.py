"""A complementary linear-phase crossover: the refined low band joined with the processed file's
content above the model's band, when the output rate is above the model's.

The low-pass branch is a Kaiser-windowed FIR of odd length (type I: symmetric, linear phase, a
delay of exactly (taps - 1) / 2 samples); the high-pass branch is the delayed unit impulse minus
it. The two kernels sum to that delayed impulse, so splitting a signal and adding the branches
back returns it (perfect reconstruction), and the branches are in phase everywhere: no gain or
phase seam at the crossover. Both are applied with their delay removed, so the output is
time-aligned with the input sample for sample.

Where the transition lies: the refined audio comes back from the model's rate through the
resampler (soxr, very high quality), whose passband ends at about 93 % of the model's Nyquist
frequency (7.45 kHz at 16 kHz: -0.03 dB at 7.4 kHz, -0.8 dB at 7.5 kHz, -20 dB at 7.7 kHz). The
low-pass branch must have died away before that, or the resampler's roll-off would show as a
notch: its transition runs from `PASS_EDGE` to `STOP_EDGE` of the model's Nyquist frequency,
6.6 to 7.3 kHz for a 16 kHz model, 9.9 to 10.95 kHz for a 24 kHz one. Below 6.6 kHz the output is
the refined audio, above 7.3 kHz the processed file's, and between them a complementary blend.

`join` works on whole arrays; `StreamingJoin` gives the same output for a recording refined and
written chunk by chunk, holding only a kernel's length of each input between chunks.
"""

import functools
from typing import Tuple

import numpy as np
from scipy import signal

# The transition band, as fractions of the model's Nyquist frequency (see the module's text).
PASS_EDGE = 0.825
STOP_EDGE = 0.9125
# Stop-band attenuation of the low-pass branch: what of the refined band leaks above STOP_EDGE,
# and what of the processed high band leaks below PASS_EDGE, is 80 dB down.
ATTENUATION_DB = 80.0

HIGH_BAND_CHOICES = ("processed", "none")


@functools.lru_cache(maxsize=16)
def lowpass_kernel(sample_rate: int, model_rate: int) -> np.ndarray:
    """The low-pass branch at `sample_rate` for a model at `model_rate`: an odd-length symmetric
    float64 FIR whose transition band is PASS_EDGE..STOP_EDGE of the model's Nyquist frequency."""
    nyquist = sample_rate / 2.0
    model_nyquist = model_rate / 2.0
    if model_nyquist * STOP_EDGE >= nyquist:
        raise ValueError(f"a crossover below a {model_rate} Hz model's band needs an output rate above it, "
                         f"got {sample_rate} Hz")
    width = (STOP_EDGE - PASS_EDGE) * model_nyquist / nyquist
    taps, beta = signal.kaiserord(ATTENUATION_DB, width)
    taps += 1 - taps % 2  # odd: a whole-sample delay, so the branches align with the input exactly
    cutoff = 0.5 * (PASS_EDGE + STOP_EDGE) * model_nyquist
    kernel = signal.firwin(taps, cutoff, window=("kaiser", beta), fs=sample_rate)
    kernel.setflags(write=False)
    return kernel


def highpass_kernel(sample_rate: int, model_rate: int) -> np.ndarray:
    """The high-pass branch: the delayed unit impulse minus the low-pass kernel."""
    kernel = -lowpass_kernel(sample_rate, model_rate)
    kernel[len(kernel) // 2] += 1.0
    return kernel


def _apply(kernel: np.ndarray, audio: np.ndarray) -> np.ndarray:
    """`audio` (..., samples) filtered by the symmetric `kernel` with its delay removed (zero-phase
    "same" convolution; the signal is taken as silent outside its ends)."""
    delay = len(kernel) // 2
    audio = np.asarray(audio, dtype=np.float64)
    full = signal.oaconvolve(audio, kernel.reshape((1,) * (audio.ndim - 1) + (-1,)), mode="full", axes=-1)
    return full[..., delay:delay + audio.shape[-1]]


def split(audio: np.ndarray, sample_rate: int, model_rate: int) -> Tuple[np.ndarray, np.ndarray]:
    """(low band, high band) of `audio` (..., samples) at `sample_rate`, float64, time-aligned
    with it; they add up to `audio`."""
    return (_apply(lowpass_kernel(sample_rate, model_rate), audio),
            _apply(highpass_kernel(sample_rate, model_rate), audio))


def join(refined: np.ndarray, processed: np.ndarray, sample_rate: int, model_rate: int) -> np.ndarray:
    """The low band of `refined` plus the high band of `processed`, both (..., samples) at
    `sample_rate` (> model_rate), as float32."""
    if np.shape(refined) != np.shape(processed):
        raise ValueError(f"refined and processed shapes differ: {np.shape(refined)} vs {np.shape(processed)}")
    low = _apply(lowpass_kernel(sample_rate, model_rate), refined)
    high = _apply(highpass_kernel(sample_rate, model_rate), processed)
    return (low + high).astype(np.float32)


def applies(output_rate: int, input_rate: int, model_rate: int) -> bool:
    """Whether a high band exists to keep: the output and the processed input both run above the
    model's rate (a processed file at or below it has nothing above the model's band)."""
    return output_rate > model_rate and input_rate > model_rate


class StreamingJoin:
    """`join` over a recording that arrives in consecutive chunks: `push` takes the next chunk of
    refined and processed audio (..., n) and returns the joined audio known so far, `finish` the
    rest; together they give `join` of the whole (up to float rounding). The output lags the
    input by the kernel's half length (its look-ahead), and a chunk's output can be written as
    soon as it is returned."""

    def __init__(self, sample_rate: int, model_rate: int):
        lowpass = lowpass_kernel(sample_rate, model_rate)
        self.kernels = (lowpass, highpass_kernel(sample_rate, model_rate))
        self.delay = len(lowpass) // 2
        self.history: Tuple[np.ndarray, ...] = ()

    def push(self, refined: np.ndarray, processed: np.ndarray) -> np.ndarray:
        """The joined output for every sample whose look-ahead has arrived, as float32."""
        if np.shape(refined) != np.shape(processed):
            raise ValueError(f"refined and processed shapes differ: {np.shape(refined)} vs {np.shape(processed)}")
        chunks = [np.asarray(x, dtype=np.float64) for x in (refined, processed)]
        if not self.history:
            # Silence before the start, as `join` takes it: a half kernel of zeros.
            self.history = tuple(np.zeros(c.shape[:-1] + (self.delay,)) for c in chunks)
        return self._emit([np.concatenate([h, c], axis=-1) for h, c in zip(self.history, chunks)])

    def finish(self) -> np.ndarray:
        """The last samples: those whose look-ahead runs past the end (silence there)."""
        if not self.history:
            return np.zeros((0,), dtype=np.float32)
        padded = [np.concatenate([h, np.zeros(h.shape[:-1] + (self.delay,))], axis=-1) for h in self.history]
        return self._emit(padded)

    def _emit(self, buffers) -> np.ndarray:
        taps = len(self.kernels[0])
        count = max(0, buffers[0].shape[-1] - taps + 1)
        out = np.zeros(buffers[0].shape[:-1] + (count,))
        for kernel, buffer in zip(self.kernels, buffers):
            if count:
                out += signal.oaconvolve(buffer, kernel.reshape((1,) * (buffer.ndim - 1) + (-1,)), mode="valid",
                                         axes=-1)
        # What the next output sample's window still needs: the last taps - 1 (or all, if fewer).
        self.history = tuple(b[..., max(0, b.shape[-1] - (taps - 1)):] for b in buffers)
        return out.astype(np.float32)
