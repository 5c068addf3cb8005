"""The noisereduce baseline: shape-preserving, deterministic, actually removes noise; and the
folder version pairs with its input by relative path."""

import os
import sys

import numpy as np
import pytest
import soundfile as sf

from diffiner.audio.enhancers import ENHANCERS, enhance, enhance_folder
from diffiner.commands.enhance import main
from diffiner.evaluation.metrics import si_sdr

from conftest import speech_like, with_noise, write_wav

pytest.importorskip("noisereduce")

RATE = 16000


def test_output_has_the_input_shape_and_dtype():
    for shape in [(1, 16001), (2, 12345), (1, 300)]:
        noisy = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.1
        out = enhance("noisereduce", noisy, RATE)
        assert out.shape == noisy.shape and out.dtype == np.float32
    out = enhance("noisereduce", noisy, 48000)
    assert out.shape == noisy.shape


def test_it_improves_si_sdr_and_removes_noise_energy():
    clean = speech_like(2.0, RATE, seed=3)
    noisy = with_noise(clean, 5.0, seed=4)
    enhanced = enhance("noisereduce", noisy[None], RATE)[0]
    assert si_sdr(clean, enhanced) > si_sdr(clean, noisy) + 2.0
    noise_only = (noisy - clean)[None]
    left = enhance("noisereduce", noise_only, RATE)
    assert np.sum(left ** 2) < 0.3 * np.sum(noise_only ** 2)  # at least 5 dB less noise


def test_it_is_deterministic():
    noisy = with_noise(speech_like(1.0, RATE, seed=1), 0.0, seed=2)[None]
    assert np.array_equal(enhance("noisereduce", noisy, RATE), enhance("noisereduce", noisy, RATE))


def test_unknown_names_and_shapes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="choose from noisereduce"):
        enhance("wiener", np.zeros((1, 100), np.float32), RATE)
    with pytest.raises(ValueError, match="choose from noisereduce"):
        enhance_folder("wiener", str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="channels, samples"):
        enhance("noisereduce", np.zeros(100, np.float32), RATE)
    assert ENHANCERS == ("noisereduce",)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "noisereduce", None)  # makes `import noisereduce` fail
    with pytest.raises(ImportError, match="pip install noisereduce"):
        enhance("noisereduce", np.zeros((1, 1000), np.float32), RATE)


@pytest.fixture
def noisy_dir(tmp_path):
    root = tmp_path / "noisy"
    write_wav(str(root / "a.wav"), with_noise(speech_like(1.0, RATE, 1), 5.0), RATE)
    write_wav(str(root / "sub" / "b.wav"), with_noise(speech_like(0.7, 48000, 2), 5.0), 48000)
    write_wav(str(root / "stereo.flac"), np.stack([with_noise(speech_like(0.5, RATE, 3), 5.0)] * 2), RATE)
    with open(root / "broken.wav", "wb") as f:
        f.write(b"RIFF not audio")
    return str(root)


def test_folder_keeps_paths_rates_and_lengths_and_skips_existing(noisy_dir, tmp_path):
    out = str(tmp_path / "noisereduce")
    result = enhance_folder("noisereduce", noisy_dir, out)
    assert sorted(result.written) == ["a.wav", "stereo.flac", os.path.join("sub", "b.wav")]
    assert list(result.failed) == ["broken.wav"]
    for rel in result.written:
        src, dst = sf.info(os.path.join(noisy_dir, rel)), sf.info(os.path.join(out, rel))
        expected = (src.samplerate, src.frames, src.channels, "PCM_16")
        assert (dst.samplerate, dst.frames, dst.channels, dst.subtype) == expected
    again = enhance_folder("noisereduce", noisy_dir, out)
    assert again.written == [] and sorted(again.skipped) == sorted(result.written)
    assert sorted(enhance_folder("noisereduce", noisy_dir, out, overwrite=True).written) == sorted(result.written)


def test_command_line(noisy_dir, tmp_path, capsys):
    out = str(tmp_path / "nr")
    assert main([noisy_dir, out]) == 1  # broken.wav
    captured = capsys.readouterr()
    assert "FAILED broken.wav" in captured.err and "3 written" in captured.out
    assert main([str(tmp_path / "nowhere"), out]) == 2
