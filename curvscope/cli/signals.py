"""How a signal ends a run: SIGTERM like Ctrl-C, one line, exit 143 / 130, never a death by signal.

Imports nothing heavy: :func:`curvscope.cli.main` installs the handler before PyTorch loads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler: the run unwinds like on Ctrl-C (staged outputs removed) and exits 143."""


def _raise_terminated(signum, frame):  # noqa: ARG001
    raise Terminated()


def install() -> None:
    """SIGTERM raises :class:`Terminated` (in the main thread; elsewhere, e.g. under a test runner, the default
    stays)."""
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, _raise_terminated)


def ignore() -> None:
    """We are exiting on a signal: a second SIGINT/SIGTERM (a pending one, or an impatient user) must not turn
    the one-line exit into a traceback or a death by signal."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, signal.SIG_IGN)


def exit_now(code: int) -> None:
    """Exit with ``code`` at once (the outputs are already rolled back): ignore further signals, flush, and skip
    the interpreter's shutdown, where a pending signal would turn exit 130 into a death by signal."""
    ignore()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
