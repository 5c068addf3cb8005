"""The project's error contract: one base class whose errors carry their exit status.

Every error the project raises on purpose for a command's user is a `DiffinerError`: its message
is one line naming the file (or flag) and the problem, and `exit_code` is the status the command
ends with (`commands.common.run_command` needs one clause for all of them). Library callers
catch them like any exception; several also derive from the built-in type they replace
(OSError, ValueError), so that code written against those keeps working.
"""

import contextlib
from typing import Iterator, Type

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class DiffinerError(Exception):
    """An error for the user, in one line; `exit_code`: 1, the run failed."""

    exit_code = EXIT_FAILED


class UsageError(DiffinerError):
    """A problem with what the user asked for (a flag, a folder, a checkpoint): exit status 2."""

    exit_code = EXIT_USAGE


def error_text(exc: BaseException) -> str:
    """The message of an exception on one line (its type name when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): for errors
    whose later lines are advice for another audience (torch's out-of-memory hints)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@contextlib.contextmanager
def usage_errors(*types: Type[BaseException]) -> Iterator[None]:
    """Turn the given exception types, raised inside the block, into UsageError (exit status 2):
    for calls whose errors are, at that point, about what the user asked for."""
    try:
        yield
    except types as exc:
        raise UsageError(error_text(exc)) from exc
