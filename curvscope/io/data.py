"""Datasets: tensors ``x`` (inputs) and ``y`` (targets) in a .safetensors, .npz or .pt file, or keyword inputs
(every tensor but the targets ``y``/``labels``, passed to the model by name).

Which samples form the batch is part of the contract: without shuffling, the batch is the first
``batch_size`` samples in file order; with ``shuffle=True`` it is ``torch.randperm(len, generator seeded with
seed)[:batch_size]``. The indices used are recorded in every report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from curvscope.errors import CurvscopeError, OptionError
from curvscope.io.inputs import TARGET_NAMES, KeywordInputs
from curvscope.io.tensors import read_tensors


@dataclass
class Dataset:
    """A whole dataset file: inputs ``x`` ``(len, ...)`` (a tensor, or :class:`KeywordInputs`) and targets
    ``y`` ``(len, ...)``; ``target_name`` is what the file calls them (``y`` or ``labels``)."""

    path: Path | None
    x: Tensor | KeywordInputs
    y: Tensor
    metadata: dict[str, str] = field(default_factory=dict)
    target_name: str = "y"

    def __len__(self) -> int:
        return self.x.shape[0]


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Read a dataset file and check it (lengths match, inputs finite).

    With a tensor ``x`` the inputs are ``x`` and the targets ``y``. Without ``x``, the targets are ``y`` or
    ``labels`` and every other tensor is a keyword input (:class:`KeywordInputs`).
    """
    path = Path(path)
    tensors, meta = read_tensors(path, "data")
    found = ", ".join(sorted(tensors)) or "no tensors"
    present = [k for k in TARGET_NAMES if k in tensors]
    if "x" in tensors or not present or len(tensors) == len(present):
        for key in ("x", "y"):
            if key not in tensors:
                raise CurvscopeError(f"{path}: data file needs tensors 'x' and 'y' (or keyword inputs and 'y' "
                                     f"or 'labels'), '{key}' is missing (found {found})")
        x, y, target_name = tensors["x"], tensors["y"], "y"
    elif len(present) > 1:
        raise CurvscopeError(f"{path}: both 'y' and 'labels' are present; keep one of them as the targets")
    else:
        target_name = present[0]
        y = tensors[target_name]
        if y.dim() == 0:
            raise CurvscopeError(f"{path}: '{target_name}' needs a leading sample dimension")
        inputs = {k: v for k, v in tensors.items() if k != target_name}
        for k, v in inputs.items():
            if v.dim() == 0:
                raise CurvscopeError(f"{path}: input '{k}' needs a leading sample dimension")
            if v.shape[0] != y.shape[0]:
                raise CurvscopeError(f"{path}: '{k}' has {v.shape[0]} samples but '{target_name}' has "
                                     f"{y.shape[0]}")
        x = KeywordInputs(inputs, source=str(path))
    if x.dim() == 0 or y.dim() == 0:
        raise CurvscopeError(f"{path}: 'x' and 'y' need a leading sample dimension")
    if x.shape[0] != y.shape[0]:
        raise CurvscopeError(f"{path}: 'x' has {x.shape[0]} samples but 'y' has {y.shape[0]}")
    if x.shape[0] == 0:
        raise CurvscopeError(f"{path}: the dataset is empty")
    for name, t in (x.items() if isinstance(x, KeywordInputs) else [("x", x)]):
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).reshape(t.shape[0], -1).any(dim=1).sum())
            raise CurvscopeError(f"{path}: inputs '{name}' contain NaN or Inf ({bad} samples affected)")
    if y.is_floating_point() and not torch.isfinite(y).all():
        raise CurvscopeError(f"{path}: targets '{target_name}' contain NaN or Inf")
    return Dataset(path=path, x=x, y=y, metadata=meta, target_name=target_name)


def select_batch(num_samples: int, batch_size: int | None, shuffle: bool = False, seed: int = 0,
                 offset: int = 0) -> Tensor:
    """Indices of the batch: the first ``batch_size`` samples from ``offset`` on, or a seeded permutation.

    ``batch_size`` is capped at what is available; ``None`` means all samples.
    """
    if batch_size is not None and batch_size < 1:
        raise OptionError("batch_size", f"must be at least 1, got {batch_size}")
    if offset < 0 or offset >= num_samples:
        raise CurvscopeError(f"batch offset {offset} is outside the dataset's {num_samples} samples")
    if shuffle:
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(num_samples)
    order = order[offset:]
    n = order.shape[0] if batch_size is None else min(batch_size, order.shape[0])
    return order[:n]
