"""The application layer between the CLI and the engine: one module per command.

Each module has an options dataclass (:class:`~curvscope.workflows.options.Options`), a
``run_*(problem, options, progress) -> result`` function, a ``write_*(writer, problem, result, options)``
function and a :class:`Workflow` entry ``WORKFLOW`` that ties them to the command's line of the registry
(:data:`curvscope.commands.COMMANDS`); :func:`get` finds them by the command's short name (``curvscope check``
computes what its rules need through it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from curvscope import commands
from curvscope.errors import CurvscopeError
from curvscope.workflows.base import Workflow

if TYPE_CHECKING:
    from curvscope.problem import Problem
    from curvscope.progress import Progress
    from curvscope.workflows.options import Options

__all__ = ["NAMES", "Workflow", "get", "run_and_write"]

NAMES = commands.names()
"""The report sections a workflow computes, in the order ``check`` runs them (the registry's)."""


def get(name: str) -> Workflow:
    """The workflow computing report section ``name`` (``spectrum``, ``lr`` or ``factors``): the ``WORKFLOW``
    of the registry's module for it."""
    if name not in NAMES:
        raise CurvscopeError(f"no workflow computes '{name}' (known: {', '.join(NAMES)})")
    return importlib.import_module(commands.get(name).workflow_module).WORKFLOW


def run_and_write(problem: Problem, out_dir: Any, jobs: dict[str, Options], progress: Progress | None = None,
                  option: str = "out_dir", warn: Callable[[str], None] | None = None,
                  keep_other: bool = False) -> dict[str, Any]:
    """Run several workflows on one problem and write all their outputs into ``out_dir`` together.

    Args:
        problem: the :class:`~curvscope.problem.Problem` every workflow runs on.
        out_dir: the output directory (created if needed; an existing report of the same problem is merged).
        jobs: report-section name -> options, run in the order of :data:`NAMES`.
        progress: :class:`~curvscope.progress.Progress` for every workflow's stages and the writing.
        option: the name of the output directory in messages (``--out`` in the CLI).
        warn: called with one-line warnings about the output directory (see :class:`ReportWriter`).
        keep_other: refuse to replace a report of another problem in ``out_dir`` (see :class:`ReportWriter`).

    Returns:
        The report as written (merged into an existing report of the same problem).
    """
    from curvscope.report.writer import ReportWriter

    writer = ReportWriter(out_dir, problem, option, warn, keep_other=keep_other)
    flows = [(get(name), jobs[name]) for name in NAMES if name in jobs]
    for flow, options in flows:
        options.validate()
        if flow.claim is not None:
            flow.claim(writer, options)
    for flow, options in flows:
        flow.write(writer, problem, flow.run(problem, options, progress), options)
    return writer.commit(progress)
