"""Paths into a JSON report, for the rules of ``curvscope check``: parsing, formatting and resolving them.

A path walks the JSON report: ``.key`` (or ``["key with.dots"]``) into a dict, ``[i]`` into a list (``[-1]``
is the last element), ``[*]`` over every element of a list (or every value of a dict), ``[key=value]`` over
the list elements whose ``key`` equals ``value`` (``groups[name=all]``). Unknown keys, indices out of range and
selectors that match nothing raise :class:`CurvscopeError` naming the nearest valid paths. The rules and
baselines that use them: :mod:`curvscope.report.check`.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Union

from curvscope import commands
from curvscope.errors import CurvscopeError

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
NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\Z")
"""A number as a rule or a selector writes it."""


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


class PathSyntax(Exception):
    """A path that does not parse, at column ``pos`` (0-based) of its text."""

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
        raise PathSyntax("unclosed '['", start)
    char = text[pos]
    if char in "\"'":
        end = text.find(char, pos + 1)
        if end < 0:
            raise PathSyntax("unclosed quote", pos)
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
                raise PathSyntax("unclosed quote", pos)
            value, pos = text[pos + 1:end], end + 1
        else:
            end = text.find("]", pos)
            if end < 0:
                raise PathSyntax("unclosed '['", start)
            value, pos = text[pos:end].strip(), end
            if not value:
                raise PathSyntax("empty value in [key=value]", pos)
        step = Select(m.group(1), value)
    else:
        raise PathSyntax("expected an index [0], [*], [\"key\"] or [key=value]", pos)
    while pos < len(text) and text[pos] == " ":
        pos += 1
    if pos >= len(text) or text[pos] != "]":
        raise PathSyntax("expected ']'", pos)
    return step, pos + 1


MAX_PATH_STEPS = 32
"""The most steps a path may have (a report is a few levels deep; a longer path is refused at once)."""
MAX_PATH_LENGTH = 1000
"""The most characters a path may have."""


def parse_path_at(text: str, pos: int = 0) -> tuple[tuple[Step, ...], int]:
    """The path starting at ``pos`` of ``text``, and the position after it (a rule's comparison follows)."""
    steps: list[Step] = []
    while True:
        if len(steps) > MAX_PATH_STEPS:
            raise PathSyntax(f"more than {MAX_PATH_STEPS} steps (a report is a few levels deep)", pos)
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
            raise PathSyntax(f"expected {what}" + (f", got {text[pos]!r}" if pos < len(text) else ""), pos)
        steps.append(Key(m.group()))
        pos = m.end()


def parse_path(text: str) -> tuple[Step, ...]:
    """Parse a whole string as a path; :class:`CurvscopeError` when it is not one."""
    stripped = text.strip()
    if len(stripped) > MAX_PATH_LENGTH:
        raise CurvscopeError(f"malformed path ({len(stripped):,} characters, more than {MAX_PATH_LENGTH}): "
                             "a path is a few keys and indices, e.g. groups[0].lambda_max")
    try:
        steps, end = parse_path_at(stripped)
        if end != len(stripped):
            raise PathSyntax(f"unexpected {stripped[end]!r}", end)
    except PathSyntax as exc:
        raise CurvscopeError(f"malformed path {text!r}: {exc} (at column {exc.pos + 1})") from None
    return steps


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
                                  "check the checkpoint itself (`curvscope check CHECKPOINT` computes it)")
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
    if isinstance(value, (int, float)) and not isinstance(value, bool) and NUMBER.match(text.strip()):
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


def numeric(match: Match, *, where: str = "the report") -> float | int | None:
    """The number at ``match`` (``None`` for null; an integer stays an integer); :class:`CurvscopeError` when
    it is not a number."""
    value = match.value
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):  # kept an integer (a JSON summary prints 23, not 23.0)
        if abs(value) > 2**1000:  # beyond the float range: as infinite as it gets
            return math.inf if value > 0 else -math.inf
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, list):
        raise CurvscopeError(f"'{match.path}' in {where} is a list of {len(value)} values, not a number: use "
                             f"'{match.path}[*]' (every element must pass) or '{match.path}[0]'")
    if isinstance(value, dict):
        keys = ", ".join(list(value)[:8])
        raise CurvscopeError(f"'{match.path}' in {where} is an object, not a number: add one of its keys "
                             f"({keys})")
    raise CurvscopeError(f"'{match.path}' in {where} is {_kind(value)} ({value!r}), not a number: rules "
                         "compare numbers")
