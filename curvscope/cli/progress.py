"""The CLI's presenter of the engine's progress protocol: one rich bar per stage, on stderr."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from curvscope.commands import COMMANDS

if TYPE_CHECKING:
    from curvscope.progress import Progress

STAGE_LABELS = {
    **{stage: label for command in COMMANDS for stage, label in command.stages.items()},
    "plots": "plots",
    "write": "writing files",
}
"""Labels of the progress stages: the computing commands' (from the registry) and the writer's (a stage not
listed shows its own key)."""


RATES = ("samples",)
"""Stages whose bar shows its rate per second."""


@contextlib.contextmanager
def bars(console: Console, quiet: bool = False) -> Iterator[Progress]:
    """A :class:`~curvscope.progress.Progress` drawing one rich bar per stage on stderr (a spinner when the
    stage's total is unknown); transient: the bars vanish when the block ends."""
    from curvscope.progress import silent

    if quiet or console.quiet:
        yield silent
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    tasks: dict[str, Any] = {}
    bar = Progress(SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=console, transient=True)

    def update(stage: str, done: int, total: int | None) -> None:
        if not tasks:
            bar.start()  # only once there is something to show: no blank line from a run without stages
        label = escape(STAGE_LABELS.get(stage, stage))
        size = None if total is None else max(total, 1)
        if stage not in tasks:
            tasks[stage] = bar.add_task(label, total=size)
        bar.update(tasks[stage], completed=done, total=size)
        if stage in RATES:  # a count whose speed matters: "samples streamed 1,234/s"
            speed = next(t.speed for t in bar.tasks if t.id == tasks[stage])
            if speed:
                bar.update(tasks[stage], description=f"{label} {speed:,.0f}/s")

    try:
        yield update
    finally:
        if tasks:
            bar.stop()
