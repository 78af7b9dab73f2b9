"""The typer application object; commands register themselves on it from their own modules."""

import sys

import typer

app = typer.Typer(
    name="curvscope",
    help=(
        "Curvature diagnosis for PyTorch checkpoints.\n\n"
        "Point curvscope at a checkpoint and a dataset: it computes the exact GGN eigenspectrum of a batch (or, "
        "matrix-free, both ends of the Hessian's), per-sample directional derivatives and their noise, "
        "symmetry-structured curvature factors and per-layer learning rates, writes a JSON report and plots "
        "(all of them or none), and gates checkpoints in CI. `curvscope show` prints a saved report again.\n\n"
        "Start with: [bold]curvscope info sample_models/mlp-digits.safetensors --data "
        "sample_models/digits.safetensors[/bold]\n\n"
        "Exit codes: 0 success, 1 a check failed, 2 bad input, 3 internal error or a failed self-check, "
        "130 Ctrl-C, 143 SIGTERM (nothing written or changed)."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from curvscope import __version__

        print(f"curvscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", "-V", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Curvature diagnosis for PyTorch checkpoints."""


def _one_line_usage_errors() -> None:
    """Bad flags (``-n 0``, ``-n abc``, an unknown option) end like every other bad input: one line starting
    with ``error:`` on stderr and exit 2, not typer's multi-line box. Help asked for by running a command
    without arguments is still shown as help."""
    from typer import rich_utils
    from typer._click.exceptions import NoArgsIsHelpError

    boxed = rich_utils.rich_format_error

    def one_line(error) -> None:
        if isinstance(error, NoArgsIsHelpError):
            boxed(error)
            return
        message = " ".join(str(error.format_message()).split())
        command = getattr(getattr(error, "ctx", None), "command_path", None) or "curvscope"
        print(f"error: {message} (see '{command} --help')", file=sys.stderr, flush=True)

    if getattr(rich_utils.rich_format_error, "__name__", "") != "one_line":
        rich_utils.rich_format_error = one_line


_one_line_usage_errors()


def _whole_option_names() -> None:
    """``--help`` at 80 columns never truncates an option's name (``--trust-model-c…``): in typer's options
    tables every column but the last two (type and help text) keeps its width, so the help text wraps instead
    (a word longer than its column folds, never ends in "…").
    A typer without this table layout is left as it is."""
    from typer import rich_utils

    base = getattr(rich_utils, "Table", None)
    if base is None or getattr(base, "_curvscope_whole_names", False):
        return

    class WholeNames(base):
        _curvscope_whole_names = True

        def add_row(self, *cells, **kwargs):
            super().add_row(*cells, **kwargs)
            for column in self.columns[:-2]:
                column.no_wrap = True
            for column in self.columns[-2:]:
                column.overflow = "fold"  # a long word in the help text folds onto the next line, not "…"

    rich_utils.Table = WholeNames


_whole_option_names()
