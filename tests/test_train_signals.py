"""SIGTERM and Ctrl-C stop training at a step boundary with the steps done saved, and the run
resumes from there exactly."""

import csv
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from diffiner.checkpoints import load_state_dict
from diffiner.commands.train import main
from diffiner.train_util import StopSignals, TrainingInterrupted, TrainLoop

from conftest import tiny_model_and_diffusion
from launchers import launcher_env
from test_train import TRAIN_FLAGS, make_corpus

START_TIMEOUT_S = 120


@pytest.fixture(autouse=True)
def one_thread():
    """Bitwise comparisons need one order of float reductions: the in-process runs compute with
    one thread, as the training subprocess does (launcher_env sets OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def progress_steps(log_dir):
    path = os.path.join(log_dir, "progress.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("step")]


def default_signals():
    """In the child before it starts: the default dispositions of the stop signals, whatever this
    test process inherited (a suite started with `&` has SIGINT ignored, under `nohup` SIGHUP)."""
    for signum in StopSignals.SIGNALS:
        signal.signal(signum, signal.SIG_DFL)


def start_training(argv, **popen):
    """`diffiner-train` in a subprocess of its own process group, as a scheduler's job would be,
    started from an interactive shell (no stop signal ignored)."""
    return subprocess.Popen([sys.executable, "-m", "diffiner.commands.train", *argv], env=launcher_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=default_signals, **popen)


@pytest.fixture
def dispositions():
    """Sets the stop signals' dispositions for one test and restores this process's afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in StopSignals.SIGNALS}

    def set_to(**handlers):
        for name, handler in handlers.items():
            signal.signal(getattr(signal, name), handler)

    yield set_to
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def wait_for_step(process, log_dir, step):
    deadline = time.time() + START_TIMEOUT_S
    while not progress_steps(log_dir) or progress_steps(log_dir)[-1] < step:
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.time() < deadline, "training did not reach step %d" % step
        time.sleep(0.05)


def assert_same_sets(folder_a, folder_b, step, rates=("0.9999",)):
    """The checkpoint sets of `step` hold bitwise the same model, EMA and optimizer tensors."""
    names = [f"model{step:06d}.pt"] + [f"ema_{rate}_{step:06d}.pt" for rate in rates]
    for name in names:
        a, b = load_state_dict(os.path.join(folder_a, name)), load_state_dict(os.path.join(folder_b, name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    opt_a = load_state_dict(os.path.join(folder_a, f"opt{step:06d}.pt"))
    opt_b = load_state_dict(os.path.join(folder_b, f"opt{step:06d}.pt"))
    assert opt_a["step"] == opt_b["step"] == step and opt_a["data_position"] == opt_b["data_position"]
    state_a, state_b = opt_a["optimizer"]["state"], opt_b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) > 50
    for key in state_a:
        for name in state_a[key]:
            assert torch.equal(torch.as_tensor(state_a[key][name]), torch.as_tensor(state_b[key][name])), (key, name)


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_saves_the_current_step_and_the_run_resumes_exactly(tmp_path, signum, status):
    """The whole process group is signalled (a scheduler's SIGTERM, a terminal's Ctrl-C), data
    workers included: training finishes its step, saves it, and exits with 128 + the signal."""
    corpus = make_corpus(str(tmp_path / "clean"))
    stopped, whole = str(tmp_path / "stopped"), str(tmp_path / "whole")
    common = ["--root", corpus, *TRAIN_FLAGS]
    process = start_training(common + ["--log_dir", stopped, "--num_workers", "2"])  # no --max_steps: runs on
    wait_for_step(process, stopped, 2)
    os.killpg(process.pid, signum)
    _, err = process.communicate(timeout=START_TIMEOUT_S)
    assert process.returncode == status, err[-3000:]

    steps = progress_steps(stopped)
    step = steps[-1]
    assert steps == list(range(1, step + 1)) and step >= 2
    names = set(os.listdir(stopped))
    assert {f"model{step:06d}.pt", f"ema_0.9999_{step:06d}.pt", f"opt{step:06d}.pt"} <= names
    assert not any(re.fullmatch(r"model(\d+)\.pt", n) and int(n[5:11]) > step for n in names)
    assert not [n for n in names if n.startswith(".tmp-")]
    message = [line for line in err.splitlines() if line.startswith("interrupted by")]
    assert message == [f"interrupted by {signal.Signals(signum).name} at step {step}: saved as "
                       f"{os.path.join(stopped, f'model{step:06d}.pt')} with its EMA and optimizer files; "
                       f"resume with --resume_checkpoint {stopped}"]
    assert "Traceback" not in err

    assert main(common + ["--resume_checkpoint", stopped, "--max_steps", str(step + 2)]) == 0
    assert main(common + ["--log_dir", whole, "--max_steps", str(step + 2)]) == 0
    assert_same_sets(stopped, whole, step + 2)
    assert progress_steps(stopped) == list(range(1, step + 3))


def test_the_first_signal_asks_to_stop_and_a_second_stops_at_once(dispositions):
    dispositions(SIGINT=signal.default_int_handler, SIGTERM=signal.SIG_DFL)  # as in an interactive shell
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGTERM)
            assert signals.received == signal.SIGTERM  # asked: the process goes on
            os.kill(os.getpid(), signal.SIGINT)  # again: Ctrl-C's own KeyboardInterrupt, now
            raise AssertionError("a second signal must not be ignored")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize("inherited", ["SIGINT", "SIGHUP"])
def test_a_signal_inherited_as_ignored_stays_ignored(dispositions, inherited):
    """`cmd &` starts the job with SIGINT ignored, `nohup cmd` with SIGHUP ignored: such a signal
    is not meant for the job, so it neither asks training to stop nor ends it."""
    dispositions(SIGINT=signal.default_int_handler, SIGTERM=signal.SIG_DFL, SIGHUP=signal.SIG_DFL)
    dispositions(**{inherited: signal.SIG_IGN})
    with StopSignals() as signals:
        os.kill(os.getpid(), getattr(signal, inherited))
        os.kill(os.getpid(), getattr(signal, inherited))
        assert signals.received is None
        os.kill(os.getpid(), signal.SIGTERM)  # the others still ask to stop
        assert signals.received == signal.SIGTERM
    assert signal.getsignal(getattr(signal, inherited)) is signal.SIG_IGN


def test_a_stop_before_the_first_step_of_a_resumed_run_writes_no_second_row_of_its_step(tmp_path):
    """Resumed at step 3 (not a multiple of --log_interval) and signalled before training a
    step: nothing was trained, so neither a row nor a checkpoint set is written again."""
    log_dir = str(tmp_path / "log")

    def make_loop(resume=""):
        model, diffusion = tiny_model_and_diffusion(diffusion_steps=100)
        return TrainLoop(model=model.train(), diffusion=diffusion, batch_size=2, lr=1e-3, log_dir=log_dir,
                         log_interval=10, max_steps=3, resume_checkpoint=resume)

    def batches(signalled=False):
        for step in range(10):
            if signalled:
                os.kill(os.getpid(), signal.SIGTERM)  # before the step boundary's agreement
            yield {"spec": torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(step)),
                   "position": torch.tensor([2 * step, 2 * step + 1])}

    first = make_loop()
    first.run_loop(batches())
    first.metrics.close()
    assert progress_steps(log_dir) == [3]
    checkpoint = os.path.join(log_dir, "model000003.pt")
    written = os.stat(checkpoint).st_mtime_ns
    resumed = make_loop(checkpoint)
    resumed.max_steps = 0  # trains until stopped
    with pytest.raises(TrainingInterrupted) as stop:
        resumed.run_loop(batches(signalled=True))
    resumed.metrics.close()
    assert (stop.value.step, stop.value.checkpoint) == (3, checkpoint)
    with open(os.path.join(log_dir, "progress.csv"), newline="") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["3"]
    assert os.stat(checkpoint).st_mtime_ns == written
