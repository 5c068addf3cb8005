"""The demo's noisy set: deterministic, exact SNRs, noises of the intended colour; and the
shipped clean clips stay within the demo's limits."""

import csv
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.signal import welch

from diffiner.audio.mixing import CONDITIONS_FILE, NOISE_COLOURS, make_noise, make_noisy_set, mix_at_snr
from diffiner.commands.make_noisy_set import main
from diffiner.seeding import numpy_rng

from conftest import speech_like, write_wav
from tolerances import rounding_rtol

DEMO_CLEAN = os.path.join(os.path.dirname(__file__), "..", "demo", "audio", "clean")
RATE = 16000


@pytest.fixture
def clean_dir(tmp_path):
    """Five clean files (one in a subfolder, one stereo, one at 22.05 kHz)."""
    root = tmp_path / "clean"
    for i, rel in enumerate(["a.wav", "b.wav", "sub/c.wav", "d.wav"]):
        write_wav(str(root / rel), speech_like(1.5, RATE, seed=i), RATE)
    write_wav(str(root / "stereo.wav"), np.stack([speech_like(1.2, RATE, 7), 0.5 * speech_like(1.2, RATE, 8)]), RATE)
    write_wav(str(root / "rate22k.wav"), speech_like(1.0, 22050, seed=9), 22050)
    return str(root)


def read_conditions(folder):
    with open(os.path.join(folder, CONDITIONS_FILE)) as f:
        return {row["file"]: row for row in csv.DictReader(f)}


def test_same_input_gives_identical_files(clean_dir, tmp_path):
    first = make_noisy_set(clean_dir, str(tmp_path / "one")).written
    second = make_noisy_set(clean_dir, str(tmp_path / "two")).written
    assert first == second == ["a.wav", "b.wav", "d.wav", "rate22k.wav", "stereo.wav", os.path.join("sub", "c.wav")]
    for rel in first + [CONDITIONS_FILE]:
        with open(tmp_path / "one" / rel, "rb") as a, open(tmp_path / "two" / rel, "rb") as b:
            assert a.read() == b.read(), rel
    # Another seed gives other noise under the same conditions.
    make_noisy_set(clean_dir, str(tmp_path / "three"), seed=1)
    assert read_conditions(str(tmp_path / "three")).keys() == read_conditions(str(tmp_path / "one")).keys()
    assert not np.array_equal(sf.read(tmp_path / "one" / "a.wav")[0], sf.read(tmp_path / "three" / "a.wav")[0])


def test_noise_depends_on_the_file_name_only():
    assert np.array_equal(numpy_rng(0, "x.wav").standard_normal(4), numpy_rng(0, "x.wav").standard_normal(4))
    assert not np.array_equal(numpy_rng(0, "x.wav").standard_normal(4), numpy_rng(0, "y.wav").standard_normal(4))


def test_files_pair_with_the_clean_ones_at_the_requested_snr(clean_dir, tmp_path):
    out = str(tmp_path / "noisy")
    written = make_noisy_set(clean_dir, out, snrs=(0.0, 5.0, 10.0)).written
    conditions = read_conditions(out)
    assert sorted(conditions) == sorted(written)
    assert {c["colour"] for c in conditions.values()} == set(NOISE_COLOURS)
    assert {float(c["snr_db"]) for c in conditions.values()} == {0.0, 5.0, 10.0}
    for rel in written:
        clean, clean_rate = sf.read(os.path.join(clean_dir, rel), always_2d=True)
        noisy, noisy_rate = sf.read(os.path.join(out, rel), always_2d=True)
        assert noisy_rate == clean_rate and noisy.shape == clean.shape
        assert sf.info(os.path.join(out, rel)).subtype == "PCM_16"
        assert np.abs(noisy).max() < 1.0  # scaled down, never clipped
        target = float(conditions[rel]["gain"]) * clean
        measured = 10 * np.log10(np.sum(target ** 2) / np.sum((noisy - target) ** 2))
        assert abs(measured - float(conditions[rel]["snr_db"])) < 0.1, rel


def test_loud_mixtures_are_scaled_instead_of_clipped():
    clean = np.full((1, 1000), 0.9, dtype=np.float32) * np.sign(np.sin(np.arange(1000)))[None]
    noise = np.random.default_rng(0).standard_normal((1, 1000))
    mixture, gain = mix_at_snr(clean, noise, 0.0)
    # The peak set in float64, then one rounding to float32.
    assert gain < 1 and np.abs(mixture).max() == pytest.approx(0.99, rel=rounding_rtol(torch.float32, 1), abs=0)
    residual = mixture - gain * clean
    assert 10 * np.log10(np.sum((gain * clean) ** 2) / np.sum(residual ** 2)) == pytest.approx(0.0, abs=1e-4)


def spectral_slope(noise, rate, low=100.0, high=4000.0):
    """Slope of log10 power against log10 frequency: 0 white, -1 pink, -2 brown."""
    freqs, power = welch(noise, fs=rate, nperseg=4096)
    band = (freqs >= low) & (freqs <= high)
    return np.polyfit(np.log10(freqs[band]), np.log10(power[band]), 1)[0]


@pytest.mark.parametrize("colour, slope", [("white", 0.0), ("pink", -1.0), ("brown", -2.0)])
def test_colours_have_their_spectral_slope(colour, slope):
    noise = make_noise(colour, 10 * RATE, RATE, np.random.default_rng(0))
    assert np.mean(noise ** 2) == pytest.approx(1.0)
    assert spectral_slope(noise, RATE) == pytest.approx(slope, abs=0.15)


def test_babble_fluctuates_and_hum_sits_on_the_mains_harmonics():
    rng = np.random.default_rng(0)
    frame = RATE // 20

    def frame_power_spread(noise):
        power = np.mean(noise[: noise.size // frame * frame].reshape(-1, frame) ** 2, axis=1)
        return power.std() / power.mean()

    babble, white = make_noise("babble", 5 * RATE, RATE, rng), make_noise("white", 5 * RATE, RATE, rng)
    assert frame_power_spread(babble) > 3 * frame_power_spread(white)
    assert spectral_slope(babble, RATE, 300, 4000) < -0.5  # speech-shaped: falls with frequency

    hum = make_noise("hum", 5 * RATE, RATE, rng)
    freqs, power = welch(hum, fs=RATE, nperseg=8192)
    peaks = freqs[np.argsort(power)[-3:]]
    assert all(min(abs(p - k * 50.0) for k in range(1, 13)) < 3 for p in peaks)


def test_bad_requests_are_refused(clean_dir, tmp_path):
    with pytest.raises(ValueError, match="white, pink"):
        make_noisy_set(clean_dir, str(tmp_path / "x"), colours=("purple",))
    with pytest.raises(ValueError):
        make_noisy_set(clean_dir, str(tmp_path / "x"), snrs=())
    # A silent clean file cannot be set to an SNR: it fails alone, named, and is not in the table.
    write_wav(str(tmp_path / "silent" / "s.wav"), np.zeros(RATE, dtype=np.float32), RATE)
    write_wav(str(tmp_path / "silent" / "t.wav"), speech_like(0.5, RATE), RATE)
    result = make_noisy_set(str(tmp_path / "silent"), str(tmp_path / "y"))
    assert result.written == ["t.wav"] and list(result.failed) == ["s.wav"]
    assert str(tmp_path / "silent" / "s.wav") in result.failed["s.wav"] and "silent" in result.failed["s.wav"]
    assert list(read_conditions(str(tmp_path / "y"))) == ["t.wav"]


def test_command_line(clean_dir, tmp_path, capsys):
    out = str(tmp_path / "noisy")
    assert main([clean_dir, out, "--snrs", "3", "--colours", "pink"]) == 0
    assert "6 written" in capsys.readouterr().out
    assert {(c["colour"], c["snr_db"]) for c in read_conditions(out).values()} == {("pink", "3")}
    assert main([str(tmp_path / "nowhere"), out]) == 2


def test_shipped_clean_clips_fit_the_demo():
    files = sorted(f for f in os.listdir(DEMO_CLEAN) if f.endswith(".wav"))
    assert 6 <= len(files) <= 10
    assert sum(os.path.getsize(os.path.join(DEMO_CLEAN, f)) for f in files) < 2 * 1024 * 1024
    for name in files:
        info = sf.info(os.path.join(DEMO_CLEAN, name))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), name
        assert 1.5 <= info.duration <= 4.0, name
