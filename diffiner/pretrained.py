"""The published weights by name: `--model-path published` and `Refiner.from_pretrained()`.

The name `published` stands for the authors' VoiceBank+DEMAND checkpoint,
`pretrained_diffiner_onVB.pt` (Zenodo record 7988790). Its first use downloads it, with a
progress bar, into a per-user cache folder: `$DIFFINER_CACHE` if set, else
`$XDG_CACHE_HOME/diffiner`, else `~/.cache/diffiner`. The download goes to a temporary name
there, is checked to be a readable state dict with the published layout (PUBLISHED_LAYOUT:
612 tensors, 164,303,618 parameters), and only then renamed into place (`diffiner.download`),
so the cache never holds an error page or a truncated file. Later uses take the cached copy.
`$DIFFINER_PUBLISHED_URL` replaces the download address (a mirror, or a local server in tests).

Offline, the error says where to put the file by hand. Any other `--model-path` is a checkpoint
file, used as it is (a file named `published` is `./published`).
"""

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .checkpoints import load_state_dict
from .download import DownloadError, download

logger = logging.getLogger(__name__)

PUBLISHED_NAME = "published"  # what --model-path and Refiner.from_pretrained take
FILE_NAME = "pretrained_diffiner_onVB.pt"
URL = "https://zenodo.org/record/7988790/files/pretrained_diffiner_onVB.pt"
CACHE_ENV = "DIFFINER_CACHE"  # the cache folder
URL_ENV = "DIFFINER_PUBLISHED_URL"  # where the published weights are downloaded from


@dataclass(frozen=True)
class Layout:
    """What a state dict holds: its number of tensors and their number of values."""

    tensors: int
    parameters: int

    def __str__(self) -> str:
        return f"{self.tensors} tensors and {self.parameters:,} parameters"


# The published checkpoint's layout: that of the UNet built from the published settings
# (script_util.model_and_diffusion_defaults), as tests/test_pretrained.py verifies.
PUBLISHED_LAYOUT = Layout(tensors=612, parameters=164_303_618)


def cache_folder() -> str:
    """The folder of the cached weights: $DIFFINER_CACHE, else $XDG_CACHE_HOME/diffiner, else
    ~/.cache/diffiner."""
    folder = os.environ.get(CACHE_ENV)
    if not folder:
        folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "diffiner")
    return os.path.abspath(os.path.expanduser(folder))


def published_path() -> str:
    """Where the cached copy of the published weights is (whether or not it is there yet)."""
    return os.path.join(cache_folder(), FILE_NAME)


def published_url() -> str:
    """Where the published weights are downloaded from: $DIFFINER_PUBLISHED_URL, else Zenodo."""
    return os.environ.get(URL_ENV) or URL


def layout_of(state: Mapping[str, Any]) -> Layout:
    """The layout of a state dict: its tensors, and their values counted."""
    tensors = [value for value in state.values() if isinstance(value, torch.Tensor)]
    return Layout(len(tensors), sum(tensor.numel() for tensor in tensors))


def check_published_layout(path: str) -> None:
    """ValueError naming `path` unless it is a readable state dict with the published layout
    (FileNotFoundError when it does not exist)."""
    layout = layout_of(load_state_dict(path))  # ValueError naming the file when it is not readable
    if layout != PUBLISHED_LAYOUT:
        raise ValueError(f"{path}: not the published weights: {layout}, the published file has {PUBLISHED_LAYOUT}")


def fetch_published(url: str = "", *, progress: bool = True) -> str:
    """The cached copy of the published weights, downloaded from `url` (default:
    `published_url()`) and checked first when it is not there yet.

    DownloadError in one line when the download fails or is refused, saying where to put the
    file by hand.
    """
    path = published_path()
    if os.path.isfile(path):
        return path
    url = url or published_url()
    logger.info("downloading the published weights (%s) from %s into %s", FILE_NAME, url, path)
    try:
        download(url, path, check_published_layout, progress=progress)
    except DownloadError as exc:
        raise DownloadError(f"cannot download the published weights: {exc}; download {FILE_NAME} elsewhere "
                            f"and put it at {path}", offline=exc.offline) from exc
    return path


def resolve(model_path: str, *, progress: bool = True) -> str:
    """The checkpoint file that a --model-path value stands for: for `published`, the cached copy
    of the published weights (downloaded on first use, see `fetch_published`); any other value
    is a file path, returned as it is."""
    return fetch_published(progress=progress) if model_path == PUBLISHED_NAME else model_path
