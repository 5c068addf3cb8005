"""What a prior's front-end costs: spectrogram frames and network FLOPs per second of audio, for
the published architecture on the published 16 kHz front-end and on 24 and 48 kHz ones.

FLOPs are counted by torch (torch.utils.flop_counter) on the meta device: no weights, no
arithmetic, any machine. One network call is counted on the segment of a 10 s recording (the
default --max-dur) as the refiner pads it, so attention's cost at that width is included; a
refinement makes one call per reverse step (200 with the published ddim200).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import markdown_table, record  # noqa: E402
from diffiner.pipeline import padded_width  # noqa: E402
from diffiner.script_util import create_model_and_diffusion  # noqa: E402
from diffiner.spectrogram import FrontEnd  # noqa: E402

FRONT_ENDS = {
    "16 kHz (published)": FrontEnd(16000, 512, 256),
    "24 kHz": FrontEnd(24000, 768, 192),
    "48 kHz": FrontEnd(48000, 1536, 384),
}
SEGMENT_SECONDS = 10.0
STEPS = 200


def call_flops(front_end: FrontEnd, width: int) -> float:
    """FLOPs of one call of the published network, built for `front_end`, on one segment."""
    from torch.utils.flop_counter import FlopCounterMode

    settings = dict(sample_rate=front_end.sample_rate, n_fft=front_end.n_fft, hop_length=front_end.hop_length)
    with torch.device("meta"):
        model, _ = create_model_and_diffusion(**settings)
    x = torch.zeros(1, model.in_channels, front_end.num_bins, width, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.zeros(1, dtype=torch.long, device="meta"))
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()
    rows, base = [], None
    for name, front_end in FRONT_ENDS.items():
        samples = int(SEGMENT_SECONDS * front_end.sample_rate)
        width = padded_width(samples, 32, samples, front_end)
        per_second = call_flops(front_end, width) / SEGMENT_SECONDS
        base = base or per_second
        rows.append([name, f"{front_end.n_fft} / {front_end.hop_length}", front_end.num_bins,
                     f"{front_end.sample_rate / front_end.hop_length:g}", width, f"{per_second / 1e9:.0f}",
                     f"{per_second * STEPS / 1e12:.1f}", f"{per_second / base:.2f}x"])
    table = markdown_table(["front-end", "n_fft / hop", "bins", "frames per s", "segment width (10 s)",
                            "GFLOP per s of audio per step", f"TFLOP per s of audio ({STEPS} steps)",
                            "vs 16 kHz"], rows)
    notes = ("The published architecture (164 M parameters, 6 levels, attention at downsampling 16 and 32) "
             "unchanged but for its front-end; FLOPs counted by torch.utils.flop_counter on the meta device "
             f"(a multiply-add is 2 FLOPs) for one call on a {SEGMENT_SECONDS:g} s segment, padded as the refiner "
             "pads it, divided by its seconds. The frames per second of audio are sample rate / hop.")
    record("Front-end cost: frames and FLOPs per second of audio", table, notes, save=not args.no_save)


if __name__ == "__main__":
    main()
