"""curvscope: curvature diagnosis for PyTorch models.

The public API mirrors the CLI: build a :class:`Problem` with :func:`load_problem` (or directly from a
model and a batch with :func:`make_problem`), then call :func:`spectrum`, :func:`suggest_lr` or
:func:`factors` on it. Names are imported on first use, so ``import curvscope`` is instant.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CurvscopeError": ("curvscope.errors", "CurvscopeError"),
    "Problem": ("curvscope.problem", "Problem"),
    "load_problem": ("curvscope.problem", "load_problem"),
    "make_problem": ("curvscope.problem", "make_problem"),
    "get_loss": ("curvscope.losses", "get_loss"),
    "spectrum": ("curvscope.api", "spectrum"),
    "suggest_lr": ("curvscope.api", "suggest_lr"),
    "factors": ("curvscope.api", "factors"),
}

__all__ = ["CurvscopeError", "Problem", "__version__", "factors", "get_loss", "load_problem", "make_problem",
           "spectrum", "suggest_lr"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'curvscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
