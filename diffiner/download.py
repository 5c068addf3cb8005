"""Downloading a file into a cache: the one way this project fetches weights (the published
Diffiner weights, `diffiner.pretrained`; NISQA's, `diffiner.evaluation.nisqa`).

The file is streamed, with a progress bar, into a temporary folder beside its destination (the
temporary copy keeps the final name, because some loaders only accept that name), checked by the
caller's `check`, and only then renamed into place. So the cache never holds a partial or wrong
file: a broken connection, a download shorter than its announced length, or an answer that is
not the expected file (a server's error page) raises DownloadError and leaves nothing behind.

Only the standard library's urllib is used: the published weights must be reachable with the
core install. file:// URLs work too (a copy from a local folder, checked the same way).
"""

import http.client
import logging
import os
import pathlib
import tempfile
import urllib.error
import urllib.request
from typing import IO, Callable

from tqdm.auto import tqdm

from . import __version__
from .audio.io import TEMPORARY_PREFIX, OutputError, free_space_hint
from .errors import DiffinerError, error_text

logger = logging.getLogger(__name__)

# Seconds without an answer (to connect, or between two reads) before giving up: an unreachable
# host fails fast, a slow one is waited for.
TIMEOUT_S = 30.0
BLOCK = 1 << 20


class DownloadError(DiffinerError, OSError):
    """A download that failed or whose answer was refused; nothing was kept. `offline`: the host
    could not be reached at all (no network, refused, unknown name)."""

    def __init__(self, message: str, offline: bool = False):
        super().__init__(message)
        self.offline = offline


def as_url(source: str) -> str:
    """`source` as a URL: a URL is kept, a local path becomes a file:// URL."""
    return source if "://" in source else pathlib.Path(source).resolve().as_uri()


def download(url: str, destination: str, check: Callable[[str], None], *, progress: bool = True,
             timeout: float = TIMEOUT_S) -> None:
    """Download `url` to `destination` through a checked temporary copy.

    `check(path)` raises ValueError or a DiffinerError when the file at `path` is not the expected
    one; that refusal, like any failure of the transfer, is a DownloadError naming `url` (with the
    temporary path left out of the message: the file is gone). A failure to write names
    `destination` (OutputError).
    """
    folder = os.path.dirname(os.path.abspath(destination))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the folder ({error_text(exc)})") from exc
    with tempfile.TemporaryDirectory(prefix=TEMPORARY_PREFIX, dir=folder) as scratch:
        candidate = os.path.join(scratch, os.path.basename(destination))
        _fetch(url, candidate, destination, progress, timeout)
        try:
            check(candidate)
        except (ValueError, DiffinerError) as exc:
            reason = error_text(exc).replace(f"{candidate}: ", "").replace(candidate, "the download")
            raise DownloadError(f"{url}: refused, nothing kept: {reason}") from exc
        os.replace(candidate, destination)
    logger.debug("downloaded %s to %s", url, destination)


def _fetch(url: str, candidate: str, destination: str, progress: bool, timeout: float) -> None:
    """Stream `url` into `candidate`; DownloadError when it fails or ends before its announced length."""
    request = urllib.request.Request(url, headers={"User-Agent": f"diffiner/{__version__}"})
    received, expected = 0, None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(candidate, "wb") as f:
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None and length.strip().isdigit() else None
            with tqdm(total=expected, desc=os.path.basename(destination), unit="B", unit_scale=True,
                      unit_divisor=1024, disable=not progress) as bar:
                for block in iter(lambda: response.read(BLOCK), b""):
                    _write(f, block, destination)
                    received += len(block)
                    bar.update(len(block))
    except OutputError:
        raise
    except urllib.error.HTTPError as exc:  # before URLError, its base class: the server answered
        raise DownloadError(f"{url}: HTTP error {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise DownloadError(f"{url}: offline or unreachable ({error_text(exc.reason)[:200]})", offline=True) from exc
    except (OSError, http.client.HTTPException) as exc:  # a connection that broke or stalled midway
        raise DownloadError(f"{url}: the download broke off after {received} bytes "
                            f"({type(exc).__name__}: {error_text(exc)[:200]})") from exc
    if expected is not None and received != expected:
        raise DownloadError(f"{url}: the download is truncated ({received} of {expected} bytes)")


def _write(f: IO[bytes], block: bytes, destination: str) -> None:
    try:
        f.write(block)
    except OSError as exc:
        raise OutputError(f"{destination}: cannot write the download ({error_text(exc)}"
                          f"{free_space_hint(os.path.dirname(os.path.abspath(destination)))})") from exc
