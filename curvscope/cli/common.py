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
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from curvscope import __version__
from curvscope.cli import signals
from curvscope.errors import CurvscopeError, Naming, OptionError, python_name

console = Console(stderr=True, highlight=False)
"""Progress, errors and diagnostics go to stderr; stdout is reserved for machine-readable output."""
out = Console(highlight=False)
"""Summaries and tables (stdout)."""

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 1, 2, 3



def build_problem(**options):
    """The CLI's one way to load a Problem: :func:`curvscope.io.load.load_problem` with a spinner while the files
    load (``options``: its keyword arguments)."""
    with console.status("Loading model and data..."):
        from curvscope.io.load import load_problem

        problem = load_problem(**options)
    for note in problem_notes(problem):
        warn(note)
    return problem


def problem_notes(problem) -> list[str]:
    """What the loaded problem itself warns about (a model computing below the run's dtype)."""
    notes = [problem.info.get("dtype_note"), problem.info.get("precision_note"), problem.info.get("shift_labels_note")]
    return [n.replace("shift_labels=True", "--shift-labels") for n in notes if n]


def _debug_requested(kwargs) -> bool:
    return bool(kwargs.get("debug")) or os.environ.get("CURVSCOPE_DEBUG", "") not in ("", "0")


def handle_errors(fn):
    """Turn exceptions into one-line messages and exit codes (2 bad input, 3 internal error)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from curvscope.io.atomic import committed

        debug = _debug_requested(kwargs)
        written_before = len(committed())
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
            console.print(f"[bold red]error:[/bold red] {_one_line(cli_message(exc))}", soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt as exc:
            _stopped(143 if isinstance(exc, signals.Terminated) else 130, committed()[written_before:])
        except MemoryError:
            console.print("[bold red]error:[/bold red] out of memory: lower --batch-size or --max-memory")
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except OSError as exc:  # the machine refused (a full disk, a name too long, no permission): not a bug
            if debug:
                traceback.print_exc()
            where = f"{exc.filename}: " if exc.filename else ""
            console.print(f"[bold red]error:[/bold red] {_one_line(where + (exc.strerror or str(exc)))}",
                          soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except RuntimeError as exc:
            if not _allocation_failed(exc):
                return _internal(exc, debug)
            if debug:
                traceback.print_exc()
            console.print("[bold red]error:[/bold red] out of memory (an allocation failed): lower --batch-size or "
                          "--max-memory", soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except Exception as exc:  # a bug, or a model curvscope cannot differentiate
            if signals.exit_code() is not None:  # a signal that a library turned into another exception
                _stopped(signals.exit_code(), committed()[written_before:])
            return _internal(exc, debug)

    return wrapper


def _stopped(code: int, written: list) -> None:
    """End a run stopped by SIGINT (130) or SIGTERM (143) with one line that says what is on disk: nothing
    changed, or (a signal that came while the outputs were moved into place) all of them written."""
    signals.ignore()
    what = "[bold red]terminated[/bold red] (SIGTERM)" if code == 143 else "[bold red]interrupted[/bold red]"
    if written:
        shown = ", ".join(escape(str(p)) for p in written[:3]) + (f", ... ({len(written)} files)"
                                                                   if len(written) > 3 else "")
        text = f"{what}: stopped after its outputs were written ({shown})"
    else:
        text = f"{what}: no output was written or changed"
    console.print(text, soft_wrap=True)
    signals.report(code, "")  # said: main() adds no second line
    raise typer.Exit(code) from None


def _internal(exc: Exception, debug: bool):
    """Report an unexpected exception (a bug) in one line and exit 3."""
    if debug:
        traceback.print_exc()
    lines = str(exc).strip().splitlines()
    first = escape(lines[0][:300]) if lines else ""
    console.print(f"[bold red]internal error:[/bold red] {type(exc).__name__}: {first} "
                  f"(curvscope {__version__}; rerun with --debug for the traceback)", soft_wrap=True)
    raise typer.Exit(EXIT_INTERNAL) from None


def _allocation_failed(exc: RuntimeError) -> bool:
    """PyTorch's words for a failed allocation (CPU: "DefaultCPUAllocator: can't allocate memory"; CUDA: "CUDA out
    of memory", raised as ``torch.OutOfMemoryError``, a RuntimeError)."""
    text = str(exc)
    return type(exc).__name__ == "OutOfMemoryError" or "can't allocate memory" in text or "out of memory" in text


def _one_line(text: str) -> str:
    """A message as one line of literal text (newlines joined; rich markup such as '[/x]' escaped)."""
    return escape(" ".join(part.strip() for part in text.strip().splitlines() if part.strip()))


def progress_bars(quiet: bool = False):
    """A context manager yielding the rich presenter of the progress protocol (see :mod:`curvscope.cli.progress`)."""
    from curvscope.cli.progress import bars

    return bars(console, quiet)


def print_report(report: dict[str, Any]) -> None:
    """The report as written, as JSON on stdout (``--json``): integers stay integers, no NaN (the report has
    none)."""
    import json

    print(json.dumps(report, indent=2, allow_nan=False), flush=True)


def explicit(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (command line or environment), as opposed to its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and getattr(source, "name", "") not in ("DEFAULT", "DEFAULT_MAP")


def warn(message: str) -> None:
    """A warning on stderr: one line in a log (easy to grep), wrapped to the terminal's width with a hanging
    indent on a terminal."""
    if not console.is_terminal:
        console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)
        return
    from rich.table import Table

    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="yellow", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("warning:", escape(message))
    console.print(grid)


def quiet_output(quiet: bool = True) -> None:
    """Silence (or restore) everything this process prints: progress, summaries and error messages. Ranks other
    than 0 of a distributed run are quiet; rank 0 prints for all of them."""
    console.quiet = quiet
    out.quiet = quiet


# -- options: flags in, the engine's words mapped back to flags ---------------------------------------------

def _parameters() -> dict[str, Any]:
    """Every registered command's parameters by their Python name, read from the typer application: the one table
    from parameter names to flags (``out_dir`` -> ``--out``, ``directions`` -> ``--directions`` /
    ``--no-directions``, ``checkpoint`` -> ``CHECKPOINT``). A name means the same flag in every command (a test
    keeps it so). Every command is registered in a CLI run (``curvscope.cli.app`` loads them all)."""
    import typer.main

    from curvscope.cli.root import app

    if not app.registered_commands:
        return {}
    root = typer.main.get_command(app)
    table: dict[str, Any] = {}
    for command in getattr(root, "commands", {}).values():
        for param in command.params:
            table.setdefault(param.name, param)
    return table


def flags() -> Naming:
    """The CLI's :data:`~curvscope.errors.Naming`: a parameter (or a setting of it) as the command line writes it:
    ``top_k`` -> ``--top-k``, ``("device", "cpu")`` -> ``--device cpu``, ``("directions", False)`` ->
    ``--no-directions``, ``checkpoint`` -> ``CHECKPOINT``. A name that is no command's parameter keeps its Python
    wording."""
    table = _parameters()
    return functools.partial(_flag, table)


def _flag(table: dict[str, Any], parameter: str, *value: Any) -> str:
    param = table.get(parameter)
    if param is None:
        return python_name(parameter, *value)
    if param.param_type_name == "argument":
        return str(value[0]) if value else param.name.upper()
    name = next((o for o in param.opts if o.startswith("--")), param.opts[0])
    if getattr(param, "is_flag", False) and value:
        return name if value[0] else (param.secondary_opts or [name])[0]
    return f"{name} {value[0]}" if value else name


def cli_message(exc: CurvscopeError) -> str:
    """The message of ``exc`` for the command line: an :class:`OptionError` names flags instead of parameters."""
    return exc.render(flags()) if isinstance(exc, OptionError) else str(exc)


@contextlib.contextmanager
def as_flags() -> Iterator[None]:
    """Inside the block, an :class:`~curvscope.errors.OptionError` is re-raised as a one-line
    :class:`CurvscopeError` naming flags instead of parameters: what :func:`handle_errors` prints (the flags of
    the commands registered so far; all of them once ``curvscope.cli.app`` is loaded)."""
    try:
        yield
    except OptionError as exc:
        raise CurvscopeError(cli_message(exc)) from None


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

