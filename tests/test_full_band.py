"""Full band: the output keeps the processed file's band above the model's (--high-band), and
outputs at the model's rate, or with --high-band none, are those of the code before it."""

import os
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from diffiner.commands.refine import main
from diffiner.pipeline import Refiner

from conftest import write_wav
from full_band_pair import HIGH_BAND, REFERENCE_RUNS, full_band_pair, refine_args, samples_digest
from test_crossover import band_levels_db

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from common import cpu_model  # noqa: E402  (bench/ is not a package)

DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "model",
                          "diffiner_demo.pt")
# Digests of the REFERENCE_RUNS' outputs made by the code before the crossover (commit 7381c40,
# `python3 tests/full_band_pair.py demo/model/diffiner_demo.pt`): at 16 kHz, and at 48 kHz as
# --keep-sample-rate wrote it then (now --high-band none). Bytes of a network's output are a
# property of the machine as well as of the code (another CPU may sum in another order, and ten
# reverse steps carry a last-bit difference into the 16-bit samples), so they are compared only
# on the kind of CPU and torch that made them; elsewhere the test skips, saying so.
BEFORE_MADE_ON = ("AMD EPYC", "2.13.0+cpu")
BEFORE = {"16k": "1b7ecfc3ea816d1ac803fa63f3805a1833c8614b902a4339fecb66a41c82b998",
          "48k": "3a45a9a5868c96dc21abf7f64168c1be247d7b8c02396bb2171f7513076a2ec7"}


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    """{run name: output file} of the demo model on the full-band pair: the reference runs (the
    48 kHz one with --high-band none), and the default at 48 kHz."""
    root = str(tmp_path_factory.mktemp("full_band"))
    noisy, proc = full_band_pair(root)
    runs = {"16k": REFERENCE_RUNS["16k"], "48k": REFERENCE_RUNS["48k"] + ["--high-band", "none"],
            "processed": ["--keep-sample-rate"]}
    outputs = {}
    for name, extra in runs.items():
        out = os.path.join(root, name)
        assert main(refine_args(noisy, proc, DEMO_MODEL, out, extra)) == 0
        outputs[name] = os.path.join(out, "pair.wav")
    outputs["proc"] = os.path.join(proc, "pair.wav")
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["16k", "48k"])
def test_outputs_at_the_model_rate_and_with_high_band_none_are_unchanged(refined, name):
    here = (cpu_model(), torch.__version__)
    if here != BEFORE_MADE_ON:
        pytest.skip(f"the reference digests were made on {BEFORE_MADE_ON}, this is {here}")
    assert samples_digest(refined[name]) == BEFORE[name]


@pytest.mark.slow
def test_the_refined_output_keeps_the_processed_band_above_9_khz(refined):
    processed, rate = sf.read(refined["proc"])
    kept, kept_rate = sf.read(refined["processed"])
    lost, _ = sf.read(refined["48k"])
    assert rate == kept_rate == 48000 and kept.shape == processed.shape
    levels = band_levels_db(processed, kept, rate, 9000, HIGH_BAND[1], 1000)
    assert np.abs(levels).max() < 1.0
    # Without the high band it is gone (the issue measured -84.5 dB): what the crossover restores.
    assert band_levels_db(processed, lost, rate, HIGH_BAND[0], HIGH_BAND[1], HIGH_BAND[1] - HIGH_BAND[0])[0] < -40
    # Below the crossover the two outputs are the same refined band.
    assert np.abs(band_levels_db(lost, kept, rate, 200, 6400, 400)).max() < 0.1


@pytest.mark.slow
def test_high_band_is_recorded_in_config_yml(refined):
    for name, value in (("processed", "processed"), ("48k", "none")):
        with open(os.path.join(os.path.dirname(refined[name]), "config.yml")) as f:
            assert yaml.safe_load(f)["refiner"]["high_band"] == value


@pytest.mark.slow
def test_the_python_api_and_refine_file_keep_the_high_band_of_the_processed_file(tmp_path):
    """The processed file is the high band's source, also when the noisy file has another rate."""
    noisy_dir, proc_dir = full_band_pair(str(tmp_path))
    noisy48, _ = sf.read(os.path.join(noisy_dir, "pair.wav"), dtype="float32")
    processed, rate = sf.read(os.path.join(proc_dir, "pair.wav"), dtype="float32")
    refiner = Refiner.from_checkpoint(DEMO_MODEL, device="cpu", timestep_respacing="ddim10")
    kept = refiner.refine(noisy48, processed, rate)
    assert np.abs(band_levels_db(processed, kept, rate, 9000, HIGH_BAND[1], 1000)).max() < 1.0
    narrow = Refiner.from_checkpoint(DEMO_MODEL, device="cpu", timestep_respacing="ddim10", high_band="none")
    assert band_levels_db(processed, narrow.refine(noisy48, processed, rate), rate, *HIGH_BAND,
                          HIGH_BAND[1] - HIGH_BAND[0])[0] < -40
    # The noisy recording at 16 kHz (it has no high band): the output is at the processed file's rate.
    noisy16 = str(tmp_path / "noisy16.wav")
    write_wav(noisy16, sf.read(os.path.join(noisy_dir, "pair.wav"), dtype="float32")[0][::3], 16000)
    out = str(tmp_path / "out.wav")
    refiner.refine_file(noisy16, os.path.join(proc_dir, "pair.wav"), out)
    from_file, out_rate = sf.read(out)
    assert out_rate == rate and from_file.shape == processed.shape
    assert np.abs(band_levels_db(processed, from_file, rate, 9000, HIGH_BAND[1], 1000)).max() < 1.0


def test_an_unknown_high_band_is_refused():
    with pytest.raises(ValueError, match="high_band must be one of processed, none"):
        Refiner.from_checkpoint(DEMO_MODEL, device="cpu", high_band="noisy")


# A full-band prior: the tiny network on the 48 kHz front-end of the issue (n_fft 1536, hop 384:
# 768 bins, 125 frames per second), 64-frame crops of 0.6 s excerpts, 100 diffusion steps.
FULL_BAND_FLAGS = ["--sample_rate", "48000", "--n_fft", "1536", "--hop_length", "384"]


@pytest.mark.slow
@pytest.mark.parametrize("rate, flags, bins", [(48000, FULL_BAND_FLAGS, 768),
                                               (24000, ["--sample_rate", "24000", "--n_fft", "768",
                                                        "--hop_length", "192"], 384)])
def test_a_full_band_prior_trains_loads_by_its_path_and_refines_at_its_rate(tmp_path, monkeypatch, rate, flags,
                                                                             bins):
    from diffiner import pipeline
    from diffiner.commands.train import main as train
    from diffiner.spectrogram import FrontEnd

    from conftest import tiny_cli_flags

    corpus = tmp_path / "clean"
    for k in range(2):
        full_band_pair(str(corpus / f"s{k}"), rate=rate, seconds=1.0, seed=k)
    log_dir = str(tmp_path / "log")
    assert train(["--root", str(corpus / "s0" / "proc"), "--log_dir", log_dir, "--max_steps", "2",
                  *tiny_cli_flags(None), *flags, "--diffusion_steps", "100", "--seq_dur", "0.6",
                  "--num_workers", "0", "--batch_size", "2"]) == 0
    with open(os.path.join(log_dir, "model_config.yml")) as f:
        carried = yaml.safe_load(f)
    assert (carried["sample_rate"], carried["n_fft"], carried["hop_length"]) == (rate, 2 * bins, bins // 2)

    refiner = Refiner.from_checkpoint(os.path.join(log_dir, "ema_0.9999_000002.pt"), device="cpu",
                                      timestep_respacing="ddim2")
    assert refiner.front_end == FrontEnd(rate, 2 * bins, bins // 2) and refiner.sample_rate == rate
    # Segment lengths follow the model's rate: 10 s of audio at 48 kHz.
    assert refiner.max_samples == 10 * rate
    seen = []
    original = pipeline.refine
    monkeypatch.setattr(pipeline, "refine", lambda net, diff, noisy, *a, **k: seen.append(noisy.shape) or
                        original(net, diff, noisy, *a, **k))
    noisy, proc = full_band_pair(str(tmp_path / "pair"), rate=rate, seconds=0.77, seed=7)
    noisy_audio, _ = sf.read(os.path.join(noisy, "pair.wav"), dtype="float32")
    processed, _ = sf.read(os.path.join(proc, "pair.wav"), dtype="float32")
    refined = refiner.refine(noisy_audio, processed, rate)
    assert refined.shape == processed.shape and np.all(np.isfinite(refined))
    # 0.77 s: 1 + samples // hop frames, one more past the signal, up to the network's multiple of 8.
    frames = 1 + processed.size // (bins // 2) + 1
    assert seen == [(1, 2, bins, 8 * -(-frames // 8))]
    # The prior refines its whole band itself: no crossover at its own rate (high_band changes nothing).
    narrow = Refiner.from_checkpoint(os.path.join(log_dir, "ema_0.9999_000002.pt"), device="cpu",
                                     timestep_respacing="ddim2", high_band="none")
    assert np.array_equal(narrow.refine(noisy_audio, processed, rate), refined)


@pytest.mark.slow
def test_the_folder_command_streams_the_crossover_that_refine_file_applies_whole(tmp_path):
    """The command joins the high band block by block as segments finish (`corpus.with_high_band`),
    `refine_file` over the whole array at once: the same float64 sums in another grouping, far
    below a 16-bit step, so the written samples differ by at most one step (a rounding tie)."""
    noisy_dir, proc_dir = full_band_pair(str(tmp_path), seconds=2.0)
    out = str(tmp_path / "out")
    assert main(refine_args(noisy_dir, proc_dir, DEMO_MODEL, out, ["--keep-sample-rate", "--max-dur", "0.8", "--segment-overlap", "0.2"])) == 0
    refiner = Refiner.from_checkpoint(DEMO_MODEL, device="cpu", timestep_respacing="ddim10", precision="fp32", max_dur=0.8,
                                      segment_overlap=0.2)
    whole = str(tmp_path / "whole.wav")
    refiner.refine_file(os.path.join(noisy_dir, "pair.wav"), os.path.join(proc_dir, "pair.wav"), whole)
    streamed, _ = sf.read(os.path.join(out, "pair.wav"), dtype="int16")
    joined, _ = sf.read(whole, dtype="int16")
    assert streamed.shape == joined.shape
    assert np.abs(streamed.astype(np.int32) - joined).max() <= 1
