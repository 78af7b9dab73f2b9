"""Command-line interface: ``curvscope info | spectrum | factors | lr-suggest | check``.

Nothing heavy is imported with this package: :func:`main` installs the signal handlers first, so that Ctrl-C
or SIGTERM at any moment, imports included, ends with one line and exit 130 / 143, never a traceback.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from typing import Any


def _load_app():
    from curvscope.cli import check, factors, info, lr, show, spectrum  # noqa: F401  (each registers itself)
    from curvscope.cli.common import one_line_paragraphs
    from curvscope.cli.root import app

    for command in app.registered_commands:  # help text flows to the terminal's width, not the source's lines
        doc = command.help or (command.callback.__doc__ if command.callback else None)
        if doc:
            command.help = one_line_paragraphs(doc)
    return app


def main() -> None:
    """Console-script entry point."""
    from curvscope.cli import signals

    try:
        signals.install()  # first: a SIGTERM while PyTorch loads ends with one line too
        with _starting():
            app = _load_app()
        gc.freeze()  # the libraries just imported live until exit: no collection scans them again
        app()
    except SystemExit as exc:
        gc.freeze()  # nor at exit: the interpreter's last collection of all objects takes longer than the run's

        if exc.code in (130, 143):  # ended by a signal: leave now, before a late second one can kill us
            signals.exit_now(int(exc.code))
        raise
    except KeyboardInterrupt as exc:  # before the commands' own handling (imports, argument parsing)
        terminated = isinstance(exc, signals.Terminated)
        with contextlib.suppress(Exception):
            sys.stderr.write("terminated (SIGTERM)\n" if terminated else "interrupted\n")
        signals.exit_now(143 if terminated else 130)


COMPUTING = ("spectrum", "factors", "lr-suggest", "check", "info", "show")


def _starting():
    """A spinner on an interactive stderr while the heavy libraries load (within a second of the start)."""
    args = sys.argv[1:2]
    if not args or args[0] not in COMPUTING or "-h" in sys.argv or "--help" in sys.argv or not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status("Starting curvscope (loading PyTorch)...")


def __getattr__(name: str) -> Any:
    if name == "app":
        return _load_app()
    raise AttributeError(name)


__all__ = ["app", "main"]
