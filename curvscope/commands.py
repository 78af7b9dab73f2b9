"""The one registry of curvscope's computing commands: their names, report sections, files and progress stages.

A plain data table, importable from every layer without importing PyTorch, the workflows or the CLI: the report
layer reads the sections and files from it, ``check`` the names, the CLI the commands and the stage labels.
The functions of each command (options type, ``run``, ``write``, ``claim``) are attached one layer up, by the
:class:`~curvscope.workflows.base.Workflow` entry ``WORKFLOW`` of its module ``curvscope.workflows.<name>``,
which :func:`curvscope.workflows.get` finds through this table. The typer command is in ``curvscope.cli.<name>``.

Adding a command is its workflow module, one :class:`Command` line in :data:`COMMANDS` and its CLI module
(``docs/architecture.md``, "Adding a command").
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["COMMANDS", "Command", "computing_commands", "get", "names", "section_owner"]


@dataclass(frozen=True)
class Command:
    """One computing command: what it is called, where its numbers go in the report, which files it writes."""

    name: str
    """The short name: ``check``'s computation and config table (``[lr]``), and the module names
    ``curvscope.workflows.<name>`` and ``curvscope.cli.<name>``."""
    command: str
    """The CLI command (``lr-suggest``); the report's ``command``/``commands`` name it."""
    key: str | None
    """The report key holding the command's section (``lr``), or ``None`` for a command whose fields are the
    report's top level (``spectrum``: ``groups``, ``loss_value``, ...). Exactly one command has ``None``."""
    files: tuple[str, ...]
    """The ``files`` keys the command writes: a rerun replaces all of them (one it no longer writes is dropped
    from the report, and removed when it lies in the output directory)."""
    stages: dict[str, str] = field(default_factory=dict)
    """Progress stages the command's computation reports (:mod:`curvscope.progress`) -> label shown while
    computing."""
    rates: dict[str, str] = field(default_factory=dict)
    """Stages whose progress line also shows a rate -> the name of their units (``products``: curvature-vector
    products per second)."""

    @property
    def workflow_module(self) -> str:
        """The module holding the command's options, ``run_*``, ``write_*`` and ``WORKFLOW``."""
        return f"curvscope.workflows.{self.name}"

    @property
    def cli_module(self) -> str:
        """The module holding the typer command (it registers itself on the app when imported)."""
        return f"curvscope.cli.{self.name}"


COMMANDS: tuple[Command, ...] = (
    Command("spectrum", "spectrum", None,
            ("spectrum_plot", "directions_plot", "layers_plot", "landscape_plot", "directions", "eigenvectors",
             "newton_step"),
            {"gram": "Gram matrix (parameter tensors)", "eigen": "eigendecomposition (groups)",
             "directions": "directional derivatives", "newton": "damped Newton step", "lanczos": "Lanczos",
             "trace": "trace (Hutch++)", "density": "spectral density", "batches": "batches",
             "samples": "samples streamed"},
            {"lanczos": "products", "trace": "products", "density": "products", "samples": "samples"}),
    Command("factors", "factors", "factors", ("factors", "factors_plot", "symo_step"),
            {"per-sample": "per-sample gradients", "ensemble": "ensemble of models", "symo": "SymO line search"}),
    Command("lr", "lr-suggest", "lr", ("lr_plot",), {"lr": "learning rates"}),
    Command("track", "track", "track", ("track_plot",), {"checkpoints": "checkpoints"}),
)
"""Every computing command, in the order ``curvscope check`` runs them (each merges into the same report)."""


def names() -> tuple[str, ...]:
    """The commands' short names, in :data:`COMMANDS` order."""
    return tuple(c.name for c in COMMANDS)


def get(name: str) -> Command:
    """The command of short name ``name`` (``spectrum``, ``factors``, ``lr``); ``KeyError`` when unknown."""
    for c in COMMANDS:
        if c.name == name:
            return c
    raise KeyError(name)


def section_owner(key: str | None) -> Command:
    """The command whose report section is ``key`` (a report's first key, e.g. ``lr``); any other key is a
    top-level field of the command with ``key=None``."""
    owned = [c for c in COMMANDS if c.key is not None and c.key == key] or [c for c in COMMANDS if c.key is None]
    return owned[0]


def computing_commands() -> tuple[str, ...]:
    """The CLI commands of :data:`COMMANDS`."""
    return tuple(c.command for c in COMMANDS)
