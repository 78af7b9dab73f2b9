"""The files of one run into an output directory: report sections, plots and tensor files, written together.

Every command (and ``curvscope check`` computing several sections at once) collects what it writes in one
:class:`ReportWriter`; :meth:`ReportWriter.commit` merges the sections into ``DIR/report.json`` (kept when
the directory holds a report of the same problem) and writes everything through
:class:`~curvscope.io.atomic.Outputs`: all files appear, or none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from curvscope import commands
from curvscope.errors import CurvscopeError, OptionError
from curvscope.io.atomic import Outputs, check_directory
from curvscope.progress import Progress, or_silent
from curvscope.report.owned import check_replaceable, is_own_name, written_by_curvscope
from curvscope.report.schema import (
    REPORT_NAME,
    build_report,
    existing_report,
    merge_reports,
    problem_section,
    same_problem,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor


COMMAND_FILES = {c.command: c.files for c in commands.COMMANDS}
"""The ``files`` keys each command writes, from the registry (a rerun of the command replaces all of them: one it
no longer writes is dropped from the report, and removed when it lies in the output directory)."""


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    a, b = old.get("problem") or {}, new.get("problem") or {}
    keys = [k for k in ("checkpoint", "model", "data", "loss", "batch_indices", "loss_options") if a.get(k) != b.get(k)]
    return ", ".join(keys) + " differ" if keys else "another problem"


class ReportWriter:
    """Collects the report sections and files of one run into ``out_dir``.

    Args:
        out_dir: the output directory (made when absent).
        problem: the :class:`~curvscope.problem.Problem` the numbers belong to (its ``problem`` section).
        option: the name of the output-directory parameter in messages (the CLI names its flag).
        warn: called with a one-line warning (a report of another problem replaced, stale files removed).
        keep_other: refuse (before any work) to replace a report of another problem in ``out_dir`` instead of
            replacing it with a warning. The CLI sets it when ``--out`` is left at its default, so that runs on
            different problems never replace each other's outputs in the shared default directory.

    The outputs of a run replace those of the previous run in the directory: a file the previous report lists
    there, of a kind this run writes (a plot, the directions file, ...), that this run does not write again is
    removed with the commit (``--no-plots`` leaves no old plots behind). A report of another problem is not
    merged: it is replaced, and the files it listed in the directory are removed.

    Only files curvscope wrote itself are ever removed or overwritten in the directory
    (:mod:`curvscope.report.owned`: one of its own names, and the content it writes under that name). A path
    the old report lists that is anything else (``train.py``, a user's ``notes.txt``, a PNG someone else drew)
    is left where it is; a file with one of curvscope's names that curvscope did not write is never
    overwritten (one-line error before anything is written).
    """

    def __init__(self, out_dir: str | os.PathLike, problem, option: str = "out_dir",
                 warn: Callable[[str], None] | None = None, keep_other: bool = False) -> None:
        self.out_dir = check_directory(out_dir, option)
        self.warn = warn or (lambda _message: None)
        old = existing_report(self.out_dir / REPORT_NAME)  # a file there that is not a report: refused before any work
        if keep_other and old is not None and not same_problem(old.get("problem"), problem_section(problem)):
            path, differ = self.out_dir, _differences(old, {"problem": problem_section(problem)})
            raise OptionError(option, lambda name: f"{path}/{REPORT_NAME} holds the report of another problem "
                              f"({differ}); to keep both, pass {name(option)} with another directory for this "
                              f"run; to replace it, pass {name(option)} {path} explicitly")
        self.problem = problem
        self.option = option
        self.outputs = Outputs()
        self.outputs.claim(self.report_path, option)
        self.commands: list[str] = []
        self.fields: dict[str, Any] = {}
        self.files: dict[str, str] = {}
        self._plots: list[tuple[str, Path, Callable[[dict[str, Any]], Figure]]] = []

    @property
    def report_path(self) -> Path:
        """``out_dir/report.json``."""
        return self.out_dir / REPORT_NAME

    def claim(self, path: str | os.PathLike, option: str) -> Path:
        """Check a user-given output path early (before computing): writable, a regular file or absent, and
        distinct from every other output of the run."""
        return self.outputs.claim(path, option)

    def claim_option(self, path: str | os.PathLike, field: str) -> Path:
        """:meth:`claim` for the output path of an options field: a refusal is an
        :class:`~curvscope.errors.OptionError` of ``field`` (the CLI names the flags). A path that is one of the
        run's inputs (the checkpoint, the data) or one of curvscope's own files in the output directory is
        refused too."""
        target = _real(path)
        info = getattr(self.problem, "info", None) or {}
        for what in ("checkpoint", "data"):
            value = info.get(what)
            if isinstance(value, str) and value and _real(value) == target:
                raise OptionError(field, f"{path}: is an input of this run (the {what}); give the output its "
                                  "own path")
        if is_own_name(path) and target.parent == _real(self.out_dir):
            raise OptionError(field, lambda name: f"{name(field)} {path}: the same file as curvscope's own "
                              f"{Path(path).name} in {name(self.option)}; give each output its own path")
        return self.claim(path, field)

    def section(self, command: str, fields: dict[str, Any]) -> None:
        """Add the report fields of ``command`` (top-level keys; later sections win on a clash)."""
        if command not in self.commands:
            self.commands.append(command)
        self.fields.update(fields)

    def tensors(self, key: str, path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, Any],
                option: str | None = None) -> Path:
        """A safetensors file, listed in the report's ``files`` under ``key``."""
        from curvscope.io.tensors import safetensors_writer

        if _real(Path(path).parent) == _real(self.out_dir):
            check_replaceable(path)
        path = self.outputs.add(path, safetensors_writer(tensors, metadata), option or self.option)
        self.files[key] = str(path)
        return path

    def plot(self, key: str, name: str, make: Callable[[dict[str, Any]], Figure]) -> Path:
        """A PNG file ``out_dir/name`` drawn at commit time by ``make(report)`` from the report being written
        (plain JSON-able fields, so a saved report can be re-plotted the same way); listed under ``key``."""
        if not is_own_name(name):
            raise CurvscopeError(f"{name}: not one of curvscope's own output names (report/owned.py)")
        path = self.out_dir / name
        check_replaceable(path)
        self.outputs.claim(path, self.option)
        self._plots.append((key, path, make))
        self.files[key] = str(path)
        return path

    def commit(self, progress: Progress | None = None) -> dict[str, Any]:
        """Render the plots, merge the report, write every file. Returns the report as written."""
        from curvscope.report.render import render_png

        progress = or_silent(progress)
        if not self.commands:
            raise CurvscopeError("nothing to write: no report section was added")
        report = build_report(self.commands[-1], self.problem, {**self.fields, "files": {}})
        report["commands"] = list(self.commands)
        for i, (_, path, make) in enumerate(self._plots):
            progress("plots", i, len(self._plots))
            self.outputs.add_bytes(path, render_png(make(report)), self.option)
        if self._plots:
            progress("plots", len(self._plots), len(self._plots))
        report["files"] = dict(sorted(self.files.items()))
        old = existing_report(self.report_path)
        merged = merge_reports(old, report)
        replaced = merged is report
        stale = self._stale(old, replaced)
        if old is not None and not replaced:  # the files of the other commands' sections stay listed
            owned = {k for c in self.commands for k in COMMAND_FILES.get(c, ())}
            kept = {k: v for k, v in (old.get("files") or {}).items()
                    if k not in owned and k not in self.files and Path(v) not in stale}
            merged["files"] = dict(sorted({**kept, **self.files}.items()))
        text = json.dumps(merged, indent=2, allow_nan=False) + "\n"
        self.outputs.add_text(self.report_path, text, self.option)
        for path in stale:
            self.outputs.remove(path)
        if old is not None and merged is report and old.get("problem") != report.get("problem"):
            self.warn(f"{self.report_path} held a report of another problem ({_differences(old, report)}): "
                      "replaced, not merged, with the files it listed here")
        self.outputs.commit(progress)
        return merged

    def _stale(self, old: dict[str, Any] | None, replaced: bool) -> list[Path]:
        """Files the previous report lists in ``out_dir`` that this run supersedes without writing them again:
        all of them when the report is replaced, else those of the commands run again."""
        if old is None:
            return []
        owned = {k for c in self.commands for k in COMMAND_FILES.get(c, ())}
        written = {_real(p) for p in self.outputs.paths}
        stale = []
        for key, value in (old.get("files") or {}).items():
            path = Path(value) if isinstance(value, str) else None
            if path is None or _real(path).parent != _real(self.out_dir) or _real(path) in written:
                continue
            if written_by_curvscope(path) and (replaced or key in owned):
                stale.append(path)
        return stale


def redraw_jobs(report: dict[str, Any], out_dir: str | os.PathLike) -> list[tuple[Path, Callable]]:
    """The plots :func:`redraw` draws for ``report`` into ``out_dir``: (target, ``make(report) -> Figure``),
    every target checked first (a file there that curvscope did not write is never overwritten)."""
    from curvscope.report.plots import spectrum_plots

    out_dir = check_directory(out_dir, "out_dir")
    jobs = [(name, make) for _, name, make in spectrum_plots(report)]
    if report.get("lr"):
        from curvscope.report.lr_plots import lr_figure

        jobs.append(("lr.png", lambda r: lr_figure(r["lr"], r.get("problem"))))
    if (report.get("track") or {}).get("points"):
        from curvscope.report.track_plots import track_figure

        jobs.append(("track.png", lambda r: track_figure(r["track"], r.get("problem"))))
    factors_file = ((report.get("factors") or {}).get("files") or {}).get("factors")
    if factors_file and Path(factors_file).is_file():
        tensors = _factors_tensors(Path(factors_file))  # checked before anything is drawn

        def factors_figure(r: dict[str, Any]) -> Figure:
            from curvscope.report.factors_plots import factors_file_plot

            return factors_file_plot(r["factors"], tensors)

        jobs.append(("factors.png", factors_figure))
    for name, _ in jobs:
        check_replaceable(out_dir / name)
    return [(out_dir / name, make) for name, make in jobs]


def redraw(report: dict[str, Any], out_dir: str | os.PathLike, progress: Progress | None = None) -> list[Path]:
    """Draw the plots of a saved report again into ``out_dir`` (all of them or none). Returns the files.

    Spectrum and lr figures come from the report's fields alone; the factors figure from the
    ``factors.safetensors`` file the report names (skipped when that file is gone).
    """
    from curvscope.report.render import render_png

    progress = or_silent(progress)
    jobs = redraw_jobs(report, out_dir)
    outputs = Outputs()
    for i, (path, make) in enumerate(jobs):
        progress("plots", i, len(jobs))
        outputs.add_bytes(path, render_png(make(report)), "out_dir")
    return outputs.commit(progress)


def _factors_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a ``factors.safetensors`` file, checked: written by curvscope, float matrices (NaN marks an
    undefined correlation; no infinities)."""
    from curvscope.io.tensors import read_tensors

    tensors, metadata = read_tensors(path, "factors", (".safetensors",))
    if metadata.get("format") != "curvscope.factors":
        raise CurvscopeError(f"{path}: not a factors file written by curvscope (metadata format "
                             f"{str(metadata.get('format'))[:40]!r}); not drawn")
    for key, t in tensors.items():
        if t.ndim > 2 or t.is_complex() or not t.is_floating_point() or bool(t.double().isinf().any()):
            raise CurvscopeError(f"{path}: tensor {key!r} is not a float matrix without infinities (shape "
                                 f"{tuple(t.shape)}, {str(t.dtype).replace('torch.', '')}); not drawn")
    return tensors
