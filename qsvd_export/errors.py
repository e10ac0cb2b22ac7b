"""Error classes the CLI turns into one-line messages with distinct exit codes.

Exit codes: 2 usage (bad flags, bad output folder), 3 bad model or input file,
4 unsupported model, 5 runtime failure (an execution provider or package missing at run time),
130 interrupted. Anything else is an internal error (exit 1) and shows a traceback only with --debug.
"""

from __future__ import annotations


class QsvdError(Exception):
    """Base class: a problem the user can act on. ``str(err)`` is the one-line message."""

    exit_code = 1


class UsageError(QsvdError):
    exit_code = 2


class BadInputError(QsvdError):
    """A model, graph, plan or data file that cannot be read or is malformed."""

    exit_code = 3


class UnsupportedModelError(QsvdError):
    """A well-formed model this tool cannot handle (architecture, ops, layout)."""

    exit_code = 4


class RuntimeFailure(QsvdError):
    """An execution provider, optional package or runtime step failed."""

    exit_code = 5


class Interrupted(QsvdError):
    exit_code = 130


SIGTERM_MESSAGE = "interrupted by SIGTERM; no output written"
_terminated = False


def mark_terminated() -> None:
    """Record that SIGTERM arrived (the CLI's handler; the exception it raises may be swallowed by a library)."""
    global _terminated
    _terminated = True


def terminated() -> bool:
    return _terminated


def raise_if_terminated() -> None:
    """Raise :class:`Interrupted` if SIGTERM arrived, whatever became of the handler's exception."""
    if _terminated:
        raise Interrupted(SIGTERM_MESSAGE)
