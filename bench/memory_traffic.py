"""Bytes a forward of the published-size network moves, per frame, and its dtype conversions.

A GPU runs this network's elementwise layers (GroupNorm, SiLU, FiLM, adds, cat) at the speed of
its memory, so the GPU estimate in BENCHMARKS.md counts bytes as well as FLOPs. Each ATen
operator of one forward is counted as reading its tensor inputs and writing its outputs once
(views move nothing); that is what an unfused eager kernel does at least. Counted on the CPU
with random weights, as refining runs the network (`NetworkRunner` inside one autocast session,
second call), in the default layout, which CUDA uses.

    python bench/memory_traffic.py [--width 256] [--no-record]
"""

import argparse
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from common import markdown_table, record
from diffiner.acceleration import NetworkRunner
from diffiner.script_util import create_model_and_diffusion


class Traffic(TorchDispatchMode):
    """Bytes read and written per operator, and the count of dtype conversions."""

    def __init__(self):
        super().__init__()
        self.bytes = Counter()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            name = str(func.overloadpacket).replace("aten.", "")
            self.bytes[name] += sum(t.numel() * t.element_size() for t in tensors)
            self.calls[name] += 1
        return out


def measure(model: torch.nn.Module, precision: str, width: int) -> Traffic:
    runner = NetworkRunner(model, precision)
    x, t = torch.randn(1, 2, 256, width), torch.tensor([100])
    traffic = Traffic()
    with torch.no_grad(), runner.session():
        runner(x, t)
        with traffic:
            runner(x, t)
    return traffic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion()
    model.eval()
    rows = []
    for precision in ("fp32", "bf16"):
        traffic = measure(model, precision, args.width)
        total = sum(traffic.bytes.values()) / args.width / 1e6
        top = ", ".join(f"{name} {b / args.width / 1e6:.1f}" for name, b in traffic.bytes.most_common(6))
        rows.append([precision, f"{total:.1f}", sum(traffic.calls.values()), traffic.calls["_to_copy"], top])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    table = markdown_table(["precision", "MB per frame", "ATen ops", "dtype conversions", "largest (MB per frame)"],
                           rows)
    notes = (f"One forward of batch 1 at width {args.width}, published-size network, random weights; every "
             "non-view ATen operator counted as reading its inputs and writing its outputs once.")
    record("Memory traffic of the published-size forward", table, notes, save=not args.no_record)


if __name__ == "__main__":
    main()
