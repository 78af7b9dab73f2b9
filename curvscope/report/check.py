"""Rules that gate a report in CI: ``PATH OP NUMBER``, wildcards, selectors and baseline limits.

A path walks the JSON report: ``.key`` (or ``["key with.dots"]``) into a dict, ``[i]`` into a list (``[-1]``
is the last element), ``[*]`` over every element of a list (or every value of a dict), ``[key=value]`` over
the list elements whose ``key`` equals ``value`` (``groups[name=all]``). A rule holds when the comparison
holds for *every* element its path selects; a ``null`` value (non-finite number in the report) fails it.

Malformed rules, unknown paths and paths that do not end at a number raise :class:`CurvscopeError` (exit 2):
those are mistakes in the rule, not a verdict on the model. Output writers live in ``check_output.py``, the
config file in ``check_config.py``.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Union

from curvscope import commands
from curvscope.errors import CurvscopeError
from curvscope.report.format import exact as fmt

# -- paths -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """``.name`` or ``["name"]``: a key of a dict."""

    name: str


@dataclass(frozen=True)
class Index:
    """``[i]``: one element of a list (negative counts from the end)."""

    index: int


@dataclass(frozen=True)
class Wildcard:
    """``[*]``: every element of a list, or every value of a dict."""


@dataclass(frozen=True)
class Select:
    """``[key=value]``: the elements of a list of dicts whose ``key`` equals ``value``."""

    key: str
    value: str


Step = Union[Key, Index, Wildcard, Select]

_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\Z")
_INT = re.compile(r"-?\d+")
_SELECT = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_\-]*)\s*=\s*")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\Z")
OPERATORS = ("<=", ">=", "==", "!=", "<", ">")
EQ_REL_TOL = 1e-9


def format_path(steps: tuple[Step, ...] | list[Step]) -> str:
    """The canonical text of a path: ``groups[0].lambda_max``, ``factors.layers["fc.weight"]``."""
    parts: list[str] = []
    for step in steps:
        if isinstance(step, Key):
            if _IDENT.match(step.name) and not _INT.fullmatch(step.name):
                parts.append(("." if parts else "") + step.name)
            else:
                parts.append(f'["{step.name}"]')
        elif isinstance(step, Index):
            parts.append(f"[{step.index}]")
        elif isinstance(step, Wildcard):
            parts.append("[*]")
        else:
            value = step.value if re.fullmatch(r"[^\]\"'\s]+", step.value) else f'"{step.value}"'
            parts.append(f"[{step.key}={value}]")
    return "".join(parts)


class _Syntax(Exception):
    def __init__(self, message: str, pos: int):
        super().__init__(message)
        self.pos = pos


def _parse_bracket(text: str, pos: int) -> tuple[Step, int]:
    """Parse ``[...]`` starting at ``text[pos] == '['``; returns the step and the position after ``]``."""
    start = pos
    pos += 1
    while pos < len(text) and text[pos] == " ":
        pos += 1
    if pos >= len(text):
        raise _Syntax("unclosed '['", start)
    char = text[pos]
    if char in "\"'":
        end = text.find(char, pos + 1)
        if end < 0:
            raise _Syntax("unclosed quote", pos)
        step: Step = Key(text[pos + 1:end])
        pos = end + 1
    elif char == "*":
        step, pos = Wildcard(), pos + 1
    elif (m := _INT.match(text, pos)) and not _SELECT.match(text, pos):
        step, pos = Index(int(m.group())), m.end()
    elif m := _SELECT.match(text, pos):
        pos = m.end()
        if pos < len(text) and text[pos] in "\"'":
            end = text.find(text[pos], pos + 1)
            if end < 0:
                raise _Syntax("unclosed quote", pos)
            value, pos = text[pos + 1:end], end + 1
        else:
            end = text.find("]", pos)
            if end < 0:
                raise _Syntax("unclosed '['", start)
            value, pos = text[pos:end].strip(), end
            if not value:
                raise _Syntax("empty value in [key=value]", pos)
        step = Select(m.group(1), value)
    else:
        raise _Syntax("expected an index [0], [*], [\"key\"] or [key=value]", pos)
    while pos < len(text) and text[pos] == " ":
        pos += 1
    if pos >= len(text) or text[pos] != "]":
        raise _Syntax("expected ']'", pos)
    return step, pos + 1


def _parse_path_at(text: str, pos: int = 0) -> tuple[tuple[Step, ...], int]:
    steps: list[Step] = []
    while True:
        if pos < len(text) and text[pos] == "[":
            step, pos = _parse_bracket(text, pos)
            steps.append(step)
            continue
        if steps and (pos >= len(text) or text[pos] != "."):
            return tuple(steps), pos
        if steps:
            pos += 1  # the dot
        m = _KEY.match(text, pos)
        if not m:
            what = "a key" if steps else "a path"
            raise _Syntax(f"expected {what}" + (f", got {text[pos]!r}" if pos < len(text) else ""), pos)
        steps.append(Key(m.group()))
        pos = m.end()


def parse_path(text: str) -> tuple[Step, ...]:
    """Parse a whole string as a path; :class:`CurvscopeError` when it is not one."""
    stripped = text.strip()
    try:
        steps, end = _parse_path_at(stripped)
        if end != len(stripped):
            raise _Syntax(f"unexpected {stripped[end]!r}", end)
    except _Syntax as exc:
        raise CurvscopeError(f"malformed path {text!r}: {exc} (at column {exc.pos + 1})") from None
    return steps


# -- rules -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """``path op threshold``, e.g. ``groups[*].rank >= 10``."""

    path: tuple[Step, ...]
    op: str
    threshold: float
    number: str
    source: str = "--rule"

    @property
    def text(self) -> str:
        """The rule in its canonical form, ``PATH OP NUMBER`` (the number as written)."""
        return f"{format_path(self.path)} {self.op} {self.number}"


MAX_RULE_LENGTH = 1000
"""Longer rules are refused at once (nothing a report holds needs a longer path)."""


def parse_rule(text: str, source: str = "--rule") -> Rule:
    """Parse ``PATH OP NUMBER``; :class:`CurvscopeError` with the column of the first mistake otherwise."""
    if not isinstance(text, str):
        raise CurvscopeError(f"malformed rule {text!r} ({source}): a rule is a string like "
                             "'loss_value < 0.5'")
    stripped = text.strip()
    if len(stripped) > MAX_RULE_LENGTH:
        raise CurvscopeError(f"malformed rule ({source}): {len(stripped):,} characters, more than "
                             f"{MAX_RULE_LENGTH}; a rule is PATH OP NUMBER, e.g. 'groups[0].lambda_max <= 50'")

    def bad(message: str, pos: int) -> CurvscopeError:
        return CurvscopeError(f"malformed rule {text!r} ({source}): {message} (at column {pos + 1}); "
                              "expected PATH OP NUMBER, e.g. 'groups[0].lambda_max <= 50'")

    try:
        path, pos = _parse_path_at(stripped)
    except _Syntax as exc:
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
    if not _NUMBER.match(number):
        column = pos + len(stripped[pos:]) - len(stripped[pos:].lstrip())
        raise bad(f"expected a number, got {number!r}", column)
    return Rule(path=path, op=op, threshold=float(number), number=number, source=source)


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


# -- resolving paths in a report ---------------------------------------------------------------------------

SECTION_COMMANDS = {c.key: c.command for c in commands.COMMANDS if c.key is not None}
"""Report section -> the command that writes it (``lr`` -> ``lr-suggest``), from the registry."""


@dataclass(frozen=True)
class Match:
    """One value a path selects: where it is (``steps``, all concrete) and the key that pairs it with the
    same element of a baseline (indices for ``[*]``, the selector text for ``[key=value]``)."""

    steps: tuple[Step, ...]
    pair: tuple
    value: Any

    @property
    def path(self) -> str:
        """The concrete path of the value as text, e.g. ``groups[2].rank``."""
        return format_path(self.steps)


def _kind(node: Any) -> str:
    if node is None:
        return "null"
    if isinstance(node, bool):
        return "a boolean"
    if isinstance(node, (int, float)):
        return "a number"
    if isinstance(node, str):
        return "a string"
    if isinstance(node, list):
        return f"a list of {len(node)}"
    return "an object"


def resolve(report: dict, path: tuple[Step, ...], *, where: str = "the report") -> list[Match]:
    """Every value ``path`` selects in ``report`` (several for ``[*]`` and selectors, none for ``[*]`` over
    an empty list). Unknown keys, indices out of range and selectors that match nothing raise
    :class:`CurvscopeError` naming the nearest valid paths."""
    current: list[Match] = [Match((), (), report)]
    for depth, step in enumerate(path):
        following: list[Match] = []
        for m in current:
            node = m.value
            prefix = m.path or "the report"
            if isinstance(step, Key):
                if isinstance(node, dict) and step.name in node:
                    following.append(Match((*m.steps, step), (*m.pair, step.name), node[step.name]))
                    continue
                if isinstance(node, dict):
                    if depth == 0 and step.name in SECTION_COMMANDS:
                        detail = (f"{where} has no '{step.name}' section: run `curvscope "
                                  f"{SECTION_COMMANDS[step.name]}` into the same output directory first, or "
                                  "let `curvscope check CHECKPOINT --config FILE` compute it")
                    else:
                        detail = f"{prefix} has no key {step.name!r}"
                else:
                    hint = "; use [i] or [*]" if isinstance(node, list) else ""
                    detail = f"{prefix} is {_kind(node)}, not an object with key {step.name!r}{hint}"
                raise _unknown(report, path, detail, where)
            if isinstance(step, Index):
                if not isinstance(node, list):
                    raise _unknown(report, path, f"{prefix} is {_kind(node)}, not a list", where)
                if not -len(node) <= step.index < len(node):
                    raise _unknown(report, path, f"index {step.index} is out of range: {prefix} has "
                                   f"{len(node)} element{'s' * (len(node) != 1)}", where)
                concrete = step.index % len(node)
                following.append(Match((*m.steps, Index(concrete)), (*m.pair, step.index), node[step.index]))
            elif isinstance(step, Wildcard):
                if isinstance(node, list):
                    following.extend(Match((*m.steps, Index(i)), (*m.pair, i), v) for i, v in enumerate(node))
                elif isinstance(node, dict):
                    following.extend(Match((*m.steps, Key(k)), (*m.pair, k), v) for k, v in node.items())
                else:
                    raise _unknown(report, path, f"{prefix} is {_kind(node)}: [*] needs a list", where)
            else:
                if not isinstance(node, list):
                    raise _unknown(report, path, f"{prefix} is {_kind(node)}, not a list", where)
                hits = [(i, v) for i, v in enumerate(node)
                        if isinstance(v, dict) and _equal(v.get(step.key), step.value)]
                if not hits:
                    seen = [str(v.get(step.key)) for v in node if isinstance(v, dict) and step.key in v]
                    known = f"; {step.key} values: {', '.join(seen[:12])}" if seen else \
                        f"; its elements have no key {step.key!r}"
                    raise _unknown(report, path, f"no element of {prefix} has {step.key}={step.value}{known}",
                                   where, suggest=False)
                for k, (i, v) in enumerate(hits):
                    following.append(Match((*m.steps, Index(i)), (*m.pair, f"{step.key}={step.value}", k), v))
        current = following
    return current


def _equal(value: Any, text: str) -> bool:
    if isinstance(value, str):
        return value == text
    if isinstance(value, (int, float)) and not isinstance(value, bool) and _NUMBER.match(text.strip()):
        return float(value) == float(text)
    return False


def leaf_paths(report: Any, limit: int = 2000) -> list[tuple[Step, ...]]:
    """The paths of every leaf of ``report`` with list indices as ``[*]`` (the vocabulary for suggestions)."""
    found: dict[tuple[Step, ...], None] = {}

    def walk(node: Any, prefix: tuple[Step, ...]) -> None:
        if len(found) >= limit:
            return
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*prefix, Key(str(k))))
        elif isinstance(node, list):
            if not node or not any(isinstance(v, (dict, list)) for v in node[:50]):
                found[(*prefix, Wildcard())] = None
            for v in node[:50]:
                if isinstance(v, (dict, list)):
                    walk(v, (*prefix, Wildcard()))
        else:
            found[prefix] = None

    walk(report, ())
    return list(found)


def nearest_paths(report: dict, path: tuple[Step, ...], n: int = 4) -> list[str]:
    """The valid paths closest to ``path`` (difflib on the ``[*]`` forms), with the user's own indices put
    back in place of ``[*]`` where that path exists."""
    def template(steps: tuple[Step, ...]) -> str:
        return format_path(tuple(Wildcard() if isinstance(s, (Index, Select)) else s for s in steps))

    candidates = {template(p): p for p in leaf_paths(report)}
    wanted = template(path)
    names = difflib.get_close_matches(wanted, list(candidates), n=n, cutoff=0.6)
    if not names:  # fall back on leaves that share the longest valid prefix
        for cut in range(len(path) - 1, -1, -1):
            prefix = template(path[:cut])
            names = [c for c in candidates if c.startswith(prefix) and c != prefix][:n] if cut else []
            if names:
                break
    user_brackets = [s for s in path if not isinstance(s, Key)]
    result = []
    for name in names:
        steps, k = [], 0
        for s in candidates[name]:
            if isinstance(s, Wildcard) and k < len(user_brackets):
                s = user_brackets[k]
            if not isinstance(s, Key):
                k += 1
            steps.append(s)
        result.append(format_path(steps) if _exists(report, steps) else name)
    return list(dict.fromkeys(result))


def _exists(node: Any, steps: list[Step]) -> bool:
    """Whether ``steps`` leads somewhere in ``node`` (for every element, through ``[*]`` and selectors)."""
    if not steps:
        return True
    step, rest = steps[0], steps[1:]
    if isinstance(step, Key):
        return isinstance(node, dict) and step.name in node and _exists(node[step.name], rest)
    if isinstance(step, Index):
        return (isinstance(node, list) and -len(node) <= step.index < len(node)
                and _exists(node[step.index], rest))
    if isinstance(step, Wildcard):
        items = node if isinstance(node, list) else list(node.values()) if isinstance(node, dict) else None
        return items is not None and all(_exists(v, rest) for v in items)
    hits = [v for v in node if isinstance(v, dict) and _equal(v.get(step.key), step.value)] \
        if isinstance(node, list) else []
    return bool(hits) and all(_exists(v, rest) for v in hits)


def _unknown(report: dict, path: tuple[Step, ...], detail: str, where: str,
             suggest: bool = True) -> CurvscopeError:
    message = f"unknown path '{format_path(path)}' in {where}: {detail}"
    near = nearest_paths(report, path) if suggest else []
    if near:
        message += "; nearest valid paths: " + ", ".join(near)
    return CurvscopeError(message)


def numeric(match: Match, *, where: str = "the report") -> float | None:
    """The number at ``match`` (``None`` for null); :class:`CurvscopeError` when it is not a number."""
    value = match.value
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, list):
        raise CurvscopeError(f"'{match.path}' in {where} is a list of {len(value)} values, not a number: use "
                             f"'{match.path}[*]' (every element must pass) or '{match.path}[0]'")
    if isinstance(value, dict):
        keys = ", ".join(list(value)[:8])
        raise CurvscopeError(f"'{match.path}' in {where} is an object, not a number: add one of its keys "
                             f"({keys})")
    raise CurvscopeError(f"'{match.path}' in {where} is {_kind(value)} ({value!r}), not a number: rules "
                         "compare numbers")


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
        elif compare(value, rule.op, rule.threshold):
            result.checks.append(Check(m.path, value, rule.threshold, True))
        else:
            result.checks.append(Check(m.path, value, rule.threshold, False,
                                       f"{fmt(value)} is not {rule.op} {rule.number}"))
    if not matches:
        result.empty_reason = f"no values: '{format_path(rule.path)}' selects an empty list"
    return result


# -- baselines ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limit:
    """At most ``amount`` (a fraction of the baseline's magnitude when ``relative``) of change in
    ``direction`` ("increase" or "decrease") from the baseline value at ``path``."""

    path: tuple[Step, ...]
    direction: str
    amount: float
    relative: bool
    source: str = "--max-increase"

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
    if isinstance(amount, bool) or not isinstance(amount, (int, float, str)):
        raise CurvscopeError(f"{where}: the amount must be a number or a percentage like '20%', "
                             f"got {amount!r}")
    text = str(amount).strip()
    relative = text.endswith("%")
    number = text[:-1].strip() if relative else text
    if not _NUMBER.match(number):
        raise CurvscopeError(f"{where}: the amount {text!r} is not a number or a percentage like '20%'")
    value = float(number)
    if value < 0:
        raise CurvscopeError(f"{where}: the amount {text!r} must not be negative")
    return (value / 100.0 if relative else value), relative


def parse_limit(spec: str, direction: str, source: str | None = None) -> Limit:
    """Parse a ``--max-increase`` / ``--max-decrease`` value: ``PATH=AMOUNT`` (``20%``, or absolute ``5``)."""
    source = source or f"--max-{direction}"
    if not isinstance(spec, str) or "=" not in spec:
        raise CurvscopeError(f"malformed {source} {spec!r}: expected PATH=AMOUNT, e.g. "
                             "'groups[0].lambda_max=20%' or 'loss_value=0.05'")
    path_text, amount = spec.rsplit("=", 1)
    return make_limit(path_text, amount, direction, source)


def make_limit(path_text: str, amount: Any, direction: str, source: str) -> Limit:
    """A :class:`Limit` from a path string and an amount (config tables give them separately)."""
    if direction not in ("increase", "decrease"):
        raise CurvscopeError(f"unknown limit direction {direction!r}")
    try:
        path = parse_path(path_text)
    except CurvscopeError as exc:
        raise CurvscopeError(f"{source}: {exc}") from None
    value, relative = parse_amount(amount, f"{source} {format_path(path)}")
    return Limit(path=path, direction=direction, amount=value, relative=relative, source=source)


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
            result.checks.append(Check(m.path, value, None, False, "not in the baseline"))
            continue
        before = old_values[m.pair]
        if before is None:
            result.checks.append(Check(m.path, value, None, False, "baseline value is null (not finite)"))
            continue
        step = abs(before) * limit.amount if limit.relative else limit.amount
        bound = before + step if limit.direction == "increase" else before - step
        if value is None:
            result.checks.append(Check(m.path, None, bound, False, "value is null (not finite)", before))
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
                                       old_values[m.pair]))
    if not new and not old:
        result.empty_reason = f"no values: '{format_path(limit.path)}' selects an empty list"
    return result


def evaluate(report: dict, rules: list[Rule], limits: list[Limit] = (), baseline: dict | None = None
             ) -> list[RuleResult]:
    """Every rule, then every baseline limit. Raises :class:`CurvscopeError` on the first rule that cannot be
    evaluated (unknown path, not a number), so a verdict is never based on half the rules."""
    if limits and baseline is None:
        raise CurvscopeError("--max-increase / --max-decrease need a baseline report (--baseline OLD.json)")
    results = [evaluate_rule(report, rule) for rule in rules]
    results += [evaluate_limit(report, baseline, limit) for limit in limits]
    return results
