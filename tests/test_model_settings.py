"""A checkpoint carries its model and diffusion settings (model_config.yml beside it): every
loader reads them without flags, a flag that contradicts one is refused, and a weight mismatch is
one short line."""

import os

import pytest
import yaml

from diffiner.checkpoints import (MODEL_CONFIG, PUBLISHED, load_model, resolve_model_settings,
                                  write_model_config)
from diffiner.commands.refine import main as refine_main
from diffiner.commands.sample_prior import main as sample_main
from diffiner.pipeline import Refiner
from diffiner.script_util import model_and_diffusion_defaults

from conftest import TINY, speech_like, write_wav

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(REPO, "demo", "model", "diffiner_demo.pt")


@pytest.fixture
def pair(tmp_path):
    clean = speech_like(0.5, 16000, seed=3)
    write_wav(str(tmp_path / "noisy" / "a b.wav"), clean + 0.02, 16000)
    write_wav(str(tmp_path / "proc" / "a b.wav"), 0.9 * clean, 16000)
    return str(tmp_path)


def refine_flags(root, checkpoint, out="out"):
    return ["--root-noisy", os.path.join(root, "noisy"), "--root-proc", os.path.join(root, "proc"),
            "--model-path", checkpoint, "--output-dir", os.path.join(root, out), "--no-gpu", "--no-progress",
            "--timestep-respacing", "ddim2"]


def test_a_model_with_non_default_settings_refines_with_its_path_alone(pair, carried_tiny_checkpoint):
    assert refine_main(refine_flags(pair, carried_tiny_checkpoint)) == 0
    config = yaml.safe_load(open(os.path.join(pair, "out", "config.yml")))
    assert {k: config["model"][k] for k in TINY} == TINY
    assert config["model_settings_from"] == os.path.join(os.path.dirname(carried_tiny_checkpoint), MODEL_CONFIG)
    assert "timestep_respacing" not in config["model"] and config["refiner"]["timestep_respacing"] == "ddim2"

    refiner = Refiner.from_checkpoint(carried_tiny_checkpoint, device="cpu", timestep_respacing="ddim2")
    assert refiner.model.model_channels == TINY["num_channels"]
    # Flags that agree with what the checkpoint carries are fine.
    assert refine_main(refine_flags(pair, carried_tiny_checkpoint, "agree") + ["--num-channels", "32"]) == 0


def test_a_flag_contradicting_a_carried_architecture_setting_is_one_line_exit_2(pair, carried_tiny_checkpoint,
                                                                                   capsys):
    assert refine_main(refine_flags(pair, carried_tiny_checkpoint) + ["--num-channels", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    config = os.path.join(os.path.dirname(carried_tiny_checkpoint), MODEL_CONFIG)
    assert err == [f"error: --num-channels 64 contradicts num_channels: 32 carried by {config}; leave the flag out"]
    assert not os.path.exists(os.path.join(pair, "out"))
    assert sample_main(["--model-path", carried_tiny_checkpoint, "--num-res-blocks", "2", "--seconds", "0.1",
                        "--output-dir", os.path.join(pair, "samples")]) == 2
    assert "contradicts num_res_blocks: 1" in capsys.readouterr().err


def test_a_weight_mismatch_names_the_first_tensor_and_where_the_settings_came_from(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError) as published:
        load_model(tiny_checkpoint)  # no model_config.yml beside it: the published settings
    message = str(published.value)
    assert message.startswith(f"{tiny_checkpoint}: the weights do not fit the model settings from {PUBLISHED}: ")
    assert ": time_embed.0.weight is (128, 32) in the file, (512, 128) in the model (and " in message
    assert len(message) < 300 and "\n" not in message
    write_model_config(str(tmp_path), {**model_and_diffusion_defaults(), **TINY, "num_res_blocks": 2})
    with pytest.raises(ValueError, match=f"from {tmp_path / MODEL_CONFIG}: .* is missing from the file"):
        load_model(tiny_checkpoint)


def test_precedence_is_flag_then_carried_then_published(carried_tiny_checkpoint, caplog):
    carried = resolve_model_settings(carried_tiny_checkpoint)
    assert carried.values["num_channels"] == 32 and carried.values["use_scale_shift_norm"] is True
    assert carried.values == dict(model_and_diffusion_defaults(), **TINY)
    # A diffusion setting is the user's to change (the network still fits), with a warning.
    chosen = resolve_model_settings(carried_tiny_checkpoint, {"noise_schedule": "cosine", "num_channels": None})
    assert chosen.values["noise_schedule"] == "cosine" and chosen.values["num_channels"] == 32
    assert "noise_schedule cosine replaces linear" in caplog.text
    # Training refuses even that: a resumed run must continue the process it trained.
    with pytest.raises(ValueError, match="--noise-schedule cosine contradicts noise_schedule: linear"):
        resolve_model_settings(carried_tiny_checkpoint, {"noise_schedule": "cosine"},
                               refuse=tuple(model_and_diffusion_defaults()))


def test_hostile_or_broken_model_configs_are_one_line_errors(tiny_checkpoint, tmp_path):
    config = tmp_path / MODEL_CONFIG
    for text, message in [("a: &a [1]\nb: *a\n", "alias"), ("- 1\n- 2\n", "expected a mapping"),
                          ("num_channels: 32\nwidth: 9\n", "unknown model settings width"),
                          ("num_channels: abc\n", "num_channels must be int, got 'abc'"),
                          ("learn_sigma: 1\n", "learn_sigma must be bool, got 1"),
                          ("x" * 70000, "larger than")]:
        config.write_text(text)
        with pytest.raises(ValueError, match=message):
            resolve_model_settings(tiny_checkpoint)


def test_the_demo_model_needs_no_flags():
    model, diffusion = load_model(DEMO_MODEL, timestep_respacing="ddim4")
    assert model.model_channels == 32 and len(diffusion.timestep_map) == 4
    assert not os.path.exists(os.path.join(REPO, "demo", "model", "model_flags.txt"))
