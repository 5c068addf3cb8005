"""The record a writer keeps of the files it wrote into an output folder: the one source of
"already done" and of what `--overwrite` may delete.

Every writer of a folder of outputs (diffiner-refine, diffiner-enhance and --baseline,
diffiner-resample, make_noisy_set, diffiner-sample) keeps `.diffiner-<writer>.json` beside its
outputs: the settings that shape the files (for the refiner they live in config.yml, which it
compares itself) and, for each file written, what it was made from: a fingerprint of every input
file (size, mtime_ns and SHA-256) and the per-file parameters (`made`, e.g. a noisy clip's noise
condition). The rules, the same for every writer:

- a file is already done when the record lists it, it exists, it was made with the same per-file
  parameters and every input is unchanged: same size and same mtime_ns, or, where only the
  mtime differs (a copied or restored folder), the same SHA-256;
- a listed file whose input changed since it was written is redone;
- a file at an output path that the record does not list is not ours: the run is refused unless
  --overwrite (a file of the user's is never replaced unasked);
- a run with other settings is refused with one line naming them; with --overwrite the files the
  record lists are deleted first, and nothing else: the user's own files in the folder stay.

The record is written atomically (temporary file, then rename) when a run starts and when it
ends. In between, each file written is appended as one line to `.diffiner-<writer>.json.log`
(one `write` of a short line with O_APPEND: whole, or a torn last line that is ignored), so a run
killed at any point leaves a record of every file it finished, and the processes of a torchrun
job can all add to it. Reading takes the record and then the lines of the log.
"""

import hashlib
import json
import logging
import os
import stat
import threading
from typing import Any, Dict, List, Optional, Sequence

from ..errors import EXIT_USAGE, DiffinerError, error_text
from .io import OutputError, open_regular, write_text_atomic

logger = logging.getLogger(__name__)

RECORD_PREFIX = ".diffiner-"
RECORD_SUFFIX = ".json"
JOURNAL_SUFFIX = ".log"
FORMAT_VERSION = 1
# A record lists each file with two or three fingerprints (about 250 bytes): 64 MiB holds a
# corpus of a quarter of a million files, and bounds what a planted file can cost.
RECORD_MAX_BYTES = 64 << 20

# Outcomes of `OutputRecord.state`.
DONE, CHANGED, NEW, UNLISTED = "done", "changed", "new", "unlisted"


class SettingsError(DiffinerError, ValueError):
    """A folder written with other settings (and no --overwrite), or holding files at output
    paths that no run recorded: one line naming the folder; exit status 2."""

    exit_code = EXIT_USAGE


def record_name(writer: str) -> str:
    """The record's file name for `writer`: ".diffiner-refine.json" for "diffiner-refine"."""
    short = writer[len("diffiner-"):] if writer.startswith("diffiner-") else writer
    return f"{RECORD_PREFIX}{short}{RECORD_SUFFIX}"


def is_bookkeeping(name: str) -> bool:
    """Whether a file name is a record, its log or the lock file (".diffiner.lock"): files of the
    writers' own, never outputs or inputs."""
    return name.startswith(".diffiner")


def file_sha256(path: str) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: str) -> Dict[str, Any]:
    """What identifies the content of an input file: size, mtime_ns and SHA-256.

    Taken before the file is read for the output, so that a change during the run shows as a
    change at the next one. The hash lets a copied folder (new mtimes, same bytes) count as
    unchanged; it is read again only where size or mtime differ.
    """
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}


def unchanged(recorded: Any, path: str) -> bool:
    """Whether the file `path` still has the content `recorded` (a `fingerprint`)."""
    if not isinstance(recorded, dict):
        return False
    try:
        st = os.stat(path)
        if st.st_size != recorded.get("size"):
            return False
        return st.st_mtime_ns == recorded.get("mtime_ns") or file_sha256(path) == recorded.get("sha256")
    except OSError:
        return False


# ----- settings -----

def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a.b": v} for {"a": {"b": v}}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(value: Any) -> str:
    text = "(none)" if value is None else str(value)
    return text if len(text) <= 24 else text[:12] + "..."


def setting_differences(recorded: Dict[str, Any], current: Dict[str, Any], ignore: Sequence[str] = ()) -> List[str]:
    """"key: recorded -> current" for every (dotted) setting in which the two differ, leaving out
    the keys in `ignore` and those below them. `current` is compared as it reads back from the
    record (JSON/YAML), so a tuple equals the list it is stored as."""
    def settings(config: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in flatten(config).items() if not any(k == e or k.startswith(e + ".") for e in ignore)}

    old, new = settings(recorded), settings(json.loads(json.dumps(current)))
    return [f"{key}: {_shown(old.get(key))} -> {_shown(new.get(key))}"
            for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]


def describe_differences(differences: List[str], shown: int = 6) -> str:
    """The first `shown` differences joined, and how many more there are."""
    more = f"; and {len(differences) - shown} more" if len(differences) > shown else ""
    return "; ".join(differences[:shown]) + more


# ----- the record -----

class OutputRecord:
    """The files one writer wrote into one folder, and the settings they were written with.

    Open it with `OutputRecord.open` while holding the folder's lock; then ask `state` for each
    output, call `add` after each write, and `save` at the end (a run that cannot, killed, leaves
    the log, which keeps every file added).
    """

    def __init__(self, folder: str, writer: str, settings: Optional[Dict[str, Any]] = None,
                 files: Optional[Dict[str, Dict[str, Any]]] = None) -> None:
        self.folder = folder
        self.writer = writer
        self.settings = settings
        self.files: Dict[str, Dict[str, Any]] = dict(files or {})
        self.removed = 0  # files `open` deleted: written with other settings
        self._lock = threading.Lock()  # `add` is called from writer threads

    @property
    def path(self) -> str:
        return os.path.join(self.folder, record_name(self.writer))

    @property
    def journal_path(self) -> str:
        return self.path + JOURNAL_SUFFIX

    # -- reading --
    @classmethod
    def read(cls, folder: str, writer: str) -> "OutputRecord":
        """The record of `writer` in `folder` (empty where there is none, or where the file is not
        a record of ours: unreadable, too large, not JSON of this shape; logged), with the
        entries of its log applied."""
        record = cls(folder, writer)
        data = _read_json(record.path)
        if isinstance(data, dict) and data.get("writer") == writer and isinstance(data.get("files"), dict):
            record.settings = data.get("settings") if isinstance(data.get("settings"), dict) else None
            record.files = {rel: entry for rel, entry in data["files"].items() if isinstance(entry, dict)}
        for line in _read_lines(record.journal_path):
            try:
                entry = json.loads(line)
            except ValueError:  # a torn last line: the write it records did not complete its entry
                continue
            if isinstance(entry, dict) and isinstance(entry.get("rel"), str) and isinstance(entry.get("entry"), dict):
                record.files[entry["rel"]] = entry["entry"]
        return record

    @classmethod
    def open(cls, folder: str, writer: str, settings: Optional[Dict[str, Any]], overwrite: bool,
             replace: bool = False) -> "OutputRecord":
        """The record for a run of `writer` with `settings` into `folder`, written back whole
        (the log folded in).

        Recorded `settings` that differ from these are refused with SettingsError naming them,
        unless `overwrite`: then the files the record lists are deleted and the record starts
        empty (`removed` counts them). `replace` does the same for settings compared elsewhere
        (the refiner's config.yml). `settings` None keeps no settings in this record.
        """
        record = cls.read(folder, writer)
        differences = record.check(settings, overwrite)
        if differences or replace:
            record.removed = record.remove_written()
            logger.info("%s: removed %d file(s) written with other settings", folder, record.removed)
        record.settings = settings
        record.save(merge=False)  # `read` took in everything on disk; what was removed stays out
        return record

    # -- deciding --
    def check(self, settings: Optional[Dict[str, Any]], overwrite: bool) -> List[str]:
        """The recorded settings in which `settings` differ (none where this record lists no
        file, keeps no settings, or `settings` is None); SettingsError naming them unless
        `overwrite`. Changes nothing."""
        differences = (setting_differences(self.settings, settings)
                       if settings is not None and self.settings is not None and self.files else [])
        if differences and not overwrite:
            raise SettingsError(f"{self.folder} holds files {self.writer} wrote with other settings "
                                f"({describe_differences(differences)}); rerun with --overwrite to redo them all, "
                                "or choose another output folder")
        return differences

    def state(self, rel: str, inputs: Dict[str, str], made: Optional[Dict[str, Any]] = None) -> str:
        """DONE, CHANGED (listed, but an input or `made` differs: redo it), NEW (no file there,
        listed or not) or UNLISTED (a file there that no run recorded) for the output `rel`, made
        from `inputs` ({role: path}) with the per-file parameters `made`."""
        if not os.path.lexists(os.path.join(self.folder, rel)):
            return NEW
        entry = self.files.get(rel)
        if entry is None:
            return UNLISTED
        recorded = entry.get("inputs") if isinstance(entry.get("inputs"), dict) else {}
        same = (set(recorded) == set(inputs) and entry.get("made") == _plain(made)
                and all(unchanged(recorded[role], path) for role, path in inputs.items()))
        return DONE if same else CHANGED

    @staticmethod
    def refuse_unlisted(folder: str, writer: str, unlisted: Sequence[str]) -> None:
        """Raise SettingsError naming the files at output paths that no run of `writer` recorded
        (none: nothing happens)."""
        if unlisted:
            raise SettingsError(f"{folder} holds {len(unlisted)} file(s) at output paths that no {writer} run "
                                f"recorded (e.g. {unlisted[0]}); rerun with --overwrite to replace them, move them "
                                "away, or choose another output folder")

    # -- writing --
    def add(self, rel: str, fingerprints: Dict[str, Dict[str, Any]], made: Optional[Dict[str, Any]] = None,
            **info: Any) -> None:
        """Record the output `rel`, just written, made from inputs with `fingerprints`
        ({role: fingerprint taken before reading}) and `made`; `info` is kept beside it (e.g. a
        noisy clip's gain). One line appended to the log."""
        entry = {"inputs": fingerprints, "made": _plain(made), **info}
        line = json.dumps({"rel": rel, "entry": entry}, separators=(",", ":")) + "\n"
        with self._lock:
            self.files[rel] = entry
            try:
                # Not through a link, and never blocking on a FIFO planted at the name.
                fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                             | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o644)
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise OSError("not a regular file (a FIFO, a device?)")
                    os.write(fd, line.encode("utf-8"))  # one write: other processes' lines never interleave
                finally:
                    os.close(fd)
            except OSError as exc:  # the record cannot be kept: no later file could be recorded either
                raise OutputError(f"{self.journal_path}: cannot add to the record of written files "
                                  f"({error_text(exc)})") from exc

    def save(self, merge: bool = True) -> None:
        """Write the record atomically, then drop the log it now contains.

        With `merge`, the files that the record on disk (and its log) lists under the same
        settings are kept beside this object's: the processes of a torchrun job, and runs of one
        file each into a shared folder (which take no folder lock), add to one record.
        """
        with self._lock:
            if merge:
                on_disk = OutputRecord.read(self.folder, self.writer)
                if on_disk.settings == _plain(self.settings):
                    self.files = {**on_disk.files, **self.files}
            data = {"format": FORMAT_VERSION, "writer": self.writer, "settings": self.settings,
                    "files": dict(sorted(self.files.items()))}
            write_text_atomic(self.path, json.dumps(data, indent=1) + "\n")
            try:
                os.remove(self.journal_path)
            except FileNotFoundError:
                pass

    def remove_written(self) -> int:
        """Delete every file the record lists (inside the folder, not reached through a link out
        of it) and forget them; returns how many were deleted. Nothing else in the folder is
        touched."""
        from .folders import is_inside  # folders imports this module

        removed = 0
        for rel in sorted(self.files):
            path = os.path.join(self.folder, rel)
            if not os.path.isfile(path) or not is_inside(os.path.dirname(path), self.folder):
                continue
            os.remove(path)
            removed += 1
        self.files = {}
        return removed


def _plain(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples as lists), so that comparisons hold."""
    return None if value is None else json.loads(json.dumps(value))


def _read_json(path: str) -> Any:
    """The JSON in `path`, or None where there is none or it is not a readable record (logged)."""
    text = _read_text(path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        logger.warning("%s: not a readable record (%s); ignored", path, exc)
        return None


def _read_lines(path: str) -> List[str]:
    text = _read_text(path)
    return text.splitlines() if text else []


def _read_text(path: str) -> Optional[str]:
    """The text of a regular file `path` of at most RECORD_MAX_BYTES, else None (logged)."""
    if not os.path.lexists(path):
        return None
    try:
        with open_regular(path, "rb") as f:
            data = f.read(RECORD_MAX_BYTES + 1)
    except (OSError, ValueError) as exc:
        logger.warning("%s: not readable as a record (%s); ignored", path, exc)
        return None
    if len(data) > RECORD_MAX_BYTES:
        logger.warning("%s: larger than %d bytes; not a record, ignored", path, RECORD_MAX_BYTES)
        return None
    return data.decode("utf-8", "replace")
