"""Tables as data: Parquet and Arrow files, Hugging Face ``save_to_disk`` directories and ``datasets.Dataset``
objects (needs ``pyarrow``: ``pip install "curvscope[parquet]"``).

Columns become keyword inputs by name (``input_ids``, ``attention_mask``, ``pixel_values``, ...) and ``y``,
``labels`` or ``label`` the targets (the rule of :func:`~curvscope.io.data.plan_layout`; ``columns`` renames).
Numeric columns become tensors; list columns of equal lengths (nested lists too) tensors of one more dimension per
level; ragged lists are an error naming the column, or, with ``pad_token``, are padded to the longest row of the
data: inputs with ``pad_token``, masks (a name with ``mask``) with 0, the targets with -100 (no loss). Columns that
hold no numbers (text, encoded images) are left out with a note.

Only the rows a batch uses are read: Arrow files and ``save_to_disk`` directories are memory-mapped, Parquet files
are read one row group (of the columns used) at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from curvscope.errors import CurvscopeError, Metavar, OptionError
from curvscope.io.data import plan_layout
from curvscope.io.sources import ColumnSource, Source

IGNORE_INDEX = -100
"""The pad value of the targets: no loss at that position."""


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.compute  # noqa: F401
    except ImportError:
        raise CurvscopeError("reading Parquet, Arrow or Hugging Face datasets needs the 'pyarrow' package, which is "
                             "not installed: pip install \"curvscope[parquet]\"") from None
    return pa


def open_table(path: Path, name: str, columns: dict[str, str] | None = None, split: str | None = None,
               pad_token: int | None = None) -> Source:
    """A ``.parquet`` or ``.arrow`` file, or a ``save_to_disk`` directory (a ``DatasetDict``'s needs ``split``)."""
    pa = _pyarrow()
    if path.is_dir():
        tables = _hf_directory(path, split, pa)
        reader: Any = ArrowTable(pa.concat_tables(tables) if len(tables) > 1 else tables[0])
    elif not path.exists():
        raise CurvscopeError(f"{path}: data file not found")
    else:
        if split is not None:
            raise OptionError("split", f"applies to a Hugging Face DatasetDict directory, not to {path}")
        reader = ParquetTable(path, pa) if path.suffix.lower() == ".parquet" else ArrowTable(_arrow_file(path, pa))
    return _source(reader, name, columns, pad_token)


def from_hf_dataset(obj: Any, name: str, columns: dict[str, str] | None = None, split: str | None = None,
                    pad_token: int | None = None) -> Source:
    """A ``datasets.Dataset`` (or a ``DatasetDict`` with ``split``) held in memory, read through Arrow."""
    if type(obj).__name__ == "DatasetDict":
        splits = list(obj.keys())
        obj = obj[_choose_split(splits, split, name)]
    elif split is not None:
        raise OptionError("split", f"applies to a DatasetDict; {name} is a single Dataset")
    if getattr(obj, "_indices", None) is not None:
        obj = obj.flatten_indices()
    return _source(ArrowTable(obj.data.table), name, columns, pad_token)


def _choose_split(splits: list[str], split: str | None, name: str) -> str:
    if split is None:
        if len(splits) == 1:
            return splits[0]
        raise OptionError("split", lambda label: f"{name} is a DatasetDict with splits {', '.join(splits)}: choose "
                          f"one with {label('split', splits[0])}")
    if split not in splits:
        raise OptionError("split", f"'{split}': {name} has the splits {', '.join(splits)}")
    return split


def _hf_directory(path: Path, split: str | None, pa: Any) -> list[Any]:
    """The memory-mapped Arrow tables of a ``save_to_disk`` directory."""
    if (path / "dataset_dict.json").is_file():
        try:
            splits = list(json.loads((path / "dataset_dict.json").read_text())["splits"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CurvscopeError(f"{path}/dataset_dict.json: cannot be read ({exc})") from exc
        path = path / _choose_split(splits, split, str(path))
    elif split is not None:
        raise OptionError("split", f"applies to a DatasetDict directory; {path} holds a single Dataset")
    state = path / "state.json"
    if not state.is_file():
        raise CurvscopeError(f"{path}: a directory, but not one written by datasets' save_to_disk (no state.json); "
                             "data directories hold a Hugging Face dataset")
    try:
        meta = json.loads(state.read_text())
        files = [path / entry["filename"] for entry in meta["_data_files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise CurvscopeError(f"{state}: cannot be read ({exc})") from exc
    if meta.get("_indices_data_files"):
        raise CurvscopeError(f"{path}: saved with an indices mapping; call dataset.flatten_indices() before "
                             "save_to_disk")
    if not files:
        raise CurvscopeError(f"{path}: the dataset has no data files")
    return [_arrow_file(f, pa) for f in files]


def _arrow_file(path: Path, pa: Any) -> Any:
    """A memory-mapped Arrow IPC file (file or stream format) as a table (its buffers stay on disk)."""
    try:
        try:
            return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise CurvscopeError(f"{path}: not a valid Arrow file ({str(exc).splitlines()[0] if str(exc) else exc})"
                             ) from exc


class ArrowTable:
    """An in-memory (or memory-mapped) Arrow table."""

    def __init__(self, table: Any):
        self.table = table
        self.num_rows = table.num_rows
        self.schema = table.schema

    def take(self, column: str, indices: Tensor) -> Any:
        """The rows ``indices`` of ``column`` (an Arrow array)."""
        import pyarrow as pa

        return self.table.column(column).take(pa.array(indices.numpy())).combine_chunks()

    def lengths(self, column: str) -> Any:
        """Every row's list length (only the offsets are read)."""
        import pyarrow.compute as pc

        return pc.list_value_length(self.table.column(column))


class ParquetTable:
    """A Parquet file, read one row group (of one column) at a time."""

    def __init__(self, path: Path, pa: Any):
        import pyarrow.parquet as pq

        try:
            self.file = pq.ParquetFile(str(path), memory_map=True)
        except (pa.ArrowException, OSError) as exc:
            raise CurvscopeError(f"{path}: not a valid Parquet file ({str(exc).splitlines()[0]})") from exc
        self.path, self.schema = path, self.file.schema_arrow
        meta = self.file.metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self.starts = torch.tensor([0, *sizes]).cumsum(0)
        self.num_rows = int(self.starts[-1])

    def take(self, column: str, indices: Tensor) -> Any:
        """The rows ``indices`` of ``column``: only the row groups holding them are read."""
        import pyarrow as pa

        groups = torch.searchsorted(self.starts, indices, right=True) - 1
        parts, positions = [], torch.empty_like(indices)
        offset = 0
        for g in torch.unique(groups).tolist():
            chosen = (groups == g).nonzero().reshape(-1)
            local = indices[chosen] - self.starts[g]
            parts.append(self.file.read_row_group(g, columns=[column]).column(0).take(pa.array(local.numpy())))
            positions[chosen] = torch.arange(offset, offset + chosen.numel())
            offset += chosen.numel()
        joined = pa.chunked_array([p for part in parts for p in part.chunks], type=self.schema.field(column).type)
        return joined.combine_chunks().take(pa.array(positions.numpy()))

    def lengths(self, column: str) -> Any:
        """Every row's list length, one row group at a time."""
        import pyarrow as pa
        import pyarrow.compute as pc

        return pa.chunked_array([pc.list_value_length(self.file.read_row_group(g, columns=[column]).column(0))
                                 for g in range(self.file.metadata.num_row_groups)], type=pa.int32())


class TableColumn:
    """One column of a table as tensors. List columns keep the lengths of row 0 (ragged rows are an error), or with
    ``pad`` are padded to the data's longest row."""

    def __init__(self, table: Any, column: str, source: str, pad: int | None):
        import pyarrow.compute as pc

        self.table, self.column, self.source = table, column, source
        self.pad = pad if pad is not None and _is_list(table.schema.field(column).type) else None
        self.width = None if self.pad is None else int(pc.max(table.lengths(column)).as_py() or 0)
        self.dims: list[int] | None = None
        first = self.read(torch.tensor([0]))
        self.dims = list(first.shape[1:])
        self.shape = (table.num_rows, *first.shape[1:])
        self.dtype = first.dtype

    def read(self, indices: Tensor) -> Tensor:
        """The rows ``indices`` as a tensor ``(n, ...)``."""
        return self._tensor(self.table.take(self.column, indices))

    def _tensor(self, array: Any) -> Tensor:
        import pyarrow as pa
        import pyarrow.compute as pc

        if array.null_count:
            raise CurvscopeError(f"{self.source}: column '{self.column}' has missing (null) values")
        n, dims, values = len(array), [], array
        while _is_list(values.type):
            lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
            flat = pc.list_flatten(values)
            if flat.null_count:
                raise CurvscopeError(f"{self.source}: column '{self.column}' has missing (null) values")
            if self.pad is not None:
                return self._padded(flat, lengths)
            level = len(dims)
            expect = self.dims[level] if self.dims is not None else (int(lengths[0]) if len(lengths) else 0)
            if len(lengths) and (lengths.min() != lengths.max() or lengths[0] != expect):
                low, high = min(int(lengths.min()), expect), max(int(lengths.max()), expect)
                text = f"{self.source}: column '{self.column}' holds lists of different lengths ({low} to {high})"
                raise OptionError("pad_token", lambda name, text=text: f"{text}; pad them when the data is made, or "
                                  f"pass {name('pad_token', Metavar('ID'))} to pad them")
            dims.append(expect)
            values = flat
        if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or
                pa.types.is_boolean(values.type)):
            raise CurvscopeError(f"{self.source}: column '{self.column}' holds {values.type} values, not numbers")
        return torch.from_numpy(_writable(values.to_numpy(zero_copy_only=False))).reshape(n, *dims)

    def _padded(self, flat: Any, lengths: Any) -> Tensor:
        import numpy as np

        if _is_list(flat.type):
            raise CurvscopeError(f"{self.source}: column '{self.column}' holds lists of lists; only lists of numbers "
                                 "can be padded")
        data = torch.from_numpy(_writable(flat.to_numpy(zero_copy_only=False)))
        out = torch.full((len(lengths), self.width), self.pad, dtype=data.dtype)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        for i, length in enumerate(lengths.tolist()):
            out[i, :length] = data[int(starts[i]):int(starts[i]) + length]
        return out


def _writable(array: Any) -> Any:
    """A contiguous array torch may wrap (Arrow's zero-copy arrays are read-only: copied)."""
    import numpy as np

    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


def _is_list(kind: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _source(table: Any, name: str, columns: dict[str, str] | None, pad_token: int | None) -> Source:
    if table.num_rows == 0:
        raise CurvscopeError(f"{name}: the dataset is empty")
    names = list(table.schema.names)
    numeric, left_out = [], []
    for column in names:
        if _numeric(table.schema.field(column).type):
            numeric.append(column)
        elif column in (columns or {}).values():
            raise CurvscopeError(f"{name}: column '{column}' holds {table.schema.field(column).type} values, not "
                                 "numbers (decode it in a data factory)")
        else:
            left_out.append(column)
    layout = plan_layout(numeric, name, columns)
    readers = {}
    for column in layout.columns:
        pad = None
        if pad_token is not None:
            pad = IGNORE_INDEX if column == layout.target else 0 if "mask" in column else int(pad_token)
        readers[column] = TableColumn(table, column, name, pad)
    notes = [f"column '{c}' ({table.schema.field(c).type}) is not numeric: left out" for c in left_out]
    padded = [f"'{c}' to {r.width} with {r.pad}" for c, r in readers.items() if r.width is not None]
    if padded:
        notes.append(f"ragged lists padded to the longest row: {', '.join(padded)}")
    return ColumnSource(readers, layout, name, notes=notes)


def _numeric(kind: Any) -> bool:
    import pyarrow as pa

    while _is_list(kind):
        kind = kind.value_type
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
