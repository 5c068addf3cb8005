"""NISQA v2.0 (Mittag et al., Interspeech 2021) through torchmetrics: its weights and its scores.

torchmetrics' `non_intrusive_speech_quality_assessment` loads `<NISQA_DIR>/nisqa.tar` once per
process (an lru_cache without arguments) and, when that file is missing, downloads it into place
without checking the answer, so an error page would be saved as the weights. This module never
lets it: it finds the weights itself (a file the user names, or torchmetrics' cache), downloads
them when asked (`diffiner.download`: a temporary copy, checked before it is renamed into the cache), and
loads them into torchmetrics' cache by pointing NISQA_DIR at their folder for that one load
(`load_weights`, the only hook into torchmetrics' internals). The public function then scores
with them, in every process that called `load_weights`.

NISQA's code is MIT-licensed; its weights are CC BY-NC-SA 4.0 (non-commercial use only), so this
project never ships them.
"""

import logging
import math
import os
from typing import Dict, Optional, Tuple

import numpy as np

from .. import download as downloader
from ..errors import UsageError, error_text
from .metrics import UnscorableFile, check_signal

logger = logging.getLogger(__name__)


WEIGHTS_NAME = "nisqa.tar"  # the file name torchmetrics loads from its NISQA_DIR

# torchmetrics' default NISQA_DIR: the weights it (or this module) downloaded before.
CACHE_DIR = os.path.join("~", ".torchmetrics", "NISQA")

WEIGHTS_URL = "https://github.com/gabrielmittag/NISQA/raw/refs/heads/master/weights/nisqa.tar"

WEIGHTS_LICENCE = "CC BY-NC-SA 4.0: non-commercial use only"

# Columns in the paper's order: overall MOS, then noisiness, coloration, discontinuity, loudness.
COLUMNS = ("nisqa_mos", "nisqa_noi", "nisqa_col", "nisqa_dis", "nisqa_loud")
# torchmetrics returns the original code's order MOS, NOI, DIS, COL, LOUD; these are the indices
# of COLUMNS in that output.
_OUTPUT_INDEX = (0, 1, 3, 2, 4)

# The weights loaded into this process: (path, the checkpoint's settings); None before any.
_loaded: Optional[Tuple[str, Dict]] = None


class NisqaWeightsError(UsageError):
    """The NISQA weights named (or found in the cache) are missing or not a NISQA checkpoint."""


class NisqaUnavailable(NisqaWeightsError):
    """The installed torchmetrics has no NISQA (it arrived in 1.6, which needs Python >= 3.9 and
    torch >= 2.0: not in the torch 1.11 image). A NisqaWeightsError, so that the commands report
    it in one line as they report unusable weights."""


def cache_path() -> str:
    """Where torchmetrics keeps the downloaded weights: ~/.torchmetrics/NISQA/nisqa.tar."""
    return os.path.join(os.path.expanduser(CACHE_DIR), WEIGHTS_NAME)


def load_weights(path: str) -> None:
    """Load a nisqa.tar into torchmetrics' model cache for this process; a no-op when it is
    already the loaded file. Raises NisqaWeightsError naming the file when it is not a NISQA
    checkpoint (not a torch file, missing keys, or weights that do not fit the network)."""
    global _loaded
    path = os.path.abspath(path)
    if _loaded is not None and _loaded[0] == path:
        return
    if os.path.basename(path) != WEIGHTS_NAME or not os.path.isfile(path):
        raise NisqaWeightsError(
            f"{path}: NISQA weights must be a file named {WEIGHTS_NAME}, the name torchmetrics loads"
        )
    try:
        import torchmetrics.functional.audio.nisqa as tm_nisqa
    except ImportError as exc:
        raise NisqaUnavailable(f"NISQA needs torchmetrics >= 1.6, with torch >= 2.0 and Python >= 3.9 ({exc})") from exc

    if os.path.getsize(path) == 0:
        raise NisqaWeightsError(f"{path}: the file is empty (0 bytes), not a NISQA checkpoint (an interrupted "
                                "download or copy?)")
    default_dir = tm_nisqa.NISQA_DIR
    tm_nisqa.NISQA_DIR = os.path.dirname(path)
    tm_nisqa._load_nisqa_model.cache_clear()
    _loaded = None
    try:
        # The file exists (checked above), so torchmetrics loads it and never downloads.
        _, settings = tm_nisqa._load_nisqa_model()
    except Exception as exc:  # torch.load and load_state_dict fail in many ways on a bad file
        # error_text, not the message's first line: some of torch's errors (EOFError) have no message.
        detail = error_text(exc)[:200]
        reason = detail if detail == type(exc).__name__ else f"{type(exc).__name__}: {detail}"
        raise NisqaWeightsError(f"{path}: not a NISQA checkpoint ({reason})") from exc
    finally:
        # Restored so that torchmetrics' cache location stays its own; the model stays cached.
        tm_nisqa.NISQA_DIR = default_dir
    _loaded = (path, settings)


def find_weights(path: Optional[str], download: bool) -> Optional[str]:
    """The checked NISQA weights to score with, loaded into this process; None leaves NISQA out.

    `path` (from --nisqa-weights) must be a valid nisqa.tar, else NisqaWeightsError. Without it,
    torchmetrics' cache is used when it holds the file (a corrupt one is an error too); else,
    with `download`, the weights are downloaded into the cache; when that is not allowed or
    fails (offline), NISQA is left out with one log line.
    """
    found = _locate_weights(path, download)
    if found is not None:
        logger.info("NISQA weights: %s (%s)", found, WEIGHTS_LICENCE)
    return found


def _locate_weights(path: Optional[str], download: bool) -> Optional[str]:
    """find_weights without its closing log line."""
    if path is not None:
        if not os.path.isfile(path):
            raise NisqaWeightsError(f"--nisqa-weights {path}: no such file")
        load_weights(path)
        return os.path.abspath(path)
    cached = cache_path()
    if os.path.isfile(cached):
        try:
            load_weights(cached)
        except NisqaWeightsError as exc:
            raise NisqaWeightsError(f"{exc}; delete it to download the weights again") from exc
        return cached
    if not download:
        logger.info("nisqa left out: no weights at %s (select it with --metrics to download them, %s, "
                    "or pass --nisqa-weights FILE)", cached, WEIGHTS_LICENCE)
        return None
    try:
        # The check loads the weights from the temporary copy, which keeps the name torchmetrics
        # needs; they are loaded again from the cache below, so that _loaded names that file.
        downloader.download(WEIGHTS_URL, cached, load_weights)
    except downloader.DownloadError as exc:  # offline, an HTTP error, a truncated file, not a NISQA checkpoint
        logger.warning("nisqa left out: no weights at %s (%s); pass --nisqa-weights FILE", cached, exc)
        return None
    load_weights(cached)
    logger.info("downloaded NISQA weights (%s) from %s to %s", WEIGHTS_LICENCE, WEIGHTS_URL, cached)
    return cached


def _length_limits(settings: Dict, sample_rate: int) -> Tuple[int, int]:
    """(shortest, longest) signal in samples that the network takes in one pass.

    librosa's centred frames give a signal of n samples 1 + n // hop frames; the network needs
    at least one segment of ms_seg_length frames and takes at most ms_max_segments segments,
    ms_seg_hop_length frames apart (torchmetrics' _segment_specs).
    """
    hop = int(sample_rate * settings["ms_hop_length"])
    min_frames = settings["ms_seg_length"]
    max_frames = settings["ms_max_segments"] * settings["ms_seg_hop_length"] + settings["ms_seg_length"] - 1
    return (min_frames - 1) * hop, max_frames * hop - 1


def scores(signal: np.ndarray, sample_rate: int) -> Dict[str, float]:
    """NISQA MOS and its four dimensions for a mono signal at `sample_rate` (any rate: torchmetrics
    resamples to NISQA's 48 kHz), each about 1 to 5.

    Raises MetricError for a silent signal (nothing to rate) and UnscorableFile for one shorter
    than the network's shortest input (0.14 s). A signal longer than its longest input (52 s) is
    scored in equal consecutive parts, each within the limit, and the part scores are averaged,
    weighted by length: NISQA itself refuses such files.
    """
    if _loaded is None:
        raise RuntimeError("NISQA weights are not loaded in this process: call load_weights first")
    import torch
    from torchmetrics.functional.audio.nisqa import non_intrusive_speech_quality_assessment

    shortest, longest = _length_limits(_loaded[1], sample_rate)
    if signal.size < shortest:
        raise UnscorableFile(f"the file is shorter than {shortest / sample_rate:.2f} s, NISQA's shortest input")
    check_signal(signal)
    parts = np.array_split(signal, math.ceil(signal.size / longest))
    total = np.zeros(len(COLUMNS))
    for part in parts:
        output = non_intrusive_speech_quality_assessment(torch.from_numpy(part.astype(np.float32)), sample_rate)
        total += part.size * output.numpy().astype(np.float64)[list(_OUTPUT_INDEX)]
    return dict(zip(COLUMNS, (float(v) for v in total / signal.size)))
