"""Command-line interface: ``curvscope info | spectrum | factors | lr-suggest | check``."""

from curvscope.cli import check, factors, info, lr, spectrum  # noqa: F401  (each module registers its command)
from curvscope.cli.app import app


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
