"""The first argument of every API verb: a :class:`~curvscope.problem.Problem`, or a model with its batch (inputs
and targets, or the data itself: a ``Dataset``, a ``DataLoader``, an iterable of batches)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvscope.errors import CurvscopeError
from curvscope.io.inputs import KeywordInputs
from curvscope.problem import Problem


def as_problem(verb: str, model_or_problem: nn.Module | Problem, inputs: Any = None, targets: Tensor | None = None,
               *, loss: str | None = None, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> Problem:
    """``model_or_problem`` itself when it is a Problem, else :func:`~curvscope.problem.make_problem` of the model
    and its batch: ``inputs`` and ``targets``, or, without ``targets``, ``inputs`` is the data (every sample of a
    map-style ``Dataset``, a ``DataLoader``'s dataset, an iterable of batches read to its end, a dict of tensors;
    :mod:`curvscope.io.factory`). A batch of ``curvscope.io.held.HOLD_BYTES`` or more stays where it came from and
    moves to the device a chunk at a time where the computation streams (:mod:`curvscope.io.held`).

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
        if inputs is None:
            raise CurvscopeError(f"{verb}(model, inputs, targets): inputs and targets are needed with a model (or "
                                 "the data as inputs: a Dataset, a DataLoader, an iterator of batches)")
        if targets is None:
            if isinstance(inputs, Tensor) or isinstance(inputs, KeywordInputs):
                raise CurvscopeError(f"{verb}(model, inputs, targets): targets are needed with a tensor of inputs")
            return _from_data(model_or_problem, inputs, loss=loss, device=device, dtype=dtype)
        return _make(model_or_problem, inputs, targets, loss=loss, device=device, dtype=dtype)
    raise CurvscopeError(f"{verb}: expected an nn.Module or a Problem, got {type(model_or_problem).__name__}")


def _from_data(model: nn.Module, data: Any, **kw: Any) -> Problem:
    """The problem of every sample of ``data`` (read as the CLI reads a data factory's object)."""
    from curvscope.io.factory import from_object
    from curvscope.io.held import hold_rows
    from curvscope.io.inputs import check_keywords
    from curvscope.problem import make_problem

    source = from_object(data, f"<{type(data).__name__}>")
    total = len(source) if source.sized else source.available(2**62)
    dataset = source.pair()
    check_keywords(model, dataset[0], source.name, source.target_name)
    indices = torch.arange(total)
    held = hold_rows(source, indices)
    x, y = source.read(indices) if held is None else (None, None)
    info = {"data": source.name, "dataset_size": total, "batch_indices": indices.tolist(),
            **({"data_notes": list(source.notes)} if source.notes else {})}
    return make_problem(model, x, y, info=info, dataset=dataset, source=source.name, held=held, **kw)


def _make(model: nn.Module, inputs: Any, targets: Tensor, **kw: Any) -> Problem:
    from curvscope.problem import make_problem

    return make_problem(model, inputs, targets, **kw)


def resolve_seed(problem: Problem, seed: int | None) -> int:
    """The seed of a computation: ``seed``, else the problem's (from its checkpoint), else 0."""
    return int(seed) if seed is not None else int(problem.info.get("seed") or 0)
