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
    """``--help`` at 80 columns neither truncates an option's name (``--trust-model-c…``) nor cuts or splits a
    word of its help text (``'path/to/file.…``): in typer's options tables the four name columns (long, short,
    negative long, negative short) become one, the negative names on a second line, and the type's range
    (``[x>=1]``) goes under the type, so that the help text keeps about 40 columns; names and types never wrap,
    the help text wraps at spaces (a word longer than its whole column folds, never ends in "…").
    A typer without this table layout is left as it is."""
    from rich.columns import Columns
    from rich.text import Text
    from typer import rich_utils

    base = getattr(rich_utils, "Table", None)
    if base is None or getattr(base, "_curvscope_whole_names", False):
        return

    def joined(*cells) -> Text:
        parts = [c if isinstance(c, Text) else Text(str(c)) for c in cells if str(c)]
        return Text(", ").join(parts) if parts else Text("")

    def stacked_type(cell):
        if isinstance(cell, Text) and " [" in cell.plain:  # "<int range> [x>=1]": the range on its own line
            at = cell.plain.index(" [")
            return Text("\n").join([cell[:at], cell[at + 1:]])
        return cell

    def whole_words(cell):
        for item in getattr(cell, "renderables", [cell]) if isinstance(cell, Columns) else [cell]:
            if isinstance(item, Text):
                item.overflow = "fold"
        return cell

    class WholeNames(base):
        _curvscope_whole_names = True

        def add_row(self, *cells, **kwargs):
            if len(cells) in (6, 7) and isinstance(cells[-1], Columns):  # an options panel's row
                lead = cells[:-6]  # the "required" marker column, when some option is required
                long, short, neg_long, neg_short, kind, text = cells[-6:]
                names = joined(long, short)
                negative = joined(neg_long, neg_short)
                if negative.plain:
                    names = Text("\n").join([names, negative])
                cells = (*lead, names, stacked_type(kind), whole_words(text))
            super().add_row(*cells, **kwargs)
            for column in self.columns[:-1]:
                column.no_wrap = True
            self.columns[-1].overflow = "fold"  # a long word in the help text folds onto the next line, not "…"

    rich_utils.Table = WholeNames


_whole_option_names()
