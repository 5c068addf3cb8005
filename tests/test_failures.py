"""Failures in a folder run: an error of the GPU fails only the files it persists on, and a
process of a multi-process job that fails makes the others stop within seconds, every one
saying which process failed and why.

No GPU is needed: the network's forward is replaced by one that raises CUDA's errors in the
form torch raises them.
"""

import json
import os
import re
import subprocess

import pytest

from diffiner.commands.refine import main
from diffiner.pipeline import padded_width
from diffiner.unet import UNetModel

from conftest import tiny_cli_flags
from launchers import launcher_env, mpiexec_or_skip, torchrun
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


# Run diffiner-refine under a launcher, with rank 1's writes failing (a full disk) and rank 0's
# batches slowed to slow_batch_s each, so that rank 0's share takes far longer than the bound.
# Each rank writes its exit status and the time it returned to status_file; rank 1 writes the
# time of its failure too. No rank exits before every rank has written its status (or a minute
# has passed): torchrun and mpiexec end the others as soon as one exits with an error status.
FAILING_RANK = """
import os
import sys
import time

from diffiner import corpus, dist_util, pipeline
from diffiner.audio.io import OutputError
from diffiner.commands.refine import main

status_file, slow_batch_s, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
run_batch = pipeline.Refiner.run_batch
BlockWriter = corpus.BlockWriter


# Each rank is known only once the job is set up (mpiexec: by MPI, inside main).
class FullDiskOnRank1(BlockWriter):
    def write(self, block):
        if dist_util.get_rank() != 1:
            return super().write(block)
        with open(status_file.format(rank=1) + ".failed", "w") as f:
            f.write(repr(time.time()))
        raise OutputError(f"{self.path}: cannot write: [Errno 28] No space left on device")


def slow_on_rank_0(self, batch, progress=False):
    if dist_util.get_rank() == 0:
        time.sleep(slow_batch_s)
    return run_batch(self, batch, progress)


corpus.BlockWriter, pipeline.Refiner.run_batch = FullDiskOnRank1, slow_on_rank_0
status = main(argv)
rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])  # set by torchrun or by main
done = status_file.format(rank=rank)
with open(done + ".tmp", "w") as f:
    f.write(f"{status} {time.time()!r}")
os.replace(done + ".tmp", done)
deadline = time.time() + 60
while time.time() < deadline and not all(os.path.exists(status_file.format(rank=r)) for r in range(world_size)):
    time.sleep(0.05)
sys.exit(status)
"""


@pytest.mark.slow  # starts a two-process launcher
@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec"])
def test_a_failing_rank_makes_the_other_stop_within_seconds_and_every_rank_names_it(tmp_path, tiny_checkpoint,
                                                                                     launcher):
    launch = torchrun if launcher == "torchrun" else mpiexec_or_skip()
    root = str(tmp_path)
    files = 24
    for k in range(files):
        make_pair(root, f"f{k:02d}.wav", 0.2, 16000, seed=k)
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    status_file = str(tmp_path / "status{rank}")
    slow_batch_s = 2.0
    out = str(tmp_path / "out")
    result = subprocess.run(
        launch(str(script), status_file, str(slow_batch_s), "--root-noisy", os.path.join(root, "noisy"),
                 "--root-proc", os.path.join(root, "proc"), "--output-dir", out, "--model-path", tiny_checkpoint,
                 "--no-gpu", "--no-progress", "--batch-size", "1", *tiny_cli_flags()),
        env=launcher_env(), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    statuses = {}
    for rank in (0, 1):
        assert os.path.exists(status_file.format(rank=rank)), f"rank {rank} did not return: {output[-4000:]}"
        with open(status_file.format(rank=rank)) as f:
            code, ended = f.read().split()
        statuses[rank] = (int(code), float(ended))
    with open(status_file.format(rank=1) + ".failed") as f:
        failed_at = float(f.read())
    # A write failure is the run's failure (exit status 1) on every rank, not only on rank 1.
    assert statuses[0][0] == statuses[1][0] == 1
    # Rank 0 had (files / 2) batches of slow_batch_s ahead of it; it stopped after at most the one
    # it was running, plus the time to leave it. The bound is generous for a loaded machine.
    share_s = files / 2 * slow_batch_s
    stopped_after = statuses[0][1] - failed_at
    assert stopped_after < min(15.0, share_s / 2), stopped_after
    # Each rank's one line names the failing rank and the file; no raw gloo error, no traceback.
    # The launchers pass both ranks' stderr through one pipe, where two lines written at once can
    # land on one line: each rank's message is taken from "error: rank" to the next one or the
    # line's end.
    lines = re.findall(r"error: rank .*?(?=error: rank |$)", output, flags=re.MULTILINE)
    assert len(lines) == 2, output[-4000:]
    for line in lines:
        assert "rank 1 of 2 failed" in line and "No space left on device" in line and "/out/" in line
    assert sum("rank 0 stopped with it" in line for line in lines) == 1
    # (torchrun itself then prints a traceback of its own, naming the rank that exited first.)
    assert "Connection closed by peer" not in output and "ProcessGroupGloo" not in output
    print(f"rank 0 stopped {stopped_after:.1f} s after rank 1 failed (its share: {share_s:.0f} s)")
