"""What every command does the same way: logging, the error boundary, checks of the flags that
several commands share, and folder-run reports.

The error boundary is the contract of every command: an error is one line on stderr naming the
problem (and the file), never a traceback (`--debug` shows it). The project's own errors carry
their exit status (`diffiner.errors`): 2 for a problem with what was asked (flags, folders,
checkpoints), 1 for a run that failed or had failed files; anything else is 1, and Ctrl-C 130.
"""

import logging
import math
import sys
import traceback
from typing import Callable, Dict, Optional

from ..audio.folders import FolderResult
from ..errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, DiffinerError, UsageError, error_text



def setup_logging(debug: bool = False, quiet: bool = False) -> None:
    """INFO-level log lines on stderr, naming the module they come from; with `debug`, the
    package's DEBUG lines too (among them the traceback of every file that failed); with `quiet`
    (--quiet), warnings and errors only."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.NOTSET
    logging.getLogger("diffiner").setLevel(level)


def check_number(flag: str, value: float, minimum: float, *, strict: bool = False) -> None:
    """UsageError unless `value` is finite and >= `minimum` (> with `strict`)."""
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise UsageError(f"{flag} must be a finite number {bound}, got {value}")


def check_respacing(respacing: str, diffusion_steps: int) -> None:
    """UsageError unless `respacing` (a --timestep-respacing value) can be taken from
    `diffusion_steps` steps; checked before any model is built."""
    from ..respace import space_timesteps  # imported here: the folder commands need no torch

    check_number("--diffusion-steps", diffusion_steps, 1)
    if respacing:
        try:
            space_timesteps(diffusion_steps, respacing)
        except ValueError as exc:
            raise UsageError(f"--timestep-respacing {exc}") from exc  # the message names the value


def resolve_device(requested: Optional[str], no_gpu: bool = False) -> str:
    """The torch device to run on: `requested`, checked to exist and work here, else cuda when
    available, else cpu. UsageError for a name torch does not know or a device that is absent."""
    import torch  # imported here: the folder commands need no torch

    if no_gpu:
        return "cpu"
    if not requested:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise UsageError(f"--device {requested}: not a torch device (e.g. cpu, cuda, cuda:1)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {requested}: CUDA is not available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) visible")
    try:
        # Results come back to the CPU to be written: a device that cannot hand them back (meta
        # tensors hold no data) is refused here, before any file is written.
        torch.empty(1, device=device).cpu()
    except Exception as exc:  # torch raises RuntimeError, NotImplementedError or AssertionError, by backend
        raise UsageError(f"--device {requested}: not usable here ({error_text(exc)})") from exc
    return requested


def run_command(body: Callable[[], int], debug: bool = False) -> int:
    """Run a command's body and turn every error into one line on stderr and an exit status.

    With `debug`, errors propagate with their traceback instead.
    """
    try:
        return body()
    except KeyboardInterrupt:
        if debug:
            raise
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DiffinerError as exc:  # its message names the file and the problem already
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # the boundary: whatever went wrong, one line, not a traceback
        if debug:
            raise
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        origin = f" (in {where.name}, {where.filename.rsplit('/', 1)[-1]}:{where.lineno})" if where else ""
        print(f"error: {type(exc).__name__}: {error_text(exc)}{origin}; rerun with --debug for the traceback",
              file=sys.stderr)
        return EXIT_FAILED


def print_failures(failed: Dict[str, str]) -> None:
    """One line on stderr per failed file (or folder), sorted: `FAILED path: reason`."""
    for rel, reason in sorted(failed.items()):
        print(f"FAILED {rel}: {reason}", file=sys.stderr)


def report_folder(result: FolderResult, headline: str) -> int:
    """Print each failure (stderr) and `headline: counts`; return the exit status (1: failures)."""
    print_failures(result.failed)
    print(f"{headline}: {result.describe()}")
    return EXIT_FAILED if result.failed else EXIT_OK
