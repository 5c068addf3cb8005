"""Shared fixtures: tiny models, checkpoints and generated audio."""

import os
from typing import Optional

import numpy as np
import pytest
import soundfile as sf
import torch

from diffiner.script_util import create_model_and_diffusion

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
REFERENCE = os.path.join(SHARED, "reference")

# A tiny configuration: 4 levels (inputs are multiples of 8), attention at the coarsest only.
TINY = dict(image_size=64, num_channels=32, num_res_blocks=1, channel_mult="1,1,2,2",
            attention_resolutions="8", num_heads=2)


def requires_reference(name: str):
    path = os.path.join(REFERENCE, name)
    return pytest.mark.skipif(not os.path.exists(path), reason=f"{path} absent (needs ../shared beside the checkout)")


def tiny_model_and_diffusion(seed: int = 0, **overrides):
    """A tiny model whose weights are all non-zero (fresh init zeroes the output layers)."""
    settings = dict(TINY, **overrides)
    torch.manual_seed(seed)
    model, diffusion = create_model_and_diffusion(**settings)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), diffusion


def tiny_cli_flags(respacing: Optional[str] = "ddim2"):
    """The TINY settings as flags, and the sampler's respacing (None: no respacing flag, as for training)."""
    flags = ["--image-size", "64", "--num-channels", "32", "--num-res-blocks", "1", "--channel-mult", "1,1,2,2",
             "--attention-resolutions", "8", "--num-heads", "2"]
    return flags + (["--timestep-respacing", respacing] if respacing is not None else [])


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model, _ = tiny_model_and_diffusion()
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture
def carried_tiny_checkpoint(tmp_path):
    """A tiny checkpoint in a folder of its own, with its settings beside it (model_config.yml),
    as training leaves it."""
    from diffiner.checkpoints import write_model_config
    from diffiner.script_util import model_and_diffusion_defaults

    folder = tmp_path / "tiny_model"
    folder.mkdir()
    model, _ = tiny_model_and_diffusion()
    torch.save(model.state_dict(), folder / "ema_0.9999_000010.pt")
    write_model_config(str(folder), dict(model_and_diffusion_defaults(), **TINY))
    return str(folder / "ema_0.9999_000010.pt")


def speech_like(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """Harmonic signal with gliding pitch and syllable-rate bursts: speech-shaped, with the
    pauses that PESQ's voice activity detection needs."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120.0 + 30.0 * rng.uniform() + 25.0 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    harmonics = [k for k in range(1, 40) if k * 180 < rate / 2]
    voiced = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / np.sqrt(k) for k in harmonics)
    signal = voiced * np.clip(np.sin(2 * np.pi * 2.5 * t), 0.0, None) ** 0.7
    return (0.5 * signal / np.abs(signal).max()).astype(np.float32)


def with_noise(signal: np.ndarray, snr_db: float, seed: int = 1) -> np.ndarray:
    """Add white Gaussian noise at the given SNR."""
    noise = np.random.default_rng(seed).standard_normal(signal.size)
    signal_power = np.mean(signal.astype(np.float64) ** 2)
    noise *= np.sqrt(signal_power / np.mean(noise ** 2) / 10 ** (snr_db / 10))
    return (signal + noise).astype(np.float32)


def snr_folders(root, files, snrs, seconds, rate=16000):
    """{name: folder} of clean/ and one folder per entry of `snrs` ({name: SNR in dB}) under
    `root`, each holding `files`: speech-like clips and their noisy copies at those SNRs."""
    from pathlib import Path

    from diffiner.audio.io import save_audio

    folders = {name: Path(root) / name for name in ("clean", *snrs)}
    for index, relative in enumerate(files):
        clean = speech_like(seconds, rate, seed=index)
        save_audio(str(folders["clean"] / relative), clean, rate)
        for name, snr in snrs.items():
            save_audio(str(folders[name] / relative), with_noise(clean, snr, seed=10 + index), rate)
    return folders


def write_wav(path, audio, rate, subtype="PCM_16"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = audio.T if audio.ndim == 2 else audio
    sf.write(path, data, rate, subtype=subtype)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped with a reason when none is present")
    config.addinivalue_line("markers", "slow: starts processes or takes seconds; the fast tier is "
                                       "-m \"not slow and not cuda\"")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible)")
