"""``report.json`` and ``track.png`` of a run that grows point by point (``curvscope track``, ``curvscope.Monitor``).

:meth:`TrackWriter.update` runs after every point and rewrites ``report.json`` cheaply: compact JSON (the C
encoder; the indented form goes through Python's), each point's fields converted once and kept, the rest of the
report (the ``problem`` section, ``files``, other commands' sections) taken from the previous write instead of
read back and validated, and the one file staged and moved into place atomically. ``track.png`` is redrawn at
most every ``plot_interval`` seconds while the run grows: a figure takes tenths of a second, which after every
point cost a cheap training loop several times its own time. :meth:`TrackWriter.finish` (the end of a run, the
monitor's ``close()``, an interruption) writes the final report in the project's indented format with the figure
through :class:`~curvscope.report.writer.ReportWriter`.

Consistent at every moment: each write is atomic, so ``report.json`` holds complete points only, and
``track.plot_points`` says how many of them ``track.png`` shows (all of them after :meth:`TrackWriter.finish`).
An update is put off to a later point when the previous one took more than :data:`WRITE_FLOOR` and more than
:data:`WRITE_SHARE` of the time since (a run of thousands of points whose report takes milliseconds to encode),
so that rewriting the report never costs a long run more than that share; the next update or
:meth:`TrackWriter.finish` writes what was put off.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

PLOT_INTERVAL = 60.0
"""Seconds between two drawings of ``track.png`` while a run grows (it is always drawn at the end)."""
WRITE_SHARE = 0.02
"""The largest share of a run's time that rewriting ``report.json`` after its points may take."""
WRITE_FLOOR = 0.002
"""Seconds: a rewrite of ``report.json`` that took less is never put off."""
PLOT_KEY = "track_plot"


class TrackWriter:
    """Writes the ``track`` report of a growing run into ``out_dir``: cheaply after every point, in full at the end.

    Args:
        out_dir: the output directory.
        problem: the run's :class:`~curvscope.problem.Problem` (its ``problem`` section).
        plot: draw ``track.png``.
        option: the name of the output-directory parameter in messages.
        warn: called with one-line warnings (a report of another problem replaced).
        plot_interval: seconds between two drawings of the figure while the run grows.
    """

    def __init__(self, out_dir: str | os.PathLike, problem, *, plot: bool = True, option: str = "out_dir",
                 warn: Callable[[str], None] | None = None, plot_interval: float = PLOT_INTERVAL) -> None:
        from curvscope.report.schema import REPORT_NAME

        self.out_dir = Path(out_dir)
        self.report_path = self.out_dir / REPORT_NAME
        self.problem, self.plot, self.option, self.warn = problem, plot, option, warn
        self.plot_interval = float(plot_interval)
        self.report: dict[str, Any] | None = None
        """The report as last written (``None`` before the first write)."""
        self.pending = False
        """Points were given since :meth:`finish` (its final report and figure are still to be written)."""
        self._fields: dict[int, tuple[Any, dict[str, Any]]] = {}
        self._signature: tuple[int, int, int] | None = None
        self._plotted = time.perf_counter()
        self._plot_points: int | None = None
        self._cost: float | None = None
        self._written_at = 0.0

    # -- writing ------------------------------------------------------------------------------------------
    def update(self, run: Any) -> dict[str, Any] | None:
        """After a point of ``run`` (a :class:`~curvscope.workflows.track.TrackRun`): rewrite the report, unless
        that is put off (:data:`WRITE_SHARE`). Returns the report written, or ``None`` when put off."""
        self.pending = True
        started = time.perf_counter()
        if self._cost is not None and self._cost > max(WRITE_FLOOR, WRITE_SHARE * (started - self._written_at)):
            return None
        draw = self.plot and bool(run.points) and started - self._plotted >= self.plot_interval
        if self.report is None and not draw and not os.path.lexists(self.report_path):
            self._start()  # nothing to merge with or to replace: the first report is a quick one too
            self._quick(run)
            self._cost = time.perf_counter() - started
        elif draw or self.report is None or not self._unchanged():
            self._full(run, draw or (self.plot and self._plot_points is not None))
            self._cost = None  # a full write (the figure, the first report) says nothing of the next one's cost
        else:
            self._quick(run)
            self._cost = time.perf_counter() - started
        self._written_at = time.perf_counter()
        return self.report

    def finish(self, run: Any) -> dict[str, Any]:
        """The final report of ``run`` in the project's format, with ``track.png`` (when plotting). Returns it."""
        self._full(run, self.plot and bool(run.points))
        self.pending = False
        return self.report  # type: ignore[return-value]

    def _full(self, run: Any, draw: bool) -> None:
        """Through :class:`~curvscope.report.writer.ReportWriter`: merged with the report in ``out_dir`` (read and
        checked), stale files removed, the figure drawn when ``draw``."""
        from curvscope.report.writer import ReportWriter

        writer = ReportWriter(self.out_dir, self.problem, option=self.option, warn=self.warn)
        section = self.section(run)
        if draw:
            from curvscope.report.track_plots import track_figure

            section["plot"] = str(writer.plot(PLOT_KEY, "track.png",
                                              lambda r: track_figure(r["track"], r["problem"])))
            section["plot_points"] = len(section["points"])
        writer.section("track", {"track": section})
        self.report = writer.commit()
        self._plot_points = len(section["points"]) if draw else None
        if draw:
            self._plotted = time.perf_counter()
        self._remember()

    def _start(self) -> None:
        """The report of an output directory without one: the ``problem`` section, no files yet."""
        from curvscope.io.atomic import check_directory
        from curvscope.report.schema import build_report

        check_directory(self.out_dir, self.option).mkdir(parents=True, exist_ok=True)
        self.report = build_report("track", self.problem, {"track": {}, "files": {}})

    def _quick(self, run: Any) -> None:
        """``report.json`` alone, compact: the previous report with the new ``track`` section."""
        from curvscope.io.atomic import replace_text

        report = dict(self.report or {})
        section = self.section(run)
        old = report.get("track") or {}
        for key in ("plot", "plot_points"):
            if key in old:
                section[key] = old[key]
        report["track"] = section
        report["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        replace_text(self.report_path, json.dumps(report, separators=(",", ":"), allow_nan=False) + "\n", self.option)
        self.report = report
        self._remember()

    def _remember(self) -> None:
        self._signature = _signature(self.report_path)

    def _unchanged(self) -> bool:
        """``report.json`` is still the file this writer wrote last (else it is read and merged again)."""
        return self._signature is not None and _signature(self.report_path) == self._signature

    # -- the section --------------------------------------------------------------------------------------
    def section(self, run: Any) -> dict[str, Any]:
        """The ``track`` section of ``run`` as plain JSON values, each point's fields converted once."""
        from curvscope.report.schema import to_jsonable
        from curvscope.report.track_report import track_section

        points = [self._point(p, run.options) for p in run.points]
        live = {id(p) for p in run.points}
        if len(self._fields) > 2 * len(live) + 16:  # points no longer in the run (a monitor's step measured again)
            self._fields = {k: v for k, v in self._fields.items() if k in live}
        section = track_section(run, points)
        plain = to_jsonable({k: v for k, v in section.items() if k != "points"})
        return {k: points if k == "points" else plain[k] for k in section}

    def _point(self, point: Any, options: Any) -> dict[str, Any]:
        from curvscope.report.schema import to_jsonable
        from curvscope.report.track_report import point_fields

        kept = self._fields.get(id(point))
        if kept is not None and kept[0] is point:
            return kept[1]
        fields = to_jsonable(point_fields(point, options.curvature, list(options.measures())))
        self._fields[id(point)] = (point, fields)
        return fields


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
