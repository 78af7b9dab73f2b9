"""The Problem: a functional model, its parameters, one batch and a loss. Every computation takes one.

Build it from files with :func:`load_problem` (what the CLI does) or from objects you already have with
:func:`make_problem`::

    import curvscope
    problem = curvscope.make_problem(model, x, y, loss="ce", dtype=torch.float64)
    problem.loss_value()          # the batch loss, as torch.nn.CrossEntropyLoss() computes it
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from curvscope.errors import CurvscopeError
from curvscope.losses import Loss, default_loss_name, get_loss

GROUP_MODES = ("all", "layer", "tensor")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class ParamGroup:
    """A named set of parameters (a block of the block-diagonal GGN, or one learning-rate group)."""

    name: str
    param_names: tuple[str, ...]


@dataclass
class Problem:
    """A model as a function of named parameters, one batch, and a loss.

    Attributes:
        model: the ``nn.Module`` (left untouched: parameters live in ``params``).
        params: trainable parameters by name, in ``named_parameters()`` order, detached, on ``device``.
        buffers: everything else ``functional_call`` needs (buffers and frozen parameters).
        inputs: the batch inputs ``(N, ...)``; targets: ``(N,)`` class labels or ``(N, C)`` floats.
        loss: the :class:`~curvscope.losses.Loss`.
        info: provenance for reports (checkpoint, model spec, data file, batch indices, seed).
        dataset: the whole dataset ``(x, y)`` the batch came from, when known (for extra batches).
    """

    model: nn.Module
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    inputs: Tensor
    targets: Tensor
    loss: Loss
    device: torch.device
    dtype: torch.dtype
    num_outputs: int
    info: dict[str, Any] = field(default_factory=dict)
    dataset: tuple[Tensor, Tensor] | None = None

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.inputs.shape[0]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    # -- evaluation --------------------------------------------------------------------------------
    def forward(self, params: dict[str, Tensor] | None = None, inputs: Tensor | None = None) -> Tensor:
        """Model outputs ``(N, C)`` at ``params`` (default: the problem's) on ``inputs`` (default: batch)."""
        params = self.params if params is None else params
        inputs = self.inputs if inputs is None else inputs
        return functional_call(self.model, {**self.buffers, **params}, (inputs,))

    def loss_value(self, params: dict[str, Tensor] | None = None) -> Tensor:
        """The batch loss ``L`` (mean over the batch), a scalar tensor."""
        return self.loss(self.forward(params), self.targets)

    def per_sample_loss(self, params: dict[str, Tensor] | None = None) -> Tensor:
        """Per-sample losses ``(N,)``."""
        return self.loss.per_sample(self.forward(params), self.targets)

    def gradient(self, params: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The batch gradient ``g = dL/dtheta`` by name."""
        params = self.params if params is None else params
        return torch.func.grad(self.loss_value)(params)

    # -- structure ---------------------------------------------------------------------------------
    def groups(self, mode: str = "all") -> list[ParamGroup]:
        """Parameter groups: ``all`` (one group), ``layer`` (one per module that owns parameters, in order),
        ``tensor`` (one per parameter tensor)."""
        names = list(self.params)
        if mode == "all":
            return [ParamGroup("all", tuple(names))]
        if mode == "tensor":
            return [ParamGroup(n, (n,)) for n in names]
        if mode == "layer":
            owners: dict[str, list[str]] = {}
            for n in names:
                module, _, _ = n.rpartition(".")
                owners.setdefault(module or n, []).append(n)
            return [ParamGroup(k, tuple(v)) for k, v in owners.items()]
        raise CurvscopeError(f"unknown parameter grouping '{mode}': choose one of {', '.join(GROUP_MODES)}")

    def with_batch(self, inputs: Tensor, targets: Tensor, **info: Any) -> Problem:
        """The same model and loss on another batch (inputs and targets already prepared)."""
        return replace(self, inputs=inputs, targets=targets, info={**self.info, **info})

    def batch_from_dataset(self, indices: Tensor) -> Problem:
        """The same model and loss on the dataset samples ``indices``."""
        if self.dataset is None:
            raise CurvscopeError("this problem was built without a dataset; pass the batch explicitly")
        x, y = self.dataset
        inputs, targets = _prepare_batch(x[indices], y[indices], self.loss, self.num_outputs, self.device,
                                         self.dtype, "data")
        return self.with_batch(inputs, targets, batch_indices=indices.tolist())


# -- building problems -------------------------------------------------------------------------------

def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/``None`` -> ``cuda`` when available else ``cpu``; checks that a requested GPU exists."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise CurvscopeError(f"--device: '{device}' is not a device (use auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CurvscopeError(f"--device {device}: no CUDA GPU is available on this machine "
                                 "(use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CurvscopeError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible")
    elif dev.type != "cpu":
        raise CurvscopeError(f"--device {device}: unsupported device type (use auto, cpu, cuda or cuda:N)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise CurvscopeError(f"dtype {dtype} is not supported (use float32 or float64)")
        return dtype
    if dtype not in DTYPES:
        raise CurvscopeError(f"--dtype '{dtype}' is not supported (use float32 or float64)")
    return DTYPES[dtype]


def check_module_modes(model: nn.Module) -> None:
    """Refuse modules whose train-mode behaviour couples or randomizes samples."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise CurvscopeError(
                f"module '{name}' is BatchNorm in train mode, which couples the samples of a batch; "
                "call model.eval() first (curvscope analyses the model as deployed)")
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise CurvscopeError(f"module '{name}' is Dropout in train mode, which makes outputs random; "
                                 "call model.eval() first")


def _prepare_batch(x: Tensor, y: Tensor, loss: Loss, num_outputs: int, device: torch.device,
                   dtype: torch.dtype, source: str) -> tuple[Tensor, Tensor]:
    inputs = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    targets = loss.prepare_targets(y, num_outputs, dtype, source).to(device)
    return inputs, targets


def make_problem(model: nn.Module, inputs: Tensor, targets: Tensor, loss: str | Loss | None = None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 info: dict[str, Any] | None = None, dataset: tuple[Tensor, Tensor] | None = None,
                 source: str = "data") -> Problem:
    """Build a :class:`Problem` from a model and a batch.

    Args:
        model: any ``nn.Module`` mapping ``inputs`` to outputs ``(N, C)``, in eval mode if it has BatchNorm or
            Dropout. It is not modified: its parameters are copied to ``device``/``dtype``.
        inputs: ``(N, ...)``; floating inputs are cast to ``dtype``, integer inputs (token ids) kept.
        targets: class labels ``(N,)`` for ``ce``; ``(N, C)`` floats for ``mse``/``bce``.
        loss: ``"ce"``, ``"mse"``, ``"bce"``; default ``ce`` for integer targets, ``mse`` for float ones.
        device: ``"auto"`` (default), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        dtype: ``float32`` (default) or ``float64``.
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    check_module_modes(model)
    loss = loss if isinstance(loss, Loss) else get_loss(loss or default_loss_name(targets))
    params = {n: p.detach().to(device=device, dtype=dtype)
              for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise CurvscopeError("the model has no trainable parameters")
    buffers = {n: b.detach().to(device=device, dtype=dtype if b.is_floating_point() else b.dtype)
               for n, b in model.named_buffers()}
    buffers.update({n: p.detach().to(device=device, dtype=dtype)
                    for n, p in model.named_parameters() if not p.requires_grad})
    if inputs.shape[0] != targets.shape[0]:
        raise CurvscopeError(f"{source}: {inputs.shape[0]} inputs but {targets.shape[0]} targets")
    if inputs.is_floating_point() and not torch.isfinite(inputs).all():
        raise CurvscopeError(f"{source}: inputs contain NaN or Inf")
    x0 = inputs[:1].to(device=device, dtype=dtype) if inputs.is_floating_point() else inputs[:1].to(device)
    with torch.no_grad():
        try:
            out = functional_call(model, {**buffers, **params}, (x0,))
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CurvscopeError(f"{source}: the model cannot run on inputs of shape "
                                 f"{tuple(inputs.shape[1:])} per sample: {msg}") from exc
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise CurvscopeError(f"the model must return outputs of shape (N, C), got {shape} for one sample")
    num_outputs = out.shape[1]
    inputs, targets = _prepare_batch(inputs, targets, loss, num_outputs, device, dtype, source)
    return Problem(model=model, params=params, buffers=buffers, inputs=inputs, targets=targets, loss=loss,
                   device=device, dtype=dtype, num_outputs=num_outputs, info=dict(info or {}),
                   dataset=dataset)


def load_problem(checkpoint: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
                 model: str | None = None, model_kwargs: dict[str, Any] | str | None = None,
                 batch_size: int | None = 128, shuffle: bool = False, seed: int = 0, loss: str | None = None,
                 device: str | None = "auto", dtype: str | None = "float32", trust_model_code: bool = False
                 ) -> Problem:
    """Build a :class:`Problem` from files, exactly as the CLI does.

    Args:
        checkpoint: ``.safetensors`` / ``.pt`` / ``.pth`` state dict. Self-describing safetensors checkpoints
            carry ``curvscope.model``, ``curvscope.model_kwargs`` and ``curvscope.loss`` metadata.
        data: dataset file with tensors ``x`` and ``y`` (``.safetensors``, ``.npz``, ``.pt``).
        model: a model spec (``path/to/file.py:factory``, ``package.module:factory`` or ``mlp``/``cnn``/
            ``transformer``); overrides the checkpoint's. Without a checkpoint the factory's own
            initialization is used, seeded by ``seed``.
        model_kwargs: factory keyword arguments (dict or JSON string); default: the checkpoint's.
        batch_size: the first ``batch_size`` samples in file order (all when ``None``; capped at the dataset
            size), or a seeded random subset with ``shuffle=True``.
        loss: ``ce``/``mse``/``bce``; default: the checkpoint's, else by target dtype.
        dtype: the model is built in this dtype before the weights are copied in (a float64 checkpoint
            stays exact in float64).
        trust_model_code: allow the checkpoint's metadata to name a model factory outside curvscope's
            built-ins (importing it runs its code). Without it such a checkpoint is refused; ``model``
            given here is always trusted (you named it).
    """
    from curvscope.io.checkpoints import apply_state_dict, load_checkpoint
    from curvscope.io.data import load_dataset, select_batch
    from curvscope.io.spec import build_model, canonical_spec, check_trusted, parse_model_kwargs

    if data is None:
        raise CurvscopeError("no data: pass --data FILE (tensors 'x' and 'y')")
    if not 0 <= seed < 2**63:
        raise CurvscopeError(f"seed must be between 0 and 2**63 - 1, got a {len(str(abs(seed)))}-digit number"
                             if abs(seed) >= 2**63 else f"seed must be at least 0, got {seed}")
    ckpt = load_checkpoint(checkpoint) if checkpoint is not None else None
    spec = model or (ckpt.model_spec if ckpt else None)
    if spec is None:
        if ckpt is None:
            raise CurvscopeError("no model: pass a CHECKPOINT, or --model SPEC to use a factory's "
                                 "initialization")
        raise CurvscopeError(f"{ckpt.path}: the checkpoint does not say which model it holds "
                             "(no 'curvscope.model' metadata); pass --model SPEC")
    if model is None:  # the spec came from the checkpoint: no code runs without the user's consent
        check_trusted(spec, f"{ckpt.path}: the checkpoint's metadata", trust_model_code)
    if isinstance(model_kwargs, str):
        kwargs = parse_model_kwargs(model_kwargs)
    elif model_kwargs is not None:
        kwargs = dict(model_kwargs)
    else:  # the checkpoint's kwargs belong to the checkpoint's model ('mlp' == 'curvscope.models:mlp')
        same_model = ckpt is not None and (model is None
                                           or canonical_spec(model) == canonical_spec(ckpt.model_spec))
        kwargs = dict(ckpt.model_kwargs) if same_model else {}
    try:
        net = build_model(spec, kwargs, seed=seed)
    except CurvscopeError as exc:
        if model is None:  # the spec came from the checkpoint's metadata: say which file named it
            raise CurvscopeError(f"{ckpt.path}: metadata names a model that cannot be built: {exc}") from exc
        raise
    if ckpt is not None:
        net = net.to(resolve_dtype(dtype))  # weights are copied into the requested dtype, never via float32
        apply_state_dict(net, ckpt.state_dict, str(ckpt.path))
    else:
        for n, p in net.named_parameters():
            if not torch.isfinite(p).all():
                raise CurvscopeError(f"model '{spec}': initial weights '{n}' contain NaN or Inf")
    net.eval()
    dataset = load_dataset(data)
    idx = select_batch(len(dataset), batch_size, shuffle=shuffle, seed=seed)
    loss_name = loss or (ckpt.loss if ckpt else None)
    if loss_name is None:
        loss_name = default_loss_name(dataset.y)
    info = {
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "model": spec,
        "model_kwargs": kwargs,
        "data": str(Path(data)),
        "dataset_size": len(dataset),
        "shuffle": shuffle,
        "seed": seed,
        "batch_indices": idx.tolist(),
    }
    return make_problem(net, dataset.x[idx], dataset.y[idx], loss=loss_name, device=device, dtype=dtype,
                        info=info, dataset=(dataset.x, dataset.y), source=str(data))
