import os

import numpy as np
import pytest
import soundfile as sf

from diffiner.audio import io as audio
from diffiner.checkpoints import INTERRUPTED_SAVE

from fs_helpers import deadline


def test_load_audio_gives_channels_first_float32(tmp_path):
    path = str(tmp_path / "stereo.wav")
    sf.write(path, np.stack([np.linspace(-0.5, 0.5, 100), np.zeros(100)], axis=1), 22050, subtype="PCM_16")
    data, rate = audio.load_audio(path)
    assert rate == 22050 and data.shape == (2, 100) and data.dtype == np.float32
    assert audio.audio_info(path) == (100, 22050, 2)


@pytest.mark.parametrize("content, message", [(b"", "cannot read"), (b"RIFF nonsense", "cannot read")])
def test_unreadable_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(audio.AudioError, match=f"{path}.*{message}"):
        audio.load_audio(str(path))


def test_empty_audio_is_an_error(tmp_path):
    path = str(tmp_path / "empty.wav")
    sf.write(path, np.zeros((0, 1)), 16000)
    with pytest.raises(audio.AudioError, match="zero length"):
        audio.load_audio(path)


@pytest.mark.parametrize("rate_in, rate_out", [(48000, 16000), (8000, 16000), (44100, 16000), (16000, 44100)])
def test_resample_gives_exactly_the_rounded_length(rate_in, rate_out):
    x = np.random.default_rng(0).standard_normal((2, 12345)).astype(np.float32)
    y = audio.resample(x, rate_in, rate_out)
    assert y.shape == (2, round(12345 * rate_out / rate_in))
    assert audio.resample(x, rate_in, rate_out, length=999).shape == (2, 999)


def test_save_audio_is_atomic_and_leaves_nothing_on_interruption(tmp_path, monkeypatch):
    path = str(tmp_path / "sub" / "out.wav")
    audio.save_audio(path, np.full((1, 10), 2.0), 16000)  # clipped, not wrapped around
    assert sf.read(path)[0].max() == pytest.approx(32767 / 32768)
    before = open(path, "rb").read()

    def interrupted(*args, **kwargs):
        with open(args[0], "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(audio.sf, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        audio.save_audio(path, np.zeros(10), 16000)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path / "sub") == ["out.wav"]


def test_written_files_have_normal_permissions(tmp_path):
    path = str(tmp_path / "out.txt")
    audio.write_text_atomic(path, "hello")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_a_wav_cut_short_is_read_at_its_length_with_a_warning(tmp_path, caplog):
    whole, cut = str(tmp_path / "whole.wav"), str(tmp_path / "cut.wav")
    sf.write(whole, np.full(1000, 0.25), 16000, subtype="PCM_16")
    with open(whole, "rb") as f:
        data = f.read()
    with open(cut, "wb") as f:
        f.write(data[:-600])  # 300 of the 1000 samples gone, header unchanged
    assert audio.wav_header_samples(whole) == 1000 and audio.wav_header_samples(cut) == 1000
    audio.load_audio(whole)
    assert not caplog.records
    samples, _ = audio.load_audio(cut)
    assert samples.shape == (1, 700)
    assert len(caplog.records) == 1 and all(s in caplog.text for s in (cut, "1000", "700"))
    flac = str(tmp_path / "a.flac")
    sf.write(flac, np.zeros(10), 16000)
    assert audio.wav_header_samples(flac) is None


def test_a_failed_write_is_an_output_error_naming_the_file(tmp_path, monkeypatch):
    path = str(tmp_path / "out.wav")

    def full(*args, **kwargs):
        raise sf.LibsndfileError(2, prefix="Error opening: ")

    monkeypatch.setattr(audio.sf, "write", full)
    with pytest.raises(audio.OutputError, match=f"{path}: cannot write .*System error.*MB free") as raised:
        audio.save_audio(path, np.zeros(10), 16000)
    assert isinstance(raised.value, OSError)
    assert os.listdir(tmp_path) == []
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(audio.OutputError, match=str(blocker)):
        audio.write_text_atomic(str(blocker / "x.txt"), "text")


# ----- finite outputs -----

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_audio_is_refused_naming_the_file_and_nothing_is_written(tmp_path, bad):
    path = str(tmp_path / "out.wav")
    samples = np.zeros((2, 100), np.float32)
    samples[1, 7] = bad
    with pytest.raises(audio.AudioError, match=f"^{path}: the audio to write has 1 NaN or infinite sample"):
        audio.save_audio(path, samples, 16000)
    assert os.listdir(tmp_path) == []


# ----- temporary names within the file system's limit -----

@pytest.mark.parametrize("name", ["a" * 251 + ".wav", "é" * 125 + "z.wav", "語" * 83 + "zz.wav", "𝄞" * 62 + "zzz.wav",
                                  "x." + "e" * 253, "a" * 240 + "\udcff" * 11 + ".wav"])
def test_the_temporary_name_of_a_255_byte_name_fits_and_the_write_succeeds(tmp_path, name):
    assert len(os.fsencode(name)) == 255
    path = str(tmp_path / name)
    with audio.atomic_output(path) as tmp:
        temporary = os.path.basename(tmp)
        assert temporary.startswith(audio.TEMPORARY_PREFIX) and len(os.fsencode(temporary)) <= 255
        os.fsencode(temporary).decode("utf-8", "surrogateescape")  # whole characters: no split
        with open(tmp, "w") as f:
            f.write("whole")
    assert os.listdir(tmp_path) == [name] and open(path).read() == "whole"


@pytest.mark.parametrize("name", ["model000100.pt", "opt000100.pt", "ema_0.9999_000100.pt"])
def test_checkpoint_temporary_names_are_still_recognised_as_interrupted_saves(tmp_path, name):
    with audio.atomic_output(str(tmp_path / name)) as tmp:
        assert INTERRUPTED_SAVE.fullmatch(os.path.basename(tmp))
        open(tmp, "wb").close()


# ----- records read whoever wrote them -----

BILLION_LAUGHS = "\n".join(["diffiner_version: 0.1.0", "refiner: {method: diffiner+}", "a: &a {x: 1, y: 1}"] +
                           [f"{chr(98 + k)}: &{chr(98 + k)} {{" +
                            ", ".join(f"k{j}: *{chr(97 + k)}" for j in range(10)) + "}" for k in range(9)]) + "\n"


@pytest.mark.parametrize("text", [BILLION_LAUGHS, "a: &a [*a]\n", "model: &m {self: *m}\n", "x: &x 1\ny: *x\n"])
def test_a_record_with_anchors_or_aliases_is_refused_at_once_in_one_line(tmp_path, text):
    path = tmp_path / "config.yml"
    path.write_text(text)
    with deadline(5):
        with pytest.raises(audio.RecordError, match="anchors and aliases") as raised:
            audio.read_yaml_record(str(path))
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_a_record_too_large_too_deep_or_not_a_file_is_refused(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text("x: " + "y" * 100 + "\n")
    with pytest.raises(audio.RecordError, match="larger than 64 bytes"):
        audio.read_yaml_record(str(path), max_bytes=64)
    path.write_text("[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(audio.RecordError, match="nested too deeply"):
        audio.read_yaml_record(str(path))
    fifo = tmp_path / "fifo.yml"
    os.mkfifo(str(fifo))
    with deadline(5):
        with pytest.raises(audio.RecordError, match="not a regular file"):
            audio.read_yaml_record(str(fifo))
    path.write_text("refiner: {method: diffiner+}\nseed: 0\n")
    assert audio.read_yaml_record(str(path)) == {"refiner": {"method": "diffiner+"}, "seed": 0}


def test_a_file_name_that_is_not_utf8_reads_and_writes(tmp_path):
    from diffiner.audio.io import BlockWriter, audio_info, load_audio, read_blocks, save_audio

    path = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.wav"))  # U+DCE9 stands for byte 0xE9
    audio = np.linspace(-0.5, 0.5, 300, dtype=np.float32)[None]
    save_audio(path, audio, 16000)
    assert audio_info(path) == (300, 16000, 1)
    assert np.array_equal(load_audio(path)[0], np.concatenate(list(read_blocks(path, 100)), axis=1))
    with BlockWriter(path, 16000, 1) as writer:
        writer.write(audio)
    assert os.listdir(os.fsencode(tmp_path)) == [b"caf\xe9.wav"]
