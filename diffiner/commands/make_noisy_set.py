"""`python -m diffiner.commands.make_noisy_set CLEAN OUT`: the demo's noisy clips, one deterministic
noise condition per clean file (stage 1 of `run_example.sh --demo`)."""

import os
import sys
from typing import Optional, Sequence

from ..audio.mixing import CONDITIONS_FILE, DEFAULT_SNRS, NOISE_COLOURS, make_noisy_set
from ..flags import CONSOLE_FLAGS, OVERWRITE_FLAG, Flag, command_parser
from ..errors import usage_errors
from .common import report_folder, run_command, setup_logging, show_progress


def build_parser():
    parser = command_parser(
        "Make the demo's noisy set: one deterministic noise condition per clean file. A rerun skips the files "
        "already made with the same settings; other settings are refused unless --overwrite.", {"settings": [
            Flag("snrs", list(DEFAULT_SNRS), "SNRs in dB", type=float, nargs="+"),
            Flag("colours", list(NOISE_COLOURS), "noise colours", choices=NOISE_COLOURS, nargs="+"),
            Flag("seed", 0, "seed of the noise"),
            OVERWRITE_FLAG,
            *CONSOLE_FLAGS,
        ]}, prog="python -m diffiner.commands.make_noisy_set")
    parser.add_argument("clean", metavar="CLEAN", help="folder of clean clips")
    parser.add_argument("output", metavar="OUT", help="where the noisy clips and conditions.csv go (not CLEAN; "
                        "inside CLEAN only when new or holding earlier noisy sets)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns 1 when some clean file could not be used, 2 for unusable arguments."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        setup_logging(args.debug, args.quiet)
        with usage_errors(ValueError, FileNotFoundError):
            result = make_noisy_set(args.clean, args.output, args.snrs, args.colours, args.seed,
                                    progress=show_progress(args), overwrite=args.overwrite)
        return report_folder(result, f"noisy files in {args.output} (conditions in "
                                     f"{os.path.join(args.output, CONDITIONS_FILE)})")

    return run_command(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
