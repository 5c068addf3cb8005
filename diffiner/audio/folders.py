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

Writing follows one rule, whoever writes (refiner, enhancers, resampler, demo data): never onto an
input file, never into a root that is read except into the writer's own output folder, and never
reading an output folder as input (`check_write_rules`, `output_path`, `prepare_output_folder`).

`convert_folder` is the one way the package turns an input tree into an output tree (preceding
enhancers, resampling, demo noise): every audio file under the input folder becomes one file at
the same relative path under the output folder, written atomically, and outputs that already
exist are skipped, so an interrupted run is resumed by running it again.
"""

import contextlib
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import yaml
from tqdm.auto import tqdm

from .io import AUDIO_EXTENSIONS, TEMPORARY_PREFIX, AudioError, OutputError, error_text, load_audio, save_audio

logger = logging.getLogger(__name__)

# The file in which diffiner-refine records the settings of the files beside it; a folder holding
# one (with the refiner's keys) is a refinement, never input.
RUN_RECORD = "config.yml"


class FolderError(Exception):
    """A folder that cannot be used as asked: unreadable, not creatable or writable, or a layout
    that the write rules refuse. The message names the folder."""


@dataclass
class Listing:
    """Audio files under a root (relative paths, sorted) and the folders that could not be listed
    ({folder path: reason})."""

    files: List[str]
    unreadable: Dict[str, str]


def _is_audio(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS and not name.startswith(TEMPORARY_PREFIX)


def _identity(st: os.stat_result) -> Tuple[int, int]:
    return st.st_dev, st.st_ino


def read_run_record(folder: str) -> Optional[Dict]:
    """The refiner's config.yml in `folder`, or None where there is none (someone else's
    config.yml, or one that cannot be read, does not count)."""
    path = os.path.join(folder, RUN_RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = yaml.safe_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "refiner" in record and "diffiner_version" in record else None


def scan_audio_files(root: str, exclude: Iterable[str] = ()) -> Listing:
    """Every .wav/.flac file under `root`, recursively, and the folders that could not be listed.

    Folders in `exclude` (absolute or relative to the working directory) are never entered, so an
    output folder placed inside an input folder is not read back as input; `root` itself is always
    listed. Raises FileNotFoundError when `root` is not a folder, FolderError when it cannot be
    listed.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a folder")
    excluded = {_identity(os.stat(p)) for p in exclude if os.path.isdir(p)}
    visited = {_identity(os.stat(root))}
    files: List[str] = []
    unreadable: Dict[str, str] = {}
    folders = [""]  # relative paths of real folders still to list
    # (relative path, identity of the target) of links to folders, followed once no real folder is left
    links: List[Tuple[str, Tuple[int, int]]] = []

    def enterable(path: str, identity: Tuple[int, int]) -> bool:
        if identity in visited or identity in excluded:
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
                        if _is_audio(entry.name):
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
            if not _is_audio(entry.name):
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


def check_write_rules(inputs: Dict[str, str], output: Optional[str]) -> None:
    """Refuse a layout in which a writer could write onto what it reads.

    `inputs` maps a name for the user (a flag, or the path itself) to each folder read; `output`
    is the folder written (None: only the inputs are checked). Two inputs may not be the same
    folder, and the output may be neither an input nor a folder containing one. An output inside
    an input is allowed: it is never read back (`scan_audio_files` excludes it). Raises
    FolderError.
    """
    items = list(inputs.items())
    for i, (name_a, path_a) in enumerate(items):
        for name_b, path_b in items[i + 1:]:
            if os.path.realpath(path_a) == os.path.realpath(path_b):
                raise FolderError(f"{name_a} and {name_b} are the same folder ({path_a}); each file would be "
                                  "paired with itself")
    if output is None:
        return
    for name, path in items:
        if os.path.realpath(output) == os.path.realpath(path):
            raise FolderError(f"the output folder {output} is the input folder {_described(name, path)}; "
                              "choose another output folder")
        if is_inside(path, output):
            raise FolderError(f"the output folder {output} contains the input folder {_described(name, path)}; "
                              "choose another output folder")


def output_path(out_root: str, rel: str) -> str:
    """Where the output for relative path `rel` goes; FolderError when a link inside `out_root`
    would carry the write out of it (possibly onto an input)."""
    path = os.path.join(out_root, rel)
    if not is_inside(os.path.dirname(path), out_root):
        raise FolderError(f"{path}: a link in its path leads out of the output folder {out_root}; not written")
    return path


def remove_audio_files(folder: str) -> int:
    """Delete the audio files under `folder` and return how many. A file reached through a link
    that leads out of `folder` is not one of its own (it may be an input): it is left alone."""
    removed = 0
    for rel in scan_audio_files(folder).files:
        path = os.path.join(folder, rel)
        if not is_inside(os.path.dirname(path), folder):
            logger.warning("%s: reached through a link out of %s; not removed", path, folder)
            continue
        os.remove(path)
        removed += 1
    return removed


def prepare_output_folder(folder: str) -> None:
    """Create `folder` and make sure a file can be written in it, before any work is done.

    Raises FolderError naming the folder and the reason (read-only, no permission, a file in the
    way).
    """
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise FolderError(f"{folder}: cannot create the output folder ({error_text(exc)})") from exc
    probe = os.path.join(folder, f"{TEMPORARY_PREFIX}write-test-{os.getpid()}")
    try:
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise FolderError(f"{folder}: cannot write into the output folder ({error_text(exc)})") from exc


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
    """Relative paths written, skipped (output already there) and failed (with the reason; a
    folder that could not be listed is keyed by its path)."""

    written: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{len(self.written)} written, {len(self.skipped)} already there, {len(self.failed)} failed"


def convert_folder(in_root: str, out_root: str, convert: Conversion, overwrite: bool = False,
                   progress: bool = True, desc: str = "converting", listing: Optional[Listing] = None
                   ) -> FolderResult:
    """Apply `convert` to every audio file under `in_root`, writing the same relative paths
    under `out_root` as 16-bit PCM (`out_root` may lie inside `in_root`: it is never read back
    as input).

    `listing` is `scan_audio_files(in_root, exclude=[out_root])` for a caller that needed it
    first. Every file's failure (unreadable, rejected by `convert`) is recorded in `failed` and
    the rest go on, so one broken file in a corpus of hundreds does not stop the run. Raises
    FileNotFoundError when `in_root` is not a folder, FolderError for a layout the write rules
    refuse or an output folder that cannot be written, OutputError when a write fails.
    """
    check_write_rules({in_root: in_root}, out_root)
    if listing is None:
        listing = scan_audio_files(in_root, exclude=[out_root])
    prepare_output_folder(out_root)
    result = FolderResult(failed=dict(listing.unreadable))
    for rel in tqdm(listing.files, desc=desc, unit="file", disable=not progress):
        if os.path.exists(os.path.join(out_root, rel)) and not overwrite:
            result.skipped.append(rel)
            continue
        in_path = os.path.join(in_root, rel)
        with file_errors(result.failed, rel, in_path):
            target = output_path(out_root, rel)
            audio, rate = load_audio(in_path)
            converted, out_rate = convert(rel, audio, rate)
            save_audio(target, converted, out_rate)
            result.written.append(rel)
    return result
