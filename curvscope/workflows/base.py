"""The :class:`Workflow` entry that attaches a command's functions to its line of the command registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from curvscope import commands

if TYPE_CHECKING:
    from curvscope.problem import Problem
    from curvscope.progress import Progress
    from curvscope.report.writer import ReportWriter
    from curvscope.workflows.options import Options


@dataclass(frozen=True)
class Workflow:
    """One command's computation: options type, runner, and the writer of its report section and files.

    Declared once, as ``WORKFLOW``, in the command's module ``curvscope.workflows.<name>``; its names, report
    section, files and progress stages are the command's line of :data:`curvscope.commands.COMMANDS`.
    """

    name: str
    """The command's short name in the registry (its report section / ``check`` computation)."""
    options: type[Options]
    run: Callable[[Problem, Any, Progress | None], Any]
    """``run(problem, options, progress) -> result``: the numbers, no files."""
    write: Callable[[ReportWriter, Problem, Any, Any], None]
    """``write(writer, problem, result, options)``: add the section and files of a result to a writer."""
    claim: Callable[[ReportWriter, Any], None] | None = None
    """``claim(writer, options)``: claim the user-given output paths before computing (optional)."""

    @property
    def spec(self) -> commands.Command:
        """The command's line of the registry."""
        return commands.get(self.name)

    @property
    def command(self) -> str:
        """The CLI command (for messages)."""
        return self.spec.command
