"""Rules that gate a report in CI: ``PATH OP NUMBER``, wildcards, selectors and baseline limits.

A path walks the JSON report: ``.key`` (or ``["key with.dots"]``) into a dict, ``[i]`` into a list (``[-1]``
is the last element), ``[*]`` over every element of a list (or every value of a dict), ``[key=value]`` over
the list elements whose ``key`` equals ``value`` (``groups[name=all]``). A rule holds when the comparison
holds for *every* element its path selects; a ``null`` value (non-finite number in the report) fails it.

Malformed rules, unknown paths and paths that do not end at a number raise :class:`CurvscopeError` (exit 2):
those are mistakes in the rule, not a verdict on the model. Paths (parsing, resolving, the nearest valid ones)
live in ``check_paths.py``, output writers in ``check_output.py``, the config file in ``check_config.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from curvscope.errors import CurvscopeError, Metavar, OptionError
from curvscope.report.check_paths import (
    NUMBER,
    SECTION_COMMANDS,
    Index,
    Key,
    Match,
    PathSyntax,
    Select,
    Step,
    Wildcard,
    format_path,
    leaf_paths,
    nearest_paths,
    numeric,
    parse_path,
    parse_path_at,
    resolve,
)
from curvscope.report.format import exact as fmt

__all__ = [  # the path names are re-exported: ``curvscope.report.check`` is the rule language's one import
    "EQ_REL_TOL", "OPERATORS", "SECTION_COMMANDS", "Check", "Index", "Key", "Limit", "Match", "Rule", "RuleResult",
    "Select", "Step", "Wildcard", "compare", "evaluate", "evaluate_limit", "evaluate_rule", "format_path",
    "leaf_paths", "make_limit", "nearest_paths", "numeric", "parse_amount", "parse_limit", "parse_path",
    "parse_rule", "resolve",
]

OPERATORS = ("<=", ">=", "==", "!=", "<", ">")
EQ_REL_TOL = 1e-9
"""``==`` and ``!=`` allow this relative difference (JSON round-offs)."""


# -- rules -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """``path op threshold``, e.g. ``groups[*].rank >= 10``."""

    path: tuple[Step, ...]
    op: str
    threshold: float
    number: str
    source: str = "rule"
    """Where the rule was given: the parameter ``rule``, or a config entry (``ci.toml rules[0]``)."""

    @property
    def text(self) -> str:
        """The rule in its canonical form, ``PATH OP NUMBER`` (the number as written)."""
        return f"{format_path(self.path)} {self.op} {self.number}"


MAX_RULE_LENGTH = 1000
"""Longer rules are refused at once (nothing a report holds needs a longer path)."""


def parse_rule(text: str, source: str | None = None) -> Rule:
    """Parse ``PATH OP NUMBER``; :class:`CurvscopeError` with the column of the first mistake otherwise.

    ``source`` names where the rule came from in messages (a config entry); without it the rule is the value of
    the parameter ``rule`` (an :class:`~curvscope.errors.OptionError` of it)."""
    if not isinstance(text, str):
        raise _refusal(source, "rule", lambda label: f"malformed rule {text!r} ({label}): a rule is a string like "
                       "'loss_value < 0.5'")
    stripped = text.strip()
    if len(stripped) > MAX_RULE_LENGTH:
        raise _refusal(source, "rule", lambda label: f"malformed rule ({label}): {len(stripped):,} characters, "
                       f"more than {MAX_RULE_LENGTH}; a rule is PATH OP NUMBER, e.g. 'groups[0].lambda_max <= 50'")

    def bad(message: str, pos: int) -> CurvscopeError:
        return _refusal(source, "rule", lambda label: f"malformed rule {text!r} ({label}): {message} (at column "
                        f"{pos + 1}); expected PATH OP NUMBER, e.g. 'groups[0].lambda_max <= 50'")

    try:
        path, pos = parse_path_at(stripped)
    except PathSyntax as exc:
        raise bad(str(exc), exc.pos) from None
    while pos < len(stripped) and stripped[pos].isspace():
        pos += 1
    op = next((o for o in OPERATORS if stripped.startswith(o, pos)), None)
    if op is None:
        got = stripped[pos:pos + 2] or "the end"
        raise bad(f"expected a comparison (<, <=, >, >=, ==, !=), got {got!r}", pos)
    pos += len(op)
    number = stripped[pos:].strip()
    if not number:
        raise bad("expected a number after " + repr(op), len(stripped))
    if not NUMBER.match(number):
        column = pos + len(stripped[pos:]) - len(stripped[pos:].lstrip())
        raise bad(f"expected a number, got {number!r}", column)
    if not math.isfinite(float(number)):
        raise bad(f"the number {number} is not finite", len(stripped) - len(number))
    return Rule(path=path, op=op, threshold=float(number), number=number, source=source or "rule")


def _refusal(source: str | None, parameter: str, message: Callable[[str], str]) -> CurvscopeError:
    """``message(label)`` about a value from ``source`` (a config entry, named as it is), or, without
    ``source``, about the value of ``parameter``: an :class:`OptionError` that names it."""
    if source is not None:
        return CurvscopeError(message(source))
    return OptionError(parameter, lambda name: message(name(parameter)))


def compare(value: float, op: str, threshold: float) -> bool:
    """``value op threshold``; ``==`` and ``!=`` allow a relative difference of 1e-9 (JSON round-offs)."""
    if op == "<":
        return value < threshold
    if op == "<=":
        return value <= threshold
    if op == ">":
        return value > threshold
    if op == ">=":
        return value >= threshold
    equal = math.isclose(value, threshold, rel_tol=EQ_REL_TOL, abs_tol=0.0)
    if op == "==":
        return equal
    if op == "!=":
        return not equal
    raise CurvscopeError(f"unknown comparison {op!r}")


# -- evaluation --------------------------------------------------------------------------------------------


@dataclass
class Check:
    """One selected value against its threshold."""

    path: str
    value: float | None
    threshold: float | None
    passed: bool
    reason: str = ""
    baseline: float | None = None


@dataclass
class RuleResult:
    """The verdict on one rule (or baseline limit): it passes when every one of its checks passes."""

    rule: str
    kind: str  # "rule" or "baseline"
    op: str
    threshold: str
    checks: list[Check] = field(default_factory=list)
    empty_reason: str = ""

    @property
    def passed(self) -> bool:
        """The rule passes: it has checks and every one passed (no values selected is a failure)."""
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        """The checks that failed, in order."""
        return [c for c in self.checks if not c.passed]

    @property
    def reason(self) -> str:
        """One line: why the rule failed ('' when it passed)."""
        if not self.checks:
            return self.empty_reason
        bad = self.failures
        if not bad:
            return ""
        if len(self.checks) == 1:
            return bad[0].reason
        listed = "; ".join(f"{c.path}: {c.reason}" for c in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        return f"{len(bad)} of {len(self.checks)} fail: {listed}{more}"

    def worst(self) -> Check | None:
        """The check to show in a one-row summary: the first failure, else the one closest to its limit."""
        if not self.checks:
            return None
        if self.failures:
            return self.failures[0]
        if self.op in ("<", "<="):
            return max(self.checks, key=lambda c: (c.value or 0.0) - (c.threshold or 0.0))
        if self.op in (">", ">="):
            return min(self.checks, key=lambda c: (c.value or 0.0) - (c.threshold or 0.0))
        return self.checks[0]


def evaluate_rule(report: dict, rule: Rule) -> RuleResult:
    """Check ``rule`` against ``report``: one :class:`Check` per value its path selects."""
    result = RuleResult(rule=rule.text, kind="rule", op=rule.op, threshold=f"{rule.op} {rule.number}")
    matches = resolve(report, rule.path)
    values = [numeric(m) for m in matches]  # type errors first: they are mistakes in the rule (exit 2)
    for m, value in zip(matches, values, strict=True):
        if value is None:
            result.checks.append(Check(m.path, None, rule.threshold, False, "value is null (not finite)"))
        elif not math.isfinite(value):  # NaN != 0.5, inf > 1, -inf < 0: a non-finite value passes no rule
            result.checks.append(Check(m.path, None, rule.threshold, False, f"value is {value} (not finite)"))
        elif compare(value, rule.op, rule.threshold):
            result.checks.append(Check(m.path, value, rule.threshold, True))
        else:
            result.checks.append(Check(m.path, value, rule.threshold, False,
                                       f"{fmt(value)} is not {rule.op} {rule.number}"))
    if not matches:
        result.empty_reason = f"no values: '{format_path(rule.path)}' selects an empty list"
    return result


def _finite(value: float | None) -> float | None:
    """``value`` for a :class:`Check` (whose numbers are finite or ``None``: JSON output has no NaN)."""
    return value if value is not None and math.isfinite(value) else None


# -- baselines ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limit:
    """At most ``amount`` (a fraction of the baseline's magnitude when ``relative``) of change in
    ``direction`` ("increase" or "decrease") from the baseline value at ``path``."""

    path: tuple[Step, ...]
    direction: str
    amount: float
    relative: bool
    source: str = "max_increase"
    """Where the limit was given: the parameter ``max_increase`` / ``max_decrease``, or a config entry."""

    @property
    def amount_text(self) -> str:
        """The amount as written in messages: a percentage when relative, else the number."""
        return f"{fmt(self.amount * 100)}%" if self.relative else fmt(self.amount)

    @property
    def text(self) -> str:
        """The limit as one line: ``PATH DIRECTION <= AMOUNT vs baseline``."""
        return f"{format_path(self.path)} {self.direction} <= {self.amount_text} vs baseline"


def parse_amount(amount: Any, where: str) -> tuple[float, bool]:
    """``"20%"`` -> (0.2, relative); ``5``, ``"5"`` or ``"1e-3"`` -> absolute amounts."""
    try:
        return _amount(amount)
    except ValueError as exc:
        raise CurvscopeError(f"{where}: {exc}") from None


def _amount(amount: Any) -> tuple[float, bool]:
    """:func:`parse_amount` without the label: ``ValueError`` saying what is wrong with the amount."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float, str)):
        raise ValueError(f"the amount must be a number or a percentage like '20%', got {amount!r}")
    text = str(amount).strip()
    relative = text.endswith("%")
    number = text[:-1].strip() if relative else text
    if not NUMBER.match(number):
        raise ValueError(f"the amount {text!r} is not a number or a percentage like '20%'")
    value = float(number)
    if not math.isfinite(value):
        raise ValueError(f"the amount {text!r} is not finite")
    if value < 0:
        raise ValueError(f"the amount {text!r} must not be negative")
    return (value / 100.0 if relative else value), relative


def parse_limit(spec: str, direction: str, source: str | None = None) -> Limit:
    """Parse a ``max_increase`` / ``max_decrease`` value: ``PATH=AMOUNT`` (``20%``, or absolute ``5``).
    Messages name ``source`` (a config entry), else that parameter."""
    if not isinstance(spec, str) or "=" not in spec:
        raise _refusal(source, f"max_{direction}", lambda label: f"malformed {label} {spec!r}: expected "
                       "PATH=AMOUNT, e.g. 'groups[0].lambda_max=20%' or 'loss_value=0.05'")
    path_text, amount = spec.rsplit("=", 1)
    return make_limit(path_text, amount, direction, source)


def make_limit(path_text: str, amount: Any, direction: str, source: str | None = None) -> Limit:
    """A :class:`Limit` from a path string and an amount (config tables give them separately); messages name
    ``source`` (a config entry), else the parameter ``max_increase`` / ``max_decrease``."""
    if direction not in ("increase", "decrease"):
        raise CurvscopeError(f"unknown limit direction {direction!r}")
    parameter = f"max_{direction}"
    try:
        path = parse_path(path_text)
    except CurvscopeError as exc:
        text = str(exc)
        raise _refusal(source, parameter, lambda label: f"{label}: {text}") from None
    try:
        value, relative = _amount(amount)
    except ValueError as exc:
        text = str(exc)
        raise _refusal(source, parameter, lambda label: f"{label} {format_path(path)}: {text}") from None
    return Limit(path=path, direction=direction, amount=value, relative=relative, source=source or parameter)


def evaluate_limit(report: dict, baseline: dict, limit: Limit) -> RuleResult:
    """Compare the values ``limit.path`` selects in ``report`` with the same elements of ``baseline``
    (paired by index for ``[*]``, by selector for ``[key=value]``)."""
    sign = "<=" if limit.direction == "increase" else ">="
    result = RuleResult(rule=limit.text, kind="baseline", op=sign,
                        threshold=f"{'+' if limit.direction == 'increase' else '-'}{limit.amount_text}")
    new = resolve(report, limit.path)
    old = resolve(baseline, limit.path, where="the baseline")
    new_values = [numeric(m) for m in new]
    old_values = {m.pair: numeric(m, where="the baseline") for m in old}
    for m, value in zip(new, new_values, strict=True):
        if m.pair not in old_values:
            result.checks.append(Check(m.path, _finite(value), None, False, "not in the baseline"))
            continue
        before = old_values[m.pair]
        if before is None or not math.isfinite(before):
            what = "null" if before is None else before
            result.checks.append(Check(m.path, _finite(value), None, False, f"baseline value is {what} (not finite)"))
            continue
        step = abs(before) * limit.amount if limit.relative else limit.amount
        bound = before + step if limit.direction == "increase" else before - step
        if value is None or not math.isfinite(value):
            what = "null" if value is None else value
            result.checks.append(Check(m.path, None, bound, False, f"value is {what} (not finite)", before))
            continue
        passed = value <= bound if limit.direction == "increase" else value >= bound
        change = value - before
        if passed:
            result.checks.append(Check(m.path, value, bound, True, "", before))
            continue
        verb = "rose" if change > 0 else "fell"
        rel = f" ({abs(change) / abs(before):.1%})" if before != 0 else ""
        result.checks.append(Check(m.path, value, bound, False,
                                   f"{verb} by {fmt(abs(change))}{rel} from {fmt(before)} to {fmt(value)}; "
                                   f"max {limit.direction} {limit.amount_text}", before))
    new_pairs = {m.pair for m in new}
    for m in old:
        if m.pair not in new_pairs:
            result.checks.append(Check(m.path, None, None, False, "in the baseline but not in the report",
                                       _finite(old_values[m.pair])))
    if not new and not old:
        result.empty_reason = f"no values: '{format_path(limit.path)}' selects an empty list"
    return result


def evaluate(report: dict, rules: list[Rule], limits: list[Limit] = (), baseline: dict | None = None
             ) -> list[RuleResult]:
    """Every rule, then every baseline limit. Raises :class:`CurvscopeError` on the first rule that cannot be
    evaluated (unknown path, not a number), so a verdict is never based on half the rules."""
    if limits and baseline is None:
        raise OptionError("baseline", lambda name: f"{name('max_increase')} / {name('max_decrease')} need a "
                          f"baseline report ({name('baseline', Metavar('OLD.json'))})")
    results = [evaluate_rule(report, rule) for rule in rules]
    results += [evaluate_limit(report, baseline, limit) for limit in limits]
    return results
