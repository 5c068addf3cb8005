"""A full-band recording pair (speech plus content at 9.5-19 kHz) and the digest of refined audio:
shared by the full-band tests and by the script that made their reference digests from the code
before the crossover (`python3 tests/full_band_pair.py DEMO_MODEL`, run with that code's
PYTHONPATH)."""

import hashlib
import os
import sys

import numpy as np
import soundfile as sf
from scipy import signal

from conftest import speech_like, with_noise, write_wav

HIGH_BAND = (9500.0, 19000.0)


def full_band_pair(folder: str, rate: int = 48000, seconds: float = 0.6, seed: int = 5):
    """Write noisy/pair.wav and proc/pair.wav under `folder`: speech with a band of noise at
    HIGH_BAND (where the rate holds it) in both, the noisy side with white noise at 5 dB SNR."""
    clean = speech_like(seconds, rate, seed=seed).astype(np.float64)
    top = min(HIGH_BAND[1], 0.45 * rate)
    if top > HIGH_BAND[0]:
        sos = signal.butter(8, (HIGH_BAND[0], top), btype="bandpass", fs=rate, output="sos")
        air = signal.sosfilt(sos, np.random.default_rng(seed + 1).standard_normal(clean.size))
        clean = clean + 0.05 * air / np.sqrt(np.mean(air ** 2))
    clean = (0.7 * clean / np.abs(clean).max()).astype(np.float32)
    write_wav(os.path.join(folder, "noisy", "pair.wav"), with_noise(clean, 5.0, seed=seed + 2), rate)
    write_wav(os.path.join(folder, "proc", "pair.wav"), clean, rate)
    return os.path.join(folder, "noisy"), os.path.join(folder, "proc")


def samples_digest(path: str) -> str:
    """SHA-256 of a file's 16-bit samples (the audio, whatever the header)."""
    data, _ = sf.read(path, dtype="int16", always_2d=True)
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


# The runs whose outputs must not change: the demo model, ddim10, at the model's rate and at the
# input's (with --keep-sample-rate; since the crossover, with --high-band none).
REFERENCE_RUNS = {"16k": [], "48k": ["--keep-sample-rate"]}


def refine_args(noisy: str, proc: str, model: str, out: str, extra):
    return ["--root-noisy", noisy, "--root-proc", proc, "--model-path", model, "--output-dir", out, "--no-gpu",
            "--no-progress", "--timestep-respacing", "ddim10", "--precision", "fp32", *extra]


if __name__ == "__main__":
    import tempfile

    from diffiner.commands.refine import main

    with tempfile.TemporaryDirectory() as tmp:
        noisy, proc = full_band_pair(tmp)
        for name, extra in REFERENCE_RUNS.items():
            out = os.path.join(tmp, name)
            assert main(refine_args(noisy, proc, sys.argv[1], out, extra)) == 0
            print(name, samples_digest(os.path.join(out, "pair.wav")))
