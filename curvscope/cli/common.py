"""What every command shares: the consoles, loading the Problem, error handling and exit codes, the progress
presenter, flag names for option errors, help-text flow and signals."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import traceback
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

from curvscope import __version__
from curvscope.cli import signals
from curvscope.errors import CurvscopeError

if TYPE_CHECKING:
    pass

console = Console(stderr=True, highlight=False)
"""Progress, errors and diagnostics go to stderr; stdout is reserved for machine-readable output."""
out = Console(highlight=False)
"""Summaries and tables (stdout)."""

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 1, 2, 3



def build_problem(**options):
    """The CLI's one way to load a Problem: :func:`curvscope.problem.load_problem` with a spinner while the files
    load (``options``: its keyword arguments)."""
    with console.status("Loading model and data..."):
        from curvscope.problem import load_problem

        return load_problem(**options)


def _debug_requested(kwargs) -> bool:
    return bool(kwargs.get("debug")) or os.environ.get("CURVSCOPE_DEBUG", "") not in ("", "0")


def handle_errors(fn):
    """Turn exceptions into one-line messages and exit codes (2 bad input, 3 internal error)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = _debug_requested(kwargs)
        try:
            with warnings.catch_warnings():
                if not debug:
                    warnings.simplefilter("ignore")
                return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except CurvscopeError as exc:
            if debug:
                traceback.print_exc()
            console.print(f"[bold red]error:[/bold red] {_one_line(str(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except signals.Terminated:
            signals.ignore()
            console.print("[bold red]terminated[/bold red] (SIGTERM): no output was written or changed")
            raise typer.Exit(143) from None
        except KeyboardInterrupt:
            signals.ignore()
            console.print("[bold red]interrupted[/bold red]: no output was written or changed")
            raise typer.Exit(130) from None
        except MemoryError:
            console.print("[bold red]error:[/bold red] out of memory: lower --batch-size or --max-memory")
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except Exception as exc:  # a bug, or a model curvscope cannot differentiate
            if debug:
                traceback.print_exc()
            lines = str(exc).strip().splitlines()
            first = escape(lines[0]) if lines else ""
            console.print(f"[bold red]internal error:[/bold red] {type(exc).__name__}: {first} "
                          f"(curvscope {__version__}; rerun with --debug for the traceback)", soft_wrap=True)
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper


def _one_line(text: str) -> str:
    """A message as one line of literal text (newlines joined; rich markup such as '[/x]' escaped)."""
    return escape(" ".join(part.strip() for part in text.strip().splitlines() if part.strip()))


def progress_bars(quiet: bool = False):
    """A context manager yielding the rich presenter of the progress protocol (see :mod:`curvscope.cli.progress`)."""
    from curvscope.cli.progress import bars

    return bars(console, quiet)


def warn(message: str) -> None:
    """A one-line warning on stderr."""
    console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


def quiet_output(quiet: bool = True) -> None:
    """Silence (or restore) everything this process prints: progress, summaries and error messages. Ranks other
    than 0 of a distributed run are quiet; rank 0 prints for all of them."""
    console.quiet = quiet
    out.quiet = quiet


# -- options: flags in, the engine's words mapped back to flags ---------------------------------------------

def flag(field: str, flags: dict[str, str] | None = None) -> str:
    """The CLI flag of an options field (``top_k`` -> ``--top-k``; ``flags`` overrides)."""
    return (flags or {}).get(field) or "--" + field.replace("_", "-")


@contextlib.contextmanager
def as_flags(flags: dict[str, str] | None = None) -> Iterator[None]:
    """Inside the block, an :class:`~curvscope.workflows.options.OptionError` is re-raised as a one-line
    :class:`CurvscopeError` naming the flag instead of the field."""
    from curvscope.workflows.options import OptionError

    try:
        yield
    except OptionError as exc:
        raise CurvscopeError(exc.render(flag(exc.field, flags))) from None


def one_line_paragraphs(doc: str) -> str:
    """typer's rich help keeps single line breaks: join each paragraph of a docstring into one flowing line (a
    line that ends with ':' keeps its break), so the help text wraps to the terminal."""
    out_paragraphs = []
    for paragraph in inspect.cleandoc(doc).split("\n\n"):
        lines = paragraph.split("\n")
        text = lines[0]
        for line in lines[1:]:
            text += ("\n" if text.endswith(":") else " ") + line.strip()
        out_paragraphs.append(text)
    return "\n\n".join(out_paragraphs)

