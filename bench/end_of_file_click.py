"""The end of refined files: is there a click where a recording ends in silence?

Refines the demo clips (demo/audio/clean) with the demo model after appending silence, at lengths
chosen so that the last partial hop holds `--tail-samples` samples (250 of 256: the worst case of a
near-empty last hop) and the frame count either is or is not a multiple of the network's. Reports,
per file, the peak of the last 8 output samples divided by the rms of the 4,000 samples before them
(the acceptance bound of issue 11 is 6), and the same ratio for the input.

The noisy side is the clip plus white noise (seeded) and the processed side is 0.9 x noisy, so the
tail is low-level noise, not digital silence, and the ratio of a clean tail stays near that of
Gaussian noise (about 2-3).
"""

import argparse
import glob
import os

import numpy as np

from common import markdown_table, record
from diffiner.audio.io import load_audio
from diffiner.checkpoints import load_model
from diffiner.pipeline import Refiner
from diffiner.seeding import numpy_rng
from diffiner.spectrogram import PUBLISHED, num_frames

HOP_LENGTH = PUBLISHED.hop_length

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_MODEL = os.path.join(REPO, "demo", "model", "diffiner_demo.pt")
TAIL = 8
BEFORE = 4000


def length_with(frames_mod: int, multiple: int, tail: int, minimum: int) -> int:
    """The smallest length >= `minimum` whose last hop holds `tail` samples and whose frame count
    is `frames_mod` modulo `multiple`."""
    samples = (minimum // HOP_LENGTH) * HOP_LENGTH + tail
    while num_frames(samples) % multiple != frames_mod % multiple:
        samples += HOP_LENGTH
    return samples


def tail_ratio(audio: np.ndarray) -> float:
    """Peak of the last TAIL samples over the rms of the BEFORE samples preceding them."""
    before = audio[-TAIL - BEFORE:-TAIL].astype(np.float64)
    return float(np.abs(audio[-TAIL:]).max() / np.sqrt(np.mean(before ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEMO_MODEL, help="checkpoint (default: the demo model), with its model_config.yml beside it")
    parser.add_argument("--steps", default="ddim50", help="the sampler's respacing (default: the demo's ddim50)")
    parser.add_argument("--excerpt", type=float, default=1.5,
                        help="seconds of speech kept from the end of each clip (the tail is what matters; "
                             "shorter inputs keep this affordable on a CPU)")
    parser.add_argument("--silence", type=float, default=0.5, help="seconds of silence appended to each clip")
    parser.add_argument("--noise-rms", type=float, default=0.016, help="rms of the white noise in the noisy side")
    parser.add_argument("--tail-samples", type=int, default=250, help="samples in the last, partial hop")
    parser.add_argument("--files", type=int, default=4, help="how many demo clips (sorted by name)")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to BENCHMARKS.md")
    args = parser.parse_args()

    model, diffusion = load_model(args.model, timestep_respacing=args.steps)
    refiner = Refiner(model, diffusion, device="cpu")
    multiple = refiner.width_bucket
    rows, worst = [], {}
    for index, path in enumerate(sorted(glob.glob(os.path.join(REPO, "demo", "audio", "clean", "*.wav")))[:args.files]):
        clean, rate = load_audio(path)
        clean = clean[0, -int(args.excerpt * rate):]
        minimum = clean.size + int(args.silence * rate)
        for case, frames_mod in (("frames % multiple == 0", 0), ("frames % multiple == 3", 3)):
            samples = length_with(frames_mod, multiple, args.tail_samples, minimum)
            padded = np.pad(clean, (0, samples - clean.size))
            noise = numpy_rng(0, os.path.basename(path)).standard_normal(samples) * args.noise_rms
            noisy = (padded + noise).astype(np.float32)
            refined = refiner.refine(noisy, 0.9 * noisy, rate, key=os.path.basename(path))
            ratio = tail_ratio(refined)
            worst[case] = max(worst.get(case, 0.0), ratio)
            rows.append([os.path.basename(path), samples, num_frames(samples), refiner.padded_width(samples), case,
                         f"{tail_ratio(noisy):.2f}", f"{ratio:.2f}", f"{np.abs(refined[-TAIL:]).max():.4f}"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    table = markdown_table(["file", "samples", "frames", "network width", "case", "input ratio",
                            "refined ratio", "refined peak of last 8"], rows)
    notes = (f"Ratio = peak of the last {TAIL} samples / rms of the {BEFORE} before them (bound: 6). Demo model "
             f"({os.path.relpath(args.model, REPO)}, {args.steps}), Diffiner+ defaults, seed 0; "
             f"the last {args.excerpt} s of each demo clip with {args.silence} s of silence appended, white noise of rms {args.noise_rms} in the noisy side, processed "
             f"= 0.9 x noisy, last hop {args.tail_samples} samples. Worst refined ratio: "
             + ", ".join(f"{case}: {value:.2f}" for case, value in worst.items()) + ".")
    record("End-of-file click (demo model)", table, notes, save=not args.no_record)


if __name__ == "__main__":
    main()
