"""``curvscope check``: gate a report (or a checkpoint, computing its report first) with rules and baselines.

Exit 0 when every rule passes, 1 when one fails, 2 on bad input. The rule language, baselines and config file
live in ``curvscope.report.check*``, the plan and the computations in :mod:`curvscope.workflows.check`; this
module maps the flags and prints the verdict.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

import typer
from rich.markup import escape

from curvscope.cli.common import (
    EXIT_FAILED,
    cli_message,
    console,
    explicit,
    handle_errors,
    out,
    progress_bars,
    warn,
)
from curvscope.cli.options import (
    DEFAULT_OUT,
    BaselineOpt,
    ConfigOpt,
    DebugOpt,
    JsonOpt,
    JunitOpt,
    MaxDecreaseOpt,
    MaxIncreaseOpt,
    OutDirOpt,
    ProblemArgs,
    RuleOpt,
    TargetArg,
    problem_options,
)
from curvscope.cli.root import app
from curvscope.errors import CurvscopeError
from curvscope.io.atomic import check_directory, check_writable
from curvscope.report.check_output import (
    annotate,
    check_table,
    github_annotation,
    github_annotations,
    in_github_actions,
    summary,
    write_junit,
)
from curvscope.workflows.check import PROBLEM_OPTIONS


@app.command("check")
@handle_errors
@problem_options(checkpoint=False)
def check(
    args: ProblemArgs,
    ctx: typer.Context,
    target: TargetArg,
    rule: RuleOpt = None,
    config: ConfigOpt = None,
    baseline: BaselineOpt = None,
    max_increase: MaxIncreaseOpt = None,
    max_decrease: MaxDecreaseOpt = None,
    junit: JunitOpt = None,
    json_output: JsonOpt = False,
    out_dir: OutDirOpt = DEFAULT_OUT,
    debug: DebugOpt = False,
) -> None:
    """Gate a checkpoint in CI: evaluate rules on a report, compare with a baseline, exit 0 / 1 / 2.

    A rule is a path into the JSON report, a comparison and a number: [bold]groups[0].lambda_max <= 50[/bold],
    [bold]groups[*].rank >= 10[/bold] (every element must pass), [bold]lr.groups[*].recommended > 1e-5[/bold],
    [bold]loss_value < 0.5[/bold]. A null (non-finite) value fails its rule. An unknown path is an error that
    lists the nearest valid paths.

    TARGET is either a report (.json, or a directory holding report.json) or a checkpoint. With a
    checkpoint, check first runs what the rules read (paths under lr. need lr-suggest, under factors. need
    factors, all others spectrum, plus every computation that has a table in --config), writes
    DIR/report.json (--out), then evaluates.

    Exit codes: 0 every rule passes; 1 at least one rule fails; 2 bad input (unreadable report or config,
    malformed rule, unknown path, a path that is not a number).

    Under GitHub Actions (GITHUB_ACTIONS=true) failures are also printed as ::error:: annotations.
    Reference and a complete workflow: docs/ci.md.

    Example: [bold]curvscope check out/report.json -r "groups[0].lambda_max <= 50" --junit junit.xml[/bold]

    Example: [bold]curvscope check sample_models/mlp-digits.safetensors --data
    sample_models/digits.safetensors --config docs/curvscope.example.toml[/bold]
    """
    try:
        _check(ctx, target, rule or [], config, baseline, max_increase or [], max_decrease or [], junit,
               json_output, out_dir, args)
    except CurvscopeError as exc:
        if in_github_actions():
            annotate([github_annotation(" ".join(cli_message(exc).split()), title="curvscope check: bad input")],
                      json_output)
        raise


def _check(ctx, target, rule_texts, config_path, baseline_path, increases, decreases, junit, json_output,
           out_dir, args: ProblemArgs) -> None:
    from curvscope.workflows.check import check_junit, outside_outputs, prepare_check, problem_values, run_check

    started = time.perf_counter()
    given = {name for name in ("data", "out_dir", *PROBLEM_OPTIONS) if _explicit(ctx, name)}
    # 1. everything that can be wrong before computing anything
    plan = prepare_check(target, rule_texts, config_path, baseline_path, increases, decreases, given)
    if junit is not None:
        check_writable(junit, "junit")
        check_junit(plan, junit, out_dir, args.data if "data" in given else plan.config.problem.get("data"))
    load = None
    if plan.computes:
        for warning in outside_outputs(plan, out_dir):
            warn(warning)
        values = problem_values(plan, given, {k: getattr(args, k) for k in PROBLEM_OPTIONS}, args.trust_model_code)
        check_directory(out_dir, "out_dir")

        def load():
            return replace(args, checkpoint=plan.target, **values).load()
    # 2. the report: read it, or compute it from the checkpoint; 3. the verdict
    with progress_bars(json_output) as progress:
        outcome = run_check(plan, out_dir, load, progress, started, warn, keep_other="out_dir" not in given)
    if outcome.computed and not json_output:
        console.print(f"report: {escape(str(outcome.report_path))} (computed: {', '.join(outcome.computed)})")
    for warning in outcome.warnings:
        warn(warning)
    if junit is not None:
        write_junit(junit, outcome.results, "junit", report=str(outcome.report_path), seconds=outcome.seconds)
    table = check_table(outcome.results, outcome.report_path)
    if json_output:
        console.print(table)
        doc = summary(outcome.results, report=str(outcome.report_path),
                      baseline=None if outcome.baseline_file is None else str(outcome.baseline_file),
                      computed=outcome.computed)
        print(json.dumps(doc, indent=2), flush=True)
    else:
        out.print(table)
    if outcome.failed and in_github_actions():
        annotate(github_annotations(outcome.results), json_output)
    if outcome.failed:
        raise typer.Exit(EXIT_FAILED)


_explicit = explicit

