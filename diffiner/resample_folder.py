"""Converting folder trees file by file, and the resampling command built on it.

`python -m diffiner.resample_folder IN OUT --rate 16000` is stage 1 of run_example.sh: the
VoiceBank+DEMAND test set is 48 kHz while the model works at 16 kHz. The original script called
sox for this; here the package's own resampler (soxr, very high quality) does it, so no system
tool is needed.

`convert_folder` is the walker shared with the noisereduce baseline and the demo noise maker:
every audio file under the input folder becomes one file at the same relative path under the
output folder, written atomically, and outputs that already exist are skipped, so an interrupted
run is resumed by running it again.
"""

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .audio import MODEL_SAMPLE_RATE, AudioError, load_audio, resample, save_audio
from .files import list_audio_files

logger = logging.getLogger(__name__)

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

    def report(self, headline: str) -> int:
        """Print each failure (stderr) and `headline: counts`; return the exit status (1: failures)."""
        for rel, reason in sorted(self.failed.items()):
            print(f"FAILED {rel}: {reason}", file=sys.stderr)
        print(f"{headline}: {self.describe()}")
        return 1 if self.failed else 0


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


def resample_folder(in_root: str, out_root: str, rate: int = MODEL_SAMPLE_RATE,
                    overwrite: bool = False) -> FolderResult:
    """Write every file under `in_root` at `rate` Hz (same channels, 16-bit PCM) under `out_root`.

    16-bit because that is what the corpora this is used on (VoiceBank+DEMAND) store, and what
    sox wrote in the original script.
    """
    return convert_folder(in_root, out_root, lambda rel, audio, sr: (resample(audio, sr, rate), rate), overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffiner.resample_folder",
        description="Resample every .wav/.flac file under IN to OUT, keeping relative paths; "
                    "existing outputs are skipped.",
    )
    parser.add_argument("input", metavar="IN", help="folder searched recursively (OUT inside it is ignored)")
    parser.add_argument("output", metavar="OUT", help="output folder")
    parser.add_argument("--rate", type=int, default=MODEL_SAMPLE_RATE,
                        help="target sample rate in Hz (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="rewrite outputs that already exist")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns 1 when some file could not be read, 2 when IN is not a folder."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.rate <= 0:
        print(f"error: --rate must be positive, got {args.rate}", file=sys.stderr)
        return 2
    try:
        result = resample_folder(args.input, args.output, args.rate, args.overwrite)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return result.report(f"resampled to {args.rate} Hz in {args.output}")


if __name__ == "__main__":
    sys.exit(main())
