"""The one progress protocol of every long-running function in curvscope.

An engine or workflow function that takes ``progress`` calls it as ``progress(stage, done, total)``:

- ``stage``: a short stable key naming the stage (``"gram"``, ``"eigen"``, ``"lanczos"``, ...); the presenter
  (a rich progress bar in the CLI, nothing in the Python API) maps it to a label;
- ``done``: units finished so far in that stage;
- ``total``: the number of units of the stage, or ``None`` when unknown (a spinner).

The engine never prints: it reports through this callable only. :func:`silent` is the default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Progress(Protocol):
    """``progress(stage, done, total)``: ``done`` of ``total`` units of ``stage`` are finished."""

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        """Report that ``done`` of ``total`` units (``None``: unknown) of ``stage`` are finished."""


def silent(stage: str, done: int, total: int | None) -> None:
    """A :class:`Progress` that shows nothing (the default of every engine function)."""


def or_silent(progress: Progress | None) -> Progress:
    """``progress`` itself, or :func:`silent` when it is ``None``."""
    return silent if progress is None else progress


def stage(progress: Progress | None, name: str) -> Callable[[int, int | None], None]:
    """``progress`` bound to one stage: ``report(done, total)``."""
    progress = or_silent(progress)

    def report(done: int, total: int | None) -> None:
        progress(name, done, total)

    return report


def counter(progress: Progress | None, name: str, total: int | None) -> Callable[[int], None]:
    """A callable ``advance(n)`` that adds ``n`` finished units to stage ``name`` of ``total`` units, starting
    at 0 (reported once right away, so a bar appears before the first unit is done)."""
    progress = or_silent(progress)
    done = 0
    progress(name, 0, total)

    def advance(n: int = 1) -> None:
        nonlocal done
        done += n
        progress(name, done, total)

    return advance
