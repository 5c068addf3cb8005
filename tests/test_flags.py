"""Flags are derived from the settings' one declaration; --precision and its aliases."""

import dataclasses

import pytest

from diffiner.commands import refine, sample_prior, train
from diffiner.pipeline import BatchSettings, MethodSettings, RefinerSettings, SegmentSettings

from conftest import tiny_cli_flags


def test_refine_flags_take_name_default_and_help_from_the_settings_dataclasses():
    parser = refine.build_parser()
    actions = {a.dest: a for a in parser._actions}
    for settings_type in (SegmentSettings, BatchSettings, MethodSettings):
        for field in dataclasses.fields(settings_type):
            if "flag" not in field.metadata or field.name == "max_batch_frames":  # the command's own form
                continue
            assert actions[field.name].default == field.default, field.name
            assert actions[field.name].help == field.metadata["help"], field.name


def test_refiner_settings_are_routed_from_the_flags():
    args = refine.parse_args(["--root-noisy", "n", "--root-proc", "p", "--model-path", "m", "--max-dur", "3",
                              "--batch-size", "2", "--max-batch-frames", "512", "--method", "diffiner",
                              "--etas", "0.5", "--channels-last", "--bf16", "--clip-denoised", "--high-band", "none"])
    args.etas_given = refine.parse_etas(args.method, args.etas)
    settings = refine.refiner_settings(args)
    assert settings == RefinerSettings.from_flat(
        method="diffiner", eta_a=0.5, clip_denoised=True, max_dur=3.0, batch_size=2, max_batch_frames=512,
        precision="bf16", channels_last=True, high_band="none")
    shaping, execution = settings.describe(width_bucket=32)
    assert shaping == dict(method="diffiner", eta_a=0.5, eta_b=0.9, clip_denoised=True, max_dur=3.0,
                           segment_overlap=1.0, width_bucket=32, high_band="none")
    assert execution == dict(batch_size=2, max_batch_frames=512, channels_last=True, compile=False,
                             cuda_graphs=False)


@pytest.mark.parametrize("parse, default", [
    (lambda extra: refine.parse_args(["--root-noisy", "n", "--root-proc", "p", "--model-path", "m", *extra]), "auto"),
    (lambda extra: sample_prior.parse_args(["--model-path", "m", *extra]), "auto"),
    (lambda extra: train.parse_args(["--root", "r", *tiny_cli_flags(None), *extra]), "fp32"),
], ids=["refine", "sample", "train"])
def test_precision_is_one_flag_with_the_originals_switches_as_aliases(parse, default, capsys):
    def precision(*extra):
        return parse(list(extra)).precision

    assert precision() == default  # auto: chosen per device (test_cpu_defaults.py); training is explicit
    assert precision("--precision", "fp32") == "fp32"
    assert precision("--precision", "bf16") == precision("--bf16") == "bf16"
    assert precision("--precision", "fp16") == precision("--use-fp16") == precision("--use_fp16", "true") == "fp16"
    assert precision("--precision", "fp16", "--use-fp16") == "fp16"  # the same request twice
    with pytest.raises(SystemExit) as exit_:
        precision("--precision", "fp32", "--bf16")
    assert exit_.value.code == 2 and "disagree" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["refine", "train", "sample_prior", "evaluate", "enhance", "resample_audio",
                                    "make_noisy_set"])
def test_every_command_prints_its_version(module, capsys):
    import importlib

    from diffiner import __version__

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(f"diffiner.commands.{module}").main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip().endswith(f"(diffiner) {__version__}")
