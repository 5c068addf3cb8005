"""`diffiner-resample IN OUT --rate 16000`: resample every audio file of a folder tree.

Stage 1 of run_example.sh: the VoiceBank+DEMAND test set is 48 kHz while the model works at
16 kHz. The original script called sox for this; here the package's own resampler (soxr, very
high quality) does it, so no system tool is needed.
"""

import sys
from typing import Optional, Sequence

from ..audio.folders import FolderResult, convert_folder
from ..audio.io import resample
from ..spectrogram import PUBLISHED
from ..flags import CONSOLE_FLAGS, OVERWRITE_FLAG, Flag, command_parser
from ..errors import usage_errors
from .common import check_number, report_folder, run_command, setup_logging, show_progress


WRITER = "diffiner-resample"  # in output folders' lock files


def resample_folder(in_root: str, out_root: str, rate: int = PUBLISHED.sample_rate,
                    overwrite: bool = False, progress: bool = True) -> FolderResult:
    """Write every file under `in_root` at `rate` Hz (same channels, 16-bit PCM) under `out_root`.

    16-bit because that is what the corpora this is used on (VoiceBank+DEMAND) store, and what
    sox wrote in the original script.
    """
    return convert_folder(in_root, out_root, lambda rel, audio, sr: (resample(audio, sr, rate), rate), overwrite,
                          progress=progress, desc=f"resampling to {rate} Hz", writer=WRITER,
                          settings={"rate": rate})


def build_parser():
    parser = command_parser(
        "Resample every .wav/.flac file under IN to OUT, keeping relative paths; outputs already done are skipped, "
        "another --rate into OUT is refused unless --overwrite.",
        {"settings": [
            Flag("rate", PUBLISHED.sample_rate, "target sample rate in Hz"),
            OVERWRITE_FLAG,
            *CONSOLE_FLAGS,
        ]}, prog="diffiner-resample")
    parser.add_argument("input", metavar="IN", help="folder searched recursively (OUT inside it is ignored)")
    parser.add_argument("output", metavar="OUT", help="output folder (not IN, nor a folder containing it; inside "
                        "IN only when new or holding earlier diffiner-resample outputs)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns 1 when some file failed, 2 for unusable arguments (IN not a folder,
    OUT onto IN)."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        setup_logging(args.debug, args.quiet)
        check_number("--rate", args.rate, 1)
        with usage_errors(FileNotFoundError):
            result = resample_folder(args.input, args.output, args.rate, args.overwrite, show_progress(args))
        return report_folder(result, f"resampled to {args.rate} Hz in {args.output}")

    return run_command(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
