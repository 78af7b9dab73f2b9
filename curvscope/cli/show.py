"""``curvscope show``: the summary of a saved report, printed again, and its plots drawn again."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from curvscope.cli.common import console, handle_errors, out, progress_bars
from curvscope.cli.options import DebugOpt
from curvscope.cli.root import app
from curvscope.errors import CurvscopeError


@app.command("show")
@handle_errors
def show(
    report: Annotated[Path, typer.Argument(
        help="A report.json written by spectrum, lr-suggest, factors, track or check (or the directory holding it).",
        show_default=False)],
    plots: Annotated[bool, typer.Option(
        "--plots/--no-plots", help="Draw the report's plots again (--no-plots: only print the summary).")] = True,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Directory for the plots. Default: beside the report.", show_default=False)] = None,
    debug: DebugOpt = False,
) -> None:
    """Print the summary of a saved report again and re-draw its plots, without computing anything.

    Every table and figure is drawn from the report's own fields (and, for the factors, the factors file it
    names), so a report copied from a CI run shows exactly what the run showed.

    Example: [bold]curvscope show curvscope-out/report.json --out figures[/bold]
    """
    from curvscope.report.schema import REPORT_NAME, read_report
    from curvscope.report.writer import redraw, redraw_jobs

    path = report / REPORT_NAME if report.is_dir() else report
    doc = read_report(path, complete=True)  # every field printed or drawn has the shape curvscope writes
    plot_dir = out_dir if out_dir is not None else path.parent
    if plots:
        redraw_jobs(doc, plot_dir)  # a target that cannot be written is refused before anything is printed
    shown = _print_sections(doc, path)
    if not shown:
        raise CurvscopeError(f"{path}: the report has no section curvscope can show (spectrum, lr, factors, track)")
    if plots:
        with progress_bars() as progress:
            written = redraw(doc, plot_dir, progress)
        for file in written:
            console.print(f"drew {escape(str(file))}", soft_wrap=True, highlight=False)


def _print_sections(doc: dict[str, Any], path: Path) -> list[str]:
    shown = []
    if doc.get("groups"):
        from curvscope.report.tables import spectrum_summary

        for table in spectrum_summary(doc, str(path.parent), out.width):
            out.print(table)
        shown.append("spectrum")
    if doc.get("lr"):
        from curvscope.report.lr_report import notes, rates_tables, truth_table

        for table in rates_tables(doc["lr"], out.width):
            out.print(table)
        out.print(truth_table(doc["lr"]))
        for line in notes(doc["lr"]):
            out.print(line, soft_wrap=True)
        shown.append("lr")
    if doc.get("factors"):
        from curvscope.report.factors_report import factors_tables

        for table in factors_tables(doc["factors"]):
            out.print(table)
        shown.append("factors")
    if doc.get("track"):
        from rich.markup import escape

        from curvscope.report.track_report import groups_table, notes, track_table

        out.print(track_table(doc["track"]))
        table = groups_table(doc["track"])
        if table is not None:
            out.print(table)
        for line in notes(doc["track"]):
            out.print(escape(line))
        shown.append("track")
    return shown
