"""`python -m diffiner.commands.make_noisy_set CLEAN OUT`: the demo's noisy clips, one deterministic
noise condition per clean file (stage 1 of `run_example.sh --demo`)."""

import os
import sys
from typing import Optional, Sequence

from ..audio.mixing import CONDITIONS_FILE, DEFAULT_SNRS, NOISE_COLOURS, make_noisy_set
from ..flags import Flag, command_parser


def build_parser():
    parser = command_parser(
        "Make the demo's noisy set: one deterministic noise condition per clean file.", {"settings": [
            Flag("snrs", list(DEFAULT_SNRS), "SNRs in dB", type=float, nargs="+"),
            Flag("colours", list(NOISE_COLOURS), "noise colours", choices=NOISE_COLOURS, nargs="+"),
            Flag("seed", 0, "seed of the noise"),
        ]}, prog="python -m diffiner.commands.make_noisy_set")
    parser.add_argument("clean", metavar="CLEAN", help="folder of clean clips")
    parser.add_argument("output", metavar="OUT", help="where the noisy clips and conditions.csv go")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = make_noisy_set(args.clean, args.output, args.snrs, args.colours, args.seed)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(written)} noisy file(s) in {args.output}; conditions in {os.path.join(args.output, CONDITIONS_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
