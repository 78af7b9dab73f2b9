"""Finite or refused: non-finite numbers stop a computation with a message naming the stage.

A checkpoint that overflows (a weight of 1e30, an input of 3e38) gives NaN or Inf curvature; reported as is,
NaN would read as "flat" (every comparison with NaN is false) and pass a CI gate. These checks turn it into
a :class:`~curvscope.errors.CurvscopeError` (exit 2) before anything is written.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from curvscope.errors import CurvscopeError

if TYPE_CHECKING:
    from curvscope.problem import Problem

CHUNK = 256


def check_outputs(problem: Problem) -> None:
    """The model's outputs and the loss on the batch are finite.

    Raises:
        CurvscopeError: e.g. "the model's outputs overflow at this checkpoint: 3 of 128 samples have NaN or
            Inf outputs (first: sample 5)".
    """
    bad: list[int] = []
    with torch.no_grad():
        n = problem.batch_size
        total = 0.0  # a held batch (moved to the device a chunk at a time): the loss summed chunk by chunk
        for start in range(0, n, CHUNK):
            inputs, targets = problem.batch_part(start, min(n, start + CHUNK))
            out = problem.forward(inputs=inputs)
            rows = ~torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1)
            bad += (torch.nonzero(rows).flatten() + start).tolist()
            if problem.held and not bad:
                total += float(problem.loss.per_sample(out, targets).double().sum())
        if bad:
            raise CurvscopeError(f"the model's outputs overflow at this checkpoint: {len(bad)} of {n} samples "
                                 f"have NaN or Inf outputs (first: sample {bad[0]})")
        loss = total / n if problem.held else float(problem.loss_value())
    if not math.isfinite(loss):
        raise CurvscopeError(f"the loss is not finite at this checkpoint ({loss}): outputs are finite, but the "
                             "loss overflows; check the targets and the loss")


def check_finite(stage: str, **values: Tensor | float | None) -> None:
    """Every given value is finite; else a one-line error naming ``stage`` and the offending values.

    Args:
        stage: what was being computed (``"the Gram matrix of group fc1"``).
        values: name -> tensor or float (``None`` is skipped).
    """
    bad = []
    for name, value in values.items():
        if value is None:
            continue
        t = torch.as_tensor(value)
        if t.numel() and not bool(torch.isfinite(t).all()):
            count = int((~torch.isfinite(t)).sum())
            bad.append(name if t.numel() == 1 else f"{name} ({count} of {t.numel()})")
    if bad:
        raise CurvscopeError(f"{stage} is not finite: {', '.join(bad)} contain NaN or Inf (the model overflows "
                             "at this checkpoint; try float64, or check the weights and inputs)")
