"""Full band: the output keeps the processed file's band above the model's (--high-band), and
outputs at the model's rate, or with --high-band none, are those of the code before it."""

import os

import numpy as np
import pytest
import soundfile as sf
import yaml

from diffiner.commands.refine import main
from diffiner.pipeline import Refiner

from conftest import write_wav
from full_band_pair import HIGH_BAND, REFERENCE_RUNS, full_band_pair, refine_args, samples_digest
from test_crossover import band_levels_db

DEMO_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "model",
                          "diffiner_demo.pt")
# Digests of the REFERENCE_RUNS' outputs made by the code before the crossover (commit 7381c40,
# `python3 tests/full_band_pair.py demo/model/diffiner_demo.pt`): at 16 kHz, and at 48 kHz as
# --keep-sample-rate wrote it then (now --high-band none).
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
