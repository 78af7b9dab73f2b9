"""Datasets: tensors ``x`` (inputs) and ``y`` (targets) in a .safetensors, .npz or .pt file, or keyword inputs
(every tensor but the targets ``y``/``labels``/``label``, passed to the model by name).

The same rule turns any set of named columns into inputs and targets, whatever holds them (a file of tensors, a
Parquet or Arrow table, a Hugging Face dataset, the dicts a data factory yields): :func:`plan_layout` decides
from the names alone (``columns`` renames: ``{"x": "image", "y": "label"}``), :func:`check_shapes` checks the
shapes before anything is read, :meth:`Layout.assemble` makes ``(x, y)`` of the rows read.

Which samples form the batch is part of the contract: without shuffling, the batch is the first
``batch_size`` samples in file order; with ``shuffle=True`` it is ``torch.randperm(len, generator seeded with
seed)[:batch_size]``. The indices used are recorded in every report.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from curvscope.errors import CurvscopeError, OptionError
from curvscope.io.inputs import KeywordInputs
from curvscope.io.tensors import read_tensors

TARGETS = ("y", "labels", "label")
"""Names the targets may have; with keyword inputs every other column is an input."""


@dataclass
class Dataset:
    """A whole dataset file: inputs ``x`` ``(len, ...)`` (a tensor, or :class:`KeywordInputs`) and targets
    ``y`` ``(len, ...)``; ``target_name`` is what the file calls them (``y``, ``labels`` or ``label``)."""

    path: Path | None
    x: Tensor | KeywordInputs
    y: Tensor
    metadata: dict[str, str] = field(default_factory=dict)
    target_name: str = "y"

    def __len__(self) -> int:
        return self.x.shape[0]


def parse_columns(columns: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"x=image,y=label"`` (or a mapping) as ``{"x": "image", "y": "label"}``: the name the data is used under
    -> the column that holds it.

    Raises:
        OptionError: of ``columns``, for an entry that is not ``NAME=COLUMN`` or a name given twice.
    """
    if columns is None or columns == "":
        return {}
    if isinstance(columns, Mapping):
        pairs = [(str(k), str(v)) for k, v in columns.items()]
    else:
        pairs = []
        for entry in str(columns).split(","):
            name, eq, column = (part.strip() for part in entry.partition("="))
            if not eq or not name or not column:
                raise OptionError("columns", f"'{entry.strip()}' is not NAME=COLUMN (e.g. 'x=image,y=label')")
            pairs.append((name, column))
    out: dict[str, str] = {}
    for name, column in pairs:
        if name in out:
            raise OptionError("columns", f"names '{name}' twice")
        if not name.isidentifier():
            raise OptionError("columns", f"'{name}' cannot be a keyword argument (NAME=COLUMN: NAME is what the "
                              "model's forward calls it, or x / y)")
        out[name] = column
    return out


@dataclass(frozen=True)
class Layout:
    """Which columns are the inputs and which the targets.

    ``inputs``: the column passed positionally as ``x`` (``None``: keyword inputs); ``keywords``: keyword name ->
    column; ``target``: the targets' column, ``target_name`` the name they go by (``y``, ``labels``, ...);
    ``unused``: columns left out (with ``x``, every column but ``x`` and ``y``).
    """

    inputs: str | None
    keywords: dict[str, str]
    target: str
    target_name: str
    unused: tuple[str, ...] = ()

    @property
    def columns(self) -> list[str]:
        """The columns to read, inputs first."""
        first = [self.inputs] if self.inputs is not None else list(self.keywords.values())
        return [*first, self.target]

    def assemble(self, tensors: Mapping[str, Tensor], source: str) -> tuple[Tensor | KeywordInputs, Tensor]:
        """``(x, y)`` from the columns read (``{column: tensor}``)."""
        if self.inputs is not None:
            return tensors[self.inputs], tensors[self.target]
        return KeywordInputs({k: tensors[c] for k, c in self.keywords.items()}, source=source), tensors[self.target]


def plan_layout(names: list[str], source: str, columns: Mapping[str, str] | None = None) -> Layout:
    """The :class:`Layout` of data with columns ``names`` (in order).

    With a column ``x`` the inputs are ``x`` and the targets ``y``. Without ``x``, the targets are ``y``,
    ``labels`` or ``label`` and every other column is a keyword input. ``columns`` maps names to columns first
    (``{"x": "image", "y": "label"}``, ``{"labels": "target_ids"}``): a mapped column goes by its new name only.
    """
    columns = dict(columns or {})
    missing = [c for c in columns.values() if c not in names]
    if missing:
        raise CurvscopeError(f"{source}: column '{missing[0]}' not found (found {', '.join(names) or 'none'})")
    view = {name: column for name, column in columns.items()}
    for name in names:
        if name not in columns.values() and name not in view:
            view[name] = name
    found = ", ".join(sorted(view)) or "no tensors"
    present = [k for k in TARGETS if k in view]
    if "x" in view or not present or len(view) == len(present):
        for key in ("x", "y"):
            if key not in view:
                raise CurvscopeError(f"{source}: data file needs tensors 'x' and 'y' (or keyword inputs and 'y' or "
                                     f"'labels'), '{key}' is missing (found {found})")
        return Layout(inputs=view["x"], keywords={}, target=view["y"], target_name="y",
                      unused=tuple(c for n, c in view.items() if n not in ("x", "y")))
    if len(present) > 1:
        both = " and ".join(f"'{k}'" for k in present)
        raise CurvscopeError(f"{source}: both {both} are present; keep one of them as the targets")
    target = present[0]
    return Layout(inputs=None, keywords={n: c for n, c in view.items() if n != target}, target=view[target],
                  target_name=target)


def check_shapes(layout: Layout, shapes: Mapping[str, tuple[int, ...]], source: str) -> int:
    """Check the shapes (``{column: shape}``) of the columns the layout reads; returns the number of samples.

    Raises:
        CurvscopeError: a column without a leading sample dimension, columns of different lengths, no samples.
    """
    y = tuple(shapes[layout.target])
    if layout.inputs is None:
        name = layout.target_name
        if len(y) == 0:
            raise CurvscopeError(f"{source}: '{name}' needs a leading sample dimension")
        for k, c in layout.keywords.items():
            shape = tuple(shapes[c])
            if len(shape) == 0:
                raise CurvscopeError(f"{source}: input '{k}' needs a leading sample dimension")
            if shape[0] != y[0]:
                raise CurvscopeError(f"{source}: '{k}' has {shape[0]} samples but '{name}' has {y[0]}")
        n = y[0]
    else:
        x = tuple(shapes[layout.inputs])
        if len(x) == 0 or len(y) == 0:
            raise CurvscopeError(f"{source}: 'x' and 'y' need a leading sample dimension")
        if x[0] != y[0]:
            raise CurvscopeError(f"{source}: 'x' has {x[0]} samples but 'y' has {y[0]}")
        n = x[0]
    if n == 0:
        raise CurvscopeError(f"{source}: the dataset is empty")
    return n


def check_finite(x: Tensor | KeywordInputs, y: Tensor, source: str, target_name: str = "y") -> None:
    """Refuse NaN or Inf in floating inputs (naming the input and how many samples) or targets."""
    for name, t in (x.items() if isinstance(x, KeywordInputs) else [("x", x)]):
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).reshape(t.shape[0], -1).any(dim=1).sum())
            raise CurvscopeError(f"{source}: inputs '{name}' contain NaN or Inf ({bad} samples affected)")
    if y.is_floating_point() and not torch.isfinite(y).all():
        raise CurvscopeError(f"{source}: targets '{target_name}' contain NaN or Inf")


def load_dataset(path: str | os.PathLike, columns: str | Mapping[str, str] | None = None) -> Dataset:
    """Read a dataset file and check it (lengths match, inputs finite).

    With a tensor ``x`` the inputs are ``x`` and the targets ``y``. Without ``x``, the targets are ``y``,
    ``labels`` or ``label`` and every other tensor is a keyword input (:class:`KeywordInputs`). ``columns``
    renames first (:func:`parse_columns`).
    """
    path = Path(path)
    tensors, meta = read_tensors(path, "data")
    layout = plan_layout(list(tensors), str(path), parse_columns(columns))
    check_shapes(layout, {c: tuple(tensors[c].shape) for c in layout.columns}, str(path))
    x, y = layout.assemble(tensors, str(path))
    check_finite(x, y, str(path), layout.target_name)
    return Dataset(path=path, x=x, y=y, metadata=meta, target_name=layout.target_name)


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
