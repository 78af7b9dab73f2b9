"""Options of a workflow as a typed dataclass: defaults, strict conversion of config values, validation.

Every workflow (``spectrum``, ``lr``, ``factors``) has one options dataclass deriving from :class:`Options`.
Its fields are the knobs of the computation, in the engine's words (``top_k``, not ``--top-k``), each declared
with :func:`option`: its default and its help text are written there once. The CLI makes its flags from them
(``curvscope.cli.options.workflow_options``), ``curvscope check`` builds the options from a TOML table with
:meth:`Options.from_mapping`, and a notebook constructs them directly. :meth:`Options.validate` checks values
that need no Problem and raises :class:`OptionError` naming the field, which the CLI turns back into the flag's
name.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

from curvscope.errors import MAX_INT, CurvscopeError, OptionError, at_least, at_most, one_of

__all__ = ["OptionError", "Options", "at_least", "at_most", "one_of", "option"]

T = TypeVar("T", bound="Options")


def option(default: Any, help: str) -> Any:  # noqa: A002  (the word typer and argparse use)
    """A field of an options dataclass: its default and its help text, written only here.

    The CLI's flag of the field takes both; in ``help``, ````name```` names another option (the CLI writes its
    flag, ``--name``) and ````name=value```` a setting of one (``--name value``; ``--no-name`` for ``False``).
    """
    return dataclasses.field(default=default, metadata={"help": help})



@dataclasses.dataclass
class Options:
    """Base class of the workflows' options dataclasses."""

    command: ClassVar[str] = ""
    """The CLI command the options belong to (for messages)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """The class docstring lists the fields' help texts (``help(SpectrumOptions)``)."""
        super().__init_subclass__(**kwargs)
        entries = [f"    {name}: {value.metadata['help']}" for name, value in vars(cls).items()
                   if isinstance(value, dataclasses.Field) and "help" in value.metadata]
        if entries and cls.__doc__:
            cls.__doc__ = cls.__doc__.rstrip() + "\n\n    Attributes:\n" + "\n".join(f"    {e}" for e in entries)

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of option ``name`` (see :func:`option`)."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}[name]

    def validate(self) -> None:
        """Check values that need no Problem; raise :class:`OptionError`. Subclasses extend it."""
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), _hints(type(self))[f.name])

    @classmethod
    def field_names(cls) -> list[str]:
        """The option names, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls: type[T], values: Mapping[str, Any], where: str = "", section: str | None = None) -> T:
        """Options from a mapping (a TOML table): unknown keys and values of the wrong type are errors.

        ``where`` prefixes messages (e.g. ``"ci.toml: "``), ``section`` names the table (``spectrum``).
        Values are converted strictly: a bool field takes only ``true``/``false``, an int field only integers,
        a float field numbers, a path field strings; nothing is guessed from a string (``plots = "no"`` is an
        error, not ``True``).
        """
        hints = _hints(cls)
        known = cls.field_names()
        table = f" in [{section}]" if section else ""
        label = f"[{section}] " if section else ""
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                owner = f"options of `curvscope {cls.command}`" if cls.command else "options"
                raise CurvscopeError(f"{where}unknown option {key!r}{table}{hint}; {owner}: {', '.join(known)}")
            try:
                kwargs[key] = _convert(key, value, hints[key])
            except OptionError as exc:
                raise CurvscopeError(f"{where}{label}{exc}") from None
        options = cls(**kwargs)
        try:
            options.validate()
        except OptionError as exc:
            raise CurvscopeError(f"{where}{label}{exc}") from None
        return options

    def replace(self: T, **changes: Any) -> T:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:  # once per class: validate() asked for every field (5 ms a call)
    return typing.get_type_hints(cls)


def _allowed(hint: Any) -> tuple[list[Any], bool]:
    """The member types of a (possibly optional) hint, and whether None is allowed."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = list(typing.get_args(hint))
        return [a for a in args if a is not type(None)], type(None) in args
    return [hint], False


def _convert(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the field's type, without guessing; :class:`OptionError` otherwise."""
    members, optional = _allowed(hint)
    if value is None:
        if optional:
            return None
        raise OptionError(name, "needs a value")
    for member in members:
        if member is bool and isinstance(value, bool):
            return value
        if member is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if member is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if member is str and isinstance(value, str):
            return value
        if member is Path and isinstance(value, str | Path):
            return Path(value)
    names = " or ".join(_type_name(m) for m in members)
    raise OptionError(name, f"must be {names}, got {_describe(value)}")


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Validate a value set in Python (no conversion): the same rules as a config value."""
    members, optional = _allowed(hint)
    if value is None and optional:
        return
    _convert(name, value, hint)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise OptionError(name, f"is out of range ({len(str(abs(value)))}-digit integer)")
    if isinstance(value, float) and not math.isfinite(value) and float not in members:
        raise OptionError(name, f"must be finite, got {value}")


def _type_name(t: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Path: "a path (string)"}.get(t, getattr(t, "__name__", str(t)))


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
