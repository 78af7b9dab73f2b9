"""Command-line interface: ``curvscope info | spectrum | factors | lr-suggest | check``.

Nothing is imported with this package: :func:`main` installs the signal handlers first, so that Ctrl-C or
SIGTERM at any moment after curvscope's first line runs, imports included, ends with one line and exit 130 /
143, never a traceback or a death by signal.
"""

from __future__ import annotations

import sys
from typing import Any


def _load_app():
    import importlib

    from curvscope import commands
    from curvscope.cli.common import one_line_paragraphs
    from curvscope.cli.root import app

    # each module registers its command: the registry's computing commands and the others, in name order
    for module in sorted({*(c.cli_module for c in commands.COMMANDS), *(f"curvscope.cli.{m}" for m in OTHERS)}):
        importlib.import_module(module)

    for command in app.registered_commands:  # help text flows to the terminal's width, not the source's lines
        doc = command.help or (command.callback.__doc__ if command.callback else None)
        if doc:
            command.help = one_line_paragraphs(doc)
    return app


def main() -> None:
    """Console-script entry point."""
    from curvscope.cli import signals

    signals.install()  # first: a signal from here on ends with one line and 130 / 143
    import gc

    try:
        torch_needed = needs_torch(sys.argv[1:])
        gc.disable()  # imports make objects that live until exit: collecting among them is wasted (0.1 s)
        with _starting(torch_needed):
            app = _load_app()
            if torch_needed:
                import torch  # noqa: F401  (the command will: now, under the spinner, and frozen below)
        gc.freeze()  # the libraries just imported live until exit: no collection scans them again
        gc.enable()
        signals.arm()  # the command runs: a signal now unwinds it (its staged outputs are removed)
        app()
    except SystemExit as exc:
        gc.freeze()  # nor at exit: the interpreter's last collection of all objects takes longer than the run's

        code = signals.exit_code()  # a signal came (some library may have turned it into another exit)
        if code is not None or exc.code in (130, 143):  # ended by a signal: leave now, before a late second one
            code = code or int(exc.code)
            signals.report(code)
            signals.exit_now(code)
        if _launched_distributed() and (exc.code is None or isinstance(exc.code, int)):
            # a torchrun rank, its process group destroyed and its outputs written: skip the interpreter's
            # shutdown, where gloo's threads sometimes abort the process (std::terminate, about 1 run in 40 on
            # 2 cores), which torchrun reports as a failure of the whole run
            signals.exit_now(exc.code or 0)
        raise
    except BaseException as exc:  # before the commands' own handling (imports, argument parsing), or a signal
        code = signals.exit_code()  # that surfaced as another exception
        if isinstance(exc, KeyboardInterrupt):
            code = 143 if isinstance(exc, signals.Terminated) else (code or 130)
        if code is None:
            raise
        signals.report(code)
        signals.exit_now(code)


def _launched_distributed() -> bool:
    """This process ran as one of several torchrun ranks (the test the commands use to go distributed)."""
    if "torch" not in sys.modules:  # nothing loaded PyTorch: no process group either
        return False
    from curvscope.curvature.distributed import torchrun_env

    return torchrun_env() is not None


OTHERS = ("check", "info", "show")
"""The commands that are not computing commands of :data:`curvscope.commands.COMMANDS` (module names)."""


def computing() -> tuple[str, ...]:
    """Commands that load a model (PyTorch): the registry's computing commands and ``info``. ``check`` does with
    ``--data`` (a checkpoint to compute); gating a saved report, ``show`` and ``--help`` start without it (a
    fifth of a second)."""
    from curvscope.commands import computing_commands

    return (*computing_commands(), "info")


def needs_torch(args: list[str]) -> bool:
    """Whether the command line ``args`` (without the program name) will load PyTorch. A wrong guess costs
    only time: the command imports what it needs either way."""
    if not args or "-h" in args or "--help" in args:
        return False
    if args[0] in computing():
        return True
    return args[0] == "check" and any(a == "--data" or a.startswith("--data=") for a in args)


def _starting(torch_needed: bool):
    """A spinner on an interactive stderr while PyTorch loads (so that something shows within a second)."""
    import contextlib

    if not torch_needed or not sys.stderr.isatty():
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status("Starting curvscope (loading PyTorch)...")


def __getattr__(name: str) -> Any:
    if name == "app":
        return _load_app()
    if name == "COMPUTING":
        return computing()
    raise AttributeError(name)


__all__ = ["app", "main"]
