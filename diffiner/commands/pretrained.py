"""`python -m diffiner.commands.pretrained [published|FILE]`: the checked file of the published
weights, its path printed on stdout.

`published` (the default) is the cached copy (see `diffiner.pretrained`), downloaded first when
it is not there yet; FILE is a copy of your own. Either is read and must have the published
layout, else the command ends with one line (exit 2). run_example.sh resolves its weights with
it, so a renamed other checkpoint is refused before anything is refined; to download the
weights ahead of a multi-process run, run it once.
"""

import sys
from typing import Optional, Sequence

from ..download import as_url
from ..errors import usage_errors
from ..flags import CONSOLE_FLAGS, Flag, command_parser
from ..pretrained import FILE_NAME, PUBLISHED_NAME, URL_ENV, check_published_layout, fetch_published, published_path
from .common import run_command, setup_logging, show_progress


def build_parser():
    parser = command_parser(
        f"Print the path of the published weights ({FILE_NAME}) after checking their layout; "
        f"'{PUBLISHED_NAME}' is the cached copy, downloaded on first use.",
        {"settings": [
            Flag("url", None, f"where to download the published weights from when they are not cached: a URL or a local "
                            f"file, checked and copied in (default: ${URL_ENV}, else Zenodo)", metavar="URL|FILE"),
            *CONSOLE_FLAGS,
        ]}, prog="python -m diffiner.commands.pretrained")
    parser.add_argument("weights", nargs="?", default=PUBLISHED_NAME, metavar="published|FILE",
                        help="the cached published weights (default), or a file that must hold them")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: 0 and the path on stdout; 2 for a file that is missing or not the published
    weights; 1 when the download fails (the message says where to put the file by hand)."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        setup_logging(args.debug, args.quiet)
        path = args.weights
        if path == PUBLISHED_NAME:
            path = fetch_published(as_url(args.url) if args.url else "", progress=show_progress(args))
        with usage_errors(ValueError, FileNotFoundError):
            try:
                check_published_layout(path)
            except ValueError as exc:
                if path != published_path():
                    raise
                raise ValueError(f"{exc}; delete it to download the published weights again") from exc
        print(path)
        return 0

    return run_command(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
