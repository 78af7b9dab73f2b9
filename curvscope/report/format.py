"""The one number formatter of every table, plot label and message."""

from __future__ import annotations

import math
from typing import Any


def num(x: Any, digits: int = 3, missing: str = "-") -> str:
    """A number for humans: ``digits`` significant digits, scientific notation outside [1e-3, 1e4), integers
    with thousands separators, ``missing`` for None and NaN, ``inf``/``-inf`` spelled out."""
    if x is None:
        return missing
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return f"{x:,}"
    x = float(x)
    if math.isnan(x):
        return missing
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.{digits}g}"
    return f"{x:.{max(digits - 1, 0)}e}"


def exact(x: float | None) -> str:
    """A number as rules and check messages show it: integers whole, else 6 significant digits; ``null``."""
    if x is None:
        return "null"
    x = float(x)
    if math.isfinite(x) and x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.6g}"


def share(x: float | None) -> str:
    """A fraction as a whole percentage (``-`` when missing)."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"


def finite_or_none(x: Any) -> float | None:
    """``x`` as a float when finite, else ``None`` (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
