"""Short ``repr()`` for result dataclasses: a notebook shows a line, not every tensor they hold."""

from __future__ import annotations

import dataclasses
from typing import Any

MAX_LENGTH = 240


def short(value: Any) -> str:
    """A value in a few characters: tensors by shape, containers by size, numbers to 4 digits."""
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"{value.item():.4g}" if len(shape) == 0 and hasattr(value, "item") else f"<{tuple(shape)}>"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return repr(value if len(value) <= 30 else value[:27] + "...")
    if isinstance(value, list | tuple):
        return repr(value) if len(value) <= 3 and all(isinstance(v, int | float | str) for v in value) \
            else f"[{len(value)} items]"
    if isinstance(value, dict):
        return f"{{{len(value)} entries}}"
    if dataclasses.is_dataclass(value):
        return f"{type(value).__name__}(...)"
    return repr(value) if len(repr(value)) <= 30 else f"<{type(value).__name__}>"


def compact_repr(obj: Any) -> str:
    """``Name(field=short value, ...)`` of a dataclass, cut at :data:`MAX_LENGTH` characters."""
    parts = [f"{f.name}={short(getattr(obj, f.name))}" for f in dataclasses.fields(obj) if f.repr]
    text = f"{type(obj).__name__}({', '.join(parts)})"
    return text if len(text) <= MAX_LENGTH else text[:MAX_LENGTH - 4] + " ...)"
