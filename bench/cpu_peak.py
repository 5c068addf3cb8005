"""The published-size forward on this CPU against the CPU's own peak, in one run.

Prints (and appends to BENCHMARKS.md with the machine line) the best float32 and bfloat16 matrix
product throughput measured here, then one forward of the published-size network (164 M
parameters, random weights) at widths 256 and 512 frames in every execution setting, with its
TFLOP/s (FLOPs counted by torch.utils.flop_counter) and its fraction of the best bf16 matmul.
The forwards run as refining runs them: through `NetworkRunner`, inside one autocast session
(`NetworkRunner.session`), after one untimed call of the same shape.

`--profile` adds the top operators of torch.profiler for the default setting at each width.

    python bench/cpu_peak.py                  # everything, appended to BENCHMARKS.md
    python bench/cpu_peak.py --widths 256 --settings auto --profile --no-record
"""

import argparse
import time
from typing import Dict, List, Sequence

import torch

from common import markdown_table, record
from diffiner.acceleration import ExecutionSettings, NetworkRunner
from diffiner.script_util import create_model_and_diffusion

try:
    from torch.utils.flop_counter import FlopCounterMode
except ImportError:  # torch < 2.1
    FlopCounterMode = None

# name -> (precision, channels_last); "auto" is whatever refining picks on this machine.
SETTINGS = {
    "fp32": ("fp32", False),
    "fp32+channels-last": ("fp32", True),
    "bf16": ("bf16", False),
    "bf16+channels-last": ("bf16", True),
    "auto": ("auto", None),
}
MATMUL_SIZES = (1024, 2048, 4096)


def best_matmul_tflops(dtype: torch.dtype, repeats: int) -> float:
    """The best TFLOP/s of square matrix products of MATMUL_SIZES in `dtype`."""
    best = 0.0
    for n in MATMUL_SIZES:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e12)
    return best


def forward_flops(model: torch.nn.Module, width: int) -> float:
    if FlopCounterMode is None:
        return float("nan")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 2, 256, width), torch.zeros(1, dtype=torch.long))
    return float(counter.get_total_flops())


def time_forward(model: torch.nn.Module, precision: str, channels_last, width: int, repeats: int,
                 profile_rows: int = 0) -> Dict:
    """Best seconds of `repeats` forwards of one (1, 2, 256, width) input, after one untimed call."""
    settings = ExecutionSettings(precision, channels_last).resolved(torch.device("cpu"))
    runner = NetworkRunner(model, settings.precision, settings.channels_last)
    x, t = torch.randn(1, 2, 256, width), torch.tensor([100])
    best, table = float("inf"), ""
    with torch.no_grad(), runner.session():
        runner(x, t)
        for _ in range(repeats):
            start = time.perf_counter()
            runner(x, t)
            best = min(best, time.perf_counter() - start)
        if profile_rows:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                runner(x, t)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=profile_rows)
    model.to(memory_format=torch.contiguous_format)  # the next setting starts from the default layout
    return dict(seconds=best, resolved=f"{settings.precision}{'+channels-last' if settings.channels_last else ''}",
                profile=table)


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="256,512", help="frames per forward, comma list")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma list of: " + ", ".join(SETTINGS))
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per setting and width (best kept)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of 'auto'")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)

    peaks = {name: best_matmul_tflops(dtype, 3) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"best matmul: fp32 {peaks['fp32']:.3f} TFLOP/s, bf16 {peaks['bf16']:.3f} TFLOP/s", flush=True)
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion()
    model.eval()
    rows: List[List] = []
    profiles = []
    for width in (int(w) for w in args.widths.split(",")):
        flops = forward_flops(model, width)
        for name in args.settings.split(","):
            precision, channels_last = SETTINGS[name]
            result = time_forward(model, precision, channels_last, width, args.repeats,
                                  profile_rows=12 if args.profile and name == "auto" else 0)
            tflops = flops / result["seconds"] / 1e12
            rows.append([width, name, result["resolved"], f"{result['seconds']:.3f}", f"{tflops:.3f}",
                         f"{100 * tflops / peaks['bf16']:.0f}%"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
            if result["profile"]:
                profiles.append(f"Top operators, {name} ({result['resolved']}), width {width}:\n\n```\n"
                                f"{result['profile']}\n```")
    table = markdown_table(["width", "setting", "runs as", "s per forward", "TFLOP/s", "of best bf16 matmul"], rows)
    notes = (f"Best matmul on this CPU in this run ({'/'.join(map(str, MATMUL_SIZES))} square, best of 3): "
             f"fp32 {peaks['fp32']:.3f} TFLOP/s, bf16 {peaks['bf16']:.3f} TFLOP/s. One forward of batch 1 of the "
             f"published-size network (random weights; {flops / 1e9:.0f} GFLOP at width {width}, counted by "
             "torch.utils.flop_counter), best of "
             f"{args.repeats} after one untimed call, inside one autocast session as refining runs it.")
    if profiles:
        notes += "\n\n" + "\n\n".join(profiles)
    record("CPU peak and the published-size forward", table, notes, save=not args.no_record)


if __name__ == "__main__":
    main()
