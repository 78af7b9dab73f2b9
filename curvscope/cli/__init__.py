"""Command-line interface: ``curvscope info | spectrum | factors | lr-suggest | check``."""

from curvscope.cli.app import app
from curvscope.cli import info  # noqa: F401  (registers the command)


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
