"""The one exception type that means "the user's input is wrong", and the option checks that raise it.

Everything raised as :class:`CurvscopeError` reaches the user as a single line and exit code 2; anything
else is a bug in curvscope.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

MAX_INT = 2**63 - 1


class CurvscopeError(Exception):
    """Bad input: a missing or corrupt file, a shape mismatch, an unsupported option, ...

    The message is one line that names the file or option and the problem.
    """


class OptionError(CurvscopeError):
    """A bad option value. ``str()`` reads ``"<field> <message>"``; :meth:`render` puts another label (a CLI
    flag, ``[spectrum] top_k`` in a config) in the field's place."""

    def __init__(self, field: str, message: str, flags_message: str | None = None) -> None:
        self.field = field
        self.message = message
        self.flags_message = flags_message
        super().__init__(f"{field} {message}")

    def render(self, label: str, flags: bool = True) -> str:
        """The message with ``label`` instead of the field name (and, when ``flags``, the CLI wording of a
        message that names other options, if one was given)."""
        return f"{label} {self.flags_message if flags and self.flags_message else self.message}"


def at_least(name: str, value: int | float | None, low: int | float, *, optional: bool = False) -> None:
    """``value >= low`` (or ``None`` when ``optional``); :class:`OptionError` otherwise."""
    if value is None:
        if optional:
            return
        raise OptionError(name, "needs a value")
    if not math.isfinite(value) or value < low or abs(value) > MAX_INT:
        raise OptionError(name, f"must be at least {low}, got {value}")


def one_of(name: str, value: str, choices: Iterable[str]) -> None:
    """``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise OptionError(name, f"'{value}': choose one of {', '.join(choices)}")
