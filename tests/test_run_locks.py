"""One run at a time writes a folder: refine, train and sample hold their output (or log) folder's
lock for the whole run, and a second run into it is refused with one line naming the first."""

import os
import socket
import threading

import pytest

from diffiner.audio.folders import LOCK_FILE, output_lock
from diffiner.commands.refine import main as refine_main
from diffiner.commands.sample_prior import main as sample_main
from diffiner.commands.train import main as train_main

from conftest import speech_like, write_wav
from test_train import TRAIN_FLAGS, make_corpus


@pytest.fixture
def held(tmp_path):
    """Hold a folder's lock in another thread, as another run of `writer` would."""
    threads = []

    def hold(folder, writer):
        taken, release = threading.Event(), threading.Event()

        def holder():
            with output_lock(folder, writer):
                taken.set()
                release.wait(60)

        thread = threading.Thread(target=holder)
        thread.start()
        assert taken.wait(30)
        threads.append((thread, release))

    yield hold
    for thread, release in threads:
        release.set()
        thread.join(30)


def refused_by(capsys, folder, writer):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    assert f"{folder}: in use by {writer} (pid {os.getpid()} on {socket.gethostname()}" in lines[0]


def test_a_second_refine_into_a_held_output_folder_is_refused(tmp_path, carried_tiny_checkpoint, held, capsys):
    write_wav(str(tmp_path / "noisy" / "a.wav"), speech_like(0.3), 16000)
    write_wav(str(tmp_path / "proc" / "a.wav"), 0.9 * speech_like(0.3), 16000)
    out = str(tmp_path / "out")
    held(out, "diffiner-refine")
    flags = ["--root-noisy", str(tmp_path / "noisy"), "--root-proc", str(tmp_path / "proc"), "--output-dir", out,
             "--model-path", carried_tiny_checkpoint, "--no-gpu", "--no-progress", "--timestep-respacing", "ddim2"]
    assert refine_main(flags + ["--overwrite"]) == 2
    refused_by(capsys, out, "diffiner-refine")
    assert sorted(os.listdir(out)) == [LOCK_FILE]  # nothing written: no config.yml, no audio


def test_a_second_trainer_into_a_held_log_folder_is_refused(tmp_path, held, capsys):
    corpus = make_corpus(str(tmp_path / "clean"))
    log_dir = str(tmp_path / "log")
    held(log_dir, "diffiner-train")
    assert train_main(["--root", corpus, "--log_dir", log_dir, "--max_steps", "1", *TRAIN_FLAGS]) == 2
    refused_by(capsys, log_dir, "diffiner-train")
    assert sorted(os.listdir(log_dir)) == [LOCK_FILE]  # no args.json, no checkpoint


def test_a_second_sampler_into_a_held_folder_is_refused(tmp_path, carried_tiny_checkpoint, held, capsys):
    out = str(tmp_path / "samples")
    held(out, "diffiner-sample")
    assert sample_main(["--model-path", carried_tiny_checkpoint, "--num-samples", "1", "--seconds", "0.1",
                        "--timestep-respacing", "ddim2", "--output-dir", out]) == 2
    refused_by(capsys, out, "diffiner-sample")
