"""``curvscope check``: gate a report (or a checkpoint, computing its report first) with rules and baselines.

Exit 0 when every rule passes, 1 when one fails, 2 on bad input. The rule language, baselines and config file
live in ``curvscope.report.check*``; this module parses options, runs the computations the rules need and
prints the verdict.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from curvscope.cli.root import app
from curvscope.cli.common import (
    EXIT_FAILED,
    BatchSizeOpt,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    LossOpt,
    ModelKwargsOpt,
    ModelOpt,
    SeedOpt,
    ShuffleOpt,
    build_problem,
    console,
    handle_errors,
    out,
)
from curvscope.errors import CurvscopeError
from curvscope.report.check import RuleResult, evaluate, fmt, parse_limit, parse_rule
from curvscope.report.check_config import CheckConfig, engines_needed, load_config
from curvscope.report.check_output import (
    github_annotation,
    github_annotations,
    in_github_actions,
    summary,
    write_junit,
)
from curvscope.report.schema import REPORT_NAME, read_report

CHECK_HELP = "Rules and baselines"
OUTPUT_HELP = "Output"
PROBLEM_OPTIONS = ("model", "model_kwargs", "batch_size", "shuffle", "seed", "loss", "device", "dtype")
ENGINE_FUNCTIONS = {  # engine -> (module, function, CLI command name)
    "spectrum": ("curvscope.cli.spectrum", "run_spectrum", "spectrum"),
    "lr": ("curvscope.cli.lr", "run_lr", "lr-suggest"),
    "factors": ("curvscope.cli.factors", "run_factors", "factors"),
}
NOT_ENGINE_OPTIONS = {"checkpoint", "data", "debug", "ctx", "out_dir", *PROBLEM_OPTIONS}

TargetArg = Annotated[Path, typer.Argument(
    help="A report to check (a .json file written by spectrum / lr-suggest / factors, or their output "
         "directory), or a checkpoint: then check computes the report first (needs --data; options from "
         "--config).", show_default=False)]
RuleOpt = Annotated[Optional[list[str]], typer.Option(
    "--rule", "-r", help="A rule 'PATH OP NUMBER' (OP: < <= > >= == !=), e.g. 'groups[0].lambda_max <= 50' "
    "or 'groups[*].rank >= 10' ([*]: every element must pass). Repeatable; quote it in the shell.",
    rich_help_panel=CHECK_HELP, show_default=False)]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="TOML file with rules = [...], a \\[baseline] table and the options of the "
    "computations (\\[problem], \\[spectrum], \\[lr], \\[factors]). See docs/ci.md.",
    rich_help_panel=CHECK_HELP, show_default=False)]
BaselineOpt = Annotated[Optional[Path], typer.Option(
    "--baseline", help="An older report to compare with (--max-increase / --max-decrease). Overrides the "
    "config's \\[baseline] report.", rich_help_panel=CHECK_HELP, show_default=False)]
MaxIncreaseOpt = Annotated[Optional[list[str]], typer.Option(
    "--max-increase", help="PATH=AMOUNT: fail when the value rose by more than AMOUNT over the baseline: a "
    "percentage of the baseline value ('groups[0].lambda_max=20%') or an absolute amount "
    "('loss_value=0.05'). Repeatable.", rich_help_panel=CHECK_HELP, show_default=False)]
MaxDecreaseOpt = Annotated[Optional[list[str]], typer.Option(
    "--max-decrease", help="PATH=AMOUNT: fail when the value fell by more than AMOUNT below the baseline "
    "(percentage or absolute, as --max-increase). Repeatable.",
    rich_help_panel=CHECK_HELP, show_default=False)]
JunitOpt = Annotated[Optional[Path], typer.Option(
    "--junit", help="Also write JUnit XML to this file: one testcase per rule, failures with value and "
    "threshold (written atomically; not written on bad input).",
    rich_help_panel=OUTPUT_HELP, show_default=False)]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print a JSON summary on stdout instead of the table (the table goes to stderr).",
    rich_help_panel=OUTPUT_HELP)]
OutDirOpt = Annotated[Path, typer.Option(
    "--out", "-o", help="Output directory when TARGET is a checkpoint: DIR/report.json and what the "
    "computations write beside it (a report of the same problem there is merged, not replaced).",
    rich_help_panel=OUTPUT_HELP)]


@app.command("check")
@handle_errors
def check(
    ctx: typer.Context,
    target: TargetArg,
    rule: RuleOpt = None,
    config: ConfigOpt = None,
    baseline: BaselineOpt = None,
    max_increase: MaxIncreaseOpt = None,
    max_decrease: MaxDecreaseOpt = None,
    junit: JunitOpt = None,
    json_output: JsonOpt = False,
    out_dir: OutDirOpt = Path("curvscope-out"),
    data: DataOpt = None,
    model: ModelOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    batch_size: BatchSizeOpt = 128,
    shuffle: ShuffleOpt = False,
    seed: SeedOpt = 0,
    loss: LossOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
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
               json_output, out_dir, data, model, model_kwargs, batch_size, shuffle, seed, loss, device,
               dtype)
    except CurvscopeError as exc:
        if in_github_actions():
            _annotate([github_annotation(" ".join(str(exc).split()), title="curvscope check: bad input")],
                      json_output)
        raise


def _check(ctx, target, rule_texts, config_path, baseline_path, increases, decreases, junit, json_output,
           out_dir, data, model, model_kwargs, batch_size, shuffle, seed, loss, device, dtype) -> None:
    started = time.perf_counter()
    given = {name for name in ("data", "out_dir", *PROBLEM_OPTIONS) if _explicit(ctx, name)}

    # 1. everything that can be wrong before computing anything
    config = load_config(config_path) if config_path is not None else CheckConfig()
    rules = config.rules + [parse_rule(text) for text in rule_texts]
    limits = config.limits + [parse_limit(s, "increase") for s in increases] + \
        [parse_limit(s, "decrease") for s in decreases]
    baseline_file = baseline_path if baseline_path is not None else config.baseline
    if limits and baseline_file is None:
        raise CurvscopeError("--max-increase / --max-decrease need a baseline: pass --baseline OLD.json "
                             "(or report = \"...\" under [baseline] in the config)")
    if baseline_path is not None and not limits:
        raise CurvscopeError("--baseline needs limits to check: add --max-increase PATH=AMOUNT or "
                             "--max-decrease PATH=AMOUNT")
    if not rules and not limits:
        raise CurvscopeError("nothing to check: give --rule 'PATH OP NUMBER' (repeatable) or --config FILE "
                             "with rules = [...]")
    if baseline_file is not None and limits:
        baseline_file = Path(baseline_file)
        old = read_report(baseline_file)
    else:
        old = None

    # 2. the report: read it, or compute it from the checkpoint
    computed: list[str] = []
    if target.is_dir() and (target / REPORT_NAME).is_file():
        target = target / REPORT_NAME
    if target.suffix.lower() == ".json":
        if given:
            flags = ", ".join("--out" if n == "out_dir" else "--" + n.replace("_", "-")
                              for n in sorted(given))
            raise CurvscopeError(f"{flags}: only used when TARGET is a checkpoint, but {target} is a report "
                                 "(.json)")
        report_path = target
        report = read_report(report_path)
    else:
        engines = engines_needed(config, [r.path for r in rules] + [lim.path for lim in limits])
        options = _engine_options(engines, config)
        functions = {name: _engine(name) for name in engines}  # a missing engine fails before any work
        values = {"model": model, "model_kwargs": model_kwargs, "batch_size": batch_size, "shuffle": shuffle,
                  "seed": seed, "loss": loss, "device": device, "dtype": dtype}
        for key, value in config.problem.items():
            if key not in given:
                values[key] = value
        _check_writable(out_dir)
        problem = build_problem(target, data, values["model"], values["model_kwargs"], values["batch_size"],
                                values["shuffle"], values["seed"], values["loss"], values["device"],
                                values["dtype"])
        for name in engines:
            functions[name](problem, out_dir, options[name], quiet=json_output)
            computed.append(name)
        report_path = Path(out_dir) / REPORT_NAME
        report = read_report(report_path)
        if not json_output:
            console.print(f"report: {escape(str(report_path))} (computed: {', '.join(computed)})")

    if old is not None:
        _warn_different_problem(report, old, baseline_file)

    # 3. verdict
    results = evaluate(report, rules, limits, old)
    if junit is not None:
        write_junit(junit, results, report=str(report_path), seconds=time.perf_counter() - started)
    failed = [r for r in results if not r.passed]
    table = _table(results, report_path)
    if json_output:
        console.print(table)
        doc = summary(results, report=str(report_path),
                      baseline=str(baseline_file) if old is not None else None, computed=computed)
        print(json.dumps(doc, indent=2), flush=True)
    else:
        out.print(table)
    if failed and in_github_actions():
        _annotate(github_annotations(results), json_output)
    if failed:
        raise typer.Exit(EXIT_FAILED)


def _explicit(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name`` (command line or environment), as opposed to its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and getattr(source, "name", "") not in ("DEFAULT", "DEFAULT_MAP")


def _annotate(lines: list[str], json_output: bool) -> None:
    """Workflow commands: GitHub reads them from stdout and stderr; keep stdout pure JSON under --json."""
    stream = sys.stderr if json_output else sys.stdout
    for line in lines:
        print(line, file=stream, flush=True)


def _check_writable(out_dir: Path) -> None:
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise CurvscopeError(f"--out {out_dir}: exists and is not a directory")


def _engine(name: str):
    """The ``run_*`` function of a computation, imported on first use."""
    module, function, command = ENGINE_FUNCTIONS[name]
    if importlib.util.find_spec(module) is None:
        raise CurvscopeError(f"this curvscope cannot compute '{name}' (no {module}): check a report written "
                             f"by `curvscope {command}` instead")
    fn = getattr(importlib.import_module(module), function, None)
    if fn is None:
        raise CurvscopeError(f"this curvscope cannot compute '{name}' ({module} has no {function}): check a "
                             f"report written by `curvscope {command}` instead")
    return fn


def _command_options(command: str) -> set[str] | None:
    """The snake_case option names of a registered command (``None`` when it is not registered)."""
    for info in app.registered_commands:
        name = info.name or (info.callback.__name__.replace("_", "-") if info.callback else None)
        if name == command and info.callback is not None:
            return set(inspect.signature(info.callback).parameters) - NOT_ENGINE_OPTIONS
    return None


def _engine_options(engines: list[str], config: CheckConfig) -> dict[str, dict[str, Any]]:
    """The option dict for each engine from the config's tables, checked against the command's options."""
    import difflib

    options: dict[str, dict[str, Any]] = {}
    where = f"{config.path}: " if config.path else ""
    for name in engines:
        table = dict(config.engines.get(name, {}))
        module, _, command = ENGINE_FUNCTIONS[name]
        if table:
            if importlib.util.find_spec(module) is not None:
                importlib.import_module(module)  # registers the command
            known = _command_options(command)
            for key in table:
                if key == "out_dir":
                    raise CurvscopeError(f"{where}[{name}] out_dir: the output directory is set with --out")
                if key in PROBLEM_OPTIONS or key in ("checkpoint", "data"):
                    raise CurvscopeError(f"{where}[{name}] {key}: a problem option; put it under [problem] "
                                         "(or pass it on the command line)")
                if known is not None and key not in known:
                    near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
                    hint = f" (did you mean {near[0]!r}?)" if near else ""
                    raise CurvscopeError(f"{where}unknown option {key!r} in [{name}]{hint}; options of "
                                         f"`curvscope {command}`: {', '.join(sorted(known))}")
        options[name] = table
    return options


def _warn_different_problem(report: dict, old: dict, path: Path) -> None:
    new_p, old_p = report.get("problem") or {}, old.get("problem") or {}
    keys = ("model", "data", "loss", "batch_size", "batch_indices")
    differ = [k for k in keys if new_p.get(k) != old_p.get(k)]
    if differ:
        console.print(f"[yellow]warning:[/yellow] the baseline {escape(str(path))} was computed on a "
                      f"different problem ({', '.join(differ)} differ): comparisons may not mean much",
                      soft_wrap=True)


def _table(results: list[RuleResult], report_path: Path) -> Table:
    failed = sum(not r.passed for r in results)
    verdict = "[bold red]FAILED[/bold red]" if failed else "[bold green]passed[/bold green]"
    table = Table(title=f"curvscope check: {len(results) - failed} of {len(results)} passed, {verdict} "
                        f"({escape(str(report_path))})", title_justify="left")
    table.add_column("rule", overflow="fold")
    table.add_column("value", justify="right", overflow="fold")
    table.add_column("threshold", justify="right", overflow="fold")
    table.add_column("result", overflow="fold")
    for r in results:
        worst = r.worst()
        if worst is None:
            value = "-"
        elif len(r.checks) == 1:
            value = fmt(worst.value)
        else:
            value = f"{fmt(worst.value)} (worst of {len(r.checks)})"
        if r.kind == "baseline" and worst is not None and worst.baseline is not None:
            threshold = f"{r.op} {fmt(worst.threshold)} (baseline {fmt(worst.baseline)} {r.threshold})"
        else:
            threshold = r.threshold
        result = "[green]pass[/green]" if r.passed else f"[bold red]FAIL[/bold red] {escape(r.reason)}"
        table.add_row(escape(r.rule), escape(value), escape(threshold), result)
    return table
