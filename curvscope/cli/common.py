"""Options shared by every command that loads a model and a batch, and the error handling of all commands."""

from __future__ import annotations

import functools
import os
import traceback
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from curvscope import __version__
from curvscope.errors import CurvscopeError

console = Console(stderr=True, highlight=False)
"""Progress, errors and diagnostics go to stderr; stdout is reserved for machine-readable output."""
out = Console(highlight=False)
"""Summaries and tables (stdout)."""

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 1, 2, 3

PROBLEM_HELP = "Model and data"

CheckpointArg = Annotated[Optional[Path], typer.Argument(
    help="Checkpoint: a .safetensors state dict (self-describing ones name their model) or a .pt/.pth "
         "state dict (loaded with weights_only=True). Leave out to use --model's own initialization.",
    show_default=False)]
DataOpt = Annotated[Optional[Path], typer.Option(
    "--data", "-d",
    help="Dataset file with tensors 'x' (inputs) and 'y' (targets): .safetensors, .npz or .pt.",
    rich_help_panel=PROBLEM_HELP, show_default=False)]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m",
    help="Model factory: 'path/to/file.py:factory', 'package.module:factory' or a built-in (mlp, cnn, "
         "transformer). Overrides the checkpoint's metadata.",
    rich_help_panel=PROBLEM_HELP, show_default=False)]
ModelKwargsOpt = Annotated[Optional[str], typer.Option(
    "--model-kwargs", help="JSON object of keyword arguments for the factory, e.g. '{\"hidden\": [32, 32]}'.",
    rich_help_panel=PROBLEM_HELP, show_default=False)]
BatchSizeOpt = Annotated[int, typer.Option(
    "--batch-size", "-n", min=1,
    help="Number of samples in the batch: the first N in file order (capped at the dataset size).",
    rich_help_panel=PROBLEM_HELP)]
ShuffleOpt = Annotated[bool, typer.Option(
    "--shuffle/--no-shuffle", help="Take a random batch (seeded by --seed) instead of the first N samples.",
    rich_help_panel=PROBLEM_HELP)]
SeedOpt = Annotated[int, typer.Option(
    "--seed", help="Seed for --shuffle, Monte-Carlo sampling and --model initialization.",
    rich_help_panel=PROBLEM_HELP)]
LossOpt = Annotated[Optional[str], typer.Option(
    "--loss",
    help="Loss: ce, mse or bce. Default: the checkpoint's, else ce for integer targets, mse for float.",
    rich_help_panel=PROBLEM_HELP, show_default=False)]
DeviceOpt = Annotated[str, typer.Option(
    "--device", help="auto (cuda when available), cpu, cuda or cuda:N.", rich_help_panel=PROBLEM_HELP)]
DtypeOpt = Annotated[str, typer.Option(
    "--dtype", help="Computation dtype: float32 or float64 (eigen-decompositions always run in float64).",
    rich_help_panel=PROBLEM_HELP)]
DebugOpt = Annotated[bool, typer.Option(
    "--debug", help="Show the full traceback on errors.", rich_help_panel="Output")]


def build_problem(checkpoint, data, model, model_kwargs, batch_size, shuffle, seed, loss, device, dtype):
    """The CLI's one way to load a Problem (with a spinner while files load)."""
    from curvscope.problem import load_problem

    with console.status("Loading model and data..."):
        return load_problem(checkpoint=checkpoint, data=data, model=model, model_kwargs=model_kwargs,
                            batch_size=batch_size, shuffle=shuffle, seed=seed, loss=loss, device=device,
                            dtype=dtype)


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
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/bold red]")
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


def quiet_output(quiet: bool = True) -> None:
    """Silence (or restore) everything this process prints: progress, summaries and error messages. Ranks other
    than 0 of a distributed run are quiet; rank 0 prints for all of them."""
    console.quiet = quiet
    out.quiet = quiet
