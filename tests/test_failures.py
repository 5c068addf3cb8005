"""Failures in a folder run: an error of the GPU fails only the files it persists on, and a
process of a multi-process job that fails makes the others stop within seconds, every one
saying which process failed and why.

No GPU is needed: the network's forward is replaced by one that raises CUDA's errors in the
form torch raises them.
"""

import json
import os
import subprocess
import time

import pytest
import soundfile as sf

from diffiner.commands.refine import main
from diffiner.pipeline import padded_width
from diffiner.unet import UNetModel

from conftest import tiny_cli_flags
from launchers import launcher_env, torchrun
from test_run_refiner import make_pair

ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


def refine(root, checkpoint, out, *extra):
    return main(["--root-noisy", os.path.join(root, "noisy"), "--root-proc", os.path.join(root, "proc"),
                 "--output-dir", out, "--model-path", checkpoint, "--no-gpu", "--no-progress",
                 *tiny_cli_flags(), *extra])


def test_a_device_error_fails_only_the_files_it_persists_on_after_one_retry_alone(tmp_path, tiny_checkpoint,
                                                                                   monkeypatch, capsys):
    root = str(tmp_path)
    for k in range(3):
        make_pair(root, f"ok{k}.wav", 0.3, 16000, seed=k)  # one width: one batch of 3
    make_pair(root, "bad.wav", 1.5, 16000, seed=7)  # a width of its own
    reference = str(tmp_path / "reference")
    assert refine(root, tiny_checkpoint, reference, "--batch-size", "1") == 0
    short_width = padded_width(int(0.3 * 16000), 8, 10 * 16000)  # the tiny network's multiple is 8
    forward = UNetModel.forward
    attempts = []

    def failing(self, x, timesteps, y=None):
        # Batches of several segments fail, and so do the wider segments alone.
        attempts.append(tuple(x.shape[::3]))
        if x.shape[0] > 1 or x.shape[-1] > short_width:
            raise RuntimeError(ILLEGAL_ACCESS + "\nCUDA kernel errors might be asynchronously reported")
        return forward(self, x, timesteps, y)

    monkeypatch.setattr(UNetModel, "forward", failing)
    out = str(tmp_path / "out")
    capsys.readouterr()
    assert refine(root, tiny_checkpoint, out, "--batch-size", "4") == 1  # failed files: exit status 1
    err = capsys.readouterr().err
    failures = [line for line in err.splitlines() if line.startswith("FAILED")]
    assert len(failures) == 1 and failures[0].startswith("FAILED bad.wav: ")
    assert "bad.wav" in failures[0] and "illegal memory access" in failures[0] and "again alone" in failures[0]
    assert "Traceback" not in err
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["refined"] == 3 and list(summary["failed"]) == ["bad.wav"]
    assert not os.path.exists(os.path.join(out, "bad.wav"))
    for k in range(3):  # retried alone: the very batches of a --batch-size 1 run, so the same bytes
        with open(os.path.join(out, f"ok{k}.wav"), "rb") as got, open(os.path.join(reference, f"ok{k}.wav"), "rb") as want:
            assert got.read() == want.read()
    # bad.wav: tried in its batch (alone already) and once more alone, then no more.
    assert len([a for a in attempts if a[1] > short_width]) == 2
    assert (3, short_width) in attempts
