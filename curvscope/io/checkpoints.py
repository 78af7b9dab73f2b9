"""Checkpoints: state dicts in .safetensors (with optional self-describing metadata) or .pt/.pth."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvscope.errors import CurvscopeError
from curvscope.io.atomic import write_atomic
from curvscope.io.tensors import read_tensors, safetensors_writer
from curvscope.jsontext import loads
from curvscope.losses import LOSS_NAMES

META_MODEL = "curvscope.model"
META_KWARGS = "curvscope.model_kwargs"
META_LOSS = "curvscope.loss"
META_SHIFT_LABELS = "curvscope.shift_labels"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")
REAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The weight dtypes a floating-point parameter or buffer is loaded from (copied exactly into the model's dtype);
fp8, complex, quantized and integer tensors are refused instead of silently converted."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: its state dict and what its metadata says about the model and loss."""

    path: Path
    state_dict: dict[str, Tensor]
    model_spec: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    loss: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    shift_labels: bool | None = None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint file (``.safetensors``, ``.pt`` or ``.pth``)."""
    path = Path(path)
    state, meta = read_tensors(path, "checkpoint", CHECKPOINT_SUFFIXES)
    return checkpoint_from_state(path, state, meta)


def checkpoint_from_state(path: str | os.PathLike, state: dict[str, Tensor], metadata: dict[str, Any]
                          ) -> Checkpoint:
    """A :class:`Checkpoint` of tensors already read (a training run's checkpoint, ``curvscope.io.runs``): what
    its ``curvscope.*`` metadata says about the model and loss (other metadata values are kept as strings)."""
    path = Path(path)
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) if isinstance(v, (int, float, bool)) else str(v)
            for k, v in metadata.items()}
    kwargs: dict[str, Any] = {}
    if META_KWARGS in meta:
        try:
            kwargs = loads(meta[META_KWARGS])
        except ValueError as exc:
            raise CurvscopeError(f"{path}: metadata '{META_KWARGS}' is not valid JSON ({exc})") from None
        if not isinstance(kwargs, dict):
            raise CurvscopeError(f"{path}: metadata '{META_KWARGS}' must be a JSON object")
    loss = meta.get(META_LOSS) or None
    if loss is not None and loss not in LOSS_NAMES and ":" not in loss:  # a user loss spec: trusted at load
        raise CurvscopeError(f"{path}: metadata '{META_LOSS}' is '{loss}', not one of "
                             f"{', '.join(LOSS_NAMES)} or a user loss 'file.py:fn'")
    shift = meta.get(META_SHIFT_LABELS)
    if shift is not None:
        from curvscope.io.hf import parse_bool

        shift = parse_bool(shift, f"{path}: metadata '{META_SHIFT_LABELS}'")
    return Checkpoint(path=path, state_dict=state, model_spec=meta.get(META_MODEL) or None,
                      model_kwargs=kwargs, loss=loss, metadata=meta, shift_labels=shift)


def apply_state_dict(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``model`` strictly, with a one-line error that lists the first mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches {_first(wrong)}")
    if problems:
        raise CurvscopeError(f"{source}: checkpoint does not match the model: {'; '.join(problems)}")
    for k, v in state.items():
        if expected[k].is_floating_point() and v.dtype not in REAL_DTYPES:
            kind = ("complex" if v.is_complex() else "quantized" if v.is_quantized else
                    "8-bit float" if v.is_floating_point() else "integer or boolean")
            raise CurvscopeError(f"{source}: weights '{k}' are {str(v.dtype).replace('torch.', '')} ({kind}), not "
                                 "a real float type (float16, bfloat16, float32, float64): curvscope does not "
                                 "dequantize or convert them; save float weights")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CurvscopeError(f"{source}: weights '{k}' contain NaN or Inf")
    model.load_state_dict(state, strict=True)


def _first(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def save_checkpoint(path: str | os.PathLike, model: nn.Module, model_spec: str | None = None,
                    model_kwargs: dict[str, Any] | None = None, loss: str | None = None,
                    extra_metadata: dict[str, str] | None = None, shift_labels: bool | None = None) -> None:
    """Write ``model``'s state dict as a self-describing safetensors checkpoint (atomically).

    ``shift_labels``: recorded as ``curvscope.shift_labels`` (targets are the inputs, predicted one step on).
    """
    meta = dict(extra_metadata or {})
    if model_spec:
        meta[META_MODEL] = model_spec
    meta[META_KWARGS] = json.dumps(model_kwargs or {})
    if loss:
        meta[META_LOSS] = loss
    if shift_labels is not None:
        meta[META_SHIFT_LABELS] = "true" if shift_labels else "false"
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_atomic(Path(path), safetensors_writer(state, meta))
