"""Long files are read, refined and written segment by segment (issue 21 item 9): the streamed
path gives the whole-file path's bytes, memory does not grow with a file's length, progress counts
segments, and a header claiming an absurd length fails its file before anything is read."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf

from diffiner import corpus, pipeline
from diffiner.audio.io import (AudioError, BlockWriter, fit_length, load_audio, read_blocks, resample,
                               resample_stream, save_audio)
from diffiner.corpus import RunSummary, load_pair, plan_jobs, refine_files
from diffiner.pipeline import CrossfadeJoiner, Refiner, segment_bounds

from conftest import speech_like, tiny_model_and_diffusion, with_noise, write_wav


def blocks_of(audio, sizes):
    """(channels, n) `audio` cut into blocks of the given sizes, repeated."""
    out, start, k = [], 0, 0
    while start < audio.shape[-1]:
        out.append(audio[:, start:start + sizes[k % len(sizes)]])
        start += sizes[k % len(sizes)]
        k += 1
    return out


# ----- the stream pieces give the whole-file functions' samples -----

@pytest.mark.parametrize("rates", [(44100, 16000), (16000, 48000), (8000, 16000), (22050, 22050)])
@pytest.mark.parametrize("channels", [1, 2])
def test_streamed_resampling_equals_the_whole_signal_resampled(rates, channels):
    audio = (0.3 * np.random.default_rng(channels).standard_normal((channels, 30011))).astype(np.float32)
    length = int(round(audio.shape[-1] * rates[1] / rates[0])) + 7  # longer than soxr gives: zero-padded
    whole = resample(audio, *rates, length=length)
    streamed = np.concatenate(list(resample_stream(blocks_of(audio, [4096, 37, 20000]), *rates, length)), axis=1)
    assert streamed.dtype == np.float32 and np.array_equal(streamed, whole)
    shorter = np.concatenate(list(resample_stream(blocks_of(audio, [1000]), *rates, length - 500)), axis=1)
    assert np.array_equal(shorter, fit_length(whole, length - 500))


def reference_crossfade(chunks, bounds, samples, overlap):
    """The whole-array cross-fade the streaming joiner replaces, as it was written."""
    if len(chunks) == 1:
        return chunks[0]
    out, total = np.zeros(samples), np.zeros(samples)
    ramp = (np.arange(overlap) + 0.5) / max(overlap, 1)
    for k, (chunk, (start, end)) in enumerate(zip(chunks, bounds)):
        weight = np.ones(end - start)
        if k > 0 and overlap:
            weight[:overlap] = ramp
        if k < len(chunks) - 1 and overlap:
            weight[-overlap:] = np.minimum(weight[-overlap:], ramp[::-1])
        out[start:end] += weight * chunk
        total[start:end] += weight
    return (out / total).astype(np.float32)


@pytest.mark.parametrize("samples, window, overlap", [(10000, 3000, 600), (10000, 3000, 2500), (10000, 3000, 0),
                                                      (2000, 3000, 600)])
def test_the_streaming_joiner_gives_the_whole_array_cross_fade_sample_for_sample(samples, window, overlap):
    rng = np.random.default_rng(overlap)
    bounds = segment_bounds(samples, window, overlap)
    chunks = [rng.standard_normal((2, end - start)).astype(np.float32) for start, end in bounds]
    joiner = CrossfadeJoiner(bounds, overlap)
    parts = [joiner.add(chunk) for chunk in chunks]
    held = max(part.shape[-1] for part in parts)
    assert held <= window  # each window's samples come out as soon as no later window covers them
    joined = np.concatenate(parts, axis=1)
    for channel in range(2):
        expected = reference_crossfade([c[channel] for c in chunks], bounds, samples, overlap)
        assert np.array_equal(joined[channel], expected)


@pytest.mark.parametrize("name, channels", [("out.wav", 1), ("out.wav", 2), ("out.flac", 2)])
def test_a_file_written_in_blocks_is_byte_for_byte_the_file_written_whole(tmp_path, name, channels):
    audio = 1.2 * np.random.default_rng(channels).uniform(-1, 1, (channels, 50001)).astype(np.float32)  # some clip
    save_audio(str(tmp_path / "whole" / name), audio, 22050)
    with BlockWriter(str(tmp_path / name), 22050, channels) as writer:
        for block in blocks_of(audio, [4096, 333]):
            writer.write(block)
    assert (tmp_path / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_a_block_writer_that_meets_nan_leaves_nothing(tmp_path):
    out = tmp_path / "out.wav"
    out.write_bytes(b"earlier")
    with pytest.raises(AudioError, match="out.wav.*NaN"):
        with BlockWriter(str(out), 16000, 1) as writer:
            writer.write(np.zeros((1, 100)))
            writer.write(np.full((1, 100), np.nan))
    assert out.read_bytes() == b"earlier" and os.listdir(tmp_path) == ["out.wav"]


def test_blocks_read_are_the_samples_load_audio_reads_and_nan_fails_at_its_block(tmp_path):
    audio = np.random.default_rng(0).uniform(-1, 1, (2, 70000)).astype(np.float32)
    path = str(tmp_path / "a.wav")
    write_wav(path, audio, 16000)
    assert np.array_equal(np.concatenate(list(read_blocks(path, 3000)), axis=1), load_audio(path)[0])
    audio[1, 65000] = np.nan
    write_wav(path, audio, 16000, subtype="FLOAT")
    blocks = read_blocks(path, 30000)
    assert next(blocks).shape == (2, 30000)  # the first blocks are read; the one with NaN fails
    next(blocks)
    with pytest.raises(AudioError, match="a.wav: file contains NaN"):
        next(blocks)


# ----- the folder engine: same bytes, bounded memory, segment progress -----

def make_refiner(**settings):
    model, diffusion = tiny_model_and_diffusion(timestep_respacing="ddim2")
    return Refiner(model, diffusion, **dict(dict(max_dur=0.3, segment_overlap=0.05, batch_size=3), **settings))


def make_pair(folder, name, seconds, rate, channels=1, seed=0):
    clean = np.stack([speech_like(seconds, rate, seed + c) for c in range(channels)])
    write_wav(str(folder / "noisy" / name), np.stack([with_noise(c, 10.0, seed) for c in clean]), rate)
    write_wav(str(folder / "proc" / name), 0.9 * clean, rate)


def refine_folder(refiner, folder, keep_sample_rate=False, **kwargs):
    summary = RunSummary()
    jobs = plan_jobs(str(folder / "noisy"), str(folder / "proc"), str(folder / "out"), refiner, False, summary)
    refine_files(refiner, jobs, summary, seed=3, keep_sample_rate=keep_sample_rate, progress=False, **kwargs)
    return jobs, summary


def whole_file_bytes(refiner, folder, name, path, keep_sample_rate):
    """The output of the whole-file path: the pair read whole, prepared, refined and assembled."""
    noisy, processed, rate = load_pair(str(folder / "noisy" / name), str(folder / "proc" / name))
    out_rate = rate if keep_sample_rate else 16000
    save_audio(path, refiner.refine(noisy, processed, rate, seed=3, key=name, output_sample_rate=out_rate,
                                    layout="channels_first"), out_rate)
    return open(path, "rb").read()


@pytest.mark.parametrize("keep_sample_rate", [False, True])
def test_streamed_files_are_byte_for_byte_the_whole_file_paths(tmp_path, keep_sample_rate):
    # In batches of one, so that the files' segments meet the same partners in both paths (the
    # folder batches segments across files; a batch's other segments change a result in its last
    # bits).
    refiner = make_refiner(batch_size=1)
    files = {"long.wav": (1.4, 44100, 1), "stereo.wav": (1.0, 16000, 2), "short.wav": (0.2, 16000, 1),
             "tiny.wav": (0.001, 48000, 1)}
    for seed, (name, (seconds, rate, channels)) in enumerate(files.items()):
        make_pair(tmp_path, name, seconds, rate, channels, seed)
    jobs, summary = refine_folder(refiner, tmp_path, keep_sample_rate)
    assert sorted(summary.refined) == sorted(files) and not summary.failed
    assert {job.rel: job.segments for job in jobs}["long.wav"] >= 5
    for name in files:
        expected = whole_file_bytes(refiner, tmp_path, name, str(tmp_path / f"whole-{name}"), keep_sample_rate)
        assert (tmp_path / "out" / name).read_bytes() == expected, name


def test_long_multichannel_files_go_window_by_window_with_the_same_bytes_in_batches_of_one(tmp_path, monkeypatch):
    # Window by window, the segments of a stereo file share batches with other partners than
    # channel by channel; alone in their batch, nothing but the order changes.
    refiner = make_refiner(batch_size=1)
    make_pair(tmp_path, "stereo.wav", 1.0, 22050, 2)
    expected = whole_file_bytes(refiner, tmp_path, "stereo.wav", str(tmp_path / "whole.wav"), True)
    monkeypatch.setattr(pipeline, "CHANNEL_MAJOR_MAX_SECONDS", 0.5)
    order = []
    real = refiner._segment
    monkeypatch.setattr(refiner, "_segment", lambda y, p, seed: order.append(seed) or real(y, p, seed))
    refine_folder(refiner, tmp_path, keep_sample_rate=True)
    windows = len(segment_bounds(16000, refiner.max_samples, refiner.overlap_samples))
    assert order[:2] == [pipeline.segment_seed(3, "stereo.wav", c, 0) for c in (0, 1)] and len(order) == 2 * windows
    assert (tmp_path / "out" / "stereo.wav").read_bytes() == expected


def test_progress_counts_segments_and_reaches_its_total_when_a_file_fails(tmp_path, monkeypatch):
    refiner = make_refiner()
    make_pair(tmp_path, "a.wav", 1.0, 16000)
    make_pair(tmp_path, "b.wav", 0.2, 16000, channels=2)
    bad = (0.1 * np.ones(80000)).astype(np.float32)
    bad[75000] = np.nan  # past the first block read: after the first segments are refined and written
    write_wav(str(tmp_path / "noisy" / "c.wav"), bad, 16000, subtype="FLOAT")
    write_wav(str(tmp_path / "proc" / "c.wav"), np.nan_to_num(bad), 16000)
    bars = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(corpus, "tqdm", Bar)
    monkeypatch.setattr(corpus, "SEGMENTS_AHEAD", 1)
    written = []
    real_write = BlockWriter.write
    monkeypatch.setattr(BlockWriter, "write", lambda self, block: written.append(self.path) or real_write(self, block))
    jobs, summary = refine_folder(refiner, tmp_path)
    assert any(path.endswith("c.wav") for path in written)  # its output was under way when it failed
    assert sorted(summary.refined) == ["a.wav", "b.wav"] and list(summary.failed) == ["c.wav"]
    assert "c.wav: file contains NaN" in summary.failed["c.wav"] and "\n" not in summary.failed["c.wav"]
    assert not (tmp_path / "out" / "c.wav").exists() and sorted(os.listdir(tmp_path / "out")) == ["a.wav", "b.wav"]
    counts = {job.rel: job.segments for job in jobs}
    assert counts == {"a.wav": 4, "b.wav": 2, "c.wav": 20}  # windows of 4800 samples, 4000 apart
    assert bars[0].total == bars[0].n == 26


def test_a_header_claiming_an_absurd_length_fails_its_file_before_anything_is_read(tmp_path, monkeypatch):
    # 200,000 samples at 1 Hz: 400 kB of file, 3.2e9 samples (12.8 GB of float32) at 16 kHz.
    for side in ("noisy", "proc"):
        write_wav(str(tmp_path / side / "absurd.wav"), np.zeros(200000, dtype=np.float32), 1)
    make_pair(tmp_path, "fine.wav", 0.2, 16000)

    def refused(*args, **kwargs):
        raise AssertionError("samples read")

    real_read = read_blocks
    monkeypatch.setattr(corpus, "read_blocks",
                        lambda path, *a: refused() if "absurd" in path else real_read(path, *a))
    jobs, summary = refine_folder(make_refiner(), tmp_path)
    assert summary.refined == ["fine.wav"] and [job.rel for job in jobs] == ["fine.wav"]
    message = summary.failed["absurd.wav"]
    assert "absurd.wav" in message and "1 Hz" in message and "\n" not in message


CHILD = textwrap.dedent("""
    import sys
    import torch
    from diffiner.corpus import RunSummary, plan_jobs, refine_files
    from diffiner.pipeline import Refiner
    from diffiner.script_util import create_model_and_diffusion

    class Network(torch.nn.Module):
        # The smallest network of the refiner's shape: the memory of a real one is its batch's
        # activations, which the segment and batch sizes bound, whatever the file's length.
        downsample_factor = 8

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x, t):
            return self.conv(x)

    torch.manual_seed(0)
    _, diffusion = create_model_and_diffusion(image_size=64, num_channels=32, num_res_blocks=1,
                                              channel_mult="1,1,2,2", attention_resolutions="8",
                                              timestep_respacing="ddim2")
    refiner = Refiner(Network(), diffusion, device="cpu", batch_size=2, max_dur=10.0, segment_overlap=1.0)
    root = sys.argv[1]
    summary = RunSummary()
    jobs = plan_jobs(root + "/noisy", root + "/proc", root + "/out", refiner, False, summary)
    refine_files(refiner, jobs, summary, seed=0, keep_sample_rate=False, progress=False)
    assert summary.refined and not summary.failed, summary.failed
    status = open("/proc/self/status").read()
    print(int(status.split("VmHWM:")[1].split()[0]) * 1024)
""")


def peak_rss_refining(folder, seconds, rate):
    """Peak RSS (bytes) of a process that refines one `seconds` long pair at `rate`."""
    rng = np.random.default_rng(0)
    for side, gain in (("noisy", 1.0), ("proc", 0.8)):
        os.makedirs(folder / side, exist_ok=True)
        with sf.SoundFile(str(folder / side / "a.wav"), "w", rate, 1, "PCM_16") as f:
            for _ in range(int(seconds // 10)):  # written 10 s at a time: the test holds no long file either
                f.write(gain * 0.1 * rng.standard_normal(10 * rate))
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak RSS from /proc (Linux)")
def test_refining_a_20_minute_file_takes_the_memory_of_a_20_second_file(tmp_path):
    short = peak_rss_refining(tmp_path / "short", 20, 16000)
    long = peak_rss_refining(tmp_path / "long", 20 * 60, 16000)
    # Read whole, a 20-minute 16 kHz file costs about 50 bytes per sample (two int16 files read as
    # float32, their copies at 16 kHz, the spectrograms of every segment, the float64 join): ~1 GB.
    # Streamed, the long file adds only segments read ahead (SEGMENTS_AHEAD of about 2 MB each)
    # and a few windows of 10 s: well under 100 MB, whatever its length.
    assert long - short < 100e6, (short, long)
