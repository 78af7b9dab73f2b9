"""The typer application object; commands register themselves on it from their own modules."""

import typer

app = typer.Typer(
    name="curvscope",
    help=(
        "Curvature diagnosis for PyTorch checkpoints.\n\n"
        "Point curvscope at a checkpoint and a dataset: it computes the exact GGN eigenspectrum of a batch, "
        "per-sample directional derivatives and their noise, symmetry-structured curvature factors and "
        "per-layer learning rates, writes a JSON report and plots, and gates checkpoints in CI.\n\n"
        "Start with: [bold]curvscope info sample_models/mlp-digits.safetensors --data "
        "sample_models/digits.safetensors[/bold]\n\n"
        "Exit codes: 0 success, 1 a check failed, 2 bad input, 3 internal error."
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
