"""Finding audio files and pairing them across folders by relative path."""

import logging
import os
from typing import Dict, Iterable, List, Tuple

from .audio import AUDIO_EXTENSIONS

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
