"""Helpers for the folder-walking and writer tests: a deadline for code that must not hang, digests
of whole trees (to prove that inputs stay byte for byte the same), and stand-ins for failures that
a root user cannot provoke with chmod (unreadable folders, full disks)."""

import builtins
import contextlib
import hashlib
import os
import signal
from typing import Dict, Iterator

import soundfile as sf

from diffiner.audio.records import is_bookkeeping


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread when the block runs longer than `seconds`."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def tree_digest(root: str) -> Dict[str, str]:
    """{relative path: SHA-256} of every regular file under `root`, links to files included,
    without following links to folders (a loop must not make this hang)."""
    digests = {}
    for folder, dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    digests[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return digests


def output_digest(root: str) -> Dict[str, str]:
    """`tree_digest` of an output folder without the writers' own files: the lock file, which
    every run rewrites with its own pid and start time, and the writers' records."""
    return {rel: digest for rel, digest in tree_digest(root).items() if not is_bookkeeping(os.path.basename(rel))}


def deny_listing(monkeypatch, *folders: str) -> None:
    """Make os.scandir fail with 'Permission denied' on `folders`, as for a folder without read
    permission (which chmod cannot provoke for root, who runs these tests in CI)."""
    real = os.scandir
    denied = {os.path.realpath(f) for f in folders}

    def scandir(path="."):
        if os.path.realpath(path) in denied:
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def fill_disk(monkeypatch, after: int = 0) -> None:
    """Make writing audio fail as libsndfile does on a full disk ("System error.") once `after`
    files have been written: through soundfile.write (a whole file) and SoundFile.write (a file
    written block by block, counted once)."""
    real, real_block = sf.write, sf.SoundFile.write
    started = []

    def check(name) -> None:
        if name not in started:
            if len(started) >= after:
                raise sf.LibsndfileError(2, prefix=f"Error writing {name!r}: ")
            started.append(name)

    def write(file, *args, **kwargs):
        check(file)
        return real(file, *args, **kwargs)

    def write_block(self, data):
        check(self.name)
        return real_block(self, data)

    monkeypatch.setattr(sf, "write", write)
    monkeypatch.setattr(sf.SoundFile, "write", write_block)


def deny_writing(monkeypatch, folder: str) -> None:
    """Make opening a file for writing below `folder` fail with 'Permission denied', as in a
    read-only folder (which chmod cannot provoke for root): through open() and through os.open()
    (which tempfile.mkstemp and the lock file use)."""
    real, real_os_open = builtins.open, os.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def opener(path, mode="r", *args, **kwargs):
        if str(path).startswith(folder) and any(m in mode for m in "wax+"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, mode, *args, **kwargs)

    def os_opener(path, flags, *args, **kwargs):
        if str(path).startswith(folder) and flags & writing:
            raise PermissionError(13, "Permission denied", str(path))
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(os, "open", os_opener)
