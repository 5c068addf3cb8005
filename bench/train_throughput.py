"""Training throughput: samples per second per precision, with and without channels-last and SDPA.

Runs the real training step (diffiner.train_util.TrainLoop: forward, backward, AdamW, EMA) on
random spectrogram crops of the training shape (2, 256, image_size). On CUDA it uses the
published-size model; on a CPU-only machine a small model and a short crop, and says so.
"""

import argparse
import tempfile
import time
from typing import Dict

import torch

from common import markdown_table, record
from diffiner.logger import MetricsLogger
from diffiner.script_util import create_model_and_diffusion
from diffiner.train_util import TrainLoop
from diffiner.unet import set_sdpa

SMALL_MODEL = dict(image_size=64, num_channels=32, num_res_blocks=1, channel_mult="1,1,2,2",
                   attention_resolutions="8", num_heads=2)
CONFIGS = {
    "fp32": dict(), "fp32+channels-last": dict(channels_last=True), "fp32-no-sdpa": dict(sdpa=False),
    "bf16": dict(precision="bf16"), "bf16+channels-last": dict(precision="bf16", channels_last=True),
    "bf16-no-sdpa": dict(precision="bf16", sdpa=False),
    "fp16": dict(precision="fp16"), "fp16+channels-last": dict(precision="fp16", channels_last=True),
}


def measure(settings: Dict, model_settings: Dict, args) -> float:
    options = dict(settings)
    sdpa = options.pop("sdpa", True)
    torch.manual_seed(0)
    model, diffusion = create_model_and_diffusion(**model_settings)
    set_sdpa(model, sdpa)
    frames = model_settings.get("image_size", 256)
    with tempfile.TemporaryDirectory() as log_dir:
        metrics = MetricsLogger(log_dir, columns=["step"], enabled=False)
        loop = TrainLoop(model=model.to(args.device), diffusion=diffusion, batch_size=args.batch_size, lr=1e-4,
                         log_dir=log_dir, metrics=metrics, **options)
        batch = {"spec": torch.randn(args.batch_size, 2, 256, frames), "position": torch.arange(args.batch_size)}
        for _ in range(args.warmup):
            loop.run_step(batch)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            loop.run_step(batch)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return args.steps * args.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--steps", type=int, default=20 if cuda else 5, help="timed steps per config")
    parser.add_argument("--warmup", type=int, default=3 if cuda else 1)
    parser.add_argument("--batch-size", type=int, default=2 if cuda else 4)
    parser.add_argument("--small", action="store_true", default=not cuda, help="small model instead of the published size")
    parser.add_argument("--configs", default=None, help="comma list of: " + ", ".join(CONFIGS))
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to BENCHMARKS.md")
    args = parser.parse_args()

    # On a CPU, fp16 autocast is emulated and far slower than fp32: measured on request only.
    names = args.configs.split(",") if args.configs else [n for n in CONFIGS if cuda or "fp16" not in n]
    model_settings = dict(SMALL_MODEL) if args.small else {}
    rows = []
    for name in names:
        try:
            rate = measure(CONFIGS[name], model_settings, args)
        except (ValueError, RuntimeError) as exc:
            rows.append([name, "unsupported: " + str(exc).splitlines()[0][:80]])
            continue
        rows.append([name, f"{rate:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(["config", "samples/s"], rows)
    desc = ("SMALL model " + str(SMALL_MODEL) + " (a CPU stand-in, not the published size)") if args.small \
        else "published-size model (164.3 M parameters), 256-frame crops"
    notes = (f"Batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, {desc}. "
             "One step = forward, backward, AdamW update and EMA update (diffiner.train_util.TrainLoop).")
    record("Training throughput", table, notes, save=not args.no_record)


if __name__ == "__main__":
    main()
