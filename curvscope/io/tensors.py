"""Reading named tensors from .safetensors, .npz and .pt files, safely and with one-line errors."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from curvscope.errors import CurvscopeError

SUFFIXES = (".safetensors", ".npz", ".pt", ".pth")


def check_file(path: Path, what: str) -> Path:
    """``path`` as a :class:`~pathlib.Path`, checked to be an existing regular file.

    Raises:
        CurvscopeError: the file is missing, a directory, or not a regular file (``what`` names it).
    """
    path = Path(path)
    if not path.exists():
        raise CurvscopeError(f"{path}: {what} file not found")
    if path.is_dir():
        raise CurvscopeError(f"{path}: is a directory, expected a {what} file")
    if not path.is_file():  # a FIFO would block the read forever; a device is not a file of tensors
        raise CurvscopeError(f"{path}: not a regular file (a FIFO, device or socket), expected a {what} file")
    return path


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CurvscopeError(f"{path}: not a valid safetensors file ({_first_line(exc)})") from exc
    return tensors, metadata


def read_torch(path: Path) -> dict[str, Tensor]:
    """A dict of tensors saved with torch.save, loaded with ``weights_only=True`` (never unpickles code)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt / unsafe files
        text = _strip_ansi(str(exc))
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if unsafe or "Weights only load failed" in text:
            what = unsafe.group(1) if unsafe else "a Python object"
            raise CurvscopeError(f"{path}: holds {what}, not a plain state dict; curvscope only loads "
                                 "tensors (weights_only=True): save model.state_dict() instead") from exc
        raise CurvscopeError(f"{path}: cannot be loaded as a weights-only torch file ({_first_line(exc)})"
                             ) from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict) and len(obj) <= 4:
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CurvscopeError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CurvscopeError(f"{path}: expected a dict of tensors (a state dict), but entry '{bad[0]}' is a "
                             f"{type(obj[bad[0]]).__name__}")
    return {str(k): v for k, v in obj.items()}


def read_npz(path: Path) -> dict[str, Tensor]:
    """The arrays of a ``.npz`` file as tensors (no pickles; bool, integer and float dtypes only).

    Raises:
        CurvscopeError: not a valid ``.npz`` file, or an array of another dtype.
    """
    import numpy as np

    if not zipfile.is_zipfile(path):  # np.load would read a .npy (one array) or text without complaint
        with open(path, "rb") as f:
            head = f.read(6)
        kind = "a single .npy array" if head == b"\x93NUMPY" else "not a zip archive"
        raise CurvscopeError(f"{path}: not a valid .npz file ({kind}); save named arrays with "
                             "numpy.savez(path, x=..., y=...)")
    try:
        with np.load(str(path), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise CurvscopeError(f"{path}: not a valid .npz file ({_first_line(exc)})") from exc
    out = {}
    for k, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise CurvscopeError(f"{path}: array '{k}' has unsupported dtype {a.dtype}")
        out[k] = torch.from_numpy(np.ascontiguousarray(a))
    return out


def read_tensors(path: Path, what: str, suffixes: tuple[str, ...] = SUFFIXES
                 ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Named tensors (and safetensors metadata, else ``{}``) from any supported file type.

    ``suffixes``: the file types accepted for this use (checkpoints are never .npz).
    """
    path = check_file(path, what)
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise CurvscopeError(f"{path}: unknown {what} file type '{path.suffix}' (expected one of "
                             f"{', '.join(suffixes)})")
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix in (".pt", ".pth"):
        return read_torch(path), {}
    if suffix == ".npz":
        return read_npz(path), {}
    raise CurvscopeError(f"{path}: unknown {what} file type '{path.suffix}' (expected one of "
                         f"{', '.join(SUFFIXES)})")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, without terminal escapes, at most ``limit`` characters."""
    text = _strip_ansi(str(exc)).strip().splitlines()
    line = text[0].strip() if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit - 3].rstrip() + "..."


def safetensors_writer(tensors: dict[str, Tensor], metadata: dict[str, Any] | None = None):
    """``write(path)`` for :mod:`curvscope.io.atomic`: a safetensors file of ``tensors``, metadata values stored
    as strings (JSON for anything that is not one already)."""
    from safetensors.torch import save_file

    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}

    def write(path: Path) -> None:
        save_file(tensors, str(path), metadata=meta)

    return write
