"""Exceptions whose message is meant for the user, and the exit codes they map to.

The CLI prints ``str(error)`` as one sentence and exits with ``error.exit_code``:
0 ok, 1 a check failed (parity, accuracy gate), 2 bad input (file, architecture, option),
130 stopped by a signal after saving what resumes the run.
"""

from __future__ import annotations


class BSCompressError(Exception):
    """Base class: an error the user can act on; ``str(self)`` says what and what to do."""

    exit_code = 2


class BadInput(BSCompressError):
    """A file, architecture, layer name or option the user gave is wrong (exit code 2)."""

    exit_code = 2


class CheckFailed(BSCompressError):
    """A verification the user asked for did not pass (exit code 1)."""

    exit_code = 1


class Stopped(BSCompressError):
    """SIGINT/SIGTERM stopped a run after saving what resumes it (exit code 130)."""

    exit_code = 130


def first_line(error: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` of ``error``, at most ``limit`` characters: a
    third-party failure (an exporter, a compiler) named in one of our sentences."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:limit]

