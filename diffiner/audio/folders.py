"""Folder trees of audio files: walking them, pairing them across folders by relative path, the
rules every writer follows, and converting a tree file by file.

Walking (`scan_audio_files`, the one walker of the package) lists every .wav/.flac file below a
root, and nothing that would make a run hang, repeat itself or read its own outputs:

- links to files are followed; a link to a folder is followed unless that folder (device and
  inode) has been listed already, so a link loop ends and no folder is listed twice. Real
  subfolders are listed before links, so a folder reachable both ways keeps its real path;
- anything that is not a regular file (a FIFO, a socket, a device, a broken link) is skipped with
  a warning: opening a FIFO blocks forever;
- a folder that cannot be listed is reported (`Listing.unreadable`), never passed over;
- excluded folders (outputs), subfolders holding a previous refinement (they have the refiner's
  `config.yml`) and the temporary files of atomic writes are not input.

Writing follows one rule, whoever writes (refiner, enhancers, resampler, demo data, evaluation): no
writer ever writes into a folder it reads from, nested or not, and no output folder is read as
input (`check_write_rules`, `output_path`, `prepare_output_folder`). An output folder may lie
inside an input root only because the walker never enters it (every writer passes it in
`exclude`) and only where nothing in it is an input: it is new or holds no audio file, or it holds
the outputs of an earlier run of the same writer (resumed). Otherwise the files in it would be
overwritten, or taken for outputs already made.

A run holds an exclusive lock on its output folder for its whole life (`output_lock`), so that two
runs never mix their files in one folder; the lock file also records which writer last wrote there.

`convert_folder` is the one way the package turns an input tree into an output tree (preceding
enhancers, resampling, demo noise): every audio file under the input folder becomes one file at
the same relative path under the output folder, written atomically, and outputs already done
(the writer's record, `records.OutputRecord`: same settings, inputs unchanged) are skipped, so an
interrupted run is resumed by running it again.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import stat
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import numpy as np
from tqdm.auto import tqdm

from ..errors import EXIT_USAGE, DiffinerError, error_text
from .records import CHANGED, DONE, UNLISTED, OutputRecord, fingerprint
from .io import (AUDIO_EXTENSIONS, TEMPORARY_PREFIX, AudioError, OutputError, RecordError, load_audio,
                 read_yaml_record, save_audio)

logger = logging.getLogger(__name__)

# The file in which diffiner-refine records the settings of the files beside it; a folder holding
# one (with the refiner's keys) is a refinement, never input.
RUN_RECORD = "config.yml"
# The writer that leaves RUN_RECORD: a folder holding one holds that writer's outputs.
REFINE_WRITER = "diffiner-refine"
# The lock file of an output folder (`output_lock`). It is never removed: a run that opened it
# while another held it must find the same file, and it records the last writer of the folder.
LOCK_FILE = ".diffiner.lock"
LOCK_MAX_BYTES = 4096  # what a lock record may take; more is not one of ours
# How long a run that finds the lock taken waits for its holder to record itself (it does so just
# after taking the lock) or to end, before it is refused.
HOLDER_WAIT_S = 2.0


class FolderError(DiffinerError):
    """A folder that cannot be used as asked: unreadable, not creatable or writable, a layout
    that the write rules refuse, or one that another run holds. The message names the folder;
    exit status 2."""

    exit_code = EXIT_USAGE


@dataclass
class Listing:
    """Audio files under a root (relative paths, sorted) and the folders that could not be listed
    ({folder path: reason})."""

    files: List[str]
    unreadable: Dict[str, str]


def is_audio_name(name: str) -> bool:
    """Whether a file name is one of the audio files the walker lists (not a temporary one)."""
    return os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS and not name.startswith(TEMPORARY_PREFIX)


def _identity(st: os.stat_result) -> Tuple[int, int]:
    return st.st_dev, st.st_ino


def read_run_record(folder: str) -> Optional[Dict]:
    """The refiner's config.yml in `folder`, or None where there is none (someone else's
    config.yml, or one that `read_yaml_record` refuses: too large, with aliases, not a regular
    file, does not count; the reason is logged at DEBUG level)."""
    path = os.path.join(folder, RUN_RECORD)
    if not os.path.isfile(path):
        return None
    try:
        record = read_yaml_record(path)
    except (OSError, RecordError) as exc:
        logger.debug("%s: not read as a run record (%s)", path, error_text(exc))
        return None
    return record if isinstance(record, dict) and "refiner" in record and "diffiner_version" in record else None


def scan_audio_files(root: str, exclude: Iterable[str] = ()) -> Listing:
    """Every .wav/.flac file under `root`, recursively, and the folders that could not be listed.

    Folders in `exclude` (absolute or relative to the working directory) are never entered, so an
    output folder placed inside an input folder is not read back as input; `root` itself is always
    listed. They are known by identity (whatever link leads to them) and by path, so that one
    created while the listing runs (by a writer working into it) is not entered either. Raises
    FileNotFoundError when `root` is not a folder, FolderError when it cannot be listed.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a folder")
    exclude = list(exclude)
    excluded = {_identity(os.stat(p)) for p in exclude if os.path.isdir(p)}
    excluded_paths = {os.path.realpath(p) for p in exclude}
    visited = {_identity(os.stat(root))}
    files: List[str] = []
    unreadable: Dict[str, str] = {}
    folders = [""]  # relative paths of real folders still to list
    # (relative path, identity of the target) of links to folders, followed once no real folder is left
    links: List[Tuple[str, Tuple[int, int]]] = []

    def enterable(path: str, identity: Tuple[int, int]) -> bool:
        if identity in visited or identity in excluded or os.path.realpath(path) in excluded_paths:
            logger.debug("%s: already listed or excluded; not entered", path)
            return False
        if read_run_record(path) is not None:
            logger.info("%s: holds a previous refinement (%s); not read as input", path, RUN_RECORD)
            return False
        visited.add(identity)
        return True

    while folders or links:
        if folders:
            rel = folders.pop()
            path = os.path.join(root, rel)
        else:
            links.sort()
            rel, identity = links.pop(0)
            path = os.path.join(root, rel)
            if not enterable(path, identity):
                continue
        try:
            with os.scandir(path) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            if not rel:
                raise FolderError(f"{root}: cannot list this folder ({exc.strerror or error_text(exc)})") from exc
            unreadable[path] = exc.strerror or error_text(exc)
            continue
        for entry in entries:
            child = os.path.join(rel, entry.name)
            try:
                if entry.is_symlink():
                    try:
                        st = os.stat(entry.path)
                    except OSError:  # broken link, or a loop of links to links
                        if is_audio_name(entry.name):
                            logger.warning("%s: a link to nothing; skipped", entry.path)
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        links.append((child, _identity(st)))
                        continue
                else:
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        if enterable(entry.path, _identity(st)):
                            folders.append(child)
                        continue
            except OSError as exc:
                unreadable[entry.path] = error_text(exc)
                continue
            if not is_audio_name(entry.name):
                continue
            if stat.S_ISREG(st.st_mode):
                files.append(child)
            else:
                logger.warning("%s: not a regular file (a FIFO, socket or device); skipped", entry.path)
    return Listing(sorted(files), dict(sorted(unreadable.items())))


def list_audio_files(root: str, exclude: Iterable[str] = ()) -> List[str]:
    """Relative paths of every .wav/.flac file under `root` (see `scan_audio_files`), sorted;
    folders that cannot be listed are logged as warnings."""
    listing = scan_audio_files(root, exclude)
    for folder, reason in listing.unreadable.items():
        logger.warning("%s: cannot list this folder (%s); its files are left out", folder, reason)
    return listing.files


@dataclass
class Pairing:
    """Files present under every root (relative paths), for each root name the files the other
    roots have and it lacks, and the folders that could not be listed ({path: reason})."""

    common: List[str]
    missing: Dict[str, List[str]]
    unreadable: Dict[str, str]


def pair_folders(roots: Dict[str, str], exclude: Iterable[str] = (), warn: bool = True) -> Pairing:
    """Pair files present under every root by their relative path.

    No root is listed below another one (the refiner writes inside the processed folder, and
    evaluation compares both), nor below a folder in `exclude`. A file missing under some root is
    logged as a warning, except below a folder of that root that could not be listed: that folder
    is reported once, in `unreadable`, instead. Raises FileNotFoundError when no file is common to
    all roots.
    """
    exclude = [*exclude, *roots.values()]
    listings = {name: scan_audio_files(root, exclude) for name, root in roots.items()}
    files = {name: set(listing.files) for name, listing in listings.items()}
    common = set.intersection(*files.values()) if files else set()
    union = set.union(*files.values()) if files else set()
    unreadable = {path: reason for listing in listings.values() for path, reason in listing.unreadable.items()}
    missing = {}
    for name, listing in listings.items():
        blind = tuple(os.path.relpath(path, roots[name]) + os.sep for path in listing.unreadable)
        missing[name] = sorted(rel for rel in union - files[name] if not rel.startswith(blind))
    if warn:
        for name, paths in missing.items():
            if paths:
                shown = ", ".join(paths[:10]) + (" ..." if len(paths) > 10 else "")
                logger.warning("%d file(s) have no counterpart under %s (%s): %s",
                               len(paths), name, roots[name], shown)
    if not common:
        described = ", ".join(f"{n}={r}" for n, r in roots.items())
        unlisted = f" ({len(unreadable)} folder(s) could not be listed: {', '.join(unreadable)})" if unreadable else ""
        raise FileNotFoundError(f"no audio file (.wav/.flac) is common to all of: {described}{unlisted}")
    return Pairing(sorted(common), missing, unreadable)


def pair_files(roots: Dict[str, str], exclude: Iterable[str] = (), warn: bool = True
               ) -> Tuple[List[str], Dict[str, List[str]]]:
    """`pair_folders` for callers that keep no account of failures: returns (common, missing) and
    logs the folders that could not be listed as warnings."""
    pairing = pair_folders(roots, exclude, warn)
    for folder, reason in pairing.unreadable.items():
        logger.warning("%s: cannot list this folder (%s); its files are left out", folder, reason)
    return pairing.common, pairing.missing


def is_inside(path: str, folder: str) -> bool:
    """True when `path` is `folder` or lies below it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


# ----- the write rules -----

def _described(name: str, path: str) -> str:
    return f"{name} ({path})" if name and name != path else path


def _kind(path: str) -> str:
    """What an input is, for messages: the commands take one audio file where they take a folder."""
    return "file" if os.path.isfile(path) else "folder"


def check_write_rules(inputs: Dict[str, str], output: Optional[str], writer: Optional[str] = None) -> None:
    """Refuse a layout in which a writer could write onto what it reads.

    `inputs` maps a name for the user (a flag, or the path itself) to each folder (or single file)
    read; `output` is the folder written (None: only the inputs are checked); `writer` names the
    command that writes (see `check_output_folder`). Two inputs may not be the same folder (or
    file), and the output must pass `check_output_folder`. Raises FolderError.
    """
    items = list(inputs.items())
    for i, (name_a, path_a) in enumerate(items):
        for name_b, path_b in items[i + 1:]:
            if os.path.realpath(path_a) == os.path.realpath(path_b):
                raise FolderError(f"{name_a} and {name_b} are the same {_kind(path_a)} ({path_a}); each file "
                                  "would be paired with itself")
    if output is not None:
        check_output_folder(inputs, output, writer)


def check_output_folder(inputs: Dict[str, str], output: str, writer: Optional[str] = None) -> None:
    """Refuse an output folder that is an input folder, contains one, or lies inside one while
    something in it may be an input.

    An output folder inside an input root is never read (the writers pass it to the walker in
    `exclude`), so an audio file in it is no input of the run, but it would be overwritten (with
    --overwrite) or taken for an output already made. It is accepted only when it does not exist,
    holds no audio file, or holds the outputs of an earlier run of `writer` (the last writer its
    lock file records, or the refiner, whose config.yml marks its folders). With `writer` None an
    earlier run of any diffiner writer will do. Raises FolderError.
    """
    for name, path in inputs.items():
        if os.path.realpath(output) == os.path.realpath(path):
            raise FolderError(f"the output folder {output} is the input {_kind(path)} {_described(name, path)}; "
                              "choose another output folder")
        if is_inside(path, output):
            raise FolderError(f"the output folder {output} contains the input {_kind(path)} "
                              f"{_described(name, path)}; choose another output folder")
    around = [(name, path) for name, path in inputs.items() if is_inside(output, path)]
    if not around or not os.path.isdir(output):
        return
    listing = scan_audio_files(output)
    previous = earlier_writer(output)
    if (listing.files or listing.unreadable) and (previous is None or writer not in (None, previous)):
        name, path = around[0]
        shown = (f"{len(listing.files)} audio file(s), e.g. {listing.files[0]}" if listing.files
                 else f"folders that cannot be listed ({', '.join(listing.unreadable)})")
        made = f"written by {previous}, not {writer}" if previous else "written by no diffiner run"
        raise FolderError(f"the output folder {output} lies inside the input folder {_described(name, path)} "
                          f"and holds {shown} {made}; they would be overwritten or taken for outputs: "
                          f"choose a new folder or one outside {path} (or move those files away)")


def check_output_file(inputs: Dict[str, str], output: str) -> None:
    """Refuse to write the file `output` where it is one of the files in `inputs` ({name for the
    user: path}): the same path once links are resolved, or another name of the same file (a hard
    link). For writers of one named file, whose folder may well hold its inputs. Raises FolderError."""
    for name, path in inputs.items():
        same = os.path.realpath(output) == os.path.realpath(path)
        if not same and os.path.exists(output) and os.path.exists(path):
            same = os.path.samefile(output, path)
        if same:
            raise FolderError(f"the output file {output} is the input file {_described(name, path)}; "
                              "choose another output file")


def earlier_writer(folder: str) -> Optional[str]:
    """The writer that last wrote into `folder`: the one its lock file records, else the refiner
    where it holds the refiner's config.yml, else None."""
    record = _lock_record(os.path.join(folder, LOCK_FILE))
    if isinstance(record.get("writer"), str):
        return record["writer"]
    return REFINE_WRITER if read_run_record(folder) is not None else None


def output_path(out_root: str, rel: str) -> str:
    """Where the output for relative path `rel` goes; FolderError when a link inside `out_root`
    would carry the write out of it (possibly onto an input)."""
    path = os.path.join(out_root, rel)
    if not is_inside(os.path.dirname(path), out_root):
        raise FolderError(f"{path}: a link in its path leads out of the output folder {out_root}; not written")
    return path


def prepare_output_folder(folder: str) -> None:
    """Create `folder` and make sure a file can be written in it, before any work is done.

    Raises FolderError naming the folder and the reason (read-only, no permission, a file in the
    way).
    """
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise FolderError(f"{folder}: cannot create the output folder ({error_text(exc)})") from exc
    # mkstemp picks a name no one can plant a link at in advance, and creates it with O_EXCL and
    # O_NOFOLLOW: in a shared folder a fixed name could lead the probe onto someone else's file.
    try:
        fd, probe = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise FolderError(f"{folder}: cannot write into the output folder ({error_text(exc)})") from exc


# ----- one run per output folder -----

class _HeldLocks(threading.local):
    """Identities of the folders this thread holds locked: a writer may call another writer into
    the same folder (make_noisy_set calls convert_folder) without refusing itself."""

    def __init__(self) -> None:
        self.folders: Set[Tuple[int, int]] = set()


_HELD = _HeldLocks()


def _lock_record(path: str) -> Dict:
    """What a lock file records ({} for none, a link, or anything that is not a small JSON object
    of ours): read without following links or blocking, since anyone may plant anything there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return {}
        return _parse_lock(os.read(fd, LOCK_MAX_BYTES))
    finally:
        os.close(fd)


def _parse_lock(data: bytes) -> Dict:
    """The JSON object at the start of `data`, {} for anything else. What follows it is ignored:
    a holder writes its record over the previous one before cutting the file to its length."""
    try:
        record, _ = json.JSONDecoder().raw_decode(data.decode("utf-8", "replace"))
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _names_a_live_run(record: Dict) -> bool:
    """Whether `record` can be the current holder's: a process of another host (which cannot be
    checked from here), or one of this host that still runs."""
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _take_lock(fd: int, folder: str) -> None:
    """flock `fd` exclusively, or raise FolderError naming the run that holds it.

    The holder records itself just after taking the lock, so for a moment the file may be empty,
    or name the previous holder, which has ended (and the holder may end just then too): the lock
    is tried again until it is taken or the file names a live run, for HOLDER_WAIT_S at most.
    """
    give_up = time.monotonic() + HOLDER_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError as exc:
            record = _parse_lock(os.pread(fd, LOCK_MAX_BYTES, 0))
            live = _names_a_live_run(record)
            if live or time.monotonic() >= give_up:
                holder = (f"{record.get('writer', '?')} (pid {record['pid']} on {record.get('host', '?')}, started "
                          f"{record.get('started', '?')}: {record.get('command', '?')})" if live
                          else "another run (it has not recorded itself)")
                raise FolderError(f"{folder}: in use by {' '.join(holder.split())}; wait for that run to end or "
                                  "choose another output folder") from exc  # split: a command line may hold a newline
        time.sleep(0.02)


@contextlib.contextmanager
def output_lock(folder: str, writer: str) -> Iterator[None]:
    """Create `folder` (`prepare_output_folder`) and hold an exclusive lock on it for the block.

    The lock is flock(2) on LOCK_FILE in the folder, which records the holder: `writer` (the
    command, e.g. "diffiner-resample"), pid, host, start time and command line. A second run,
    from any process, raises FolderError naming the holder instead of mixing its files with the
    first run's. The kernel releases the lock when its holder ends, however it ends (crash, kill
    -9), so a lock file left behind is not a lock: the next run takes it over. The same thread
    may take the lock of a folder it holds again (a writer calling another writer). The lock
    file is not audio: the walker never lists it. Raises FolderError also where the lock file is
    a link, a hard link or not a regular file (never written through), or cannot be created.
    """
    prepare_output_folder(folder)
    identity = _identity(os.stat(folder))
    held = _HELD.folders
    if identity in held:
        yield
        return
    path = os.path.join(folder, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0),
                     0o644)
    except OSError as exc:
        reason = "it is a link; remove it" if exc.errno == errno.ELOOP else error_text(exc)
        raise FolderError(f"{path}: cannot open the lock file of the output folder ({reason})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise FolderError(f"{path}: the lock file is not a plain file of its own (a FIFO, a device or a "
                              "hard link); remove it")
        _take_lock(fd, folder)
        record = {"writer": writer, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "command": shlex.join(sys.argv)}
        data = (json.dumps(record) + "\n").encode("utf-8")
        os.pwrite(fd, data, 0)  # over the previous record, then cut: never an empty file to a reader
        os.ftruncate(fd, len(data))
        held.add(identity)
        try:
            yield
        finally:
            held.discard(identity)
    finally:
        os.close(fd)  # releases the lock


# ----- one file's error boundary -----

def describe_failure(path: str, exc: BaseException) -> str:
    """One line naming the file and what went wrong; our own errors already name the file."""
    text = error_text(exc)
    if isinstance(exc, (AudioError, FolderError, ValueError)):
        return text if str(path) in text else f"{path}: {text}"
    return f"{path}: {type(exc).__name__}: {text}"


@contextlib.contextmanager
def file_errors(failed: Dict[str, str], rel: str, path: str) -> Iterator[None]:
    """The error boundary around one file's processing: whatever goes wrong with it (a bad file,
    an error of the model on it) is recorded as `failed[rel]`, a line naming `path`, and the
    caller goes on with the other files.

    A failed write (OutputError: disk full, folder read-only) concerns every file after it, so it
    propagates and stops the run, as do KeyboardInterrupt and SystemExit.
    """
    try:
        yield
    except OutputError:
        raise
    except Exception as exc:  # the boundary: one file's failure is that file's alone
        failed[rel] = describe_failure(path, exc)
        logger.debug("%s failed", path, exc_info=True)


# ----- converting a tree -----

# (relative path, audio (channels, samples), sample rate) -> (audio, sample rate)
Conversion = Callable[[str, np.ndarray, int], Tuple[np.ndarray, int]]


@dataclass
class FolderResult:
    """Relative paths written, skipped (already done: see `records`) and failed (with the reason;
    a folder that could not be listed is keyed by its path); `redone`: those of `written` that
    had been written before, from an input that has changed since."""

    written: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)
    redone: List[str] = field(default_factory=list)

    def describe(self) -> str:
        redone = f" ({len(self.redone)} because their input changed)" if self.redone else ""
        return f"{len(self.written)} written{redone}, {len(self.skipped)} already there, {len(self.failed)} failed"


def convert_folder(in_root: str, out_root: str, convert: Conversion, overwrite: bool = False,
                   progress: bool = True, desc: str = "converting", listing: Optional[Listing] = None, *,
                   writer: str, settings: Optional[Dict] = None,
                   made: Optional[Callable[[str], Dict]] = None,
                   info: Optional[Callable[[str], Dict]] = None) -> FolderResult:
    """Apply `convert` to every audio file under `in_root`, writing the same relative paths
    under `out_root` as 16-bit PCM (`out_root` may lie inside `in_root` as `check_write_rules`
    allows: it is never read back as input), holding `output_lock(out_root, writer)`.

    `in_root` may be one audio file instead: its output is `out_root/<its name>`, or `out_root`
    itself where that is a file name with an audio extension (.wav/.flac), which may lie anywhere
    but on the input. `listing` is `scan_audio_files(in_root, exclude=[out_root])` for a caller
    that needed it first. Every file's failure (unreadable, rejected by `convert`, a non-finite
    result) is recorded in `failed` and the rest go on, so one broken file in a corpus of hundreds
    does not stop the run.

    What is already done follows the writer's record (`records.OutputRecord`): `settings` (what
    shapes every file) must match the recorded ones unless `overwrite`, which redoes every file
    (after deleting the files the record lists, where the settings differ); `made(rel)` gives a
    file's own parameters, recorded and compared with it; `info(rel)`, asked after its
    conversion, what else to record beside it. A file whose input changed since it was written
    is redone. Raises
    FileNotFoundError when `in_root` is neither a folder nor a file, FolderError for a layout the
    write rules refuse, an output folder that cannot be written or one that another run holds,
    SettingsError for other settings or files at output paths that no run recorded (without
    `overwrite`), OutputError when a write fails.
    """
    settings = dict(settings or {})
    if os.path.isfile(in_root) and is_audio_name(os.path.basename(out_root)):
        check_output_file({in_root: in_root}, out_root)
        # No folder lock: the lock keeps two runs from mixing their files in one folder, and one
        # file written atomically is whole, whichever run wrote it. Runs of one file each into a
        # shared folder keep each other's record entries (`OutputRecord.save` merges).
        out_folder, name = os.path.split(out_root)
        out_folder = out_folder or os.curdir
        prepare_output_folder(out_folder)
        record = OutputRecord.open(out_folder, writer, settings, overwrite)
        return _convert_files([(name, in_root)], record, convert, overwrite, progress, desc, made, info)
    if not os.path.exists(in_root):
        raise FileNotFoundError(f"{in_root}: no such file or folder")
    check_write_rules({in_root: in_root}, out_root, writer)
    if os.path.isfile(in_root):
        listing = Listing([os.path.basename(in_root)], {})
        in_folder = os.path.dirname(in_root)
    else:
        listing = listing or scan_audio_files(in_root, exclude=[out_root])
        in_folder = in_root
    files = [(rel, os.path.join(in_folder, rel)) for rel in listing.files]
    with output_lock(out_root, writer):
        record = OutputRecord.open(out_root, writer, settings, overwrite)
        return _convert_files(files, record, convert, overwrite, progress, desc, made, info,
                              failed=listing.unreadable)


def _convert_files(files: List[Tuple[str, str]], record: OutputRecord, convert: Conversion, overwrite: bool,
                   progress: bool, desc: str, made: Optional[Callable[[str], Dict]] = None,
                   info: Optional[Callable[[str], Dict]] = None,
                   failed: Optional[Dict[str, str]] = None) -> FolderResult:
    """`convert_folder`'s work on (output path relative to the record's folder, input path)
    pairs; what is done is skipped unless `overwrite`, and every file written is added to
    `record`. `failed` starts the result's failures."""
    out_root = record.folder
    result = FolderResult(failed=dict(failed or {}))
    states = {rel: record.state(rel, {"input": in_path}, made(rel) if made else None) for rel, in_path in files}
    if not overwrite:
        record.refuse_unlisted(out_root, record.writer, [rel for rel, state in states.items() if state == UNLISTED])
    try:
        for rel, in_path in tqdm(files, desc=desc, unit="file", disable=not progress):
            if states[rel] == DONE and not overwrite:
                result.skipped.append(rel)
                continue
            with file_errors(result.failed, rel, in_path):
                target = output_path(out_root, rel)
                inputs = {"input": fingerprint(in_path)}  # before reading: a change during the run shows next time
                audio, rate = load_audio(in_path)
                converted, out_rate = convert(rel, audio, rate)
                save_audio(target, converted, out_rate)
                record.add(rel, inputs, made(rel) if made else None, **(info(rel) if info else {}))
                result.written.append(rel)
                if states[rel] == CHANGED and not overwrite:
                    logger.info("%s: its input changed since it was written; redone", target)
                    result.redone.append(rel)
    finally:
        record.save()
    return result
