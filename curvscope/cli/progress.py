"""The CLI's presenter of the engine's progress protocol: one rich bar per stage, on stderr."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
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

RATE_UNITS = {stage: unit for command in COMMANDS for stage, unit in command.rates.items()}
"""Stages whose line shows a rate (from the registry) -> the name of their units."""

JUMP = 32
"""An update advancing a stage by more units than this at once is a skip to its end (an eigensolver that converged
before its product cap): its units do not count in the rate."""


class Rate:
    """The rate of one stage: the units between its first update and the latest over the time between them (skips
    of more than :data:`JUMP` units add their time, not their units)."""

    def __init__(self, unit: str, done: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.unit, self.clock, self.last, self.units, self.start = unit, clock, done, 0, clock()

    def update(self, done: int) -> str:
        """Take the stage's new ``done``; the rate as text (``12.3 products/s``, or ``14.2 s/product`` below one
        unit a second), empty before the second update."""
        step, self.last = done - self.last, done
        if 0 < step <= JUMP:
            self.units += step
        elapsed = self.clock() - self.start
        if not self.units or elapsed <= 0:
            return ""
        rate = self.units / elapsed
        return f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit.removesuffix('s')}"




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
    rates: dict[str, Rate] = {}
    bar = Progress(SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[rate]}"), console=console, transient=True)

    def update(stage: str, done: int, total: int | None) -> None:
        if not tasks:
            bar.start()  # only once there is something to show: no blank line from a run without stages
        label = escape(STAGE_LABELS.get(stage, stage))
        size = None if total is None else max(total, 1)
        if stage not in tasks:
            tasks[stage] = bar.add_task(label, total=size, rate="")
            if stage in RATE_UNITS:
                rates[stage] = Rate(RATE_UNITS[stage], done)
        rate = {"rate": rates[stage].update(done)} if stage in rates else {}
        bar.update(tasks[stage], completed=done, total=size, **rate)

    try:
        yield update
    finally:
        if tasks:
            bar.stop()
