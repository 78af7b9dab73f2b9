"""Datasets: tensors ``x`` (inputs) and ``y`` (targets) in a .safetensors, .npz or .pt file.

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

from curvscope.errors import CurvscopeError
from curvscope.io.tensors import read_tensors


@dataclass
class Dataset:
    """A whole dataset file: inputs ``x`` ``(len, ...)`` and targets ``y`` ``(len, ...)``."""

    path: Path | None
    x: Tensor
    y: Tensor
    metadata: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.x.shape[0]


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Read ``x`` and ``y`` from a dataset file and check them (lengths match, inputs finite)."""
    path = Path(path)
    tensors, meta = read_tensors(path, "data")
    for key in ("x", "y"):
        if key not in tensors:
            found = ", ".join(sorted(tensors)) or "no tensors"
            raise CurvscopeError(f"{path}: data file needs tensors 'x' and 'y', '{key}' is missing "
                                 f"(found {found})")
    x, y = tensors["x"], tensors["y"]
    if x.dim() == 0 or y.dim() == 0:
        raise CurvscopeError(f"{path}: 'x' and 'y' need a leading sample dimension")
    if x.shape[0] != y.shape[0]:
        raise CurvscopeError(f"{path}: 'x' has {x.shape[0]} samples but 'y' has {y.shape[0]}")
    if x.shape[0] == 0:
        raise CurvscopeError(f"{path}: the dataset is empty")
    if x.is_floating_point() and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(dim=1).sum())
        raise CurvscopeError(f"{path}: inputs 'x' contain NaN or Inf ({bad} samples affected)")
    if y.is_floating_point() and not torch.isfinite(y).all():
        raise CurvscopeError(f"{path}: targets 'y' contain NaN or Inf")
    return Dataset(path=path, x=x, y=y, metadata=meta)


def select_batch(num_samples: int, batch_size: int | None, shuffle: bool = False, seed: int = 0,
                 offset: int = 0) -> Tensor:
    """Indices of the batch: the first ``batch_size`` samples from ``offset`` on, or a seeded permutation.

    ``batch_size`` is capped at what is available; ``None`` means all samples.
    """
    if batch_size is not None and batch_size < 1:
        raise CurvscopeError(f"--batch-size must be at least 1, got {batch_size}")
    if offset < 0 or offset >= num_samples:
        raise CurvscopeError(f"batch offset {offset} is outside the dataset's {num_samples} samples")
    if shuffle:
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(num_samples)
    order = order[offset:]
    n = order.shape[0] if batch_size is None else min(batch_size, order.shape[0])
    return order[:n]
