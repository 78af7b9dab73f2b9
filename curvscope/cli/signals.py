"""How a signal ends a run: SIGTERM like Ctrl-C, one line, exit 143 / 130, never a death by signal.

Imports nothing heavy: :func:`curvscope.cli.main` installs the handlers as its first action, before anything
else loads. Until the command's body runs (:func:`arm`), a signal ends the process at once with its exit code
and one line (nothing has been written yet); from then on SIGINT raises ``KeyboardInterrupt`` and SIGTERM
:class:`Terminated`, so that the run unwinds (staged outputs removed) and ends with one line.

A signal that some library turns into another exception or exit (click turns ``KeyboardInterrupt`` into
"Aborted!" and exit 1) is still recognised: :func:`received` says which signal came, and the CLI exits with its
code.

A signal that arrives while the Python interpreter itself starts, before curvscope's first line runs, gets the
operating system's default (SIGTERM ends the process, SIGINT interrupts Python's own start-up): no program
written in Python can handle it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler: the run unwinds like on Ctrl-C (staged outputs removed) and exits 143."""


_received: list[int] = []
_armed: list[bool] = [False]

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def _handle(signum, frame):  # noqa: ARG001
    _received.append(signum)
    if not _armed[0]:  # nothing is running that could leave something behind: end now
        code = EXIT_CODES.get(signum, 130)
        report(code)
        exit_now(code)
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()


def install() -> None:
    """SIGINT and SIGTERM to :func:`_handle` (in the main thread; elsewhere, e.g. under a test runner's worker
    thread, the defaults stay). Until :func:`arm`, either ends the process at once."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, _handle)


def arm() -> None:
    """The command runs: from now on a signal raises (``KeyboardInterrupt`` / :class:`Terminated`) so that the
    run unwinds and cleans up."""
    _armed[0] = True


def received() -> int | None:
    """The first SIGINT or SIGTERM this process received (``None``: none)."""
    return _received[0] if _received else None


def exit_code() -> int | None:
    """130 or 143 when a signal was received, else ``None``."""
    sig = received()
    return None if sig is None else EXIT_CODES.get(sig, 130)


_reported: list[bool] = [False]


def report(code: int, text: str | None = None) -> None:
    """Say once on stderr that the run was stopped (``text``: the whole line; default ``interrupted`` /
    ``terminated (SIGTERM)``; ``""``: it was said already); later calls print nothing."""
    if _reported[0]:
        return
    _reported[0] = True
    if text == "":
        return
    with contextlib.suppress(Exception):
        sys.stderr.write((text or ("terminated (SIGTERM)" if code == 143 else "interrupted")) + "\n")


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
