"""``check``: gate a report (or a checkpoint, computing the report first) with rules and a baseline.

:func:`prepare_check` validates everything that needs no computation (config, rules, limits, baseline,
options of the computations); :func:`run_check` reads or computes the report and evaluates the rules.
Presentation (tables, JSON, JUnit, annotations) is the CLI's and :mod:`curvscope.report.check_output`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from curvscope.errors import CurvscopeError, Metavar, OptionError
from curvscope.report.check import Limit, Rule, RuleResult, evaluate, parse_limit, parse_rule
from curvscope.report.check_config import CheckConfig, engines_needed, load_config
from curvscope.report.schema import REPORT_NAME, read_report

if TYPE_CHECKING:
    from curvscope.problem import Problem
    from curvscope.progress import Progress
    from curvscope.workflows.options import Options

RULE, LIMIT = Metavar("'PATH OP NUMBER'"), Metavar("PATH=AMOUNT")
"""A rule and a baseline limit in messages."""

PROBLEM_OPTIONS = ("model", "model_kwargs", "batch_size", "shuffle", "seed", "loss", "device", "dtype", "output",
                   "shift_labels", "label_smoothing", "class_weights", "huber_delta", "smooth_l1_beta", "data",
                   "data_kwargs", "split", "columns", "pad_token")
"""Options of the problem a ``[problem]`` table may set (command-line values win)."""
BATCH_OPTIONS = ("batches",)
"""``[problem]`` keys that are options of the computations that take them (``[spectrum]``, ``[lr]``): the
default of each such computation's table."""


@dataclass
class CheckPlan:
    """Everything ``check`` validated before reading or computing a report."""

    target: Path
    config: CheckConfig
    rules: list[Rule]
    limits: list[Limit]
    baseline_file: Path | None = None
    baseline: dict[str, Any] | None = None
    options: dict[str, Options] = field(default_factory=dict)
    """Computation name -> its options (only when ``target`` is a checkpoint)."""

    @property
    def computes(self) -> bool:
        """Whether the target is a checkpoint (the report is computed first)."""
        return self.target.suffix.lower() != ".json"


@dataclass
class CheckOutcome:
    """The verdict of :func:`run_check`."""

    results: list[RuleResult]
    report_path: Path
    computed: list[str]
    baseline_file: Path | None
    warnings: list[str]
    seconds: float

    @property
    def failed(self) -> list[RuleResult]:
        """The rules that failed."""
        return [r for r in self.results if not r.passed]


def prepare_check(target: Path, rule_texts: list[str], config_path: Path | None, baseline_path: Path | None,
                  increases: list[str], decreases: list[str], given: set[str]) -> CheckPlan:
    """Validate config, rules, limits, baseline and computation options (nothing is computed).

    Args:
        target: a report (``.json``, or a directory holding one) to check as it is, or a checkpoint to compute
            the report of.
        rule_texts: ``PATH OP NUMBER`` rules (``--rule``), added to the config's.
        config_path: a TOML config with rules, limits, a baseline and computation options, or ``None``.
        baseline_path: the baseline report for the limits (default: the config's), or ``None``.
        increases: ``PATH=AMOUNT`` limits on increases from the baseline (``--max-increase``).
        decreases: ``PATH=AMOUNT`` limits on decreases from the baseline (``--max-decrease``).
        given: the problem options and ``data``/``out_dir`` the user set explicitly (only meaningful when the
            target is a checkpoint).
    """
    config = load_config(config_path) if config_path is not None else CheckConfig()
    rules = config.rules + [parse_rule(text) for text in rule_texts]
    limits = config.limits + [parse_limit(s, "increase") for s in increases] + \
        [parse_limit(s, "decrease") for s in decreases]
    baseline_file = baseline_path if baseline_path is not None else config.baseline
    if limits and baseline_file is None:
        raise OptionError("baseline", lambda name: f"{name('max_increase')} / {name('max_decrease')} need a "
                          f"baseline: pass {name('baseline', Metavar('OLD.json'))} (or report = \"...\" under "
                          "[baseline] in the config)")
    if baseline_path is not None and not limits:
        raise OptionError("baseline", lambda name: f"{name('baseline')} needs limits to check: add "
                          f"{name('max_increase', LIMIT)} or {name('max_decrease', LIMIT)}")
    if not rules and not limits:
        raise OptionError("rule", lambda name: f"nothing to check: give {name('rule', RULE)} (repeatable) or "
                          f"{name('config', Metavar('FILE'))} with rules = [...]")
    plan = CheckPlan(target=target, config=config, rules=rules, limits=limits)
    if baseline_file is not None and limits:
        plan.baseline_file = Path(baseline_file)
        plan.baseline = read_report(plan.baseline_file)
    if target.is_dir() and (target / REPORT_NAME).is_file():
        plan.target = target / REPORT_NAME
    elif not target.exists():
        if not plan.computes:
            raise CurvscopeError(f"{target}: report file not found")
        raise CurvscopeError(f"{target}: not found (expected a report, its directory, or a checkpoint)")
    elif target.is_dir() and not (target / "config.json").is_file():
        raise CurvscopeError(f"{target}: no {REPORT_NAME} in this directory (expected a report, its directory, "
                             "or a checkpoint)")
    if not plan.computes:
        if given:
            names = sorted(given)
            raise OptionError(names[0], lambda name: f"{', '.join(name(n) for n in names)}: only used when "
                              f"{name('target')} is a checkpoint, but {plan.target} is a report (.json)")
        return plan
    engines = engines_needed(config, [r.path for r in rules] + [lim.path for lim in limits])
    plan.options = engine_options(engines, config)
    return plan


def engine_options(engines: list[str], config: CheckConfig) -> dict[str, Options]:
    """The options of each computation from the config's tables, validated against its options dataclass."""
    import dataclasses

    from curvscope.workflows import get

    options: dict[str, Options] = {}
    where = f"{config.path}: " if config.path else ""
    for name in engines:
        table = dict(config.engines.get(name, {}))
        fields = {f.name for f in dataclasses.fields(get(name).options)}
        table = {**{k: v for k, v in config.problem.items() if k in BATCH_OPTIONS and k in fields}, **table}
        for key in table:
            if key == "out_dir":
                raise OptionError("out_dir", lambda label, name=name: f"{where}[{name}] out_dir: the output "
                                  f"directory is set with {label('out_dir')}")
            if key in PROBLEM_OPTIONS or key in ("checkpoint", "data"):
                raise CurvscopeError(f"{where}[{name}] {key}: a problem option; put it under [problem] "
                                     "(or pass it on the command line)")
        options[name] = get(name).options.from_mapping(table, where, section=name)
    return options


def problem_values(plan: CheckPlan, given: set[str], values: dict[str, Any], trust_model_code: bool = False
                   ) -> dict[str, Any]:
    """The problem options: the command line's where given, else the config's ``[problem]``, else defaults.

    A ``model``, ``data`` or ``loss`` that comes from the config file (not the command line) is code named by a
    file: a model must be a built-in one and a data factory or loss is refused unless ``trust_model_code`` (the
    same rule as checkpoint metadata). ``batches`` goes to the computations' options (:func:`engine_options`).
    """
    from curvscope.io.spec import check_trusted

    merged = dict(values)
    for key, value in plan.config.problem.items():
        if key not in given and key not in BATCH_OPTIONS:
            merged[key] = value
            if key == "model":
                check_trusted(value, f"{plan.config.path}: [problem] model", trust_model_code)
            if key == "data":
                from curvscope.io.factory import check_trusted_data

                check_trusted_data(value, f"{plan.config.path}: [problem] data", trust_model_code)
            if key == "loss":
                from curvscope.user_loss import check_trusted_loss

                check_trusted_loss(value, f"{plan.config.path}: [problem] loss", trust_model_code)
    return merged


def check_junit(plan: CheckPlan, junit: Path, out_dir: Path, data: Path | None = None) -> None:
    """Refuse a JUnit path that is the report, an input of the check (the target, the baseline, the config, the
    data) or one of the files the computations write into ``out_dir``: the XML would replace it.

    Raises:
        OptionError: of ``junit``, naming the file it collides with.
    """
    import os

    from curvscope.report.owned import is_own_name

    def real(path) -> Path:
        return Path(os.path.realpath(path))

    target = real(junit)
    taken = {"the checkpoint" if plan.computes else "the report checked": plan.target,
             "the baseline report": plan.baseline_file, "the config": plan.config.path, "the data": data}
    if plan.computes:
        taken["the report written"] = Path(out_dir) / REPORT_NAME
    for what, path in taken.items():
        if path is not None and real(path) == target:
            raise OptionError("junit", lambda name, what=what: f"{name('junit')} {junit}: is {what}; write the "
                              "JUnit XML to a file of its own")
    if plan.computes and is_own_name(junit) and target.parent == real(out_dir):
        raise OptionError("junit", lambda name: f"{name('junit')} {junit}: the same file as curvscope's own "
                          f"{Path(junit).name} in {name('out_dir')}; write the JUnit XML to a file of its own")


def outside_outputs(plan: CheckPlan, out_dir: Path) -> list[str]:
    """Warnings for the output files a config's computation tables name outside ``out_dir`` (its
    ``eigenvectors = "../victim.bin"`` is the config's explicit choice, but it should not go unseen)."""
    import dataclasses
    import os

    inside = os.path.realpath(out_dir)
    warnings = []
    for name, options in plan.options.items():
        for f in dataclasses.fields(options):
            value = getattr(options, f.name)
            if f.name not in plan.config.engines.get(name, {}) or not isinstance(value, Path):
                continue
            if os.path.commonpath([inside, os.path.realpath(value)]) != inside:
                warnings.append(f"{plan.config.path}: [{name}] {f.name} = {str(value)!r} writes outside the "
                                f"output directory {out_dir} ({os.path.abspath(value)})")
    return warnings


def run_check(plan: CheckPlan, out_dir: Path, load: Callable[[], Problem] | None = None,
              progress: Progress | None = None, started: float | None = None,
              warn: Callable[[str], None] | None = None, keep_other: bool = False) -> CheckOutcome:
    """Read (or, for a checkpoint, compute with ``load()``'s problem) the report, then evaluate the rules
    (``keep_other``: refuse to replace a report of another problem in ``out_dir``)."""
    from curvscope.workflows import run_and_write

    started = time.perf_counter() if started is None else started
    computed: list[str] = []
    if plan.computes:
        if load is None:
            raise CurvscopeError(f"{plan.target}: a checkpoint needs a problem to compute the report")
        run_and_write(load(), out_dir, plan.options, progress, warn=warn, keep_other=keep_other)
        computed = list(plan.options)
        report_path = Path(out_dir) / REPORT_NAME
    else:
        report_path = plan.target
    report = read_report(report_path)
    warnings = [] if plan.baseline is None else different_problem(report, plan.baseline, plan.baseline_file)
    if plan.baseline is not None:
        warnings += different_precision(report, plan.baseline, plan.baseline_file, plan.limits)
    results = evaluate(report, plan.rules, plan.limits, plan.baseline)
    return CheckOutcome(results=results, report_path=report_path, computed=computed,
                        baseline_file=plan.baseline_file if plan.baseline is not None else None,
                        warnings=warnings, seconds=time.perf_counter() - started)


PRECISION_BOUND = ("rank", "eigenvalue_floor", "eigenvalues", "snr_gt1_share", "lambda_snr_gt1_share",
                   "flat_overlap")
"""Report fields set by the precision floor (``docs/conventions.md`` §2): comparable only between reports computed
in the same precision."""


def report_precision(report: dict) -> str | None:
    """The precision a report's numbers carry: its ``precision`` (the rank floor's), else the problem's
    ``compute_dtype`` or ``dtype``."""
    problem = report.get("problem") if isinstance(report.get("problem"), dict) else {}
    return report.get("precision") or problem.get("compute_dtype") or problem.get("dtype")


def different_precision(report: dict, old: dict, path: Path | None, limits: list) -> list[str]:
    """Baselines compare like with like: limits on fields the precision floor sets (rank, SNR shares, ...) are
    refused between a float32 and a float64 report; other limits get a warning.

    Raises:
        CurvscopeError: a limit on a precision-bound field, with the precisions of the report and the baseline.
    """
    from curvscope.report.check_paths import Key, format_path

    new, before = report_precision(report), report_precision(old)
    if new is None or before is None or new == before:
        return []
    for limit in limits:
        keys = {step.name for step in limit.path if isinstance(step, Key)}
        bound = sorted(keys & set(PRECISION_BOUND))
        if bound:
            raise CurvscopeError(f"'{format_path(limit.path)}': the baseline {path} was computed in {before} and "
                                 f"the report in {new}; {bound[0]} counts or weighs eigenvalues above the precision "
                                 f"floor, which moves about 1e9-fold between them: compute both in the same dtype")
    return [f"the baseline {path} was computed in {before}, the report in {new}: their values agree only to the "
            "rounding of the lower precision"]


def different_problem(report: dict, old: dict, path: Path | None) -> list[str]:
    """A warning when the baseline was computed on another problem."""
    new_p, old_p = report.get("problem") or {}, old.get("problem") or {}
    keys = ("model", "data", "loss", "batch_size", "batch_indices")
    differ = [k for k in keys if new_p.get(k) != old_p.get(k)]
    if not differ:
        return []
    return [f"the baseline {path} was computed on a different problem ({', '.join(differ)} differ): comparisons "
            "may not mean much"]
