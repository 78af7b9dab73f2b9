"""Where the samples come from: a :class:`Source` reads the rows a batch needs, and only those.

Every way to bring data (a file of tensors, a Parquet or Arrow table, a Hugging Face dataset, a data factory's
``Dataset``, ``DataLoader`` or iterable) is a :class:`Source`: ``len(source)`` samples (an iterable's length is
what it has yielded so far: :meth:`Source.available` reads on), ``source.read(indices)`` the collated
``(x, y)`` of those rows, on the CPU, checked finite. :meth:`Source.pair` gives the two lazy views a
:class:`~curvscope.problem.Problem` keeps as its ``dataset``: indexing them reads the rows (``x[idx]``,
``y[idx]``), so further batches are read when they are used, never the whole dataset at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from curvscope.errors import CurvscopeError, OptionError, at_least
from curvscope.io.data import Layout, check_finite, check_shapes, select_batch
from curvscope.io.inputs import Inputs, KeywordInputs


class Column(Protocol):
    """One named column of a table-like source: its full ``shape`` ``(N, ...)``, ``dtype`` and rows."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def read(self, indices: Tensor) -> Tensor:
        """The rows ``indices`` ``(n,)`` as a tensor ``(n, ...)``."""


class TensorColumn:
    """A column held in memory (or memory-mapped: indexing reads only the rows asked for)."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype

    def read(self, indices: Tensor) -> Tensor:
        """``tensor[indices]``."""
        return self.tensor[indices]


class Source:
    """Samples read on demand (subclasses implement :meth:`_read`).

    Attributes:
        name: what messages and reports call the data (a path, a spec).
        target_name: what the data calls its targets (``y``, ``labels``, ``label``).
        notes: what the user should know about how the samples were read (printed by ``curvscope info``).
        metadata: string metadata of a safetensors file, else ``{}``.
        sized: the number of samples is known up front (an iterable's is not).
    """

    sized = True

    def __init__(self, name: str, target_name: str = "y", notes: list[str] | None = None,
                 metadata: dict[str, str] | None = None):
        self.name = name
        self.target_name = target_name
        self.notes = list(notes or [])
        self.metadata = dict(metadata or {})
        self._cache: tuple[tuple[int, ...], tuple[Inputs, Tensor]] | None = None
        self._schema: tuple[Any, tuple[torch.dtype, tuple[int, ...]]] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def available(self, n: int) -> int:
        """How many samples there are, up to ``n`` (an iterable is read on until it has ``n``)."""
        return min(n, len(self))

    def _read(self, indices: Tensor) -> tuple[Inputs, Tensor]:
        raise NotImplementedError

    def read(self, indices: Tensor, cached: bool = True) -> tuple[Inputs, Tensor]:
        """The collated ``(x, y)`` of the rows ``indices`` ``(n,)`` (CPU tensors; the last read is kept, and given
        again for the same rows unless ``cached=False``)."""
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        key = tuple(indices.tolist())
        if cached and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        if key and (min(key) < 0 or max(key) >= self.available(max(key) + 1)):
            raise CurvscopeError(f"{self.name}: sample {max(key)} is outside the data's {len(self)} samples")
        x, y = self._read(indices)
        # integers stored narrower (Arrow's int32 token ids, int8 masks) are PyTorch's int64 ids and labels
        x = x.map(_widen) if isinstance(x, KeywordInputs) else _widen(x)
        y = _widen(y)
        check_finite(x, y, self.name, self.target_name)
        self._cache = (key, (x, y))
        return x, y

    # -- the lazy views a Problem keeps as its dataset ------------------------------------------------------
    def schema(self) -> tuple[Any, tuple[torch.dtype, tuple[int, ...]]]:
        """``(inputs, targets)``: per-sample ``(dtype, shape)`` of ``x`` (a dict of them for keyword inputs) and of
        ``y``, from the first sample."""
        if self._schema is None:
            x, y = self.read(torch.tensor([0]))
            def spec(t: Tensor) -> tuple[torch.dtype, tuple[int, ...]]:
                return t.dtype, tuple(t.shape[1:])

            inputs = {k: spec(v) for k, v in x.items()} if isinstance(x, KeywordInputs) else spec(x)
            self._schema = (inputs, spec(y))
        return self._schema

    def pair(self) -> tuple[Any, Rows]:
        """``(x, y)``: lazy views of every sample's inputs (a :class:`Rows`, or :class:`KeywordInputs` of them)
        and targets; ``x[idx]`` and ``y[idx]`` read the rows ``idx`` (once for both)."""
        inputs, targets = self.schema()
        if isinstance(inputs, dict):
            x = KeywordInputs._wrap({k: Rows(self, k, *s) for k, s in inputs.items()})
        else:
            x = Rows(self, "x", *inputs)
        return x, Rows(self, None, *targets)


def _widen(t: Tensor) -> Tensor:
    """Integer tensors as int64 (bool and floating ones unchanged)."""
    if t.is_floating_point() or t.is_complex() or t.dtype in (torch.int64, torch.bool):
        return t
    return t.long()


class Rows:
    """A lazy view of one part of a :class:`Source`: its inputs ``x``, one keyword input, or the targets (``key``
    ``None``). ``len()``, ``shape`` ``(N, ...)``, ``dtype``; ``rows[indices]`` reads those rows."""

    def __init__(self, source: Source, key: str | None, dtype: torch.dtype, sample_shape: tuple[int, ...]):
        self.source, self.key, self.dtype, self.sample_shape = source, key, dtype, sample_shape

    def __len__(self) -> int:
        return len(self.source)

    @property
    def shape(self) -> torch.Size:
        """``(N, *sample_shape)``."""
        return torch.Size([len(self.source), *self.sample_shape])

    def dim(self) -> int:
        """The number of dimensions, the sample dimension included."""
        return 1 + len(self.sample_shape)

    def is_floating_point(self) -> bool:
        """Whether the rows are floating point."""
        return self.dtype.is_floating_point

    def __getitem__(self, indices: Any) -> Tensor:
        if isinstance(indices, slice):
            indices = torch.arange(len(self))[indices]
        x, y = self.source.read(torch.as_tensor(indices))
        if self.key is None:
            return y
        return x if self.key == "x" and not isinstance(x, KeywordInputs) else x[self.key]

    def __repr__(self) -> str:
        return f"Rows({self.source.name!r}, {self.key or 'targets'}, {str(self.dtype).removeprefix('torch.')} " \
               f"{tuple(self.shape)})"


class TensorSource(Source):
    """Samples held as tensors ``x`` (or :class:`KeywordInputs`) and ``y``."""

    def __init__(self, x: Inputs, y: Tensor, name: str, target_name: str = "y", **kw: Any):
        super().__init__(name, target_name, **kw)
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def _read(self, indices: Tensor) -> tuple[Inputs, Tensor]:
        return self.x[indices], self.y[indices]


class ColumnSource(Source):
    """Named columns (each a :class:`Column`) read row by row, turned into ``(x, y)`` by a
    :class:`~curvscope.io.data.Layout`."""

    def __init__(self, columns: Mapping[str, Column], layout: Layout, name: str, **kw: Any):
        super().__init__(name, layout.target_name, **kw)
        self.columns, self.layout = dict(columns), layout
        self.length = check_shapes(layout, {c: tuple(self.columns[c].shape) for c in layout.columns}, name)

    def __len__(self) -> int:
        return self.length

    def _read(self, indices: Tensor) -> tuple[Inputs, Tensor]:
        return self.layout.assemble({c: self.columns[c].read(indices) for c in self.layout.columns}, self.name)


def source_of(dataset: Any) -> Source | None:
    """The :class:`Source` behind a problem's ``dataset`` (lazy views or a plain ``(x, y)`` of tensors)."""
    if dataset is None:
        return None
    x, y = dataset
    if isinstance(y, Rows):
        return y.source
    return TensorSource(x, y, "data")


def batch_indices(problem: Any, batches: int, holdout: int = 0, field: str | None = None
                  ) -> tuple[list[Tensor], Tensor | None]:
    """The dataset rows of ``batches - 1`` further batches and a holdout, for a problem loaded from data.

    Samples are taken in the order the batch was drawn (file order, or the shuffled order of the problem's seed),
    skipping the problem's own batch: further batch ``b`` is the next ``batch_size`` samples after batch
    ``b - 1``, the holdout the ``holdout`` samples after the last batch. Nothing is read but the rows' count.

    Raises:
        OptionError: of ``batches`` (or ``field``): the problem has no dataset, or the data has too few samples.
    """
    at_least("batches", batches, 1)
    at_least("holdout", holdout, 0)
    if batches == 1 and holdout == 0:
        return [], None
    field = field or ("batches" if batches > 1 else "holdout")
    source = source_of(problem.dataset)
    if source is None or problem.info.get("batch_indices") is None:
        raise OptionError(field, "needs a problem loaded from a data file or factory (the other samples are unknown)")
    n = problem.batch_size
    need_total = batches * n + holdout
    count = source.available(need_total)
    if count < need_total:
        total = len(source) if source.sized else count

        def message(name) -> str:
            with_holdout = f" and {name('holdout', holdout)}" if holdout else ""
            has = f"the dataset has {total}" if source.sized else f"the data yields only {total}"
            return (f"{name('batches', batches)} with {name('batch_size', n)}{with_holdout} needs "
                    f"{need_total} samples but {has}; lower {name('batch_size')}, {name('batches')} or "
                    f"{name('holdout')}")

        raise OptionError(field, message)
    order = select_batch(len(source), None, shuffle=bool(problem.info.get("shuffle")),
                         seed=int(problem.info.get("seed") or 0))
    rest = order[~torch.isin(order, torch.as_tensor(problem.info["batch_indices"], dtype=order.dtype))]
    others = [rest[b * n:(b + 1) * n] for b in range(batches - 1)]
    held = rest[(batches - 1) * n:(batches - 1) * n + holdout] if holdout else None
    return others, held
