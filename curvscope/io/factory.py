"""Data the user's own code makes: ``data="path/to/file.py:factory"`` or ``"package.module:factory"`` (called with
``data_kwargs``), or the object itself from Python.

What a factory may return, and how its samples are read:

- a map-style ``torch.utils.data.Dataset`` (anything with ``__getitem__`` and ``__len__``, a list too): items
  ``(x, y)`` or dicts of keyword inputs with ``y``/``labels``/``label``; the batch's items are read by index
  (transforms run as in training) and collated with ``torch.utils.data.default_collate``;
- a ``DataLoader``: over a map-style dataset, its dataset is read as above with the loader's own ``collate_fn``
  (its batch size, sampler and workers are not used: a note says so); over an ``IterableDataset``, its batches are
  read in order;
- an ``IterableDataset`` (yields samples) or any other iterable (a generator: yields batches): read in order
  (``shuffle`` needs random access);
- a dict of tensors (like a data file), or a tuple ``(x, y)`` of tensors;
- a Hugging Face ``datasets.Dataset`` (read as a table, :mod:`curvscope.io.tables`).
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from curvscope.errors import CurvscopeError, Metavar, OptionError
from curvscope.io.data import Layout, check_shapes, plan_layout
from curvscope.io.inputs import Inputs, KeywordInputs
from curvscope.io.sources import ColumnSource, Source, TensorColumn, TensorSource

SPEC = re.compile(r"(?P<target>.+\.py|[A-Za-z_][\w.]*):(?P<name>[A-Za-z_]\w*)")
"""``path/to/file.py:factory`` or ``package.module:factory``."""


def is_data_spec(data: str | os.PathLike) -> bool:
    """Whether ``data`` names a factory rather than a file (a path that exists is a file)."""
    text = str(data)
    return SPEC.fullmatch(text) is not None and not Path(text).exists()


def check_trusted_data(data: str, source: str, trusted: bool) -> None:
    """Refuse a data factory spec that came from a file (a config) unless the user allowed code
    (``trust_model_code``): calling it would run that code. Data files and directories pass.

    Raises:
        OptionError: of ``trust_model_code``, naming what the file asks to run and how to allow it.
    """
    if trusted or not is_data_spec(data):
        return
    raise OptionError("trust_model_code", lambda name: f"{source} asks to import and run the data factory '{data}', "
                      f"code outside curvscope; nothing was imported. If you trust it, pass "
                      f"{name('trust_model_code', True)}, or name the data yourself with "
                      f"{name('data', Metavar('SPEC'))}")


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def resolve_data_factory(spec: str) -> Callable[..., Any]:
    """The callable ``spec`` names: ``file.py`` executed as a fresh module, or ``package.module`` imported
    (installed packages first, then the current directory); the model specs' resolver, naming a data spec."""
    from curvscope.io.spec import resolve_factory

    if SPEC.fullmatch(spec) is None:
        raise CurvscopeError(f"data spec '{spec}': expected 'path/to/file.py:factory' or 'package.module:factory'")
    return resolve_factory(spec, kind="data")


def call_data_factory(spec: str, kwargs: Mapping[str, Any] | None = None, seed: int | None = None) -> Any:
    """Import the factory ``spec`` names and call it with ``kwargs`` (``torch.manual_seed(seed)`` first)."""
    factory = resolve_data_factory(spec)
    kwargs = dict(kwargs or {})
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            raise CurvscopeError(f"data spec '{spec}': bad keyword arguments {sorted(kwargs)}: {exc}") from exc
    if seed is not None:
        torch.manual_seed(seed)
    try:
        return factory(**kwargs)
    except CurvscopeError:
        raise
    except Exception as exc:
        raise CurvscopeError(f"data spec '{spec}': the factory raised {_one_line(exc)}") from exc


# -- Python objects as sources --------------------------------------------------------------------------------

EXPECTED = "a Dataset, a DataLoader, an iterable of batches, a dict of tensors or a tuple (x, y) of tensors"


def from_object(obj: Any, name: str, columns: Mapping[str, str] | None = None, shuffle: bool = False,
                split: str | None = None, pad_token: int | None = None) -> Source:
    """The :class:`~curvscope.io.sources.Source` of a Python object (see the module docstring)."""
    from torch.utils.data import DataLoader, IterableDataset

    if _is_hf(obj):
        from curvscope.io.tables import from_hf_dataset

        return from_hf_dataset(obj, name, columns=columns, split=split, pad_token=pad_token)
    if split is not None:
        raise OptionError("split", f"applies to a Hugging Face DatasetDict, not to {type(obj).__name__}")
    if pad_token is not None:
        raise OptionError("pad_token", "applies to list columns of Parquet, Arrow and Hugging Face data; a "
                          "factory pads in its own collate function")
    if isinstance(obj, Tensor):
        raise CurvscopeError(f"{name}: got a single Tensor; expected {EXPECTED}")
    if isinstance(obj, Mapping):
        return _from_tensors(obj, name, columns)
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(t, Tensor) for t in obj):
        if columns:
            raise OptionError("columns", f"names columns, but {name} is a tuple (x, y)")
        x, y = obj
        check_shapes(Layout("x", {}, "y", "y"), {"x": tuple(x.shape), "y": tuple(y.shape)}, name)
        return TensorSource(x, y, name)
    if isinstance(obj, DataLoader):
        if isinstance(obj.dataset, IterableDataset):
            _no_shuffle(name, "a DataLoader over an IterableDataset", shuffle)
            return IterableSource(obj, name, batched=obj.batch_size is not None, columns=columns,
                                  notes=[f"DataLoader over an IterableDataset: its batches (batch_size "
                                         f"{obj.batch_size}) are read in order and split into samples"])
        return MapSource(obj.dataset, name, obj.collate_fn, columns, notes=[_loader_note(obj)])
    if isinstance(obj, IterableDataset):
        _no_shuffle(name, "an IterableDataset", shuffle)
        return IterableSource(obj, name, batched=False, columns=columns)
    if hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not isinstance(obj, (str, bytes)):
        return MapSource(obj, name, None, columns)
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        _no_shuffle(name, f"an iterable of batches ({type(obj).__name__})", shuffle)
        return IterableSource(obj, name, batched=True, columns=columns)
    raise CurvscopeError(f"{name}: got {type(obj).__name__}; expected {EXPECTED}")


def _is_hf(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "datasets" and type(obj).__name__ in ("Dataset", "DatasetDict")


def _no_shuffle(name: str, what: str, shuffle: bool) -> None:
    if shuffle:
        raise OptionError("shuffle", lambda label: f"{label('shuffle')}: {name} is {what}, read in order (no random "
                          "access); return a map-style Dataset to draw a random batch, or leave out "
                          f"{label('shuffle')}")


def _loader_note(loader: Any) -> str:
    sampler = type(loader.sampler).__name__ if getattr(loader, "sampler", None) is not None else "none"
    shuffled = " (shuffled)" if sampler == "RandomSampler" else ""
    workers = f", num_workers {loader.num_workers}" if getattr(loader, "num_workers", 0) else ""
    return (f"DataLoader: samples are drawn from its dataset by curvscope's rule and collated with its collate_fn; "
            f"its own batch_size {loader.batch_size}, sampler {sampler}{shuffled}{workers} are not used")


def _tensor(value: Any) -> Tensor | None:
    """``value`` as a tensor (tensors, numeric numpy arrays), else ``None``."""
    if isinstance(value, Tensor):
        return value
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return torch.from_numpy(np.ascontiguousarray(value))
    return None


def _from_tensors(obj: Mapping[str, Any], name: str, columns: Mapping[str, str] | None) -> Source:
    tensors = {}
    for key, value in obj.items():
        t = _tensor(value)
        if t is None:
            raise CurvscopeError(f"{name}: '{key}' is a {type(value).__name__}, not a tensor (a dict of data holds "
                                 "tensors of one row per sample)")
        tensors[str(key)] = t
    layout = plan_layout(list(tensors), name, columns)
    return ColumnSource({c: TensorColumn(tensors[c]) for c in layout.columns}, layout, name)


class _Batches:
    """Turns collated batches into ``(x, y)``: the layout of dict batches is fixed by the first one."""

    def __init__(self, name: str, columns: Mapping[str, str] | None):
        self.name, self.columns = name, dict(columns or {})
        self.layout: Layout | None = None
        self.target_name = "y"
        self.dropped: list[str] = []

    def pair(self, batch: Any, what: str) -> tuple[Inputs, Tensor]:
        if isinstance(batch, Mapping):
            tensors = {}
            for key, value in batch.items():
                t = _tensor(value)
                if t is None:
                    if str(key) in self.columns.values():
                        raise CurvscopeError(f"{self.name}: '{key}' in {what} is a {type(value).__name__}, not a "
                                             "tensor")
                    if str(key) not in self.dropped:
                        self.dropped.append(str(key))
                    continue
                tensors[str(key)] = t
            if self.layout is None:
                self.layout = plan_layout(list(tensors), self.name, self.columns)
                self.target_name = self.layout.target_name
            missing = [c for c in self.layout.columns if c not in tensors]
            if missing:
                raise CurvscopeError(f"{self.name}: {what} has no '{missing[0]}' (the first had "
                                     f"{', '.join(self.layout.columns)})")
            check_shapes(self.layout, {c: tuple(tensors[c].shape) for c in self.layout.columns}, self.name)
            return self.layout.assemble(tensors, self.name)
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            if self.columns:
                raise OptionError("columns", f"names columns, but the items of {self.name} are (x, y) pairs")
            x, y = batch
            if isinstance(x, Mapping):
                inputs = {str(k): _tensor(v) for k, v in x.items()}
                bad = [k for k, v in inputs.items() if v is None]
                if bad:
                    raise CurvscopeError(f"{self.name}: input '{bad[0]}' in {what} is not a tensor")
                x = KeywordInputs(inputs, source=self.name)
                xs = {k: tuple(v.shape) for k, v in x.items()}
                layout = Layout(None, {k: k for k in xs}, "y", "y")
                check_shapes(layout, {**xs, "y": tuple(_need(y, "y", what, self.name).shape)}, self.name)
                return x, _tensor(y)
            x, y = _need(x, "x", what, self.name), _need(y, "y", what, self.name)
            check_shapes(Layout("x", {}, "y", "y"), {"x": tuple(x.shape), "y": tuple(y.shape)}, self.name)
            return x, y
        kind = f"a {type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        raise CurvscopeError(f"{self.name}: {what} is {kind}; expected an (x, y) pair or a dict of inputs with "
                             "'y', 'labels' or 'label'")


def _need(value: Any, part: str, what: str, name: str) -> Tensor:
    t = _tensor(value)
    if t is None:
        raise CurvscopeError(f"{name}: {part} in {what} is a {type(value).__name__}, not a tensor")
    return t


def _structure(item: Any, path: str = "") -> list[tuple[str, str]]:
    """The leaves of an item: ``(path, description)`` (tensors by dtype and shape)."""
    if isinstance(item, Mapping):
        return [leaf for k in item for leaf in _structure(item[k], f"{path}['{k}']")]
    if isinstance(item, (tuple, list)) and not (item and all(isinstance(v, (int, float)) for v in item)):
        return [leaf for i, v in enumerate(item) for leaf in _structure(v, f"{path}[{i}]")]
    t = _tensor(item)
    if t is not None:
        return [(path or "item", f"shape {tuple(t.shape)}")]
    if isinstance(item, (list, tuple)):
        return [(path or "item", f"a list of {len(item)} numbers")]
    return [(path or "item", type(item).__name__)]


def _collate(items: list[Any], indices: list[int], collate: Callable[[list[Any]], Any], name: str) -> Any:
    try:
        return collate(items)
    except Exception as exc:
        first = dict(_structure(items[0]))
        for item, i in zip(items[1:], indices[1:], strict=True):
            other = dict(_structure(item))
            if list(other) != list(first):
                raise CurvscopeError(f"{name}: items {indices[0]} and {i} have different structures (item "
                                     f"{indices[0]}: {', '.join(first)}; item {i}: {', '.join(other)})") from exc
            for path, desc in first.items():
                if other[path] != desc:
                    raise CurvscopeError(f"{name}: items cannot be collated: {path} has {desc} in item "
                                         f"{indices[0]} but {other[path]} in item {i}") from exc
        raise CurvscopeError(f"{name}: the items cannot be collated: {_one_line(exc)}") from exc


class MapSource(Source):
    """A map-style dataset: items read by index, collated (default: ``default_collate``)."""

    def __init__(self, dataset: Any, name: str, collate: Callable[[list[Any]], Any] | None = None,
                 columns: Mapping[str, str] | None = None, notes: list[str] | None = None):
        from torch.utils.data import default_collate

        super().__init__(name, notes=notes)
        self.dataset, self.collate = dataset, collate or default_collate
        self.batches = _Batches(name, columns)
        try:
            self.length = len(dataset)
        except Exception as exc:
            raise CurvscopeError(f"{name}: len() of the dataset failed: {_one_line(exc)}") from exc
        if self.length == 0:
            raise CurvscopeError(f"{name}: the dataset is empty")

    def __len__(self) -> int:
        return self.length

    def _read(self, indices: Tensor) -> tuple[Inputs, Tensor]:
        items, order = [], [int(i) for i in indices.tolist()]
        for i in order:
            try:
                item = self.dataset[i]
            except CurvscopeError:
                raise
            except Exception as exc:
                raise CurvscopeError(f"{self.name}: item {i} cannot be read: {_one_line(exc)}") from exc
            if not isinstance(item, (Mapping, tuple, list)):
                raise CurvscopeError(f"{self.name}: item {i} is a {type(item).__name__}; expected an (x, y) pair "
                                     "or a dict of inputs with 'y', 'labels' or 'label'")
            items.append(item)
        batch = _collate(items, order, self.collate, self.name)
        x, y = self.batches.pair(batch, f"the batch of items {order[0]}..")
        self.target_name = self.batches.target_name
        self._note_dropped()
        return x, y

    def _note_dropped(self) -> None:
        for key in self.batches.dropped:
            note = f"'{key}' is not a tensor: left out"
            if note not in self.notes:
                self.notes.append(note)


class IterableSource(MapSource):
    """An iterable read in order: of batches (``batched``) or of samples. What it has yielded is kept (on the CPU)
    until the process ends; ``len()`` is the number of samples read so far."""

    sized = False

    def __init__(self, iterable: Any, name: str, batched: bool, columns: Mapping[str, str] | None = None,
                 notes: list[str] | None = None):
        from torch.utils.data import default_collate

        Source.__init__(self, name, notes=notes)
        self.iterable, self.batched, self.collate = iterable, batched, default_collate
        self.batches = _Batches(name, columns)
        self.chunks: list[tuple[Inputs, Tensor]] = []
        self.count, self.done = 0, False
        self.iterator: Iterator[Any] | None = None

    def __len__(self) -> int:
        return self.count

    def available(self, n: int) -> int:
        """Read on until ``n`` samples have been yielded (or the iterable ends)."""
        if self.iterator is None:
            try:
                self.iterator = iter(self.iterable)
            except Exception as exc:
                raise CurvscopeError(f"{self.name}: iterating failed: {_one_line(exc)}") from exc
        pending: list[Any] = []
        while not self.done and self.count + len(pending) < n:
            try:
                element = next(self.iterator)
            except StopIteration:
                self.done = True
                break
            except CurvscopeError:
                raise
            except Exception as exc:
                raise CurvscopeError(f"{self.name}: reading the next {'batch' if self.batched else 'sample'} "
                                     f"failed: {_one_line(exc)}") from exc
            if self.batched:
                x, y = self.batches.pair(element, f"batch {len(self.chunks)}")
                self.chunks.append((x, y))
                self.count += int(y.shape[0])
            else:
                if not isinstance(element, (Mapping, tuple, list)):
                    raise CurvscopeError(f"{self.name}: sample {self.count + len(pending)} is a "
                                         f"{type(element).__name__}; expected an (x, y) pair or a dict of inputs")
                pending.append(element)
        if pending:
            order = list(range(self.count, self.count + len(pending)))
            x, y = self.batches.pair(_collate(pending, order, self.collate, self.name), "the samples")
            self.chunks.append((x, y))
            self.count += len(pending)
        self.target_name = self.batches.target_name
        self._note_dropped()
        if self.count == 0:
            raise CurvscopeError(f"{self.name}: the iterable yields no samples")
        return min(n, self.count)

    def _read(self, indices: Tensor) -> tuple[Inputs, Tensor]:
        xs = [c[0] for c in self.chunks]
        ys = [c[1] for c in self.chunks]
        try:
            x = torch.cat(xs) if not isinstance(xs[0], KeywordInputs) else KeywordInputs(
                {k: torch.cat([c[k] for c in xs]) for k in xs[0].keys()}, source=self.name)
            y = torch.cat(ys)
        except (RuntimeError, KeyError) as exc:
            raise CurvscopeError(f"{self.name}: its batches cannot be joined (a sample's shape or the inputs' names "
                                 f"differ between batches): {_one_line(exc)}") from exc
        return x[indices], y[indices]
