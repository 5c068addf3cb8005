"""`diffiner-resample IN OUT --rate 16000`: resample every audio file of a folder tree.

Stage 1 of run_example.sh: the VoiceBank+DEMAND test set is 48 kHz while the model works at
16 kHz. The original script called sox for this; here the package's own resampler (soxr, very
high quality) does it, so no system tool is needed.
"""

import sys
from typing import Optional, Sequence

from ..audio.folders import FolderResult, convert_folder
from ..audio.io import MODEL_SAMPLE_RATE, resample
from ..flags import Flag, command_parser
from .common import report_folder, setup_logging


def resample_folder(in_root: str, out_root: str, rate: int = MODEL_SAMPLE_RATE,
                    overwrite: bool = False) -> FolderResult:
    """Write every file under `in_root` at `rate` Hz (same channels, 16-bit PCM) under `out_root`.

    16-bit because that is what the corpora this is used on (VoiceBank+DEMAND) store, and what
    sox wrote in the original script.
    """
    return convert_folder(in_root, out_root, lambda rel, audio, sr: (resample(audio, sr, rate), rate), overwrite)


def build_parser():
    parser = command_parser(
        "Resample every .wav/.flac file under IN to OUT, keeping relative paths; existing outputs are skipped.",
        {"settings": [
            Flag("rate", MODEL_SAMPLE_RATE, "target sample rate in Hz"),
            Flag("overwrite", False, "rewrite outputs that already exist"),
        ]}, prog="diffiner-resample")
    parser.add_argument("input", metavar="IN", help="folder searched recursively (OUT inside it is ignored)")
    parser.add_argument("output", metavar="OUT", help="output folder")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns 1 when some file could not be read, 2 when IN is not a folder."""
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.rate <= 0:
        print(f"error: --rate must be positive, got {args.rate}", file=sys.stderr)
        return 2
    try:
        result = resample_folder(args.input, args.output, args.rate, args.overwrite)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return report_folder(result, f"resampled to {args.rate} Hz in {args.output}")


if __name__ == "__main__":
    sys.exit(main())
