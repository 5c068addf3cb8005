"""Frames the network processes per frame of audio: our width buckets against fixed-width padding.

Pure arithmetic on a VoiceBank-like length distribution, no network is run. The original code
padded every file to ceil(max_dur / 4.096 s) x 256 frames (768 for max_dur 10 s); we pad each
file only to the network's multiple (32 frames for the published model), past at least one frame
after the signal (diffiner.pipeline.padded_width says why).
"""

import argparse
import math

from common import markdown_table, record, voicebank_like_durations
from diffiner.pipeline import padded_width
from diffiner.spectrogram import num_frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-files", type=int, default=824)
    parser.add_argument("--max-dur", type=float, default=10.0)
    parser.add_argument("--multiple", type=int, default=32, help="the network's width multiple")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to BENCHMARKS.md")
    args = parser.parse_args()

    durations = voicebank_like_durations(args.num_files)
    samples = [int(round(d * 16000)) for d in durations]
    audio_frames = sum(num_frames(n) for n in samples)
    max_samples = int(args.max_dur * 16000)
    ours = sum(padded_width(n, args.multiple, max_samples) for n in samples)
    original_width = math.ceil(args.max_dur / 4.096) * 256
    original = original_width * len(samples)
    rows = [
        ["ours: frames + 1, padded to a multiple of %d" % args.multiple, ours, f"{ours / audio_frames:.3f}"],
        ["original: fixed %d frames" % original_width, original, f"{original / audio_frames:.3f}"],
    ]
    table = markdown_table(["strategy", "network frames", "frames per audio frame"], rows)
    notes = (f"{len(samples)} files, {sum(durations) / 60:.1f} min of audio, mean {durations.mean():.2f} s, "
             f"min {durations.min():.2f} s, max {durations.max():.2f} s; {audio_frames} audio frames.")
    record("Padding overhead (VoiceBank-like lengths)", table, notes, save=not args.no_record)


if __name__ == "__main__":
    main()
