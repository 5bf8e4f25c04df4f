"""The ``bscompress`` command line: parses options, calls the Python API, renders with rich.

One module per command (``inspect``, ``pack``, ``evaluate``, ``decompose``, ``export``,
``bench``, ``upcycle``; ``train`` holds the recipe commands ``finetune`` and ``run``), each
registering itself on the typer app of :mod:`bscompress.app.cli.common`, which holds what they
share (the app, the option types, error handling, model loading, the plan table). A command
module imports ``common`` and no other command. Exit codes: 0 ok, 1 a check failed, 2 bad
input, 3 internal error (a bug: please report it with the output of ``--debug``).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from bscompress.app.cli.common import StageBar, app

# the commands register themselves on ``app``, in the order ``--help`` lists them
# isort: off
from bscompress.app.cli import inspect, pack, evaluate, decompose  # noqa: F401
from bscompress.app.cli import export, bench, train, upcycle  # noqa: F401
# isort: on

__all__ = ["StageBar", "app", "main"]


def _terminate(signum: int, _frame: Any) -> None:
    """SIGTERM unwinds like an error (temporary outputs are removed on the way out)."""
    raise SystemExit(128 + signum)


def main() -> None:
    """Console-script entry point."""
    import signal

    with contextlib.suppress(ValueError):  # not in the main thread
        signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="bscompress")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
