"""The Python API as a user meets it: `from diffiner import Refiner`, arrays as soundfile returns
them (frames, channels) or as the package keeps them (channels, samples), integer arrays, and
`Refiner.refine_file` (issue 16 item 1, issue 21 item 6)."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from diffiner.audio.folders import FolderError

from conftest import speech_like, tiny_model_and_diffusion, write_wav

# ddim2 keeps each call at a fraction of a second on a CPU; the layout is what is tested.
RESPACING = "ddim2"


@pytest.fixture(scope="module")
def refiner():
    from diffiner import Refiner

    model, diffusion = tiny_model_and_diffusion(timestep_respacing=RESPACING)
    return Refiner(model, diffusion, device="cpu")


def stereo_pair(seconds: float, rate: int):
    """(noisy, processed) as (channels, samples): two different channels, so a swap shows."""
    clean = np.stack([speech_like(seconds, rate, seed=0), 0.5 * speech_like(seconds, rate, seed=3)])
    noise = 0.05 * np.random.default_rng(1).standard_normal(clean.shape).astype(np.float32)
    return clean + noise, 0.9 * clean


def test_the_package_exports_the_api():
    import diffiner
    from diffiner import BatchSettings, MethodSettings, Refiner, RefinerSettings, SegmentSettings, refine
    from diffiner import ExecutionSettings, get_method, method_names, register_method
    from diffiner.pipeline import Refiner as PipelineRefiner

    assert Refiner is PipelineRefiner
    assert RefinerSettings().segmenting == SegmentSettings() and BatchSettings().batch_size >= 1
    assert MethodSettings().method in method_names() and get_method(MethodSettings().method)
    assert callable(refine) and callable(register_method) and ExecutionSettings
    assert set(diffiner.__all__) <= set(dir(diffiner))
    with pytest.raises(AttributeError):
        diffiner.no_such_name  # noqa: B018


@pytest.mark.slow
def test_importing_the_package_imports_no_torch():
    # The folder commands import `diffiner.<something>`: the package's own import must stay cheap.
    code = "import sys, diffiner; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_stereo_read_by_soundfile_is_refined_as_stereo_in_its_own_layout(refiner, tmp_path):
    noisy, processed = stereo_pair(1.4, 16000)
    write_wav(str(tmp_path / "n.wav"), noisy, 16000, subtype="FLOAT")
    write_wav(str(tmp_path / "p.wav"), processed, 16000, subtype="FLOAT")
    noisy_sf, rate = sf.read(str(tmp_path / "n.wav"), dtype="float32")
    processed_sf, _ = sf.read(str(tmp_path / "p.wav"), dtype="float32")
    assert processed_sf.shape == (22400, 2)
    start = time.monotonic()
    refined_sf = refiner.refine(noisy_sf, processed_sf, rate)
    assert time.monotonic() - start < 60  # it ran 22400 "channels" for more than ten minutes before
    assert refined_sf.shape == processed_sf.shape
    # The same audio passed as (channels, samples) gives the same result, transposed.
    refined = refiner.refine(noisy, processed, rate)
    assert refined.shape == (2, 22400)
    np.testing.assert_array_equal(refined_sf, refined.T)


def test_an_explicit_layout_is_taken_as_given(refiner):
    noisy, processed = stereo_pair(0.3, 16000)
    first = refiner.refine(noisy, processed, 16000, layout="channels_first")
    last = refiner.refine(noisy.T, processed.T, 16000, layout="channels_last")
    np.testing.assert_array_equal(first, last.T)
    with pytest.raises(ValueError, match="layout"):
        refiner.refine(noisy, processed, 16000, layout="samples")
    # A layout that the shape contradicts is refused, not run on thousands of "channels".
    with pytest.raises(ValueError, match="4800 channels of 2 samples; pass layout='channels_last'"):
        refiner.refine(noisy.T, processed.T, 16000, layout="channels_first")


@pytest.mark.parametrize("shape", [(40, 2), (2, 40)])
def test_a_short_stereo_array_is_refined_in_its_layout(refiner, shape):
    # 40 samples: returned the right shape with the wrong content (frames taken as channels).
    rng = np.random.default_rng(0)
    processed = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    out = refiner.refine(processed, processed, 16000)
    assert out.shape == shape
    channels_first = processed if shape[0] == 2 else processed.T
    expected = refiner.refine(channels_first, channels_first, 16000, layout="channels_first")
    np.testing.assert_array_equal(out if shape[0] == 2 else out.T, expected)


@pytest.mark.parametrize("shape", [(4, 6), (8, 8), (100, 200), (2, 2)])
def test_a_shape_that_cannot_be_told_apart_is_refused_with_how_to_pass_it(refiner, shape):
    audio = np.zeros(shape, dtype=np.float32)
    from diffiner import ArrayError

    with pytest.raises(ArrayError) as info:  # a ValueError, and a UsageError of the package
        refiner.refine(audio, audio, 16000)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "\n" not in message and str(shape) in message
    assert "layout='channels_first'" in message and "layout='channels_last'" in message


def test_noisy_and_processed_in_different_layouts_are_refused(refiner):
    noisy, processed = stereo_pair(0.3, 16000)
    with pytest.raises(ValueError, match="layout"):
        refiner.refine(noisy, processed.T, 16000)


@pytest.mark.parametrize("dtype, scale", [(np.int16, 2 ** 15), (np.int32, 2 ** 31)])
def test_integer_arrays_are_scaled_by_their_type(refiner, dtype, scale):
    noisy, processed = stereo_pair(0.5, 16000)
    as_int = [np.round(x * (scale - 1)).astype(dtype) for x in (noisy, processed)]
    from_int = refiner.refine(*as_int, 16000)
    from_float = refiner.refine(*(x.astype(np.float64) / scale for x in as_int), 16000)
    # Refined exactly as the same audio in float: taken as they were, int16 samples of about 1e4
    # gave an output whose correlation with the input was 0.004.
    assert from_int.dtype == np.float32
    np.testing.assert_array_equal(from_int, from_float.astype(np.float32))


def test_unsigned_integer_arrays_are_refused(refiner):
    audio = np.full(800, 128, dtype=np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        refiner.refine(audio, audio, 16000)


def test_a_one_sample_input_gives_at_least_one_sample(refiner):
    audio = np.array([0.25], dtype=np.float32)
    assert refiner.refine(audio, audio, 48000).shape == (1,)
    assert refiner.refine(audio, audio, 48000, output_sample_rate=16000).shape == (1,)


# ----- refine_file -----

def file_pair(folder, rate=44100, name_noisy="noisy one.wav", name_processed="enhanced one.wav"):
    noisy, processed = stereo_pair(0.4, rate)
    paths = str(folder / name_noisy), str(folder / name_processed)
    write_wav(paths[0], noisy, rate)
    write_wav(paths[1], processed, rate)
    return paths


def test_refine_file_keeps_rate_and_channels(refiner, tmp_path):
    noisy, processed = file_pair(tmp_path)
    out = str(tmp_path / "out" / "refined one.wav")
    refiner.refine_file(noisy, processed, out)
    data, rate = sf.read(out, dtype="float32")
    assert rate == 44100 and data.shape == sf.read(processed)[0].shape
    expected = refiner.refine(sf.read(noisy, dtype="float32")[0], sf.read(processed, dtype="float32")[0], rate,
                              key="enhanced one.wav")  # the seed names the processed file, as the CLI does
    np.testing.assert_allclose(data, np.clip(expected, -1, 1), atol=1.5 / 2 ** 15)  # one 16-bit step


def test_refine_file_writes_atomically(refiner, tmp_path, monkeypatch):
    noisy, processed = file_pair(tmp_path)
    out = tmp_path / "refined.wav"
    out.write_bytes(b"earlier")

    def interrupted(file, *args, **kwargs):
        with open(file, "wb") as f:  # half a file written, then the run stops
            f.write(b"RIFF partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(sf, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        refiner.refine_file(noisy, processed, str(out))
    assert out.read_bytes() == b"earlier"
    assert sorted(os.listdir(tmp_path)) == ["enhanced one.wav", "noisy one.wav", "refined.wav"]


@pytest.mark.parametrize("target", ["processed", "noisy", "link to processed", "hard link to noisy"])
def test_refine_file_refuses_to_write_onto_an_input(refiner, tmp_path, target):
    noisy, processed = file_pair(tmp_path)
    before = {p: open(p, "rb").read() for p in (noisy, processed)}
    out = {"processed": processed, "noisy": noisy}.get(target)
    if target == "link to processed":
        out = str(tmp_path / "link.wav")
        os.symlink(processed, out)
    elif target == "hard link to noisy":
        out = str(tmp_path / "hard.wav")
        os.link(noisy, out)
    with pytest.raises(FolderError) as info:
        refiner.refine_file(noisy, processed, out)
    assert out in str(info.value) and "\n" not in str(info.value)
    assert {p: open(p, "rb").read() for p in (noisy, processed)} == before


def test_refine_file_names_an_unreadable_input(refiner, tmp_path):
    from diffiner.audio.io import AudioError

    noisy, processed = file_pair(tmp_path)
    with open(processed, "wb") as f:
        f.write(b"RIFF not audio")
    with pytest.raises(AudioError, match="enhanced one.wav"):
        refiner.refine_file(noisy, processed, str(tmp_path / "out.wav"))
    assert not os.path.exists(tmp_path / "out.wav")
