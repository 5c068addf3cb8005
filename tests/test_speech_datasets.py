import gc
import logging
import multiprocessing
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import soundfile as sf
import torch

from diffiner import speech_datasets as data
from diffiner.audio.io import AudioError
from diffiner.speech_datasets import ExcerptDataset, build_index, load_data, read_excerpt, source_samples
from diffiner.spectrogram import wave_to_spec

from conftest import speech_like, write_wav
from tolerances import rounding_rtol


def test_empty_folder_is_an_error_naming_the_folder(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no audio here")
    with pytest.raises(FileNotFoundError, match=str(empty)):
        build_index(str(empty), 1.0)
    with pytest.raises(FileNotFoundError, match="missing"):
        build_index(str(tmp_path / "missing"), 1.0)


def test_unreadable_file_is_an_error_naming_the_file(tmp_path):
    write_wav(str(tmp_path / "good.wav"), speech_like(1.5), 16000)
    (tmp_path / "broken.wav").write_bytes(b"RIFF this is not audio")
    with pytest.raises(AudioError, match="broken.wav"):
        build_index(str(tmp_path), 1.0)


def test_short_files_are_skipped_with_one_log_line(tmp_path, caplog):
    write_wav(str(tmp_path / "long.wav"), speech_like(1.5), 16000)
    write_wav(str(tmp_path / "a" / "short1.wav"), speech_like(0.5), 16000)
    write_wav(str(tmp_path / "a" / "short2.flac"), speech_like(0.25, 44100), 44100)
    with caplog.at_level(logging.INFO, logger="diffiner.speech_datasets"):
        files = build_index(str(tmp_path), 1.0)
    assert [os.path.basename(f.path) for f in files] == ["long.wav"]
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert len(skipped) == 1
    assert "skipped 2 of 3" in skipped[0] and "0.8 s of audio" in skipped[0]
    index_lines = [r.getMessage() for r in caplog.records if "training data" in r.getMessage()]
    assert len(index_lines) == 1 and "1 file(s)" in index_lines[0] and "hours" in index_lines[0]
    with pytest.raises(ValueError, match="none of the 3"):
        build_index(str(tmp_path), 2.0)


def test_multichannel_files_are_downmixed(tmp_path):
    voice = speech_like(1.5, seed=1)
    write_wav(str(tmp_path / "stereo.wav"), np.stack([voice, 0.5 * voice]), 16000, subtype="FLOAT")
    (entry,) = build_index(str(tmp_path), 1.0)
    excerpt = read_excerpt(entry, 1000, 1.0)
    # float32 throughout: the downmix's sum and halving, and the reference's product, round once
    # each, relative to values no larger than the voice's peak.
    expected = 0.75 * voice[1000:17000]
    np.testing.assert_allclose(excerpt, expected, rtol=0,
                               atol=rounding_rtol(torch.float32, 3) * float(np.abs(voice).max()))


def test_44k_file_is_resampled_and_only_the_excerpt_is_read(tmp_path, monkeypatch):
    rate = 44100
    t = np.arange(int(2.0 * rate)) / rate
    write_wav(str(tmp_path / "tone.wav"), (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, "FLOAT")
    (entry,) = build_index(str(tmp_path), 1.0)
    reads = []
    real_read = sf.read

    def spy(path, *args, **kwargs):
        reads.append((kwargs.get("start"), kwargs.get("stop")))
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(data.sf, "read", spy)
    excerpt = read_excerpt(entry, 3000, 1.0)
    assert reads == [(3000, 3000 + source_samples(1.0, rate))] and source_samples(1.0, rate) == 44100
    assert excerpt.shape == (16000,) and excerpt.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(excerpt * np.hanning(excerpt.size)))
    assert abs(np.argmax(spectrum) * 16000 / excerpt.size - 440) <= 1
    # The excerpt is the 16 kHz version of the same stretch of the tone (phase included).
    expected = 0.5 * np.sin(2 * np.pi * 440 * (3000 / rate + np.arange(16000) / 16000))
    np.testing.assert_allclose(excerpt[200:-200], expected[200:-200], atol=2e-3)


@pytest.mark.parametrize("seq_dur, frames", [(1.0, 63), (2.0, 126)])
def test_crops_are_image_size_frames(tmp_path, seq_dur, frames):
    write_wav(str(tmp_path / "a.wav"), speech_like(2.5, seed=2), 16000)
    dataset = ExcerptDataset(build_index(str(tmp_path), seq_dur), seq_dur, 64, seed=0)
    spec = dataset[5]["spec"]
    assert spec.shape == (2, 256, 64) and spec.dtype == torch.float32
    entry, start = dataset.choose(5)
    full = wave_to_spec(torch.from_numpy(read_excerpt(entry, start, seq_dur)))
    assert full.shape == (2, 256, frames)
    kept = min(frames, 64)
    assert torch.equal(spec[..., :kept], full[..., :kept]) and full.abs().max() > 0
    if kept < 64:  # zero-padded after the last frame
        assert spec[..., kept:].abs().max() == 0


def test_stream_is_determined_by_seed_and_position(tmp_path):
    for k, seconds in enumerate([1.2, 1.7, 2.3]):
        write_wav(str(tmp_path / f"f{k}.wav"), speech_like(seconds, seed=k), 16000)
    files = build_index(str(tmp_path), 1.0)
    dataset = ExcerptDataset(files, 1.0, 64, seed=3)
    # Every file once per epoch, in an order that changes between epochs.
    epochs = [[dataset.choose(e * 3 + i)[0].path for i in range(3)] for e in range(4)]
    assert all(sorted(e) == sorted(f.path for f in files) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1

    common = dict(image_size=64, seq_dur=1.0, seed=3)
    single = load_data(files, batch_size=4, **common)
    ranks = [load_data(files, batch_size=2, rank=r, world_size=2, num_workers=r, **common) for r in range(2)]
    batches = []
    for _ in range(2):
        batches.append(next(single))
        parts = [next(it) for it in ranks]
        assert torch.equal(batches[-1]["position"], torch.cat([p["position"] for p in parts]))
        assert torch.equal(batches[-1]["spec"], torch.cat([p["spec"] for p in parts]))
    assert batches[0]["position"].tolist() == [0, 1, 2, 3]
    # Resuming at a position reproduces the stream from there.
    resumed = next(load_data(files, batch_size=4, start_position=8, **common))
    assert torch.equal(resumed["spec"], next(single)["spec"])
    other_seed = next(load_data(files, batch_size=4, image_size=64, seq_dur=1.0, seed=4))
    assert not torch.equal(other_seed["spec"], batches[0]["spec"])


# With a worker the DataLoader starts a process: that case belongs to the slow tier.
@pytest.mark.parametrize("num_workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_an_unreadable_excerpt_raises_its_own_message_in_the_training_process(tmp_path, num_workers):
    write_wav(str(tmp_path / "good.wav"), speech_like(1.5), 16000)
    write_wav(str(tmp_path / "nan.wav"), np.full(24000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    files = build_index(str(tmp_path), 1.0)
    dataset = ExcerptDataset(files, 1.0, 64, seed=0)
    bad = next(p for p in range(4) if dataset.choose(p)[0].path.endswith("nan.wav"))
    with pytest.raises(AudioError) as direct:
        read_excerpt(*dataset.choose(bad), 1.0)
    batches = load_data(files, batch_size=1, image_size=64, seq_dur=1.0, seed=0, num_workers=num_workers)
    for _ in range(bad):
        assert set(next(batches)) == {"spec", "position"}
    with pytest.raises(AudioError) as raised:
        next(batches)
    # The same one-line message as in the worker, not the worker's traceback.
    assert str(raised.value) == str(direct.value) and "nan.wav" in str(raised.value)


@pytest.mark.slow  # starts a DataLoader worker and signals it
def test_workers_leave_stop_signals_to_the_training_process(tmp_path):
    """Ctrl-C or a scheduler's SIGTERM (sent by another process) leaves the data workers running,
    so that training can finish its step and save; a SIGTERM from the training process (how the
    DataLoader and multiprocessing end workers) still ends them."""
    # DataLoader workers of earlier tests in this process are ended first: torch reports a worker
    # that dies of a signal from whatever code runs in the parent at that moment, this test's
    # sleep included, though it was not this test's worker.
    gc.collect()
    for child in multiprocessing.active_children():
        child.join(timeout=10)
    write_wav(str(tmp_path / "a.wav"), speech_like(1.5), 16000)
    files = build_index(str(tmp_path), 1.0)
    before = set(multiprocessing.active_children())
    batches = load_data(files, batch_size=1, image_size=64, seq_dur=1.0, seed=0, num_workers=1)
    next(batches)
    (worker,) = set(multiprocessing.active_children()) - before
    for name in ("INT", "TERM"):
        subprocess.run(["kill", f"-{name}", str(worker.pid)], check=True)
    time.sleep(0.5)
    assert worker.is_alive()
    assert next(batches)["position"].tolist() == [1]
    os.kill(worker.pid, signal.SIGTERM)
    worker.join(timeout=10)
    assert worker.exitcode == 0
