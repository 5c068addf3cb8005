"""Checkpoint files: one clear error for unreadable ones, and training sets that survive kill -9.

The kill tests fork the test process (cheap: torch is already imported) and let the child save;
the child is killed either at an injected point between two file operations of the save, or by
a real SIGKILL after a random delay. A kill skips every `finally` clause, as a real one does.
The parent then checks the folder and resumes from it.
"""

import contextlib
import hashlib
import io
import itertools
import os
import random
import re
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import torch

from diffiner.checkpoints import load_state_dict, load_weights, newest_complete_step, remove_interrupted_saves
from diffiner.logger import MetricsLogger
from diffiner.train_util import TrainLoop

from conftest import tiny_model_and_diffusion

RATES = "0.99,0.9999"
KILLED = 250  # exit status of a child killed at an injected point
MAX_KILLS = 40  # of the random-moment test, when its first 20 kills rarely land in a save
MODEL_FILE = re.compile(r"model(\d{6})\.pt")


@pytest.fixture(autouse=True)
def one_thread():
    """Bitwise comparisons need one order of float reductions: the parent computes with one
    thread, as the forked children do (torch's thread pool is not safe to use after a fork)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- unreadable files -----
def write_checkpoint_variants(folder):
    """{case: (path, words the error must contain)} for files that are not whole checkpoints."""
    model, _ = tiny_model_and_diffusion()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    whole = buffer.getvalue()
    variants = {
        "empty": (b"", "empty"),
        "text": (b"step,loss\n1,0.5\n", "not a PyTorch checkpoint"),
        "truncated-half": (whole[:len(whole) // 2], "truncated"),
        "truncated-end": (whole[:-10], "truncated"),
        "corrupt-header": (whole[:4] + bytes(60) + whole[64:], "corrupt"),
    }
    paths = {}
    for case, (data, words) in variants.items():
        path = os.path.join(folder, f"{case}.pt")
        with open(path, "wb") as f:
            f.write(data)
        paths[case] = (path, words)
    return model, paths


def test_unreadable_checkpoint_files_are_one_clear_error(tmp_path):
    model, variants = write_checkpoint_variants(str(tmp_path))
    for case, (path, words) in variants.items():
        for load in (lambda: load_state_dict(path), lambda: load_weights(model, path)):
            with pytest.raises(ValueError) as error:
                load()
            message = str(error.value)
            assert message.startswith(path + ": ") and words in message and "\n" not in message, (case, message)
            # A file that cannot be read says so; it is not blamed on the model settings.
            assert "do not fit" not in message, case
    not_a_dict = str(tmp_path / "list.pt")
    torch.save([1, 2], not_a_dict)
    with pytest.raises(ValueError, match="list.pt: expected a state dict, got list"):
        load_state_dict(not_a_dict)
    with pytest.raises(ValueError, match="is a folder"):
        load_state_dict(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_state_dict(str(tmp_path / "missing.pt"))


# ----- files that are not regular files, and a full disk -----
def released_if_blocked(fifo, call, seconds=5.0):
    """What `call()` returned or raised, as {"value": ...} or {"error": ...}. Run in a thread:
    when it is still blocked on `fifo` after `seconds` (a plain open() of a FIFO waits for the
    other end), both ends are opened once to release it, and the test fails."""
    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the test, which judges it
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))  # Linux: O_RDWR never blocks on a FIFO
        thread.join(seconds)
        pytest.fail(f"blocked for {seconds} s opening the FIFO {fifo}")
    return outcome


def assert_refused_naming(outcome, path):
    error = outcome.get("error")
    assert isinstance(error, ValueError), outcome
    assert str(error).startswith(f"{path}: not a regular file") and "\n" not in str(error), str(error)


@pytest.mark.parametrize("name", ["model000004.pt", "opt000004.pt"])
def test_a_fifo_named_like_a_checkpoint_is_refused_naming_it(tmp_path, name):
    fifo = str(tmp_path / name)
    os.mkfifo(fifo)
    assert_refused_naming(released_if_blocked(fifo, lambda: load_state_dict(fifo)), fifo)
    model, _ = tiny_model_and_diffusion()
    assert_refused_naming(released_if_blocked(fifo, lambda: load_weights(model, fifo)), fifo)


@pytest.mark.parametrize("resume_step", [0, None], ids=["resumed", "kept"])
@pytest.mark.parametrize("name", ["progress.csv", "progress.jsonl"])
def test_a_fifo_named_like_a_progress_log_is_refused_naming_it(tmp_path, name, resume_step):
    fifo = str(tmp_path / name)
    os.mkfifo(fifo)
    outcome = released_if_blocked(fifo, lambda: MetricsLogger(
        str(tmp_path), columns=["step"], enabled=True, stdout=io.StringIO(), tensorboard=False,
        resume_step=resume_step))
    assert_refused_naming(outcome, fifo)


@pytest.mark.slow  # two training runs through the command
def test_resume_auto_refuses_a_fifo_among_the_newest_set_in_one_line(tmp_path, capsys):
    from diffiner.commands.train import main
    from test_train import TRAIN_FLAGS, make_corpus

    corpus, log_dir = make_corpus(str(tmp_path / "clean")), str(tmp_path / "log")
    assert main(["--root", corpus, "--log_dir", log_dir, "--max_steps", "1", *TRAIN_FLAGS]) == 0
    for name in ("model000002.pt", "opt000002.pt", "ema_0.9999_000002.pt"):  # the newest set, as the scan sees it
        os.mkfifo(os.path.join(log_dir, name))
    capsys.readouterr()
    fifo = os.path.join(log_dir, "model000002.pt")
    outcome = released_if_blocked(fifo, lambda: main(["--root", corpus, "--log_dir", log_dir, "--resume_checkpoint",
                                                      "auto", "--max_steps", "3", *TRAIN_FLAGS]), seconds=60)
    assert outcome == {"value": 2}, outcome
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {fifo}: not a regular file (a FIFO, device or socket?); not used"], errors


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device whose writes fail: disk full")
@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch < 2.0's zip writer aborts the process on a full "
                    "disk, when its writer is destroyed later (a C++ abort no Python code can catch)")
@pytest.mark.parametrize("failure", ["file-write", "zip-writer"])
def test_a_full_disk_during_a_save_is_one_line_naming_the_file_and_the_free_space(tmp_path, monkeypatch, failure):
    from diffiner import checkpoints
    from diffiner.audio.io import OutputError

    folder = str(tmp_path)
    loop = make_loop(folder)
    train(loop, 1)
    real_open, real_save = open, torch.save

    def onto_full_disk(path, mode="r", *args, **kwargs):
        """Every file the save opens for writing is /dev/full, which fails each write with ENOSPC
        as a full disk does; the file's own flush raises the OSError."""
        return real_open("/dev/full" if "w" in mode else path, mode, *args, **kwargs)

    def zip_writer_meets_a_full_disk(state, f):
        """torch.save's zip writer fails first: its RuntimeError "[enforce fail at
        inline_container.cc] unexpected pos", the message users saw, is what escapes."""
        full = real_open("/dev/full", "wb")
        try:
            real_save(state, full)
        finally:
            with contextlib.suppress(OSError):  # its buffer cannot be flushed either
                full.close()

    if failure == "file-write":
        monkeypatch.setattr(checkpoints, "open", onto_full_disk, raising=False)
    else:
        monkeypatch.setattr(torch, "save", zip_writer_meets_a_full_disk)
    with pytest.raises(OutputError) as error:
        loop.save()
    message = str(error.value)
    assert message.startswith(os.path.join(folder, "model000001.pt") + ": cannot write the checkpoint "), message
    assert re.search(r"; \d+ MB free on that disk\)$", message) and "\n" not in message, message
    assert os.listdir(folder) == [] and loop.last_checkpoint is None  # no temporary file, no set


# ----- a training run to kill: the tiny model (with dropout) on synthetic batches -----
def batch(step):
    """The batch of training step `step` (counted from 0): a pure function of the step."""
    generator = torch.Generator().manual_seed(1000 + step)
    return {"spec": torch.randn(2, 2, 16, 16, generator=generator), "position": torch.tensor([2 * step, 2 * step + 1])}


def make_loop(folder, resume="", seed=0, **settings):
    model, diffusion = tiny_model_and_diffusion(seed=seed, diffusion_steps=100, dropout=0.1)
    return TrainLoop(model=model.train(), diffusion=diffusion, batch_size=2, lr=1e-3, ema_rate=RATES,
                     log_dir=folder, resume_checkpoint=resume, seed=seed, save_interval=1, log_interval=1000,
                     metrics=MetricsLogger(None, enabled=False), **settings)


def data_from(loop):
    return (batch(step) for step in itertools.count(loop.step))


def train(loop, steps):
    for _ in range(steps):
        loop.run_step(batch(loop.step))


def digest(loop):
    """Hash of everything that decides the rest of the run: step, weights, EMAs, optimizer, random state."""
    sha = hashlib.sha256(f"{loop.step} {loop.data_position}".encode())
    tensors = list(loop.model.state_dict().values()) + [t for ema in loop.ema_params for t in ema]
    for state in loop.opt.state_dict()["state"].values():
        tensors += [torch.as_tensor(state[key]) for key in sorted(state)]
    tensors.append(torch.get_rng_state())
    for tensor in tensors:
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


class Reference:
    """The uninterrupted run: `reference[n]` is the digest after n steps (computed on demand).

    Dropout draws from torch's global generator, which the other loops of a test use too: the
    reference keeps its own generator state, as a process of its own would.
    """

    def __init__(self, folder):
        outside = torch.get_rng_state()
        self.loop = make_loop(folder)
        self.digests = [digest(self.loop)]
        self.rng = torch.get_rng_state()
        torch.set_rng_state(outside)

    def __getitem__(self, step):
        outside = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        while len(self.digests) <= step:
            train(self.loop, 1)
            self.digests.append(digest(self.loop))
        self.rng = torch.get_rng_state()
        torch.set_rng_state(outside)
        return self.digests[step]


def model_steps(folder):
    return sorted(int(m.group(1)) for m in map(MODEL_FILE.fullmatch, os.listdir(folder)) if m)


def assert_every_model_file_has_its_set(folder):
    """The rule: a modelNNNNNN.pt present implies its optimizer and EMA files are present."""
    names = set(os.listdir(folder))
    for step in model_steps(folder):
        expected = {f"opt{step:06d}.pt"} | {f"ema_{rate}_{step:06d}.pt" for rate in RATES.split(",")}
        assert expected <= names, (step, sorted(names))


def run_child(body):
    """Fork; the child runs `body` and exits without returning into pytest. Returns the child's pid."""
    python_rng = random.getstate()  # the child's is reseeded at the fork; checkpoints record it
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            random.setstate(python_rng)
            torch.set_num_threads(1)
            status = body()
        finally:
            os._exit(status)
    return pid


def inject_kill_points(kill_at):
    """Make the `kill_at`-th file operation (counted from 0) end the process like kill -9.

    The points are: before each rename, removal and fsync, and before, in the middle of and
    after the bytes of each torch.save (a kill mid-write leaves a partial file). Returns a
    function giving the number of points passed.
    """
    count = [0]

    def point():
        if count[0] == kill_at:
            os._exit(KILLED)
        count[0] += 1

    def before(function):
        def wrapped(*args, **kwargs):
            point()
            return function(*args, **kwargs)
        return wrapped

    for name in ("replace", "rename", "remove", "unlink", "fsync"):
        setattr(os, name, before(getattr(os, name)))
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        target = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        try:
            point()
            target.write(data[:len(data) // 2])
            target.flush()
            point()
            target.write(data[len(data) // 2:])
            target.flush()
            point()
        finally:
            if target is not f:
                target.close()

    torch.save = save
    return lambda: count[0]


def kill_during_save(loop, rng, folder, kill_at):
    """Save `loop` (with torch's global generator in state `rng`, which the set records) into
    `folder` in a child killed at point `kill_at`; returns the child's exit status."""
    def body():
        torch.set_rng_state(rng)
        points = inject_kill_points(kill_at)
        loop.log_dir = folder
        loop.save()
        return min(points(), KILLED - 1)

    _, status = os.waitpid(run_child(body), 0)
    return os.WEXITSTATUS(status)


def set_names(step):
    return [f"model{step:06d}.pt", f"opt{step:06d}.pt"] + [f"ema_{rate}_{step:06d}.pt" for rate in RATES.split(",")]


def set_hashes(folder, step):
    """{file name: sha256 of its bytes} of the set of `step` (torch.save writes the same state
    as the same bytes)."""
    hashes = {}
    for name in set_names(step):
        with open(os.path.join(folder, name), "rb") as f:
            hashes[name] = hashlib.sha256(f.read()).hexdigest()
    return hashes


class ResumeCheck:
    """Resume from the newest set of a folder and compare with the reference run, before and
    after 2 more steps. A set whose files are byte for byte one already checked resumes to the
    same state, so it is checked once (the leftovers are still cleaned up and checked)."""

    def __init__(self, reference):
        self.reference = reference
        self.checked = set()

    def __call__(self, folder, step):
        key = tuple(sorted(set_hashes(folder, step).items()))
        if key in self.checked:
            remove_interrupted_saves(folder)  # what the resumed TrainLoop does first
        else:
            resumed = make_loop(folder, resume=os.path.join(folder, f"model{step:06d}.pt"))
            assert digest(resumed) == self.reference[step]
            train(resumed, 2)
            assert digest(resumed) == self.reference[step + 2]
            self.checked.add(key)
        assert not [name for name in os.listdir(folder) if name.startswith(".tmp-")]


@pytest.mark.slow  # a kill loop: one save interrupted at every file operation
@pytest.mark.parametrize("overwrite", [False, True], ids=["new-step", "over-another-runs-set"])
def test_a_save_killed_between_any_two_file_operations_leaves_complete_sets(tmp_path, overwrite):
    """Kill the save of step 2 at every point. Then every model file has its whole set (of one
    save), the leftovers are cleaned up when training starts again, and resuming from the newest
    set continues exactly as the uninterrupted run."""
    reference = Reference(str(tmp_path / "reference"))
    check_resume = ResumeCheck(reference)
    base = str(tmp_path / "base")
    loop = make_loop(base)
    train(loop, 1)
    loop.save()  # a complete set at step 1
    train(loop, 1)
    rng = torch.get_rng_state()
    assert digest(loop) == reference[2]
    step_1, old = set_hashes(base, 1), None
    if overwrite:  # step 2 of another run (seed 1) is already there: the save of step 2 replaces it
        other = make_loop(base, seed=1)
        train(other, 2)
        other.save()
        old = set_hashes(base, 2)

    shutil.copytree(base, str(tmp_path / "whole"))
    points = kill_during_save(loop, rng, str(tmp_path / "whole"), kill_at=10 ** 6)  # not killed: counts the points
    assert 12 <= points < KILLED - 1
    new = set_hashes(str(tmp_path / "whole"), 2)
    outcomes = []
    for kill_at in range(points):
        folder = str(tmp_path / f"kill{kill_at}")
        shutil.copytree(base, folder)
        assert kill_during_save(loop, rng, folder, kill_at) == KILLED
        partial = any(name.startswith(".tmp-") for name in os.listdir(folder))
        assert_every_model_file_has_its_set(folder)
        newest = model_steps(folder)[-1]
        present = set_hashes(folder, newest)
        # The newest set is wholly the new one, or one that was there before, untouched.
        outcome = {"new": new, "other run's": old, "step 1": step_1}
        matching = [name for name, hashes in outcome.items() if present == hashes]
        assert len(matching) == 1, f"kill {kill_at}: the set of step {newest} mixes the files of two saves"
        name = matching[0]
        outcomes.append((kill_at, partial, name))
        if name == "other run's":  # its continuation is not the reference run
            remove_interrupted_saves(folder)
        else:
            check_resume(folder, newest)
        shutil.rmtree(folder)
    print(outcomes)
    assert any(partial for _, partial, _ in outcomes)  # some kills left a half-written file behind
    assert outcomes[0][2] != "new" and outcomes[-1][2] == "new"


def kill_during_training(folder, delay):
    """A child resumes from the newest complete set of `folder` (or starts afresh) and trains on,
    saving every step; it is SIGKILLed `delay` seconds after its first save begins. Returns
    whether the kill left evidence of a save cut in the middle."""
    read_end, write_end = os.pipe()

    def body():
        step = newest_complete_step(folder)
        loop = make_loop(folder, resume="" if step is None else os.path.join(folder, f"model{step:06d}.pt"),
                         max_steps=10 ** 6)
        save = loop.save

        def announced_save():
            os.write(write_end, b"s")  # the parent starts its clock
            return save()  # whether the set was written: the loop stops when it was not

        loop.save = announced_save
        loop.run_loop(data_from(loop))
        return 0

    pid = run_child(body)
    os.close(write_end)
    assert os.read(read_end, 1) == b"s"
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(read_end)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    names, steps = os.listdir(folder), model_steps(folder)
    # Evidence of a kill in the middle of the save: a temporary file, or files of a step whose
    # model file is not there yet.
    return any(n.startswith(".tmp-") or (n.startswith(("opt", "ema")) and int(n[-9:-3]) not in steps)
               for n in names)


@pytest.mark.slow  # a kill loop of forked children
@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (1, 13),
                    reason="torch < 1.13 cannot run autograd in a forked child once the parent has used it")
def test_kill_9_at_random_moments_of_saves_then_resume_is_exact(tmp_path):
    """20 times (or more, see below): a child resumes from the newest complete set, trains a
    step and saves it; it is SIGKILLed at a random moment between the start of that save and
    twice its usual duration. After every kill each model file has its whole set, and resuming
    from the newest continues bitwise as the uninterrupted run."""
    folder = str(tmp_path / "run")
    os.makedirs(folder)  # as the first child would, unless it is killed before its first save
    check_resume = ResumeCheck(Reference(str(tmp_path / "reference")))
    timing = make_loop(str(tmp_path / "timing"))
    save_seconds = []
    for _ in range(3):  # the first save also warms up
        started = time.perf_counter()
        timing.save()
        save_seconds.append(time.perf_counter() - started)
    window = 2.0 * min(save_seconds)
    rng = np.random.default_rng(0)
    delays = list(rng.uniform(0.0, window, size=20))
    mid_save = kills = 0
    while delays:
        mid_save += kill_during_training(folder, delays.pop(0))
        kills += 1
        steps = model_steps(folder)
        assert_every_model_file_has_its_set(folder)
        newest = newest_complete_step(folder)
        assert newest == (steps[-1] if steps else None)
        if newest is not None:
            check_resume(folder, newest)
        # On a loaded machine the child may get no processor time before the kill, so that few
        # kills land in a save: then more kills, each drawn from a longer window (2, 3, ... times
        # the first: the child saves after every step, so a late kill still often lands in a
        # save), until two did or MAX_KILLS were made.
        if not delays and mid_save < 2 and kills < MAX_KILLS:
            delays.append(rng.uniform(0.0, window * (kills - 18)))
    print(f"{kills} kills, {mid_save} left a save half done, newest complete set: step {newest}")
    assert mid_save >= 2


def test_the_batch_noise_arrives_in_one_non_blocking_copy_and_resume_stays_exact(tmp_path, monkeypatch):
    """Each step's noise is drawn from the examples' CPU generators into one host buffer and
    copied to the device once, non-blocking (issue 20, item 6); the values are those of each
    example's own stream, so a run stopped after 2 steps and resumed is bitwise the
    uninterrupted one after 4."""
    from diffiner import train_util
    copies = []  # (shape, non_blocking) of each Tensor.to made while the noise is drawn
    drawing = []
    to, randn = torch.Tensor.to, train_util.randn

    def recording_to(tensor, *args, **kwargs):
        if drawing:
            copies.append((tuple(tensor.shape), kwargs.get("non_blocking", False)))
        return to(tensor, *args, **kwargs)

    def recording_randn(*args, **kwargs):
        drawing.append(True)
        try:
            return randn(*args, **kwargs)
        finally:
            drawing.pop()

    reference = Reference(str(tmp_path / "reference"))
    expected = [reference[2], reference[4]]
    folder = str(tmp_path / "run")
    first = make_loop(folder)
    train(first, 2)
    first.save()
    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    monkeypatch.setattr(train_util, "randn", recording_randn)
    resumed = make_loop(folder, resume=os.path.join(folder, "model000002.pt"))
    assert digest(resumed) == expected[0]
    train(resumed, 2)
    assert digest(resumed) == expected[1]
    assert copies == [((2, 2, 16, 16), True)] * 2  # one per step, the whole batch at once


# ----- --keep_last (issue 16, item 5) -----
def set_files(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".pt"))


def files_of(steps):
    return sorted(name for step in steps for name in (f"model{step:06d}.pt", f"opt{step:06d}.pt")
                  + tuple(f"ema_{rate}_{step:06d}.pt" for rate in RATES.split(",")))


def test_keep_last_keeps_the_newest_sets_across_a_stopped_pruning_and_a_resume(tmp_path, monkeypatch):
    """--keep_last 2 with a save every step: after each save only the newest two complete sets
    are left. A pruning stopped between removing a set's model file and its other files (as by a
    kill) leaves a folder whose every model file has its set; the run resumed from the newest set
    continues bitwise as the uninterrupted one and removes the leftovers."""
    from diffiner import checkpoints
    reference = Reference(str(tmp_path / "reference"))
    folder = str(tmp_path / "run")
    loop = make_loop(folder, keep_last=2, max_steps=3)
    loop.run_loop(data_from(loop))
    assert set_files(folder) == files_of([2, 3])

    remove = os.remove
    removed = []

    def stopped_after_the_model_file(path):
        if removed:
            raise KeyboardInterrupt("stopped mid-pruning")
        removed.append(path)
        remove(path)

    loop = make_loop(folder, resume=os.path.join(folder, "model000003.pt"), keep_last=2, max_steps=4)
    monkeypatch.setattr(checkpoints.os, "remove", stopped_after_the_model_file)
    with pytest.raises(KeyboardInterrupt):
        loop.run_loop(data_from(loop))
    monkeypatch.undo()
    assert removed == [os.path.join(folder, "model000002.pt")]
    assert model_steps(folder) == [3, 4] and newest_complete_step(folder) == 4
    assert_every_model_file_has_its_set(folder)

    resumed = make_loop(folder, resume=os.path.join(folder, "model000004.pt"), keep_last=2, max_steps=6)
    assert digest(resumed) == reference[4]
    resumed.run_loop(data_from(resumed))
    assert digest(resumed) == reference[6]
    assert set_files(folder) == files_of([5, 6])  # step 2's leftovers are gone too


def test_keep_last_never_removes_the_newest_set_and_leaves_a_later_branch_alone(tmp_path):
    """Resumed from an older set of a folder holding later ones (the run it branched from; another
    seed here, so that the branch's sets differ), with --keep_last 1: the sets of later steps are
    not pruned (only replaced when the run saves those steps), and the set just saved, the one a
    resume needs, is kept."""
    folder = str(tmp_path / "run")
    first = make_loop(folder, max_steps=4)
    first.run_loop(data_from(first))
    later = {name: open(os.path.join(folder, name), "rb").read() for name in files_of([4])}
    branch = make_loop(folder, resume=os.path.join(folder, "model000002.pt"), keep_last=1, max_steps=3, seed=1)
    branch.run_loop(data_from(branch))
    assert set_files(folder) == files_of([3, 4])
    assert all(open(os.path.join(folder, name), "rb").read() == data for name, data in later.items())
    branch = make_loop(folder, resume=os.path.join(folder, "model000003.pt"), keep_last=1, max_steps=4, seed=1)
    branch.run_loop(data_from(branch))
    assert set_files(folder) == files_of([4])
    assert open(os.path.join(folder, "model000004.pt"), "rb").read() != later["model000004.pt"]
