"""What every command does the same way: logging, the error boundary, and folder-run reports.

The error boundary is the contract of every command: an error is one line on stderr naming the
problem (and the file), never a traceback (`--debug` shows it); exit status 2 for a problem with
what was asked (flags, folders, checkpoints: `UsageError`), 1 for a run that failed or had failed
files, 130 for Ctrl-C.
"""

import logging
import sys
import traceback
from typing import Callable

from ..audio.folders import FolderResult

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """A problem with what the user asked for (a flag, a folder, a checkpoint): exit status 2."""


def setup_logging() -> None:
    """INFO-level log lines on stderr, naming the module they come from."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


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
    except UsageError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # the boundary: whatever went wrong, one line, not a traceback
        if debug:
            raise
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        origin = f" (in {where.name}, {where.filename.rsplit('/', 1)[-1]}:{where.lineno})" if where else ""
        print(f"error: {type(exc).__name__}: {exc}{origin}; rerun with --debug for the traceback", file=sys.stderr)
        return EXIT_FAILED


def report_folder(result: FolderResult, headline: str) -> int:
    """Print each failure (stderr) and `headline: counts`; return the exit status (1: failures)."""
    for rel, reason in sorted(result.failed.items()):
        print(f"FAILED {rel}: {reason}", file=sys.stderr)
    print(f"{headline}: {result.describe()}")
    return EXIT_FAILED if result.failed else EXIT_OK
