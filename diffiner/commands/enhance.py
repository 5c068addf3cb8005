"""`diffiner-enhance NOISY OUT --name noisereduce`: make a processed folder from a noisy one."""

import sys
from typing import Optional, Sequence

from ..audio.enhancers import ENHANCERS, enhance_folder
from ..flags import Flag, command_parser
from .common import report_folder


def build_parser():
    parser = command_parser(
        "Enhance every .wav/.flac file under NOISY with a preceding SE method, writing the same relative paths "
        "under OUT; existing outputs are skipped.", {"settings": [
            Flag("name", ENHANCERS[0], "enhancer", choices=ENHANCERS),
            Flag("overwrite", False, "rewrite outputs that already exist"),
        ]}, prog="diffiner-enhance")
    parser.add_argument("noisy", metavar="NOISY", help="folder of noisy recordings (searched recursively)")
    parser.add_argument("output", metavar="OUT", help="output folder")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns 1 when some file could not be read, 2 for unusable arguments."""
    args = build_parser().parse_args(argv)
    try:
        result = enhance_folder(args.name, args.noisy, args.output, args.overwrite)
    except (ImportError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return report_folder(result, f"{args.name} outputs in {args.output}")


if __name__ == "__main__":
    sys.exit(main())
