"""The :class:`Workflow` record that ties a command's options, runner and report writer together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from curvscope.problem import Problem
    from curvscope.progress import Progress
    from curvscope.report.writer import ReportWriter
    from curvscope.workflows.options import Options


@dataclass(frozen=True)
class Workflow:
    """One command's computation: options type, runner, and the writer of its report section and files."""

    name: str
    """Report section / ``check`` engine name."""
    command: str
    """The CLI command (for messages)."""
    options: type[Options]
    run: Callable[[Problem, Any, Progress | None], Any]
    """``run(problem, options, progress) -> result``."""
    write: Callable[[ReportWriter, Problem, Any, Any], None]
    """``write(writer, problem, result, options)``: add the section and files of a result to a writer."""
    claim: Callable[[ReportWriter, Any], None] | None = None
    """``claim(writer, options)``: claim the user-given output paths before computing (optional)."""
