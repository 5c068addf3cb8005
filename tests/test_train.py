import contextlib
import csv
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml

from diffiner import training as train_module
from diffiner.logger import MetricsLogger
from diffiner.acceleration import autocast
from diffiner.checkpoints import load_state_dict
from diffiner.pipeline import Refiner
from diffiner.commands.train import main
from diffiner.speech_datasets import ExcerptDataset, build_index
from diffiner.train_util import DynamicLossScaler, TrainLoop, global_norm

from conftest import speech_like, tiny_cli_flags, tiny_model_and_diffusion, write_wav
from fs_helpers import output_digest
from tolerances import reordering_atol

# The tiny model on 64-frame crops of 1 s excerpts, 100 diffusion steps, 2 examples per step.
TRAIN_FLAGS = tiny_cli_flags(None) + ["--diffusion_steps", "100", "--seq_dur", "1.0", "--num_workers", "0",
                                    "--log_interval", "1", "--batch_size", "2"]
PROGRESS_COLUMNS = ["step", "samples", "loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "grad_norm",
                    "param_norm", "samples_per_sec", "lr"]


def make_corpus(root: str) -> str:
    """Four usable files (16 kHz, 44.1 kHz, stereo 22.05 kHz FLAC) and one too short."""
    write_wav(os.path.join(root, "a.wav"), speech_like(1.3, seed=1), 16000)
    write_wav(os.path.join(root, "spk", "b.wav"), speech_like(1.6, 44100, seed=2), 44100)
    write_wav(os.path.join(root, "spk", "c.flac"), np.stack([speech_like(1.2, 22050, seed=3)] * 2), 22050)
    write_wav(os.path.join(root, "d.wav"), speech_like(2.0, seed=4), 16000)
    write_wav(os.path.join(root, "short.wav"), speech_like(0.4, seed=5), 16000)
    return root


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(str(tmp_path / "clean"))


def read_progress(log_dir):
    with open(os.path.join(log_dir, "progress.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_three_steps_write_checkpoints_logs_and_settings(corpus, tmp_path):
    log_dir = str(tmp_path / "log")
    assert main(["--root", corpus, "--log_dir", log_dir, "--max_steps", "3", *TRAIN_FLAGS]) == 0
    for name in ("model000003.pt", "ema_0.9999_000003.pt", "opt000003.pt", "args.json", "model_config.yml",
                 "progress.jsonl"):
        assert os.path.exists(os.path.join(log_dir, name)), name
    rows = read_progress(log_dir)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert set(PROGRESS_COLUMNS) <= set(rows[0])
    assert [int(r["samples"]) for r in rows] == [2, 4, 6]
    assert all(math.isfinite(float(r["loss"])) and float(r["grad_norm"]) > 0 for r in rows)
    with open(os.path.join(log_dir, "progress.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
    settings = json.load(open(os.path.join(log_dir, "args.json")))
    assert settings["lr"] == 1e-4 and settings["ema_rate"] == "0.9999" and settings["global_batch_size"] == 2

    # The EMA checkpoint is what users refine with: it loads through the refiner by its path
    # alone, with the settings the run carries beside it (and no sampler setting among them).
    model_config = yaml.safe_load(open(os.path.join(log_dir, "model_config.yml")))
    assert "use_fp16" not in model_config and "timestep_respacing" not in model_config
    assert model_config["num_channels"] == 32 and model_config["diffusion_steps"] == 100
    refiner = Refiner.from_checkpoint(os.path.join(log_dir, "ema_0.9999_000003.pt"), device="cpu",
                                      timestep_respacing="ddim2")
    model_state = load_state_dict(os.path.join(log_dir, "model000003.pt"))
    ema_state = refiner.model.state_dict()
    assert model_state.keys() == ema_state.keys()
    assert any(not torch.equal(model_state[k], ema_state[k]) for k in model_state)
    opt = load_state_dict(os.path.join(log_dir, "opt000003.pt"))
    assert opt["step"] == 3 and opt["data_position"] == 6 and len(opt["rng"]) == 1


@pytest.mark.parametrize("ema_rates, extra", [
    (["0.9999"], []),
    (["0.99", "0.9999"], ["--num_workers", "2", "--schedule_sampler", "loss-second-moment", "--microbatch", "1",
                          "--lr_anneal_steps", "10", "--grad_clip", "0.5", "--keep_last", "1"]),
], ids=["defaults", "workers-lossaware-microbatch-anneal-clip-keep1"])
@pytest.mark.slow
def test_resume_is_exact(corpus, tmp_path, ema_rates, extra):
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    common = ["--root", corpus, *TRAIN_FLAGS, "--ema_rate", ",".join(ema_rates), *extra]
    assert main(common + ["--log_dir", whole, "--max_steps", "4"]) == 0
    assert main(common + ["--log_dir", split, "--max_steps", "2"]) == 0
    assert main(common + ["--resume_checkpoint", os.path.join(split, "model000002.pt"), "--max_steps", "4"]) == 0

    for name in ["model000004.pt"] + [f"ema_{rate}_000004.pt" for rate in ema_rates]:
        a, b = load_state_dict(os.path.join(whole, name)), load_state_dict(os.path.join(split, name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    opt_a, opt_b = load_state_dict(os.path.join(whole, "opt000004.pt")), load_state_dict(os.path.join(split, "opt000004.pt"))
    assert opt_a["data_position"] == opt_b["data_position"] == 8
    for state_a, state_b in zip(opt_a["optimizer"]["state"].values(), opt_b["optimizer"]["state"].values()):
        assert all(torch.equal(torch.as_tensor(state_a[k]), torch.as_tensor(state_b[k])) for k in state_a)
    for key, value in opt_a["schedule_sampler"].items():
        assert torch.equal(value, opt_b["schedule_sampler"][key])
    # The resumed run appended to the same progress files.
    assert [int(r["step"]) for r in read_progress(split)] == [1, 2, 3, 4]
    # --keep_last 1: the resumed run's save of step 4 removed the set of step 2 it resumed from.
    kept = sorted(name for name in os.listdir(split) if name.endswith(".pt"))
    steps = [2, 4] if "--keep_last" not in extra else [4]
    assert kept == sorted(f"{kind}{step:06d}.pt" for step in steps for kind in ["model", "opt"] +
                          [f"ema_{rate}_" for rate in ema_rates])


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


def test_explicit_resume_of_an_incomplete_set_is_refused_unless_allowed(corpus, tmp_path, caplog, capsys):
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    assert main(["--root", corpus, "--log_dir", first, "--max_steps", "1", *TRAIN_FLAGS]) == 0
    os.makedirs(second)
    shutil.copy(os.path.join(first, "model000001.pt"), second)
    resume = ["--root", corpus, *TRAIN_FLAGS, "--max_steps", "2",
              "--resume_checkpoint", os.path.join(second, "model000001.pt")]
    # Resuming with a fresh optimizer would silently diverge from the interrupted run: refused.
    capsys.readouterr()
    assert main(resume) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "model000001.pt" in line and "opt000001.pt" in line and "ema_0.9999_000001.pt" in line
    assert "--allow-fresh-optimizer" in line
    assert sorted(output_digest(second)) == ["model000001.pt"]  # nothing written (but the lock)
    shutil.copy(os.path.join(first, "opt000001.pt"), second)
    assert main(resume) == 2  # the EMA file is still missing
    assert "ema_0.9999_000001.pt" in error_lines(capsys.readouterr().err)[0]

    os.remove(os.path.join(second, "opt000001.pt"))
    with caplog.at_level(logging.WARNING):
        assert main(resume + ["--allow-fresh-optimizer"]) == 0
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "ema_0.9999_000001.pt not found" in messages and "opt000001.pt not found" in messages
    assert os.path.exists(os.path.join(second, "model000002.pt"))
    assert load_state_dict(os.path.join(second, "opt000002.pt"))["data_position"] == 4
    # Already at max_steps: nothing to do, nothing written.
    assert main(["--root", corpus, *TRAIN_FLAGS, "--max_steps", "2",
                 "--resume_checkpoint", os.path.join(second, "model000002.pt")]) == 0
    assert not os.path.exists(os.path.join(second, "model000003.pt"))


@pytest.mark.slow
def test_a_refused_resume_leaves_the_run_settings_untouched(corpus, tmp_path, capsys):
    log_dir = str(tmp_path / "log")
    assert main(["--root", corpus, "--log_dir", log_dir, "--max_steps", "2", *TRAIN_FLAGS]) == 0
    settings = {name: open(os.path.join(log_dir, name), "rb").read() for name in ("args.json", "model_config.yml")}
    checkpoint = os.path.join(log_dir, "model000002.pt")
    wrong_flags = [
        (["--num-channels", "64"], "contradicts num_channels: 32 carried by"),  # another network
        (["--diffusion_steps", "200"], "contradicts diffusion_steps: 100 carried by"),  # another process
        (["--ema_rate", "0.999"], "ema_0.999_000002.pt"),  # no such EMA in the set
        (["--schedule_sampler", "loss-second-moment"], "opt000002.pt"),
    ]
    for flags, named in wrong_flags:
        capsys.readouterr()
        assert main(["--root", corpus, *TRAIN_FLAGS, "--max_steps", "3", "--resume_checkpoint", checkpoint,
                     *flags]) == 2, flags
        (line,) = error_lines(capsys.readouterr().err)
        assert named in line, (flags, line)
        for name, content in settings.items():
            assert open(os.path.join(log_dir, name), "rb").read() == content, (flags, name)
    assert not os.path.exists(os.path.join(log_dir, "model000003.pt"))


@pytest.mark.slow
def test_resume_from_a_folder_or_auto_takes_the_newest_complete_set(corpus, tmp_path, capsys):
    log_dir = str(tmp_path / "log")
    common = ["--root", corpus, *TRAIN_FLAGS, "--save_interval", "2"]
    # auto in a folder without checkpoints: a fresh start.
    assert main(common + ["--log_dir", log_dir, "--max_steps", "4", "--resume_checkpoint", "auto"]) == 0
    assert {"model000002.pt", "model000004.pt"} <= set(os.listdir(log_dir))
    # What a save killed at step 6 can leave: a temporary file, and set files without the model file.
    shutil.copy(os.path.join(log_dir, "opt000004.pt"), os.path.join(log_dir, "opt000006.pt"))
    with open(os.path.join(log_dir, ".tmp-0123456789ab-model000006.pt"), "wb") as f:
        f.write(b"PK\x03\x04 half a zip")
    # A model file whose set is incomplete (an older version's interrupted save): skipped.
    shutil.copy(os.path.join(log_dir, "model000004.pt"), os.path.join(log_dir, "model000008.pt"))

    assert main(common + ["--resume_checkpoint", log_dir, "--max_steps", "5"]) == 0
    opt = load_state_dict(os.path.join(log_dir, "opt000005.pt"))
    assert opt["step"] == 5 and opt["data_position"] == 10
    assert not [n for n in os.listdir(log_dir) if n.startswith(".tmp-")]  # the leftover is removed
    assert os.path.exists(os.path.join(log_dir, "opt000006.pt"))  # set files are never deleted

    assert main(common + ["--log_dir", log_dir, "--max_steps", "6", "--resume_checkpoint", "auto"]) == 0
    assert load_state_dict(os.path.join(log_dir, "opt000006.pt"))["data_position"] == 12  # replaced
    assert [int(r["step"]) for r in read_progress(log_dir)] == [1, 2, 3, 4, 5, 6]
    # Back to step 4: the progress rows of steps 5 and 6 are replaced, not repeated.
    assert main(common + ["--resume_checkpoint", os.path.join(log_dir, "model000004.pt"), "--max_steps", "6"]) == 0
    assert [int(r["step"]) for r in read_progress(log_dir)] == [1, 2, 3, 4, 5, 6]

    capsys.readouterr()
    assert main(common + ["--max_steps", "6", "--resume_checkpoint", "auto"]) == 2
    assert "--log_dir" in error_lines(capsys.readouterr().err)[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(common + ["--max_steps", "6", "--resume_checkpoint", str(empty)]) == 2
    assert "no modelNNNNNN.pt" in error_lines(capsys.readouterr().err)[0]
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    shutil.copy(os.path.join(log_dir, "model000002.pt"), str(incomplete))
    assert main(common + ["--max_steps", "3", "--resume_checkpoint", str(incomplete)]) == 2
    assert "--allow-fresh-optimizer" in error_lines(capsys.readouterr().err)[0]
    assert main(common + ["--max_steps", "3", "--resume_checkpoint", str(incomplete), "--allow-fresh-optimizer"]) == 0
    assert os.path.exists(str(incomplete / "model000003.pt"))


@pytest.mark.slow
def test_a_folder_resumes_from_its_newest_set_with_the_ema_files_of_ema_rate(corpus, tmp_path, capsys):
    """A model file whose set lacks an EMA file of --ema_rate is not the folder's newest complete
    set: the folder resumes from the one before it, and a folder without any is refused."""
    log_dir = str(tmp_path / "log")
    common = ["--root", corpus, *TRAIN_FLAGS, "--save_interval", "1"]
    assert main(common + ["--log_dir", log_dir, "--max_steps", "2"]) == 0
    os.remove(os.path.join(log_dir, "ema_0.9999_000002.pt"))  # step 2: model and optimizer files only
    assert main(common + ["--resume_checkpoint", log_dir, "--max_steps", "3"]) == 0
    assert load_state_dict(os.path.join(log_dir, "opt000003.pt"))["data_position"] == 6
    assert [int(r["step"]) for r in read_progress(log_dir)] == [1, 2, 3]  # resumed from step 1

    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    for name in ("model000001.pt", "opt000001.pt"):
        shutil.copy(os.path.join(log_dir, name), str(incomplete))
    capsys.readouterr()
    assert main(common + ["--max_steps", "2", "--resume_checkpoint", str(incomplete)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "optimizer and EMA files" in line and "--allow-fresh-optimizer" in line, line


def test_a_rerun_after_a_kill_before_the_first_save_does_not_repeat_progress_rows(corpus, tmp_path):
    """`--resume_checkpoint auto` after an attempt killed before its first checkpoint starts
    afresh: its rows replace those of the killed attempt instead of following them."""
    log_dir = str(tmp_path / "log")
    common = ["--root", corpus, *TRAIN_FLAGS, "--log_dir", log_dir, "--resume_checkpoint", "auto"]
    assert main(common + ["--max_steps", "3"]) == 0
    for name in os.listdir(log_dir):  # what a kill -9 before the first save leaves: rows, no checkpoint
        if name.endswith(".pt"):
            os.remove(os.path.join(log_dir, name))
    assert main(common + ["--max_steps", "2"]) == 0
    assert [int(r["step"]) for r in read_progress(log_dir)] == [1, 2]
    with open(os.path.join(log_dir, "progress.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


def test_a_fresh_start_into_a_folder_of_checkpoints_is_refused_and_changes_nothing(corpus, tmp_path, capsys):
    """Without --resume_checkpoint, a log folder holding an earlier run's checkpoints would have
    its settings, progress rows and same-step checkpoints replaced: refused, nothing touched."""
    log_dir = str(tmp_path / "log")
    assert main(["--root", corpus, "--log_dir", log_dir, "--max_steps", "2", *TRAIN_FLAGS]) == 0
    before = output_digest(log_dir)
    capsys.readouterr()
    assert main(["--root", corpus, "--log_dir", log_dir, "--max_steps", "2", *TRAIN_FLAGS, "--lr", "1e-3"]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "model000002.pt" in errors[0] and "--resume_checkpoint auto" in errors[0]
    assert output_digest(log_dir) == before


@pytest.mark.parametrize("damage", ["truncated-model", "truncated-optimizer", "empty-ema", "text-model"])
def test_an_unreadable_checkpoint_is_one_line_naming_it(corpus, tmp_path, capsys, damage):
    log_dir = str(tmp_path / "log")
    assert main(["--root", corpus, "--log_dir", log_dir, "--max_steps", "1", *TRAIN_FLAGS]) == 0
    name, words = {"truncated-model": ("model000001.pt", "truncated"),
                   "truncated-optimizer": ("opt000001.pt", "truncated"),
                   "empty-ema": ("ema_0.9999_000001.pt", "empty"),
                   "text-model": ("model000001.pt", "not a PyTorch checkpoint")}[damage]
    path = os.path.join(log_dir, name)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write({"truncated": data[:len(data) * 2 // 3], "empty": b"",
                 "not a PyTorch checkpoint": b"model weights go here\n"}[words])
    capsys.readouterr()
    assert main(["--root", corpus, *TRAIN_FLAGS, "--max_steps", "2",
                 "--resume_checkpoint", os.path.join(log_dir, "model000001.pt")]) == 2
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert line.startswith(f"error: {path}: ") and words in line and "do not fit" not in line, line
    assert "Traceback" not in err


@pytest.mark.slow
def test_an_unreadable_training_file_mid_run_saves_the_steps_done_and_names_it(corpus, tmp_path, capsys):
    bad = os.path.join(corpus, "spk", "bad.wav")
    write_wav(bad, np.full(24000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")  # a valid header
    files = build_index(corpus, 1.0)

    def steps_before_bad(seed):
        """Steps of 2 examples done before the first batch that draws from bad.wav."""
        dataset = ExcerptDataset(files, 1.0, 64, seed)
        return next(p for p in itertools.count() if dataset.choose(p)[0].path == bad) // 2

    seed = next(s for s in range(20) if steps_before_bad(s) >= 2)  # so that there is something to save
    bad_step = steps_before_bad(seed)
    log_dir = str(tmp_path / "log")
    capsys.readouterr()
    assert main(["--root", corpus, "--log_dir", log_dir, *TRAIN_FLAGS, "--seed", str(seed), "--num_workers", "1",
                 "--max_steps", "100"]) == 2
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert bad in line and "NaN" in line and f"stopped at step {bad_step}" in line and log_dir in line, line
    assert "Traceback" not in err and "DataLoader worker" not in err
    opt = load_state_dict(os.path.join(log_dir, f"opt{bad_step:06d}.pt"))  # the steps done are saved
    assert opt["step"] == bad_step and opt["data_position"] == 2 * bad_step
    assert [int(r["step"]) for r in read_progress(log_dir)] == list(range(1, bad_step + 1))


def test_bad_settings_are_clear_errors(corpus, tmp_path, capsys, monkeypatch):
    for flags in (["--use_fp16", "--bf16"], ["--use-fp16", "true", "--bf16", "true"], ["--seed", "-1"],
                  ["--ema_rate", "1.5"], ["--schedule_sampler", "random"]):
        with pytest.raises(SystemExit):
            main(["--root", corpus, *TRAIN_FLAGS, *flags])
    assert "the precision flags disagree: bf16 and fp16" in capsys.readouterr().err
    assert main(["--root", corpus, *TRAIN_FLAGS, "--log_dir", str(tmp_path / "x"),
                 "--resume_checkpoint", str(tmp_path / "opt000001.pt")]) == 2
    assert "modelNNNNNN.pt" in capsys.readouterr().err

    # The data folder is checked before the model is built.
    def no_model(**_):
        raise AssertionError("the model was built before the data folder was checked")

    monkeypatch.setattr(train_module, "create_model_and_diffusion", no_model)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--root", str(empty), *TRAIN_FLAGS, "--log_dir", str(tmp_path / "y")]) == 2
    assert str(empty) in capsys.readouterr().err


# ----- the loop itself, on small synthetic batches -----
def make_loop(tmp_path, seed=0, **settings):
    model, diffusion = tiny_model_and_diffusion(seed=seed, diffusion_steps=100)
    return TrainLoop(model=model.train(), diffusion=diffusion, batch_size=2, lr=1e-3, log_dir=str(tmp_path),
                     metrics=MetricsLogger(None, enabled=False), **settings)


def small_batch(seed=0):
    """Two 16x16 'spectrograms': the network takes any multiple of 8, and this is fast."""
    return {"spec": torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(seed)),
            "position": torch.tensor([0, 1])}


def grads(loop):
    return {name: p.grad.clone() for name, p in loop.model.named_parameters() if p.grad is not None}


def test_loss_scaler_unscales_every_gradient_and_adapts_the_scale():
    scaler = DynamicLossScaler(lg_loss_scale=4.0, growth=0.5)
    gradients = [torch.full((3,), 16.0), torch.full((2, 2), -32.0), torch.full((1,), 48.0)]
    scaler.unscale_(gradients)
    assert [g.tolist() for g in gradients] == [[1.0] * 3, [[-2.0] * 2] * 2, [3.0]]
    scaler.update(finite=True)
    assert scaler.lg_loss_scale == 4.5
    scaler.update(finite=False)
    assert scaler.scale == 2.0 ** 3.5
    restored = DynamicLossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.lg_loss_scale == 3.5


def cpu_fp16_autocast() -> bool:
    try:
        with autocast("cpu", torch.float16):
            return True
    except ValueError:
        return False


needs_cpu_fp16 = pytest.mark.skipif(not cpu_fp16_autocast(),
                                    reason=f"torch {torch.__version__} cannot autocast to float16 on the CPU")


@needs_cpu_fp16
def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path):
    # 2**200 overflows even float32, so the gradients are inf/nan whatever autocast does.
    loop = make_loop(tmp_path, precision="fp16", initial_lg_loss_scale=200.0)
    before = [p.detach().clone() for p in loop.params]
    assert loop.run_step(small_batch()) is False
    assert loop.scaler.lg_loss_scale == 199.0 and loop.scaler.scale == 2.0 ** 199
    assert all(torch.equal(a, b) for a, b in zip(before, loop.params))
    assert all(torch.equal(a, b) for a, b in zip(before, loop.ema_params[0]))
    assert loop.step == 1  # the batch is consumed: the step counts, the optimizer did not move


@needs_cpu_fp16
def test_fp16_step_unscales_every_gradient(tmp_path):
    reference = make_loop(tmp_path)
    reference.forward_backward(small_batch())
    expected = grads(reference)

    loop = make_loop(tmp_path, precision="fp16", initial_lg_loss_scale=10.0, fp16_scale_growth=0.25)
    before = [p.detach().clone() for p in loop.params]
    assert loop.run_step(small_batch()) is True
    assert loop.scaler.lg_loss_scale == 10.25
    assert any(not torch.equal(a, b) for a, b in zip(before, loop.params))
    got = grads(loop)
    assert got.keys() == expected.keys() and len(got) > 50
    # Without unscaling every gradient would be 2**10 times too large; float16 rounding
    # allows a few percent.
    for name, grad in expected.items():
        if grad.norm() > 1e-3 * max(g.norm() for g in expected.values()):
            assert (got[name] - grad).norm() <= 0.05 * grad.norm(), name
    assert loop._training_state()["loss_scaler"]["lg_loss_scale"] == 10.25


def test_microbatches_give_the_whole_batch_gradient_and_clipping_bounds_the_norm(tmp_path):
    whole, micro = make_loop(tmp_path), make_loop(tmp_path, microbatch=1)
    whole.forward_backward(small_batch())
    micro.forward_backward(small_batch())
    a, b = grads(whole), grads(micro)
    # A weight's gradient sums over the batch and every position of the activations (at most
    # 2 examples x 16 x 16 positions here); one batch of 2 and two batches of 1 sum in other orders.
    # A gradient can cancel to near zero, so the terms' size is taken from the largest gradient.
    atol = reordering_atol(torch.float32, 2 * 16 * 16, max(g.abs().max().item() for g in a.values()))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol)

    clipped = make_loop(tmp_path, grad_clip=1e-3)
    clipped.run_step(small_batch())
    assert global_norm(list(grads(clipped).values())) == pytest.approx(1e-3, rel=1e-3)


def test_lr_anneals_linearly_to_zero_and_training_stops_there(tmp_path):
    loop = make_loop(tmp_path, lr_anneal_steps=4, max_steps=10)
    assert loop.stop_step == 4
    lrs = []
    for step in range(4):
        loop.step = step
        lrs.append(loop.current_lr())
    assert lrs == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


def test_metrics_logger_writes_table_csv_and_json_lines(tmp_path):
    out = io.StringIO()
    metrics = MetricsLogger(str(tmp_path), columns=["step", "loss"], enabled=True, stdout=out, tensorboard=False)
    metrics.log("step", 1)
    metrics.log_mean("loss", 1.0)
    metrics.log_mean("loss", 3.0)
    assert metrics.dump(1) == {"step": 1, "loss": 2.0}
    metrics.log("step", 2)
    metrics.log_mean("loss", 4.0, count=2)
    metrics.log_mean("loss_q3", 5.0)
    metrics.dump(2)
    metrics.close()
    assert "| loss" in out.getvalue() and "| 2 " in out.getvalue()
    rows = read_progress(str(tmp_path))
    assert list(rows[0]) == ["step", "loss", "loss_q3"]
    assert rows == [{"step": "1", "loss": "2.0", "loss_q3": ""}, {"step": "2", "loss": "4.0", "loss_q3": "5.0"}]
    with open(os.path.join(str(tmp_path), "progress.jsonl")) as f:
        assert [json.loads(line) for line in f] == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 4.0, "loss_q3": 5.0}]
    # A run resumed from step 1: the rows of later steps (logged after that checkpoint by the
    # interrupted run, about to be trained again) go; so does a line cut by a kill.
    with open(os.path.join(str(tmp_path), "progress.jsonl"), "a") as f:
        f.write('{"step": 3, "lo')
    resumed = MetricsLogger(str(tmp_path), columns=["step", "loss"], enabled=True, stdout=out, tensorboard=False,
                            resume_step=1)
    resumed.log("step", 2)
    resumed.log_mean("loss", 6.0)
    resumed.dump(2)
    resumed.close()
    assert read_progress(str(tmp_path)) == [{"step": "1", "loss": "2.0", "loss_q3": ""},
                                            {"step": "2", "loss": "6.0", "loss_q3": ""}]
    with open(os.path.join(str(tmp_path), "progress.jsonl")) as f:
        assert [json.loads(line) for line in f] == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 6.0}]
    silent = MetricsLogger(str(tmp_path / "silent"), enabled=False)
    silent.log("step", 1)
    silent.dump(1)
    assert not os.path.exists(str(tmp_path / "silent"))


# ----- divergence: non-finite losses and weights -----
def nan_after(good_steps):
    """Batches of `small_batch`, then, from step `good_steps` on, batches with a NaN sample: the
    loss and every gradient of those steps are NaN, as in a run whose weights have blown up."""
    for step in itertools.count():
        batch = small_batch(step)
        if step >= good_steps:
            batch["spec"][0, 0, 0, 0] = float("nan")
        yield batch


def all_finite(path):
    state = load_state_dict(path)
    tensors = list(state.values()) if "optimizer" not in state else [
        v for s in state["optimizer"]["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def test_ten_steps_of_nan_loss_stop_the_run_after_saving_the_last_good_state(tmp_path):
    from diffiner.train_util import NONFINITE_STEPS_LIMIT, TrainingDiverged

    loop = make_loop(tmp_path, max_steps=50, save_interval=1000)
    data = nan_after(2)
    with pytest.raises(TrainingDiverged) as stop:
        loop.run_loop(data)
    last = 2 + NONFINITE_STEPS_LIMIT
    assert loop.step == last, "stopped at the limit, not at --max_steps"
    message = str(stop.value)
    assert "\n" not in message and f"steps 3-{last}" in message and str(tmp_path) in message, message
    saved = os.path.join(str(tmp_path), f"model{last:06d}.pt")
    assert loop.last_checkpoint == saved and all_finite(saved)
    assert all_finite(os.path.join(str(tmp_path), f"opt{last:06d}.pt"))

    # The saved weights are those of step 2: the NaN steps were skipped and changed nothing.
    reference = make_loop(tmp_path / "reference", max_steps=2)
    reference.run_loop(nan_after(2))
    after_two = load_state_dict(os.path.join(str(tmp_path / "reference"), "model000002.pt"))
    assert all(torch.equal(after_two[k], v) for k, v in load_state_dict(saved).items())


def test_a_stray_nan_step_is_skipped_and_the_run_goes_on(tmp_path):
    loop = make_loop(tmp_path, max_steps=6, save_interval=1000)

    def one_bad():
        for step, batch in enumerate(nan_after(0)):
            yield batch if step == 3 else small_batch(step)

    loop.run_loop(one_bad())
    assert loop.step == 6 and all_finite(os.path.join(str(tmp_path), "model000006.pt"))


def test_a_non_finite_state_is_never_saved_and_ends_the_run(tmp_path):
    from diffiner.train_util import TrainingDiverged

    loop = make_loop(tmp_path, max_steps=4, save_interval=2)
    loop.run_loop(nan_after(100))  # two good sets: steps 2 and 4
    with torch.no_grad():
        loop.params[0].view(-1)[0] = float("inf")
    assert loop.save() is False
    assert sorted(n for n in os.listdir(str(tmp_path)) if n.endswith(".pt")) == [
        "ema_0.9999_000002.pt", "ema_0.9999_000004.pt", "model000002.pt", "model000004.pt", "opt000002.pt",
        "opt000004.pt"]

    # Inside the loop: the periodic save refuses it, the run stops naming the newest good set.
    loop.max_steps = 8
    with pytest.raises(TrainingDiverged) as stop:
        loop.run_loop(nan_after(100))
    assert loop.step == 6 and not os.path.exists(os.path.join(str(tmp_path), "model000006.pt"))
    assert os.path.join(str(tmp_path), "model000004.pt") in str(stop.value), str(stop.value)


def test_fp32_steps_skipped_for_non_finite_gradients_count_toward_the_limit(tmp_path):
    from diffiner.train_util import TrainingDiverged

    loop = make_loop(tmp_path, max_steps=20, nonfinite_steps_limit=3)
    loop.optimize = lambda: False  # gradients non-finite, the loss finite: each step skipped
    with pytest.raises(TrainingDiverged, match="for 3 consecutive steps"):
        loop.run_loop(nan_after(100))
    assert loop.step == 3


@needs_cpu_fp16
def test_fp16_overflow_skips_do_not_count_toward_the_limit(tmp_path):
    # A scale of 2**130 overflows the scaled gradients for several steps while the loss stays
    # finite: the scaler's business (it halves the scale each time), not divergence.
    loop = make_loop(tmp_path, precision="fp16", initial_lg_loss_scale=130.0, max_steps=5, nonfinite_steps_limit=2)
    loop.run_loop(nan_after(100))
    assert loop.step == 5 and loop.scaler.lg_loss_scale == 125.0  # five skips in a row, no stop


@pytest.mark.slow
def test_a_learning_rate_of_1e8_stops_with_one_line_and_exit_1(corpus, tmp_path, capsys):
    log_dir = str(tmp_path / "log")
    capsys.readouterr()
    assert main(["--root", corpus, "--log_dir", log_dir, *TRAIN_FLAGS, "--lr", "1e8", "--grad_clip", "0",
                 "--max_steps", "60", "--save_interval", "5"]) == 1
    err = capsys.readouterr().err
    (line,) = error_lines(err)
    assert "training diverged" in line and log_dir in line and "Traceback" not in err, line
    steps = sorted(int(m.group(1)) for m in map(re.compile(r"model(\d{6})\.pt").fullmatch, os.listdir(log_dir)) if m)
    assert steps and steps[-1] < 60
    for step in steps:
        for name in (f"model{step:06d}.pt", f"ema_0.9999_{step:06d}.pt", f"opt{step:06d}.pt"):
            assert all_finite(os.path.join(log_dir, name)), name


# Under torchrun: rank 1 alone sees a NaN loss from its third batch on. In fp16 rank 0's own
# loss stays finite and its skipped steps (the all-reduced gradients overflow) are the loss
# scaler's, so only the agreement at each step boundary makes rank 0 stop with rank 1.
ONE_RANK_DIVERGES = """
import itertools
import sys
import torch
sys.path.insert(0, sys.argv[2])
from conftest import tiny_model_and_diffusion
from diffiner import dist_util
from diffiner.logger import MetricsLogger
from diffiner.train_util import TrainLoop, TrainingDiverged

info = dist_util.setup_dist(device="cpu")
model, diffusion = tiny_model_and_diffusion(diffusion_steps=100)
loop = TrainLoop(model=model.train(), diffusion=diffusion, batch_size=1, lr=1e-3, log_dir=sys.argv[1],
                 precision="fp16", max_steps=30, nonfinite_steps_limit=3, metrics=MetricsLogger(None, enabled=False))


def data():
    for step in itertools.count():
        spec = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(2 * step + info.rank))
        if info.rank == 1 and step >= 2:
            spec[0, 0, 0, 0] = float("nan")
        yield {"spec": spec, "position": torch.tensor([2 * step + info.rank])}


try:
    loop.run_loop(data())
    print(f"rank {info.rank} finished at step {loop.step}", flush=True)
except TrainingDiverged:
    print(f"rank {info.rank} diverged at step {loop.step}", flush=True)
dist_util.cleanup()
"""


@needs_cpu_fp16
@pytest.mark.slow  # starts a two-process launcher
def test_ranks_agree_to_stop_a_run_that_diverged_on_one_rank(tmp_path):
    import subprocess
    from launchers import launcher_env, torchrun

    script = tmp_path / "diverge.py"
    script.write_text(ONE_RANK_DIVERGES)
    result = subprocess.run(torchrun(str(script), str(tmp_path / "log"), os.path.dirname(os.path.abspath(__file__))),
                            env=launcher_env(), capture_output=True, text=True, timeout=300)
    # The launcher merges the ranks' output, so one rank's line may run into the other's.
    outcomes = sorted(re.findall(r"rank (\d) (diverged|finished) at step (\d+)", result.stdout))
    assert outcomes == [("0", "diverged", "5"), ("1", "diverged", "5")], result.stderr[-3000:]
    assert os.path.exists(str(tmp_path / "log" / "model000005.pt"))


# ----- the device-side work of a step (issue 20, item 6) -----
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def counting_host_reads(monkeypatch, ignore=()):
    """Count the reads of tensor values on the host made by diffiner's code (a synchronisation
    with the device on CUDA); torch's own reads of its CPU-side counters are not ours to count,
    nor are the tensors in `ignore` (the data loader's host-side positions)."""
    reads = []
    ignored = [id(t) for t in ignore]
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(tensor, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("diffiner") and id(tensor) not in ignored:
                reads.append(f"{_name} in {caller}")
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    yield reads
    monkeypatch.undo()


@pytest.mark.parametrize("settings", [{}, {"microbatch": 1, "grad_clip": 1e-3, "ema_rate": "0.99,0.999"}],
                         ids=["defaults", "microbatch-clip-two-emas"])
def test_a_step_reads_the_host_once_and_the_losses_only_when_logged(tmp_path, monkeypatch, settings):
    """A step's one host read is the decision to step (the loss's finiteness and the gradient
    norm, in one transfer), whatever the microbatching; the losses reach the host at the dump."""
    loop = make_loop(tmp_path, **settings)
    loop.metrics = MetricsLogger(None, enabled=True, stdout=io.StringIO(), tensorboard=False)
    batches = [dict(small_batch(step), position=torch.tensor([2 * step, 2 * step + 1])) for step in range(3)]
    for batch in batches:
        with counting_host_reads(monkeypatch, ignore=[batch["position"]]) as reads:
            assert loop.run_step(batch)
        assert len(reads) == 1, reads
    monkeypatch.setattr(loop.metrics, "dump", lambda step: None)  # keeps the interval's sums to look at
    with counting_host_reads(monkeypatch) as reads:
        loop.dump_metrics()
    assert reads, "the losses of the interval are read at the dump"
    # Every microbatch's losses arrived: 3 steps x 2 examples, each counted once overall and once
    # in its timestep quarter.
    assert loop.metrics._counts["loss"] == 6
    assert sum(n for k, n in loop.metrics._counts.items() if k.startswith("loss_q")) == 6


def test_ema_unscale_and_clipping_use_multi_tensor_kernels_with_the_loops_arithmetic(tmp_path, monkeypatch):
    """torch._foreach_* for the EMA update, the fp16 unscale and the clipping: no per-parameter
    Tensor.mul_/add_ from Python, and bitwise the values of the per-parameter loop."""
    loop = make_loop(tmp_path, ema_rate="0.9,0.999", grad_clip=1e-3)
    generator = torch.Generator().manual_seed(3)
    for ema in loop.ema_params:  # EMAs that differ from the weights, as after some steps
        for tensor in ema:
            tensor.add_(torch.randn(tensor.shape, generator=generator))
    expected = [[t.clone() for t in ema] for ema in loop.ema_params]
    loop.forward_backward(small_batch())
    unclipped = [p.grad.clone() for p in loop.params]
    per_parameter = []
    for name in ("mul_", "add_"):
        original = getattr(torch.Tensor, name)

        def counting(tensor, *args, _original=original, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("diffiner"):  # not AdamW's own
                per_parameter.append(tensor.shape)
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    assert loop.optimize()
    loop._update_ema()
    monkeypatch.undo()
    assert per_parameter == []

    norm = global_norm(unclipped)
    assert norm > 1e-3  # so the gradients were clipped
    for grad, before in zip((p.grad for p in loop.params), unclipped):
        assert torch.equal(grad, before.mul(1e-3 / (norm + 1e-6)))
    for rate, ema, reference in zip(loop.ema_rates, loop.ema_params, expected):
        for target, source, got in zip(reference, loop.params, ema):
            assert torch.equal(target.mul_(rate).add_(source.detach(), alpha=1.0 - rate), got)

    scaler = DynamicLossScaler(lg_loss_scale=3.0)
    gradients = [torch.randn(5, generator=generator), torch.randn(2, 3, generator=generator)]
    expected = [g.mul(1.0 / 8.0) for g in gradients]
    scaler.unscale_(gradients)
    assert all(torch.equal(a, b) for a, b in zip(gradients, expected))


# ----- the training display (issue 16, item 5) -----
@pytest.mark.parametrize("holder", ["diffiner", ""], ids=["package-logger", "root-logger"])
def test_the_bar_shows_the_loss_and_tables_and_log_lines_stay_whole_lines(tmp_path, capsys, holder):
    """Bar, metric tables and log lines all on one stream (as on a terminal): the bar's line
    shows the loss and samples/s; every table line and log line is a whole line, never printed
    into the bar's. The terminal's log handler may be the package logger's or the root logger's
    (setup_logging's)."""
    handler = logging.StreamHandler(sys.stderr)  # a console handler, as setup_logging's
    handler.setLevel(logging.INFO)
    package = logging.getLogger("diffiner")
    level = package.level
    logging.getLogger(holder).addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        loop = make_loop(tmp_path, max_steps=4, log_interval=2, save_interval=2, progress=True)
        loop.metrics = MetricsLogger(None, enabled=True, stdout=sys.stderr, tensorboard=False)
        loop.run_loop(dict(small_batch(step), position=torch.tensor([2 * step, 2 * step + 1]))
                      for step in itertools.count())
    finally:
        logging.getLogger(holder).removeHandler(handler)
        package.setLevel(level)
    pieces = [piece.strip() for piece in re.split(r"[\r\n]", capsys.readouterr().err) if piece.strip()]
    table = [p for p in pieces if "|" in p and "training" not in p]
    assert sum(p.startswith("| loss ") for p in table) == 2, pieces
    assert all(re.fullmatch(r"\| \S+ +\| \S+ +\|", p) for p in table), table
    rules = [p for p in pieces if "----" in p]
    assert len(rules) == 4 and all(set(p) == {"-"} for p in rules), rules
    saved = [p for p in pieces if "saved the checkpoint set" in p]
    assert saved == [f"saved the checkpoint set of step {n} in {tmp_path}" for n in (2, 4)], pieces
    bars = [p for p in pieces if p.startswith("training:")]
    assert bars and re.search(r"4/4 \[.*loss=\d.*samples_per_s=\d", bars[-1]), bars[-1]


@pytest.mark.slow
def test_quiet_prints_only_problems_and_no_progress_keeps_the_tables(corpus, tmp_path, capsys):
    """--quiet: no bar, no table, no INFO line, the progress files as usual; --no-progress: the
    tables without the bar."""
    quiet = str(tmp_path / "quiet")
    assert main(["--root", corpus, "--log_dir", quiet, "--max_steps", "2", *TRAIN_FLAGS, "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "training:" not in err and "INFO" not in err, (out, err)
    assert [int(r["step"]) for r in read_progress(quiet)] == [1, 2]

    plain = str(tmp_path / "plain")
    assert main(["--root", corpus, "--log_dir", plain, "--max_steps", "1", *TRAIN_FLAGS, "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"^\| loss +\| \S+ +\|$", out, re.M) and "training:" not in err, (out, err)
