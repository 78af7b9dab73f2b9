"""The first argument of every API verb: a :class:`~curvscope.problem.Problem`, or a model with its batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvscope.errors import CurvscopeError
from curvscope.problem import Problem


def as_problem(verb: str, model_or_problem: nn.Module | Problem, inputs: Any = None, targets: Tensor | None = None,
               *, loss: str | None = None, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> Problem:
    """``model_or_problem`` itself when it is a Problem, else :func:`~curvscope.problem.make_problem` of the model
    and its batch.

    Raises:
        CurvscopeError: a Problem together with a batch or problem arguments (they would be ignored), a model
            without its batch, or neither.
    """
    if isinstance(model_or_problem, Problem):
        given = [n for n, v in (("inputs", inputs), ("targets", targets), ("loss", loss), ("device", device),
                                ("dtype", dtype)) if v is not None]
        if given:
            raise CurvscopeError(f"{verb}: pass either a Problem or a model with inputs and targets; a Problem "
                                 f"already has its {', '.join(given)}")
        return model_or_problem
    if isinstance(model_or_problem, nn.Module):
        if inputs is None or targets is None:
            raise CurvscopeError(f"{verb}(model, inputs, targets): inputs and targets are needed with a model")
        return _make(model_or_problem, inputs, targets, loss=loss, device=device, dtype=dtype)
    raise CurvscopeError(f"{verb}: expected an nn.Module or a Problem, got {type(model_or_problem).__name__}")


def _make(model: nn.Module, inputs: Any, targets: Tensor, **kw: Any) -> Problem:
    from curvscope.problem import make_problem

    return make_problem(model, inputs, targets, **kw)


def resolve_seed(problem: Problem, seed: int | None) -> int:
    """The seed of a computation: ``seed``, else the problem's (from its checkpoint), else 0."""
    return int(seed) if seed is not None else int(problem.info.get("seed") or 0)
