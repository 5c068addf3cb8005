"""What every command does the same way: logging setup and the closing report of a folder run."""

import logging
import sys

from ..audio.folders import FolderResult


def setup_logging() -> None:
    """INFO-level log lines on stderr, naming the module they come from."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def report_folder(result: FolderResult, headline: str) -> int:
    """Print each failure (stderr) and `headline: counts`; return the exit status (1: failures)."""
    for rel, reason in sorted(result.failed.items()):
        print(f"FAILED {rel}: {reason}", file=sys.stderr)
    print(f"{headline}: {result.describe()}")
    return 1 if result.failed else 0
