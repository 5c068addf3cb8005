"""Process groups: single process, torchrun and mpiexec, each training on the CPU with gloo."""

import csv
import os
import signal
import subprocess
import time

import pytest
import torch

from diffiner import dist_util
from diffiner.checkpoints import load_state_dict
from diffiner.commands.train import main

from launchers import launcher_env, mpiexec_or_skip, torchrun
from test_train import TRAIN_FLAGS, make_corpus

LAUNCH_TIMEOUT_S = 300

# Run under a launcher: train, then save what this rank ended with.
DRIVER = """
import sys
import torch
from diffiner import dist_util
from diffiner.commands.train import parse_args, train

loop = train(parse_args(sys.argv[2:]))
torch.save({"model": loop.model.state_dict(), "ema": loop.ema_params[0], "world_size": dist_util.get_world_size()},
           sys.argv[1].format(rank=dist_util.get_rank()))
dist_util.cleanup()
"""

# Run diffiner-train under a launcher, after writing this rank's process id to PID_FILE; then
# write its exit status to PID_FILE.status.
COMMAND = """
import os
import sys
import time
from diffiner.commands.train import main

pid_file = sys.argv[1]
with open(pid_file.format(rank=os.environ["RANK"]), "w") as f:
    f.write(str(os.getpid()))
status = main(sys.argv[2:])
status_file = pid_file.format(rank=os.environ["RANK"]) + ".status"
with open(status_file + ".tmp", "w") as f:
    f.write(str(status))
os.replace(status_file + ".tmp", status_file)
# torchrun ends the other ranks as soon as one exits with an error status: none exits before
# every rank has written its status (or a minute has passed), so that each one's can be read.
deadline = time.time() + 60
while time.time() < deadline and not all(os.path.exists(pid_file.format(rank=r) + ".status")
                                         for r in range(int(os.environ["WORLD_SIZE"]))):
    time.sleep(0.05)
sys.exit(status)
"""

# Rank 1 hangs; rank 0's barrier must fail instead of waiting forever.
STUCK_RANK = """
import time
from diffiner import dist_util

info = dist_util.setup_dist(device="cpu")
if info.rank == 1:
    time.sleep(120)
dist_util.barrier(timeout_s=3)
"""


@pytest.fixture(autouse=True)
def no_launcher_env(monkeypatch):
    """The in-process runs must see a plain single-process environment."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK") + dist_util.MPI_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def test_single_process_setup_and_helpers():
    info = dist_util.setup_dist(device="cpu")
    try:
        assert info == dist_util.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                                          distributed=False)
        assert (dist_util.get_rank(), dist_util.get_world_size(), dist_util.is_main()) == (0, 1, True)
        assert dist_util.dev() == torch.device("cpu")
        x = torch.arange(4.0)
        assert torch.equal(dist_util.all_gather_cat(x), x)
        assert dist_util.all_gather_objects({"a": 1}) == [{"a": 1}]
        dist_util.barrier()
        dist_util.sync_params([x])
    finally:
        dist_util.cleanup()


@pytest.mark.parametrize("name", dist_util.MPI_ENV_VARS)
def test_mpi_launch_is_detected_from_the_environment(monkeypatch, name):
    assert not dist_util.launched_by_mpi()
    monkeypatch.setenv(name, "2")
    assert dist_util.launched_by_mpi() and not dist_util.launched_by_torchrun()


def train_two_ranks_and_compare(tmp_path, launch):
    """Train 3 steps with 2 ranks x batch 1 and with 1 process x batch 2: the same result.

    Not bitwise: a batch-of-2 convolution sums its weight gradient in another order than two
    batch-of-1 convolutions plus an all-reduce. Adam divides each gradient by its own size,
    so a rounding difference in a near-zero gradient can move a weight by a sizeable fraction
    of the learning rate; lr 1e-5 keeps that well inside the 1e-6 tolerance.
    """
    corpus = make_corpus(str(tmp_path / "clean"))
    reference = str(tmp_path / "single")
    common = ["--root", corpus, "--max_steps", "3", *TRAIN_FLAGS, "--lr", "1e-5"]
    assert main(common + ["--log_dir", reference]) == 0

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    log_dir = str(tmp_path / "two")
    rank_file = str(tmp_path / "rank{rank}.pt")
    flags = common + ["--log_dir", log_dir, "--batch_size", "1"]
    result = subprocess.run(launch(str(driver), rank_file, *flags), env=launcher_env(), capture_output=True,
                            text=True, timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    ranks = [torch.load(rank_file.format(rank=r)) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for key in ranks[0]["model"]:
        assert torch.equal(ranks[0]["model"][key], ranks[1]["model"][key]), key
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["ema"], ranks[1]["ema"]))
    single = load_state_dict(os.path.join(reference, "model000003.pt"))
    written = load_state_dict(os.path.join(log_dir, "model000003.pt"))
    for key, value in single.items():
        assert torch.equal(written[key], ranks[0]["model"][key]), key
        torch.testing.assert_close(written[key], value, rtol=0, atol=1e-6)
    # Training moved the weights away from the (slow) EMA, so the comparison means something.
    ema = load_state_dict(os.path.join(reference, "ema_0.9999_000003.pt"))
    assert sum((single[k] - ema[k]).abs().max() > 1e-5 for k in single) > 10
    opt = load_state_dict(os.path.join(log_dir, "opt000003.pt"))
    assert opt["data_position"] == 6 and opt["global_batch"] == 2 and len(opt["rng"]) == 2


@pytest.mark.slow  # starts a two-process launcher
def test_torchrun_two_ranks_equal_one_process_with_the_global_batch(tmp_path):
    train_two_ranks_and_compare(tmp_path, torchrun)


@pytest.mark.slow  # starts a two-process launcher
def test_mpiexec_two_ranks_equal_one_process_with_the_global_batch(tmp_path):
    train_two_ranks_and_compare(tmp_path, mpiexec_or_skip())


@pytest.mark.slow  # starts a two-process launcher
def test_a_stuck_rank_ends_the_job_with_an_error(tmp_path):
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_RANK)
    start = time.time()
    result = subprocess.run(torchrun(str(script)), env=launcher_env(), capture_output=True, text=True,
                            timeout=LAUNCH_TIMEOUT_S)
    assert result.returncode != 0
    assert time.time() - start < 100  # far less than rank 1's 120 s sleep
    assert "monitoredBarrier" in result.stderr and "1" in result.stderr


@pytest.mark.slow  # starts a two-process launcher
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_it_saved(tmp_path):
    """A signal that reaches only rank 1: the ranks agree at the next step boundary, all take
    part in saving that step's set, and all exit with 143 (none waits for the others forever)."""
    corpus = make_corpus(str(tmp_path / "clean"))
    script = tmp_path / "command.py"
    script.write_text(COMMAND)
    log_dir = str(tmp_path / "two")
    pid_file = str(tmp_path / "pid{rank}")
    process = subprocess.Popen(torchrun(str(script), pid_file, "--root", corpus, "--log_dir", log_dir, *TRAIN_FLAGS,
                                        "--batch_size", "1"),
                               env=launcher_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    progress = os.path.join(log_dir, "progress.csv")
    deadline = time.time() + LAUNCH_TIMEOUT_S
    steps = []
    while len(steps) < 2:
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-4000:]
        time.sleep(0.1)
        if os.path.exists(progress):
            with open(progress, newline="") as f:
                steps = [row["step"] for row in csv.DictReader(f)]
    with open(pid_file.format(rank=1)) as f:
        os.kill(int(f.read()), signal.SIGTERM)
    _, err = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert process.returncode != 0, err[-4000:]
    for rank in (0, 1):
        status_file = pid_file.format(rank=rank) + ".status"
        assert os.path.exists(status_file), f"rank {rank} was ended before it returned: {err[-4000:]}"
        with open(status_file) as f:
            assert f.read() == "143", rank

    with open(progress, newline="") as f:
        step = int(list(csv.DictReader(f))[-1]["step"])
    assert f"interrupted by SIGTERM at step {step}: saved as" in err
    opt = load_state_dict(os.path.join(log_dir, f"opt{step:06d}.pt"))
    assert opt["step"] == step and opt["data_position"] == 2 * step and len(opt["rng"]) == 2
    names = os.listdir(log_dir)
    assert f"model{step:06d}.pt" in names and f"ema_0.9999_{step:06d}.pt" in names
    assert not [n for n in names if n.startswith(".tmp-")]
