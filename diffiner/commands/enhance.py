"""`diffiner-enhance NOISY OUT --enhancer noisereduce`: make a processed folder from a noisy one, or a
processed file from a noisy file."""

import sys
from typing import Optional, Sequence

from ..audio.enhancers import ENHANCERS, enhance_folder
from ..flags import CONSOLE_FLAGS, OVERWRITE_FLAG, Flag, command_parser
from ..errors import usage_errors
from .common import report_folder, run_command, setup_logging, show_progress


def build_parser():
    parser = command_parser(
        "Enhance every .wav/.flac file under NOISY (or the one file NOISY) with a preceding SE method, writing the "
        "same relative paths under OUT; outputs already done are skipped, another enhancer into OUT is refused "
        "unless --overwrite.", {"settings": [
            Flag("enhancer", ENHANCERS[0], "the SE method", choices=ENHANCERS, aliases=("name",)),
            OVERWRITE_FLAG,
            *CONSOLE_FLAGS,
        ]}, prog="diffiner-enhance")
    parser.add_argument("noisy", metavar="NOISY", help="folder of noisy recordings (searched recursively), or one "
                        "noisy file")
    parser.add_argument("output", metavar="OUT", help="output folder (not NOISY; inside NOISY only when new or "
                        "holding earlier diffiner-enhance outputs); for one NOISY file, OUT/<its name>, or OUT "
                        "itself where it ends in .wav or .flac")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns 1 when some file failed, 2 for unusable arguments (a missing file or
    folder, OUT onto NOISY, the enhancer's package not installed)."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        setup_logging(args.debug, args.quiet)
        with usage_errors(ImportError, FileNotFoundError):
            result = enhance_folder(args.enhancer, args.noisy, args.output, args.overwrite,
                                   progress=show_progress(args))
        return report_folder(result, f"{args.enhancer} outputs in {args.output}")

    return run_command(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
