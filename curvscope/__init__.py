"""curvscope: curvature diagnosis for PyTorch models.

The public API mirrors the CLI: build a :class:`Problem` with :func:`load_problem` (or directly from a
model and a batch with :func:`make_problem`), then call :func:`spectrum`, :func:`suggest_lr` or
:func:`factors` on it, or hold its curvature as a linear operator (:func:`ggn_operator`,
:func:`hessian_operator`: ``op @ v``, ``op.to_scipy()``). Names are imported on first use, so
``import curvscope`` is instant.
"""

from __future__ import annotations

from curvscope.lazy import lazy_exports

__version__ = "0.1.0"

__all__ = ["CurvscopeError", "Problem", "__version__", "factors", "get_loss", "ggn_operator", "hessian_operator",
           "load_problem", "make_problem", "spectrum", "suggest_lr", "Monitor"]

__getattr__, __dir__ = lazy_exports(globals(), {
    "CurvscopeError": "curvscope.errors",
    "Problem": "curvscope.problem",
    "load_problem": "curvscope.io.load",
    "make_problem": "curvscope.problem",
    "get_loss": "curvscope.losses",
    "spectrum": "curvscope.api",
    "suggest_lr": "curvscope.api",
    "factors": "curvscope.api",
    "ggn_operator": "curvscope.api",
    "hessian_operator": "curvscope.api",
    "Monitor": "curvscope.monitor",
})
