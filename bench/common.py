"""Shared pieces of the benchmarks: the test-set length distribution, the results log, and the
GPU check of gpu_acceptance.sh."""

import datetime
import os
import platform
import subprocess
import sys
import warnings
from typing import List, Optional, Sequence, Tuple

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
    # Imported here, not above: gpu_acceptance.sh's GPU check imports this module with a torch
    # that may be unable to import the package (a stand-in in the tests, a broken CUDA build).
    from diffiner.acceleration import NATIVE_BF16_FLAGS, cpu_flags

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = (f"GPU: {props.name}, {props.total_memory / 2 ** 30:.0f} GiB, {torch.cuda.device_count()} visible, "
                  f"CUDA {torch.version.cuda}")
    else:
        flags = sorted(cpu_flags() & NATIVE_BF16_FLAGS)
        device = (f"CPU: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                  f"native bf16: {' '.join(flags) if flags else 'none'} (AMX: "
                  f"{'yes' if any(f.startswith('amx') for f in cpu_flags()) else 'no'})")
    return (f"{device}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {np.__version__}")


def can_run_on(capability: Tuple[int, int], arches: Sequence[str]) -> bool:
    """Whether a torch build compiled for `arches` (torch.cuda.get_arch_list(): sm_XY machine
    code, compute_XY PTX) has kernels for a GPU of compute `capability` (major, minor).

    Machine code runs on GPUs of its major version and an equal or higher minor one (sm_86 on an
    8.9 card, not sm_86 on a 9.0 one); PTX is compiled by the driver for its own or any later
    capability.
    """
    for arch in arches:
        kind, _, number = arch.partition("_")
        digits = number.rstrip("abcdefghijklmnopqrstuvwxyz")  # sm_90a, sm_100f: variants of 9.0, 10.0
        if not digits.isdigit():
            continue
        built = (int(digits[:-1]), int(digits[-1]))
        if kind == "sm" and built[0] == capability[0] and built[1] <= capability[1]:
            return True
        if kind == "compute" and built <= capability:
            return True
    return False


def cuda_problem(listed: Sequence[str]) -> Optional[str]:
    """Why this torch cannot run on the GPUs that nvidia-smi lists (`listed`: its CSV lines of
    index, name, compute capability and driver), in one line naming the driver and torch's
    kernels; None when it can run on every GPU it sees and sees them all.

    Each visible GPU must have kernels in the build (`can_run_on`) and run a matrix product.
    """
    cuda = torch.version.cuda or "none: a CPU build"
    problem = None
    # Asked first, so that torch's warning about why (torch warns once) lands here.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    # get_arch_list() answers [] whenever CUDA is unusable; the build's own flags still say what
    # it was compiled for.
    arches = torch.cuda.get_arch_list() or (getattr(torch._C, "_cuda_getArchFlags", lambda: "")() or "").split()
    if not available:
        # torch's warning, if any, says why (e.g. "The NVIDIA driver on your system is too old").
        why = "; ".join(str(w.message).splitlines()[0] for w in caught)
        problem = "torch.cuda.is_available() is False" + (f" ({why})" if why else "")
    elif torch.cuda.device_count() < len(listed) and "CUDA_VISIBLE_DEVICES" not in os.environ:
        problem = f"torch sees {torch.cuda.device_count()} of them"
    else:
        for index in range(torch.cuda.device_count()):
            capability = torch.cuda.get_device_capability(index)
            if not can_run_on(capability, arches):
                problem = f"GPU {index} is sm_{capability[0]}{capability[1]}, which this build has no kernels for"
                break
            try:
                x = torch.ones(64, 64, device=f"cuda:{index}")
                if (x @ x).sum().item() != 64 ** 3:
                    problem = f"GPU {index} computed a wrong matrix product"
                    break
            except RuntimeError as exc:
                problem = f"GPU {index} fails to run a matrix product: {str(exc).splitlines()[0]}"
                break
    if problem is None:
        return None
    gpus = "; ".join(line.strip() for line in listed)
    return (f"nvidia-smi lists {len(listed)} GPU(s) (index, name, compute capability, driver: {gpus}) but torch "
            f"{torch.__version__} (CUDA {cuda}; torch.cuda.get_arch_list(): {arches}) cannot use them: {problem}")


def cpu_model() -> str:
    """The CPU's model name as Linux reports it, else platform's guess."""
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
