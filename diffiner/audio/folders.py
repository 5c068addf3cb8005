"""Folder trees of audio files: finding them, pairing them across folders by relative path, and
converting a tree file by file.

`convert_folder` is the one way the package turns an input tree into an output tree (preceding
enhancers, resampling, demo noise): every audio file under the input folder becomes one file at
the same relative path under the output folder, written atomically, and outputs that already
exist are skipped, so an interrupted run is resumed by running it again.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Tuple

import numpy as np

from .io import AUDIO_EXTENSIONS, AudioError, load_audio, save_audio

logger = logging.getLogger(__name__)


def list_audio_files(root: str, exclude: Iterable[str] = ()) -> List[str]:
    """Relative paths of every .wav/.flac file under `root`, recursively, sorted.

    Folders in `exclude` (absolute or relative to the working directory) are never entered,
    so an output folder placed inside an input folder is not read back as input.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a folder")
    excluded = {os.path.realpath(p) for p in exclude}
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(
            d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in excluded
        )
        for name in filenames:
            if name.startswith(".tmp-"):
                continue
            if os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS:
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def pair_files(
    roots: Dict[str, str], exclude: Iterable[str] = (), warn: bool = True
) -> Tuple[List[str], Dict[str, List[str]]]:
    """Pair files present under every root by their relative path.

    Returns (relative paths found under all roots, {root name: relative paths found only
    under some roots but not this one ... }) — precisely, for each root name the files that
    the other roots have and this one lacks. Files missing somewhere are logged as a warning.
    Raises FileNotFoundError when no file is common to all roots.
    """
    exclude = list(exclude)
    listings = {name: set(list_audio_files(root, exclude)) for name, root in roots.items()}
    common = set.intersection(*listings.values()) if listings else set()
    union = set.union(*listings.values()) if listings else set()
    missing = {name: sorted(union - files) for name, files in listings.items()}
    if warn:
        for name, paths in missing.items():
            if paths:
                shown = ", ".join(paths[:10]) + (" ..." if len(paths) > 10 else "")
                logger.warning(
                    "%d file(s) have no counterpart under %s (%s): %s",
                    len(paths), name, roots[name], shown,
                )
    if not common:
        described = ", ".join(f"{n}={r}" for n, r in roots.items())
        raise FileNotFoundError(f"no audio file (.wav/.flac) is common to all of: {described}")
    return sorted(common), missing


def is_inside(path: str, folder: str) -> bool:
    """True when `path` is `folder` or lies below it."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


# (relative path, audio (channels, samples), sample rate) -> (audio, sample rate)
Conversion = Callable[[str, np.ndarray, int], Tuple[np.ndarray, int]]


@dataclass
class FolderResult:
    """Relative paths written, skipped (output already there) and failed (with the reason)."""

    written: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{len(self.written)} written, {len(self.skipped)} already there, {len(self.failed)} failed"


def convert_folder(in_root: str, out_root: str, convert: Conversion, overwrite: bool = False,
                   subtype: str = "PCM_16") -> FolderResult:
    """Apply `convert` to every audio file under `in_root`, writing the same relative paths
    under `out_root` (which may lie inside `in_root`: it is never read back as input).

    Unreadable files are recorded in `failed` and the rest go on, so one broken file in a corpus
    of hundreds does not stop the run. Raises FileNotFoundError when `in_root` is not a folder.
    """
    result = FolderResult()
    for rel in list_audio_files(in_root, exclude=[out_root]):
        out_path = os.path.join(out_root, rel)
        if os.path.exists(out_path) and not overwrite:
            result.skipped.append(rel)
            continue
        try:
            audio, rate = load_audio(os.path.join(in_root, rel))
        except AudioError as exc:
            logger.warning("%s", exc)
            result.failed[rel] = str(exc)
            continue
        converted, out_rate = convert(rel, audio, rate)
        save_audio(out_path, converted, out_rate, subtype=subtype)
        result.written.append(rel)
    return result
