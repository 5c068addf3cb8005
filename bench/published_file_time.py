"""The published-size model's time to refine one file here, at ddim200 and at fewer steps.

One mono recording (`--seconds`, default 4 s, at the model's rate) goes through `Refiner.refine`
with the published architecture and random weights (the time does not depend on them), at the
device's default execution settings (on a CPU with native bf16: bf16 autocast in channels-last;
`--precision` names another). Each step count builds its own model and is timed once, from the
call to the returned audio, after one untimed call at 2 steps that warms the same shapes.

    python bench/published_file_time.py                       # ddim200 and ddim50, appended to BENCHMARKS.md
    python bench/published_file_time.py --steps ddim20 --no-record
"""

import argparse
import time

import numpy as np
import torch

from common import markdown_table, record
from diffiner.pipeline import Refiner
from diffiner.script_util import create_model_and_diffusion


def refiner_for(steps: str, device: str, precision: str) -> Refiner:
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(timestep_respacing=steps)
    return Refiner(model, diffusion, device=device, precision=precision)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="ddim200,ddim50", help="comma list of ddimN")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--precision", default="auto", help="auto (the device's default), fp32, bf16 or fp16")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to BENCHMARKS.md")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for steps in args.steps.split(","):
        refiner = refiner_for(steps, device, args.precision)
        rate = refiner.sample_rate
        noisy = (0.1 * np.random.default_rng(0).standard_normal(int(args.seconds * rate))).astype(np.float32)
        processed = 0.5 * noisy
        refiner_for("ddim2", device, args.precision).refine(noisy, processed, rate)  # warm-up: same shapes
        start = time.perf_counter()
        refiner.refine(noisy, processed, rate)
        seconds = time.perf_counter() - start
        execution = refiner.settings.execution
        count = int(steps[len("ddim"):]) if steps.startswith("ddim") else len(steps.split(","))
        rows.append([steps, f"{execution.precision}{'+channels-last' if execution.channels_last else ''}",
                     f"{seconds:.1f}", f"{seconds / count:.3f}", f"{seconds / args.seconds:.1f}"])
        print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(["steps", "runs as", "s per file", "s per step", "real-time factor"], rows)
    notes = (f"One {args.seconds:g} s mono file at the model's rate through `Refiner.refine`, published "
             f"architecture (164 M parameters) with random weights, on {device}, timed once per step count after "
             "a 2-step warm-up of the same shapes.")
    record(f"The published-size model: one {args.seconds:g} s file", table, notes, save=not args.no_record)


if __name__ == "__main__":
    main()
