"""What ``curvscope check`` hands to CI systems: JUnit XML, GitHub ``::error::`` annotations, JSON."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from rich.console import RenderableType
from rich.markup import escape
from rich.table import Table

from curvscope import __version__
from curvscope.errors import OptionError
from curvscope.io.atomic import write_text_atomic
from curvscope.report.check import RuleResult, fmt
from curvscope.report.schema import to_jsonable

SUITE_NAME = "curvscope check"


def junit_xml(results: list[RuleResult], *, report: str = "", seconds: float = 0.0) -> str:
    """JUnit XML: one ``<testcase>`` per rule, a ``<failure>`` (message and one line per failing value)
    for each rule that fails."""
    failures = sum(not r.passed for r in results)
    suites = ET.Element("testsuites", name=SUITE_NAME, tests=str(len(results)), failures=str(failures),
                        errors="0", time=f"{seconds:.3f}")
    suite = ET.SubElement(suites, "testsuite", name=SUITE_NAME, tests=str(len(results)),
                          failures=str(failures), errors="0", skipped="0", time=f"{seconds:.3f}")
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="report", value=str(report))
    ET.SubElement(props, "property", name="curvscope_version", value=__version__)
    for result in results:
        case = ET.SubElement(suite, "testcase", name=result.rule,
                             classname=f"curvscope.check.{result.kind}", time="0")
        details = [f"{c.path} = {fmt(c.value)}"
                   + (f" (baseline {fmt(c.baseline)})" if c.baseline is not None else "")
                   + (f", limit {result.op} {fmt(c.threshold)}" if c.threshold is not None else "")
                   + (f": FAIL: {c.reason}" if not c.passed else ": pass")
                   for c in result.checks]
        if not result.passed:
            failure = ET.SubElement(case, "failure", message=result.reason, type="CurvatureCheckFailed")
            failure.text = "\n".join([f"rule: {result.rule}", f"threshold: {result.threshold}", *details])
        elif details:
            ET.SubElement(case, "system-out").text = "\n".join(details)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def write_junit(path: str | os.PathLike, results: list[RuleResult], option: str = "path", **kwargs: Any) -> Path:
    """Write :func:`junit_xml` to ``path`` atomically; errors name the parameter ``option`` that gave the path."""
    path = Path(path)
    if path.is_dir():
        raise OptionError(option, f"{path}: is a directory, expected a file name like junit.xml")
    try:
        write_text_atomic(path, junit_xml(results, **kwargs), option)
    except OSError as exc:
        raise OptionError(option, f"{path}: cannot write ({exc.strerror or exc})") from None
    return path


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def github_annotation(message: str, title: str = SUITE_NAME, file: str | None = None) -> str:
    """One ``::error ...::message`` workflow command, escaped as GitHub documents it."""
    props = [f"title={_escape_property(title)}"]
    if file:
        props.insert(0, f"file={_escape_property(file)}")
    return f"::error {','.join(props)}::{_escape_data(message)}"


def github_annotations(results: list[RuleResult], file: str | None = None) -> list[str]:
    """An annotation for each failing rule."""
    return [github_annotation(f"{r.rule}: {r.reason}", title=f"{SUITE_NAME}: rule failed", file=file)
            for r in results if not r.passed]


def in_github_actions() -> bool:
    """GitHub Actions sets ``GITHUB_ACTIONS=true`` in every step."""
    return os.environ.get("GITHUB_ACTIONS", "").lower() == "true"


def summary(results: list[RuleResult], *, report: str, baseline: str | None = None,
            computed: list[str] | None = None) -> dict[str, Any]:
    """The ``--json`` summary: the verdict, the exit code, and every check of every rule."""
    failed = sum(not r.passed for r in results)
    return to_jsonable({
        "passed": failed == 0,
        "exit_code": 0 if failed == 0 else 1,
        "report": report,
        "baseline": baseline,
        "computed": computed or [],
        "counts": {"rules": len(results), "passed": len(results) - failed, "failed": failed},
        "rules": [{
            "rule": r.rule, "kind": r.kind, "passed": r.passed, "threshold": r.threshold, "reason": r.reason,
            "checks": [{"path": c.path, "value": c.value, "threshold": c.threshold, "baseline": c.baseline,
                        "passed": c.passed, "reason": c.reason} for c in r.checks],
        } for r in results],
        "curvscope_version": __version__,
    })


def check_table(results: list[RuleResult], report_path: Path) -> RenderableType:
    """The verdict as a rich table: one row per rule with value, threshold and result.

    At 80 columns it stays readable: the result column says ``pass`` or ``FAIL [n]``, and failure ``n``'s
    reason is listed below the table, one failing element per line (wrapped with a hanging indent); the worst
    value and the baseline go on a line of their own below the number."""
    from rich.console import Group

    failed = sum(not r.passed for r in results)
    verdict = "[bold red]FAILED[/bold red]" if failed else "[bold green]passed[/bold green]"
    table = Table(title=f"curvscope check: {len(results) - failed} of {len(results)} passed, {verdict} "
                        f"({escape(str(report_path))})", title_justify="left")
    table.add_column("rule", overflow="fold")
    table.add_column("value", justify="right", overflow="fold")
    table.add_column("threshold", justify="right", overflow="fold")
    table.add_column("result", no_wrap=True)
    reasons = Table.grid(padding=(0, 1))
    reasons.add_column(no_wrap=True, style="bold red")
    reasons.add_column(overflow="fold")
    for r in results:
        worst = r.worst()
        if worst is None:
            value = "-"
        elif len(r.checks) == 1:
            value = fmt(worst.value)
        else:
            value = f"{fmt(worst.value)}\n(worst of {len(r.checks)})"
        if r.kind == "baseline" and worst is not None and worst.baseline is not None:
            threshold = f"{r.op} {fmt(worst.threshold)}\n(baseline {fmt(worst.baseline)} {r.threshold})"
        else:
            threshold = r.threshold
        if r.passed:
            result = "[green]pass[/green]"
        else:
            n = reasons.row_count + 1
            result = f"[bold red]FAIL[/bold red] [{n}]"
            reasons.add_row(f"[{n}]", escape(f"{r.rule}: " + "\n".join(_split_failures(r.reason))))
        table.add_row(escape(r.rule), escape(value), escape(threshold), result)
    return Group(table, reasons) if reasons.row_count else table


def _split_failures(reason: str) -> list[str]:
    """``2 of 3 fail: a: ...; b: ...`` as its head and one line per failing element."""
    head, sep, rest = reason.partition(" fail: ")
    if not sep:
        return [reason]
    return [head + " fail:", *(p for p in re.split(r"; (?=[^\s;]+: )", rest) if p)]


def annotate(lines: list[str], json_output: bool) -> None:
    """Print GitHub workflow commands: GitHub reads them from stdout and stderr; stdout stays pure JSON under
    ``--json``."""
    import sys

    stream = sys.stderr if json_output else sys.stdout
    for line in lines:
        print(line, file=stream, flush=True)
