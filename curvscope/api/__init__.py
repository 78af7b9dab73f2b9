"""The Python API: the verbs of the CLI on objects you already have, with the CLI's checks and no files.

Every verb takes a :class:`~curvscope.problem.Problem` or a model with its batch (``verb(model, x, y, loss=...)``)
and returns the engine's result dataclasses. See ``docs/api.md``.
"""

from __future__ import annotations

from curvscope.api.factors import factors
from curvscope.api.lr import suggest_lr
from curvscope.api.operators import ggn_operator, hessian_operator
from curvscope.api.spectrum import spectrum

__all__ = ["factors", "ggn_operator", "hessian_operator", "spectrum", "suggest_lr"]
