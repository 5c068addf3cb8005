"""Shared pieces of the benchmarks: the test-set length distribution and the results log."""

import datetime
import os
import platform
import subprocess
import sys
from typing import List, Optional, Sequence

import numpy as np
import torch

BENCHMARKS_MD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")


def voicebank_like_durations(num_files: int = 824, seed: int = 0) -> np.ndarray:
    """Seconds per file shaped like the VoiceBank+DEMAND test set: 1.5-10 s, mean about 2.5 s.

    A log-normal clipped to the range; the parameters were chosen so that the mean of 824
    draws lands near 2.5 s (the real set is 824 files, about 35 minutes).
    """
    rng = np.random.default_rng(seed)
    durations = np.clip(rng.lognormal(mean=0.83, sigma=0.45, size=num_files), 1.5, 10.0)
    return np.round(durations * 16000) / 16000


def machine_description() -> str:
    """CPU or GPU model, core count and library versions, for the record."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = (f"GPU: {props.name}, {props.total_memory / 2 ** 30:.0f} GiB, {torch.cuda.device_count()} visible, "
                  f"CUDA {torch.version.cuda}")
    else:
        device = f"CPU: {_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return (f"{device}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {np.__version__}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(BENCHMARKS_MD)).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def markdown_table(header: Sequence[str], rows: List[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def record(title: str, table: str, notes: str = "", save: bool = True, path: str = BENCHMARKS_MD,
           command: Optional[str] = None) -> None:
    """Print a result table and, with `save`, append it to BENCHMARKS.md with the machine and
    the command (default: python and this script's arguments)."""
    if command is None:
        command = "python " + " ".join([os.path.relpath(sys.argv[0], os.path.dirname(path))] + sys.argv[1:])
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    block = (f"\n## {title} ({stamp}, commit {git_revision()})\n\n"
             f"Machine: {machine_description()}  \nCommand: `{command}`\n\n{table}\n")
    if notes:
        block += f"\n{notes}\n"
    print(block)
    if save:
        with open(path, "a") as f:
            f.write(block)
