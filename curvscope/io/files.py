"""Data files as :class:`~curvscope.io.sources.Source` objects, large ones read row by row.

A file smaller than :data:`LAZY_BYTES` is read whole and checked whole (every input finite), as
:func:`~curvscope.io.data.load_dataset` does. A larger file is never read whole: only the rows a batch uses,

- ``.safetensors``: the bytes of the rows of each tensor (its header checked by ``safe_open``; one read per run
  of consecutive rows);
- ``.npz``: members stored uncompressed (``numpy.savez``) are memory-mapped (a compressed member,
  ``numpy.savez_compressed``, cannot be: it is read whole, with a note);
- ``.pt``/``.pth``: ``torch.load(mmap=True, weights_only=True)``;

and each batch's rows are checked finite when they are read. Parquet, Arrow and Hugging Face datasets:
:mod:`curvscope.io.tables`.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from curvscope.errors import CurvscopeError, OptionError
from curvscope.io.data import load_dataset, plan_layout
from curvscope.io.sources import ColumnSource, Source, TensorColumn, TensorSource
from curvscope.io.tensors import SUFFIXES, _first_line, check_file, read_torch

LAZY_BYTES = 64 * 2**20
"""Data files of at least this size are read row by row (only the rows a batch uses)."""
TABLE_SUFFIXES = (".parquet", ".arrow")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def open_data_file(path: str | Path, columns: dict[str, str] | None = None, split: str | None = None,
                   pad_token: int | None = None, name: str | None = None) -> Source:
    """The source of a data file or a Hugging Face ``save_to_disk`` directory (``columns``: renames)."""
    path = Path(path)
    name = name or str(path)
    if path.is_dir() or path.suffix.lower() in TABLE_SUFFIXES:
        from curvscope.io.tables import open_table

        return open_table(path, name, columns=columns, split=split, pad_token=pad_token)
    if split is not None:
        raise OptionError("split", f"applies to a Hugging Face DatasetDict directory, not to {path}")
    if pad_token is not None:
        raise OptionError("pad_token", f"applies to list columns of Parquet, Arrow and Hugging Face data, not to "
                          f"{path}")
    path = check_file(path, "data")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES or path.stat().st_size < LAZY_BYTES:
        dataset = load_dataset(path, columns)
        return TensorSource(dataset.x, dataset.y, name, dataset.target_name, metadata=dataset.metadata)
    if suffix == ".safetensors":
        tensors, metadata = _safetensors_columns(path)
    elif suffix == ".npz":
        tensors, metadata = _npz_columns(path), {}
    else:
        tensors, metadata = _torch_columns(path), {}
    layout = plan_layout(list(tensors), str(path), columns)
    notes = [f"{path.stat().st_size / 2**20:,.0f} MiB: only the rows used are read"]
    notes += [tensors[c].note for c in layout.columns if getattr(tensors[c], "note", None)]
    return ColumnSource({c: tensors[c] for c in layout.columns}, layout, name, notes=notes, metadata=metadata)


def _runs(indices: Tensor) -> tuple[list[tuple[int, int]], Tensor, Tensor]:
    """The sorted distinct rows as runs ``[(start, stop)]`` of consecutive rows, the sorted rows, and where each
    requested row sits among them."""
    unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    runs: list[tuple[int, int]] = []
    for i in unique.tolist():
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs, unique, inverse


class SafetensorsColumn:
    """One tensor of a safetensors file, read by plain reads of the bytes of its rows (one per run of consecutive
    rows; no memory map, whose read-ahead would pull in pages around every row of a random batch)."""

    def __init__(self, path: Path, key: str, shape: tuple[int, ...], dtype: torch.dtype, start: int):
        self.path, self.key, self.shape, self.dtype, self.start = path, key, shape, dtype, start
        self.row_bytes = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()

    def read(self, indices: Tensor) -> Tensor:
        """The rows ``indices``."""
        runs, _, inverse = _runs(indices)
        data = bytearray(read_rows(self.path, self.start, self.row_bytes, runs))
        rows = torch.frombuffer(data, dtype=self.dtype) if data else torch.empty(0, dtype=self.dtype)
        return rows.reshape(-1, *self.shape[1:])[inverse]


def read_rows(path: Path, start: int, row_bytes: int, runs: list[tuple[int, int]]) -> bytes:
    """The bytes of rows ``[a, b)`` for each run, of a row-major array of ``row_bytes`` per row at ``start``."""
    with open(path, "rb") as f:
        parts = []
        for a, b in runs:
            f.seek(start + a * row_bytes)
            parts.append(f.read((b - a) * row_bytes))
    return b"".join(parts)


def _safetensors_columns(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:  # validates the header
            metadata = dict(f.metadata() or {})
            dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
        with open(path, "rb") as raw:
            size = int.from_bytes(raw.read(8), "little")
            header = json.loads(raw.read(size))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CurvscopeError(f"{path}: not a valid safetensors file ({_first_line(exc)})") from exc
    columns = {}
    for key, kind in dtypes.items():
        dtype = SAFETENSORS_DTYPES.get(kind)
        if dtype is None:
            raise CurvscopeError(f"{path}: tensor '{key}' has unsupported dtype {kind}")
        entry = header[key]
        columns[key] = SafetensorsColumn(path, key, tuple(entry["shape"]), dtype, 8 + size + entry["data_offsets"][0])
    return columns, metadata


class MemmapColumn:
    """A numpy array (memory-mapped: indexing reads only the rows asked for)."""

    def __init__(self, array: Any, note: str | None = None):
        self.array, self.note = array, note
        self.shape = tuple(array.shape)
        self.dtype = torch.from_numpy(array[:0].copy()).dtype

    def read(self, indices: Tensor) -> Tensor:
        """``array[indices]`` as a tensor."""
        import numpy as np

        return torch.from_numpy(np.ascontiguousarray(self.array[indices.numpy()]))


def _random_access(array: Any) -> None:
    """Tell the kernel a memory map is read at random rows: no read-ahead around each (where it can be told)."""
    import mmap

    handle = getattr(array, "_mmap", None)
    if handle is not None and hasattr(handle, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        try:
            handle.madvise(mmap.MADV_RANDOM)
        except OSError:  # pragma: no cover  (advice only)
            pass


def _npz_columns(path: Path) -> dict[str, Any]:
    """Each member of a ``.npz`` as a column: memory-mapped where stored uncompressed, else read whole."""
    import numpy as np
    from numpy.lib import format as npy

    columns: dict[str, Any] = {}
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            for info in archive.infolist():
                key = info.filename.removesuffix(".npy")
                if info.compress_type == zipfile.ZIP_STORED:
                    raw.seek(info.header_offset)
                    header = raw.read(30)
                    if header[:4] != b"PK\x03\x04":
                        raise ValueError(f"member {info.filename}: bad local header")
                    start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + \
                        int.from_bytes(header[28:30], "little")
                    raw.seek(start)
                    version = npy.read_magic(raw)
                    read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                    shape, fortran, dtype = read_header(raw)
                    if dtype.hasobject:
                        raise CurvscopeError(f"{path}: array '{key}' has unsupported dtype {dtype}")
                    array = np.memmap(path, dtype=dtype, mode="r", offset=raw.tell(), shape=shape,
                                      order="F" if fortran else "C")
                    _random_access(array)
                    note = None
                else:
                    with archive.open(info) as member:
                        array = npy.read_array(member, allow_pickle=False)
                    note = f"'{key}' is stored compressed: read whole (numpy.savez keeps it readable row by row)"
                if array.dtype.kind not in "biuf":
                    raise CurvscopeError(f"{path}: array '{key}' has unsupported dtype {array.dtype}")
                columns[key] = MemmapColumn(array, note)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CurvscopeError(f"{path}: not a valid .npz file ({_first_line(exc)})") from exc
    return columns


def _torch_columns(path: Path) -> dict[str, Any]:
    """The tensors of a torch file, memory-mapped when it is in the zip format (else read whole)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an old (non-zip) file, or one with objects: read_torch says what is wrong with it
        return {k: TensorColumn(v) for k, v in read_torch(path).items()}
    if isinstance(obj, dict) and all(isinstance(v, Tensor) for v in obj.values()):
        return {str(k): TensorColumn(v) for k, v in obj.items()}
    return {k: TensorColumn(v) for k, v in read_torch(path).items()}
