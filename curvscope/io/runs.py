"""The checkpoints of a training run: found, given a step, ordered, fingerprinted and loaded safely.

A run is given as directories, checkpoint files or globs (:func:`find_checkpoints`). A checkpoint is

- a ``.safetensors`` file (a state dict; the step may be in its metadata as ``step`` or ``global_step``);
- a ``.pt``/``.pth`` file, read with ``torch.load(..., weights_only=True)`` only (never unpickling code): a
  training checkpoint, a dict with the model state under ``model``, ``state_dict`` or ``model_state_dict``,
  optionally the optimizer's ``state_dict()`` under ``optimizer``, ``optimizer_state_dict`` or (Lightning)
  ``optimizer_states`` with one entry, and ``step``/``global_step``/``epoch``; or a plain state dict;
- a Hugging Face directory (``Trainer``'s ``checkpoint-<n>/``, or any ``save_pretrained`` directory) with
  ``model.safetensors`` (or the shards of ``model.safetensors.index.json``), optionally ``optimizer.pt`` and
  ``trainer_state.json``. Pickled ``pytorch_model.bin`` weights are not read (as in :mod:`curvscope.io.hf`).

The step of a checkpoint is its own (``global_step``, else ``step``: safetensors metadata, the ``.pt`` dict,
``trainer_state.json``), else the last integer in its file or directory name. Checkpoints are ordered by step.
In a directory of checkpoints the ``Trainer``'s other files (``optimizer.pt``, ``scheduler.pt``,
``rng_state*.pth``, ``training_args.bin``) are not checkpoints, and beside ``checkpoint-<n>/`` directories the
final ``save_pretrained`` weights (``model.safetensors``, its shards) are left out: they are the end of the run
again, without a step.
"""

from __future__ import annotations

import glob
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from curvscope.errors import CurvscopeError
from curvscope.io.tensors import check_file, read_safetensors, read_torch

KINDS = ("safetensors", "torch", "hf")
FILE_SUFFIXES = (".safetensors", ".pt", ".pth")
MODEL_KEYS = ("model", "state_dict", "model_state_dict")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict")
STEP_KEYS = ("global_step", "step")
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_OPTIMIZER = "optimizer.pt"
HF_STATE = "trainer_state.json"
NOT_CHECKPOINTS = re.compile(r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth|training_args\.bin)$")
FINAL_WEIGHTS = re.compile(r"^model(-\d+-of-\d+)?\.safetensors$")
_GLOB = re.compile(r"[*?\[]")
_INTEGER = re.compile(r"\d+")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class TrainingState:
    """One checkpoint, loaded.

    Attributes:
        state_dict: the model's tensors by name.
        optimizer_state: the optimizer's ``state_dict()`` as saved, or ``None``.
        step: the checkpoint's step.
        metadata: safetensors metadata (strings); a ``.pt`` file's other plain entries (``epoch``, ``step``,
            ...); a Hugging Face directory's weight metadata and ``trainer_state`` (the parsed JSON).
    """

    state_dict: dict[str, Tensor]
    optimizer_state: dict[str, Any] | None
    step: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Outline:
    """What a checkpoint holds, read without loading its tensors' data: what a run is checked against before its
    first point is computed.

    Attributes:
        shapes: the model tensors' shapes by name.
        optimizer_state: the optimizer's ``state_dict()`` with every tensor replaced by a tensor of its shape and
            dtype on the ``meta`` device (no data), or ``None`` (no optimizer state).
    """

    shapes: dict[str, tuple[int, ...]]
    optimizer_state: dict[str, Any] | None


@dataclass(frozen=True)
class RunCheckpoint:
    """A checkpoint of a run: where it is, its step and what kind it is (not loaded).

    Attributes:
        path: the file, or the Hugging Face directory.
        step: its step.
        kind: ``"safetensors"``, ``"torch"`` (``.pt``/``.pth``) or ``"hf"`` (a directory).
        step_source: where the step came from: ``"metadata"`` (the checkpoint's own) or ``"name"``.
        files: the files that make it up (for a directory: weights, shards and index, ``optimizer.pt``,
            ``trainer_state.json``), which :meth:`fingerprint` hashes and :meth:`load` reads.
    """

    path: Path
    step: int
    kind: str
    step_source: str
    files: tuple[Path, ...]
    known: Outline | None = field(default=None, compare=False, repr=False)
    """The :meth:`outline`, when reading the step already gave it (a ``.pt`` file is opened once for both)."""

    def fingerprint(self) -> dict[str, Any]:
        """``{"path", "size", "sha256", "files"}``: the path as found, the bytes and the SHA-256 of the files
        (streamed, in order, each preceded by its name relative to ``path`` and its size), their names.

        Two checkpoints have equal fingerprints when the same path holds the same bytes.
        """
        digest = hashlib.sha256()
        size = 0
        names = []
        for f in self.files:
            name = f.name if f == self.path else f.relative_to(self.path).as_posix()
            n = check_file(f, "checkpoint").stat().st_size
            digest.update(f"{name}\0{n}\0".encode())
            with f.open("rb") as handle:
                for chunk in iter(lambda h=handle: h.read(_CHUNK), b""):
                    digest.update(chunk)
            size += n
            names.append(name)
        return {"path": str(self.path), "size": size, "sha256": digest.hexdigest(), "files": names}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The model tensors' shapes by name, read without loading the tensors (safetensors headers; a ``.pt`` file
        memory-mapped where possible)."""
        return self.outline().shapes

    def outline(self) -> Outline:
        """The model tensors' shapes and the optimizer state's structure, without loading tensor data
        (safetensors headers; ``.pt`` files memory-mapped where possible)."""
        if self.known is not None:
            return self.known
        if self.kind == "torch":
            return _torch_outline(_torch_load(self.path, mmap=True), self.path)
        shapes: dict[str, tuple[int, ...]] = {}
        for f in self.files:
            if f.suffix == ".safetensors":
                shapes.update(_safetensors_shapes(f))
        optimizer = None
        if self.kind == "hf" and (self.path / HF_OPTIMIZER).is_file():
            optimizer = _skeleton(_hf_optimizer(self.path, mmap=True))
        return Outline(shapes, optimizer)

    def load(self) -> TrainingState:
        """Read the checkpoint: tensors safely (safetensors, or ``torch.load`` with ``weights_only=True``)."""
        if self.kind == "safetensors":
            tensors, meta = read_safetensors(check_file(self.path, "checkpoint"))
            return TrainingState(tensors, None, self.step, dict(meta))
        if self.kind == "torch":
            model, optimizer, meta = _training_parts(_torch_load(self.path), self.path)
            return TrainingState(model, optimizer, self.step, meta)
        return _load_hf(self)


def find_checkpoints(paths: Sequence[str | Path]) -> list[RunCheckpoint]:
    """The checkpoints of a run, ordered by step.

    Args:
        paths: directories of checkpoints, checkpoint files (or Hugging Face checkpoint directories), or globs
            of them. The same checkpoint reached twice counts once.

    Raises:
        CurvscopeError: a path that does not exist, a glob or directory without checkpoints, an unreadable or
            unsafe checkpoint, checkpoints without a step, or two with the same step (naming them).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: dict[Path, RunCheckpoint] = {}
    for given in paths:
        for candidate in _expand(str(given)):
            key = candidate.resolve()
            if key not in found:
                found[key] = _describe(candidate)
    if not found:
        raise CurvscopeError("no checkpoint given")
    checkpoints = list(found.values())
    without = [c for c in checkpoints if c.step < 0]
    if without:
        raise CurvscopeError(f"no step for {_listed([c.path for c in without])}: neither a step in the checkpoint "
                             "(global_step / step) nor an integer in its name")
    by_step: dict[int, list[RunCheckpoint]] = {}
    for c in checkpoints:
        by_step.setdefault(c.step, []).append(c)
    twice = [(s, cs) for s, cs in sorted(by_step.items()) if len(cs) > 1]
    if twice:
        step, same = twice[0]
        more = f" (and {len(twice) - 1} more steps)" if len(twice) > 1 else ""
        raise CurvscopeError(f"two checkpoints with step {step}: {_listed([c.path for c in same])}{more}")
    return sorted(checkpoints, key=lambda c: c.step)


def _listed(paths: list[Path], n: int = 4) -> str:
    shown = ", ".join(str(p) for p in paths[:n])
    return shown + (f" (and {len(paths) - n} more)" if len(paths) > n else "")


# -- discovery --------------------------------------------------------------------------------------------

def _expand(given: str) -> list[Path]:
    """The checkpoint candidates one argument names (files and Hugging Face directories)."""
    path = Path(given)
    if not path.exists() and _GLOB.search(given):
        matches = [Path(m) for m in sorted(glob.glob(given))]
        out = [m for m in matches if _is_single(m) or (m.is_file() and _is_checkpoint_file(m))]
        out += [c for m in matches if m.is_dir() and not _is_single(m) for c in _scan(m, required=False)]
        if not out:
            raise CurvscopeError(f"{given}: no checkpoint matches (expected .safetensors, .pt or .pth files or "
                                 "Hugging Face checkpoint directories)")
        return out
    if not path.exists():
        raise CurvscopeError(f"{path}: checkpoint or run directory not found")
    if path.is_dir():
        return [path] if _is_single(path) else _scan(path, required=True)
    check_file(path, "checkpoint")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise CurvscopeError(f"{path}: unknown checkpoint file type '{path.suffix}' (expected "
                             f"{', '.join(FILE_SUFFIXES)}, or a directory)")
    return [path]


def _scan(directory: Path, required: bool) -> list[Path]:
    children = sorted(directory.iterdir())
    hf_dirs = [c for c in children if c.is_dir() and _is_hf_dir(c)]
    files = [c for c in children if c.is_file() and _is_checkpoint_file(c)
             and not (hf_dirs and FINAL_WEIGHTS.match(c.name))]
    if required and not hf_dirs and not files:
        raise CurvscopeError(f"{directory}: no checkpoint found (expected .safetensors, .pt or .pth files or "
                             "Hugging Face checkpoint-<n>/ directories)")
    return files + hf_dirs


def _is_checkpoint_file(path: Path) -> bool:
    return path.suffix.lower() in FILE_SUFFIXES and not NOT_CHECKPOINTS.match(path.name)


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and ((path / HF_WEIGHTS).is_file() or (path / HF_INDEX).is_file())


def _is_single(path: Path) -> bool:
    """A Hugging Face directory that is one checkpoint: it has weights and no checkpoint directories inside (a
    ``Trainer`` output directory has both: its checkpoints are the ``checkpoint-<n>/`` inside)."""
    return _is_hf_dir(path) and not any(c.is_dir() and _is_hf_dir(c) for c in path.iterdir())


def _name_step(path: Path) -> int | None:
    stem = path.name if path.is_dir() else path.name[:len(path.name) - len(path.suffix)]
    numbers = _INTEGER.findall(stem)
    return int(numbers[-1]) if numbers else None


def _describe(path: Path) -> RunCheckpoint:
    """Kind, files and step of one candidate (reads metadata only: a safetensors header, a ``.pt`` file
    memory-mapped, ``trainer_state.json``)."""
    if path.is_dir():
        kind, files = "hf", _hf_files(path)
        own = _hf_step(path)
    elif path.suffix.lower() == ".safetensors":
        kind, files = "safetensors", (path,)
        own = _step_value(_safetensors_metadata(path), path)
    else:
        kind, files = "torch", (path,)
        obj = _torch_load(path, mmap=True)
        own = _step_value(obj, path) if isinstance(obj, dict) else None
        try:
            known = _torch_outline(obj, path)
        except CurvscopeError:  # said when the checkpoint is checked or loaded
            known = None
        del obj
        if own is not None:
            return RunCheckpoint(path, own, kind, "metadata", files, known)
        by_name = _name_step(path)
        return RunCheckpoint(path, -1 if by_name is None else by_name, kind, "name", files, known)
    if own is not None:
        return RunCheckpoint(path, own, kind, "metadata", files)
    by_name = _name_step(path)
    return RunCheckpoint(path, -1 if by_name is None else by_name, kind, "name", files)


def _torch_outline(obj: Any, path: Path) -> Outline:
    model, optimizer, _ = _training_parts(obj, path)
    return Outline({k: tuple(v.shape) for k, v in model.items()}, _skeleton(optimizer))


def _skeleton(value: Any) -> Any:
    """``value`` with every tensor replaced by one of its shape and dtype on the ``meta`` device (no data)."""
    if isinstance(value, Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, dict):
        return {k: _skeleton(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_skeleton(v) for v in value)
    return value


def _step_value(entries: dict[str, Any], path: Path) -> int | None:
    for key in STEP_KEYS:
        value = entries.get(key)
        if value is None:
            continue
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not (number == number and number >= 0 and number == int(number)):
            raise CurvscopeError(f"{path}: '{key}' is {value!r}, not a step (an integer >= 0)")
        return int(number)
    return None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        read_safetensors(path)  # raises curvscope's one-line error for this file
        raise CurvscopeError(f"{path}: not a valid safetensors file") from exc


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(check_file(path, "checkpoint")), framework="pt") as handle:
            return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        read_safetensors(path)  # raises curvscope's one-line error for this file
        raise CurvscopeError(f"{path}: not a valid safetensors file") from exc


def _torch_load(path: Path, mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` (memory-mapped when asked and possible); a file that needs
    anything but tensors and plain containers gets :func:`curvscope.io.tensors.read_torch`'s one-line error."""
    check_file(path, "checkpoint")
    if mmap:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be memory-mapped: load them plainly
            pass
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt / unsafe files
        read_torch(path)  # raises the one-line error naming what the file holds
        raise CurvscopeError(f"{path}: cannot be loaded as a weights-only torch file") from exc


def _tensor_dict(obj: Any, path: Path, what: str) -> dict[str, Tensor]:
    if not isinstance(obj, dict):
        raise CurvscopeError(f"{path}: {what} is a {type(obj).__name__}, expected a dict of tensors")
    bad = next((k for k, v in obj.items() if not isinstance(v, Tensor)), None)
    if bad is not None:
        raise CurvscopeError(f"{path}: {what} entry '{bad}' is a {type(obj[bad]).__name__}, not a tensor")
    return {str(k): v for k, v in obj.items()}


def _training_parts(obj: Any, path: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None, dict[str, Any]]:
    """Model state, optimizer state and plain metadata of a loaded ``.pt`` object."""
    if not isinstance(obj, dict):
        raise CurvscopeError(f"{path}: expected a state dict or a training checkpoint dict, got "
                             f"{type(obj).__name__}")
    key = next((k for k in MODEL_KEYS if isinstance(obj.get(k), dict)), None)
    if key is None:
        return _tensor_dict(obj, path, "state dict"), None, {}
    model = _tensor_dict(obj[key], path, f"'{key}'")
    optimizer = next((obj[k] for k in OPTIMIZER_KEYS if obj.get(k) is not None), None)
    states = obj.get("optimizer_states")
    if optimizer is None and isinstance(states, (list, tuple)) and states:
        if len(states) > 1:
            raise CurvscopeError(f"{path}: holds {len(states)} optimizer states; one optimizer is supported")
        optimizer = states[0]
    if optimizer is not None and not isinstance(optimizer, dict):
        raise CurvscopeError(f"{path}: the optimizer state is a {type(optimizer).__name__}, expected the dict of "
                             "optimizer.state_dict()")
    meta = {str(k): v.item() if isinstance(v, Tensor) and v.numel() == 1 else v for k, v in obj.items()
            if k not in MODEL_KEYS and k not in OPTIMIZER_KEYS and k != "optimizer_states"
            and (isinstance(v, (int, float, str, bool)) or (isinstance(v, Tensor) and v.numel() == 1))}
    return model, optimizer, meta


# -- Hugging Face directories -----------------------------------------------------------------------------

def _hf_files(path: Path) -> tuple[Path, ...]:
    if (path / HF_WEIGHTS).is_file():
        weights = [path / HF_WEIGHTS]
    else:
        index = _read_json(path / HF_INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CurvscopeError(f"{path / HF_INDEX}: no 'weight_map' of tensor names to shard files")
        shards = sorted({str(f) for f in weight_map.values()})
        bad = [s for s in shards if Path(s).name != s or not (path / s).is_file()]
        if bad:
            raise CurvscopeError(f"{path / HF_INDEX}: shard {bad[0]} is not a file in {path}")
        weights = [path / HF_INDEX] + [path / s for s in shards]
    extra = [path / f for f in (HF_OPTIMIZER, HF_STATE) if (path / f).is_file()]
    return tuple(weights + extra)


def _read_json(path: Path) -> Any:
    from curvscope.jsontext import loads

    try:
        return loads(check_file(path, "JSON").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and absurd JSON are ValueErrors
        raise CurvscopeError(f"{path}: cannot be read as JSON ({exc})") from None


def _hf_step(path: Path) -> int | None:
    if (path / HF_STATE).is_file():
        state = _read_json(path / HF_STATE)
        if isinstance(state, dict):
            step = _step_value(state, path / HF_STATE)
            if step is not None:
                return step
    if (path / HF_WEIGHTS).is_file():
        return _step_value(_safetensors_metadata(path / HF_WEIGHTS), path / HF_WEIGHTS)
    return None


def _load_hf(checkpoint: RunCheckpoint) -> TrainingState:
    path = checkpoint.path
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {}
    for f in checkpoint.files:
        if f.suffix == ".safetensors":
            part, part_meta = read_safetensors(check_file(f, "checkpoint"))
            tensors.update(part)
            meta.update(part_meta)
    optimizer = _hf_optimizer(path) if (path / HF_OPTIMIZER).is_file() else None
    if (path / HF_STATE).is_file():
        meta["trainer_state"] = _read_json(path / HF_STATE)
    return TrainingState(tensors, optimizer, checkpoint.step, meta)


def _hf_optimizer(path: Path, mmap: bool = False) -> dict[str, Any]:
    optimizer = _torch_load(path / HF_OPTIMIZER, mmap=mmap)
    if not isinstance(optimizer, dict):
        raise CurvscopeError(f"{path / HF_OPTIMIZER}: expected the dict of optimizer.state_dict(), got "
                             f"{type(optimizer).__name__}")
    return optimizer
