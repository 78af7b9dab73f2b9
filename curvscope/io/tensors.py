"""Reading named tensors from .safetensors, .npz and .pt files, safely and with one-line errors."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from torch import Tensor

from curvscope.errors import CurvscopeError

SUFFIXES = (".safetensors", ".npz", ".pt", ".pth")


def check_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise CurvscopeError(f"{path}: {what} file not found")
    if path.is_dir():
        raise CurvscopeError(f"{path}: is a directory, expected a {what} file")
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
    """A dict of tensors saved with torch.save, loaded with ``weights_only=True`` (no arbitrary unpickling)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt / unsafe files
        raise CurvscopeError(f"{path}: cannot be loaded as a weights-only torch file ({_first_line(exc)})"
                             ) from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict) and len(obj) <= 4:
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CurvscopeError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return {str(k): v for k, v in obj.items()}


def read_npz(path: Path) -> dict[str, Tensor]:
    import numpy as np

    try:
        with np.load(str(path), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CurvscopeError(f"{path}: not a valid .npz file ({_first_line(exc)})") from exc
    out = {}
    for k, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise CurvscopeError(f"{path}: array '{k}' has unsupported dtype {a.dtype}")
        out[k] = torch.from_numpy(np.ascontiguousarray(a))
    return out


def read_tensors(path: Path, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Named tensors (and safetensors metadata, else ``{}``) from any supported file type."""
    path = check_file(path, what)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix in (".pt", ".pth"):
        return read_torch(path), {}
    if suffix == ".npz":
        return read_npz(path), {}
    raise CurvscopeError(f"{path}: unknown {what} file type '{path.suffix}' (expected one of "
                         f"{', '.join(SUFFIXES)})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
