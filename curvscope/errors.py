"""The one exception type that means "the user's input is wrong", and the option checks that raise it.

Everything raised as :class:`CurvscopeError` reaches the user as a single line and exit code 2; anything
else is a bug in curvscope.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

MAX_INT = 2**63 - 1


class CurvscopeError(Exception):
    """Bad input: a missing or corrupt file, a shape mismatch, an unsupported option, ...

    The message is one line that names the file or option and the problem.
    """


class Metavar(str):
    """A placeholder for a value in a message (``FILE``, ``SPEC``): written bare, never quoted, in every wording
    (``data=FILE`` in Python words, ``--data FILE`` on the command line)."""

    def __repr__(self) -> str:
        return str(self)


def python_name(parameter: str, *value: Any) -> str:
    """How a message names a parameter to a Python caller: ``top_k``, or a setting of it ``device='cpu'``."""
    return f"{parameter}={value[0]!r}" if value else parameter


Naming = Callable[..., str]
"""``name(parameter)`` or ``name(parameter, value)``: a parameter (or a setting of it) in the reader's words,
:func:`python_name` for Python callers; the CLI renders command-line flags (``--top-k``, ``--device cpu``)."""


class OptionError(CurvscopeError):
    """A bad value of a parameter, in words that name parameters, never command-line flags.

    ``message`` is either the text after the parameter's name (``OptionError("top_k", "must be at least 1")``
    reads ``top_k must be at least 1``), or a function ``message(name) -> str`` that writes the whole sentence
    and names every parameter it mentions through ``name`` (a :data:`Naming`)::

        OptionError("device", lambda name: f"{name('device', 'cuda')}: no CUDA GPU (use {name('device', 'cpu')})")

    ``str()`` is the Python wording (``device='cuda': no CUDA GPU (use device='cpu')``); :meth:`render` takes
    another naming: the CLI's gives ``--device cuda: no CUDA GPU (use --device cpu)``.
    """

    def __init__(self, field: str, message: str | Callable[[Naming], str]) -> None:
        self.field = field
        """The parameter the error is about."""
        self.message = message
        super().__init__(self.render(python_name))

    def render(self, name: Naming) -> str:
        """The message with every parameter named by ``name``."""
        if callable(self.message):
            return self.message(name)
        return f"{name(self.field)} {self.message}"


def at_least(name: str, value: int | float | None, low: int | float, *, optional: bool = False) -> None:
    """``value >= low`` (or ``None`` when ``optional``); :class:`OptionError` otherwise."""
    if value is None:
        if optional:
            return
        raise OptionError(name, "needs a value")
    if not math.isfinite(value) or value < low or abs(value) > MAX_INT:
        raise OptionError(name, f"must be at least {low}, got {value}")


def at_most(name: str, value: int | float | None, high: int | float, why: str = "") -> None:
    """``value <= high`` (``None`` passes); :class:`OptionError` otherwise: an absurd count is refused up front
    instead of hanging the run (``why``: what the maximum is for)."""
    if value is not None and value > high:
        raise OptionError(name, f"must be at most {high:,}, got {value:,}" + (f" ({why})" if why else ""))


def one_of(name: str, value: str, choices: Iterable[str]) -> None:
    """``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise OptionError(name, f"'{value}': choose one of {', '.join(choices)}")
