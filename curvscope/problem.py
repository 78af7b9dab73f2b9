"""The Problem: a functional model, its parameters, one batch and a loss. Every computation takes one.

Build it from files with :func:`curvscope.io.load.load_problem` (what the CLI does) or from objects you already
have with :func:`make_problem`::

    import curvscope
    problem = curvscope.make_problem(model, x, y, loss="ce", dtype=torch.float64)
    problem.loss_value()          # the batch loss, as torch.nn.CrossEntropyLoss() computes it
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from curvscope.errors import CurvscopeError, OptionError
from curvscope.io.held import Batch, HeldBatch, hold_batch, hold_tensors
from curvscope.io.inputs import Inputs, call_model, cast_inputs, nonfinite_inputs, probe_model
from curvscope.io.precision import probe_precision
from curvscope.losses import Loss, check_loss_outputs, default_loss_name, get_loss
from curvscope.losses import shift_labels as _shift_labels
from curvscope.user_loss import check_per_sample

GROUP_MODES = ("all", "layer", "tensor")
"""How parameters form groups (blocks): ``all`` (one group), ``layer`` (one per module with parameters) or
``tensor`` (one per parameter tensor)."""
CURVATURES = ("ggn", "hessian")
"""The curvature matrices curvscope computes: ``ggn`` (the generalized Gauss-Newton, PSD; conventions §2) and
``hessian`` (the loss Hessian, possibly indefinite; §9)."""
DTYPES = {"float32": torch.float32, "float64": torch.float64}
AUTO_FLOAT64_MAX_PARAMS = 10_000_000
"""``dtype="auto"`` on the CPU: float64 for models of at most this many trainable parameters, float32 above (a
vector of a 124M-parameter model is 1 GB in float64: matrix-free methods hold several, and each product is about
twice as slow)."""


def one_line(exc: BaseException) -> str:
    """An exception as one short line: its message's first line, or its type."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


@dataclass(frozen=True)
class ParamGroup:
    """A named set of parameters (a block of the block-diagonal GGN, or one learning-rate group)."""

    name: str
    param_names: tuple[str, ...]


def group_named(groups, name: str):
    """The item of ``groups`` (anything with a ``name``) called ``name``.

    Raises:
        KeyError: no group has that name.
    """
    for group in groups:
        if group.name == name:
            return group
    raise KeyError(name)


@dataclass
class Problem:
    """A model as a function of named parameters, one batch, and a loss.

    Attributes:
        model: the ``nn.Module`` (left untouched: parameters live in ``params``).
        params: trainable parameters by name, in ``named_parameters()`` order, detached, on ``device``.
        buffers: everything else ``functional_call`` needs (buffers and frozen parameters).
        batch: the samples (:class:`~curvscope.io.held.Batch`): on the device, or held where they came from (a
            batch of ``curvscope.io.held.HOLD_BYTES`` or more) and moved there a chunk at a time (:meth:`part`).
            :attr:`inputs` ``(N, ...)`` and :attr:`targets` (``(N,)`` class labels or ``(N, C)`` floats) are the
            whole batch on the device.
        loss: the :class:`~curvscope.losses.Loss`.
        info: provenance for reports (checkpoint, model spec, data file, batch indices, seed).
        dataset: the whole dataset ``(x, y)`` the batch came from, when known (for extra batches).
        output_shape: the model's raw output shape for one sample: ``(C,)``, or ``(T, C)`` / ``(T1, T2, C)`` for
            sequence outputs, which :meth:`forward` flattens to ``num_outputs = T*C`` per sample
            (``docs/conventions.md`` §8; ``positions``, ``classes``).
        shift_labels: the targets were shifted for a causal LM (position t scored against token t+1).
        use_vmap: try the vmapped per-sample paths (``False``: plain autograd everywhere).
        vmap_error: why ``vmap`` failed on this model (set by the engine when it fell back), else ``None``;
            :attr:`path` says which path ran.
        compute_dtype: the lowest precision the model really computes in when it is below ``dtype`` (a Hugging
            Face Llama upcasts to float32 in RMSNorm and softmax, also at float64; :mod:`curvscope.io.precision`),
            else ``None``. :attr:`precision` is the dtype whose rounding the numbers carry.
        forward_ad_error: why forward-mode AD failed on this model (the second-order products then ran by double
            backward, :mod:`curvscope.curvature.products`), else ``None``; :attr:`path` says so.
    """

    model: nn.Module
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    batch: Batch
    loss: Loss
    device: torch.device
    dtype: torch.dtype
    num_outputs: int
    info: dict[str, Any] = field(default_factory=dict)
    dataset: tuple[Tensor, Tensor] | None = None
    output_shape: tuple[int, ...] = ()
    shift_labels: bool = False
    use_vmap: bool = True
    output: str | None = None
    vmap_error: str | None = None
    vmap_checked: bool = field(default=False, repr=False)
    forward_ad_error: str | None = None
    forward_ad_checked: bool = field(default=False, repr=False)
    compute_dtype: torch.dtype | None = None

    def __repr__(self) -> str:
        shape = "x".join(str(d) for d in (self.output_shape or (self.num_outputs,)))
        seq = (f", tokens={self.num_tokens}{', shift_labels' if self.shift_labels else ''}"
               if self.is_sequence else "")
        return (f"Problem(model={type(self.model).__name__}, N={self.batch_size}, outputs={shape}{seq}, "
                f"loss={self.loss.name}, D={self.num_params:,}, dtype={str(self.dtype).replace('torch.', '')}, "
                f"device={self.device}, path={self.path!r})")

    # -- sizes -------------------------------------------------------------------------------------
    @property
    def precision(self) -> torch.dtype:
        """The dtype whose rounding the model's numbers carry: :attr:`compute_dtype` when the model computes
        below :attr:`dtype`, else :attr:`dtype`. Rank floors and self-check tolerances use its eps."""
        return self.compute_dtype or self.dtype

    @property
    def eps(self) -> float:
        """``torch.finfo(self.precision).eps``."""
        return torch.finfo(self.precision).eps

    @property
    def batch_size(self) -> int:
        """N: the number of samples in the batch."""
        return len(self.batch)

    @property
    def inputs(self) -> Inputs:
        """The batch inputs ``(N, ...)`` on the device (a held batch is moved there whole on first use, and kept)."""
        return self._resident().inputs

    @property
    def targets(self) -> Tensor:
        """The batch targets on the device, prepared for the loss (labels shifted where the problem shifts them)."""
        return self._resident().targets

    @property
    def held(self) -> bool:
        """The samples are held off the device (where they came from): streamed paths move a chunk at a time
        (:meth:`part`) instead of the whole batch."""
        return not self.batch.resident

    def _resident(self) -> Batch:
        if not self.batch.resident:
            self.batch.inputs, self.batch.targets = self._prepare(*self.batch.held.read(0, len(self.batch.held)))
        return self.batch

    def _prepare(self, x: Inputs, y: Tensor) -> tuple[Inputs, Tensor]:
        """Samples as read (collated, on the host) as the problem's inputs and targets on its device."""
        name = self.batch.held.name if self.batch.held is not None else "data"
        inputs, targets = _prepare_batch(x, y, self.loss, self.num_outputs, self.device, self.dtype, name)
        return inputs, _shift_labels(targets) if self.shift_labels else targets

    def batch_part(self, b0: int, b1: int) -> tuple[Inputs, Tensor]:
        """The inputs and targets of the batch samples ``b0 <= n < b1`` on the device: slices of the batch, or of a
        held batch just those samples, read and moved now."""
        if self.batch.resident:
            return self.batch.inputs[b0:b1], self.batch.targets[b0:b1]
        return self._prepare(*self.batch.held.read(b0, b1))

    def part(self, b0: int, b1: int) -> Problem:
        """The batch samples ``b0 <= n < b1`` as a problem on the device, with this batch's loss: its per-sample
        losses are the ``l_n`` of this batch (a sequence loss keeps the batch's ``N/|T|``), so the parts of a
        partition of the batch, weighted by their sizes, add up to the batch's loss and curvature."""
        inputs, targets = self.batch_part(b0, b1)
        return replace(self, batch=Batch(inputs, targets))

    @property
    def num_params(self) -> int:
        """D: the number of trainable parameters (scalars) in ``params``."""
        return sum(p.numel() for p in self.params.values())

    @property
    def is_sequence(self) -> bool:
        """The model returns one output vector per position (``docs/conventions.md`` §8)."""
        return self.loss.positions > 0

    @property
    def positions(self) -> int:
        """T: positions per sample (1 for one output vector per sample)."""
        return self.loss.positions or 1

    @property
    def classes(self) -> int:
        """C: outputs per position (``num_outputs`` for one output vector per sample)."""
        return self.loss.classes if self.is_sequence else self.num_outputs

    @property
    def num_tokens(self) -> int:
        """|T|: the batch's tokens that carry loss (N for one output vector per sample)."""
        if not self.is_sequence:
            return self.batch_size
        if self.batch.tokens is not None:
            return self.batch.tokens
        return int(self.loss.valid_tokens(self.targets).sum())

    @property
    def path(self) -> str:
        """Which per-sample differentiation path the engine took: ``vmap``, ``autograd (vmap failed: ...)``, or
        ``autograd`` when nothing needed vmap (the ghost rules backpropagate with autograd's batched backward);
        followed by ``; double backward (forward AD failed: ...)`` when the second-order products could not use
        forward-mode AD."""
        if not self.use_vmap:
            path = "autograd (vmap disabled)"
        elif self.vmap_error is not None:
            path = f"autograd (vmap failed: {self.vmap_error})"
        else:
            path = "vmap" if self.vmap_checked else "autograd"
        if self.forward_ad_error is not None:
            path += f"; double backward (forward AD failed: {self.forward_ad_error})"
        return path

    def note_vmap_failure(self, exc: BaseException | str) -> None:
        """Record that a vmapped path failed on this model (the engine then uses plain autograd)."""
        if self.vmap_error is None:
            self.vmap_error = exc if isinstance(exc, str) else one_line(exc)

    # -- evaluation --------------------------------------------------------------------------------
    def forward(self, params: dict[str, Tensor] | None = None, inputs: Tensor | None = None) -> Tensor:
        """Model outputs ``(N, C)`` at ``params`` (default: the problem's) on ``inputs`` (default: batch)."""
        params = self.params if params is None else params
        inputs = self.inputs if inputs is None else inputs
        return self.call({**self.buffers, **params}, inputs)

    def call(self, state: dict[str, Tensor], inputs: Tensor) -> Tensor:
        """The model at ``state`` (parameters and buffers by name) on ``inputs`` ``(n, ...)``: outputs
        ``(n, num_outputs)``, sequence outputs ``(n, T, C)`` flattened per sample. Every engine path evaluates
        the model through this method."""
        out = call_model(self.model, state, inputs, self.output)
        return out.reshape(out.shape[0], -1) if self.is_sequence else out

    def loss_value(self, params: dict[str, Tensor] | None = None) -> Tensor:
        """The batch loss ``L`` (mean over the batch), a scalar tensor."""
        return self.loss(self.forward(params), self.targets)

    def per_sample_loss(self, params: dict[str, Tensor] | None = None, samples: tuple[int, int] | None = None
                        ) -> Tensor:
        """Per-sample losses ``(N,)``, or ``(b1 - b0,)`` of the batch samples ``samples = (b0, b1)`` (their
        ``l_n``: a slice's losses still sum to ``N L`` with the others')."""
        if samples is None:
            return self.loss.per_sample(self.forward(params), self.targets)
        inputs, targets = self.batch_part(*samples)
        return self.loss.per_sample(self.forward(params, inputs), targets)

    def gradient(self, params: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The batch gradient ``g = dL/dtheta`` by name."""
        params = self.params if params is None else params
        names = list(params)
        with torch.enable_grad():
            leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
            grads = torch.autograd.grad(self.loss_value(leaves), [leaves[n] for n in names], allow_unused=True)
        return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads, strict=True)}

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
        """The same model and loss on another batch (inputs and targets already prepared, labels shifted where
        the problem shifts them); sequence losses take that batch's valid-token count."""
        return replace(self, batch=Batch(inputs, targets), loss=self.loss.for_batch(targets),
                       info={**self.info, **info})

    def with_held(self, held: HeldBatch, **info: Any) -> Problem:
        """The same model and loss on another batch held off the device (checked a chunk at a time)."""
        batch, loss = hold_batch(held, self.loss, self.num_outputs, self.dtype, self.shift_labels)
        return replace(self, batch=batch, loss=loss, info={**self.info, **info})

    def batch_from_dataset(self, indices: Tensor) -> Problem:
        """The same model and loss on the dataset samples ``indices`` (held off the device as this batch would be,
        :func:`~curvscope.io.held.hold_rows`)."""
        if self.dataset is None:
            raise CurvscopeError("this problem was built without a dataset; pass the batch explicitly")
        from curvscope.io.held import hold_rows
        from curvscope.io.sources import source_of

        held = hold_rows(source_of(self.dataset), indices)
        if held is not None:
            return self.with_held(held, batch_indices=indices.tolist())
        x, y = self.dataset
        inputs, targets = _prepare_batch(x[indices], y[indices], self.loss, self.num_outputs, self.device,
                                         self.dtype, "data")
        if self.shift_labels:
            targets = _shift_labels(targets)
        return self.with_batch(inputs, targets, batch_indices=indices.tolist())


# -- building problems -------------------------------------------------------------------------------

def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/``None`` -> ``cuda`` when available else ``cpu``; checks that a requested GPU exists.

    Raises:
        OptionError: of ``device``, for a device that is not one or not on this machine.
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise OptionError("device", lambda name: f"{name('device')}: '{device}' is not a device (use auto, cpu, "
                          "cuda or cuda:N)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError("device", lambda name: f"{name('device', str(device))}: no CUDA GPU is available on "
                              f"this machine (use {name('device', 'cpu')})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError("device", lambda name: f"{name('device', str(device))}: only "
                              f"{torch.cuda.device_count()} GPU(s) are visible")
    elif dev.type != "cpu":
        raise OptionError("device", lambda name: f"{name('device', str(device))}: unsupported device type (use "
                          "auto, cpu, cuda or cuda:N)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None,
                  num_params: int | None = None) -> torch.dtype:
    """``None``/``"auto"`` -> float64 on the CPU (reference-quality numbers where they are affordable: rank and
    SNR shares are not set by float32's precision floor) for models of at most :data:`AUTO_FLOAT64_MAX_PARAMS`
    trainable parameters (``num_params``; ``None``: not known, counts as small), float32 above them and on a GPU
    (``device``: the resolved device; ``None`` counts as the CPU); ``"float32"``/``"float64"`` or the torch dtype
    itself; anything else is refused.

    Raises:
        OptionError: of ``dtype``, for a dtype other than auto, float32 or float64.
    """
    if dtype is None or dtype == "auto":
        gpu = device is not None and torch.device(device).type == "cuda"
        large = num_params is not None and num_params > AUTO_FLOAT64_MAX_PARAMS
        return torch.float32 if gpu or large else torch.float64
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise OptionError("dtype", f"{dtype} is not supported (use float32 or float64)")
        return dtype
    if dtype not in DTYPES:
        raise OptionError("dtype", f"'{dtype}' is not supported (use auto, float32 or float64)")
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
    inputs = cast_inputs(x, device, dtype)
    targets = loss.prepare_targets(y, num_outputs, dtype, source).to(device)
    return inputs, targets


def make_problem(model: nn.Module, inputs: Tensor | None, targets: Tensor | None, loss: str | Loss | None = None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 info: dict[str, Any] | None = None, dataset: tuple[Tensor, Tensor] | None = None,
                 source: str = "data", shift_labels: bool = False, use_vmap: bool = True,
                 output: str | None = None, held: HeldBatch | None = None) -> Problem:
    """Build a :class:`Problem` from a model and a batch.

    Args:
        model: any ``nn.Module`` mapping ``inputs`` to outputs ``(N, C)``, or to sequence outputs ``(N, T, C)``
            (more position dims are flattened into T; ``docs/conventions.md`` §8), in eval mode if it has
            BatchNorm or Dropout. It is not modified: its parameters are copied to ``device``/``dtype``.
        inputs: ``(N, ...)``; floating inputs are cast to ``dtype``, integer inputs (token ids) kept.
        targets: class labels ``(N,)`` for ``ce``; ``(N, C)`` floats for ``mse``/``bce``. Sequence outputs:
            token labels ``(N, T)`` for ``ce`` (``-100``: no loss at that position), ``(N, T, C)`` floats for
            ``mse``/``bce``.
        loss: ``"ce"``, ``"mse"``, ``"bce"``, ``"nll"``, ``"huber"``, ``"smooth-l1"``, a
            :class:`~curvscope.losses.Loss` with options (:func:`~curvscope.losses.get_loss`: label smoothing,
            class weights, delta), a user loss ``"file.py:fn"`` or the function itself; default ``ce`` for
            integer targets, ``mse`` for float ones.
        device: ``"auto"`` (default), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        dtype: ``float32`` or ``float64``; default (``None``/``"auto"``): float64 on the CPU for models of at most
            10M trainable parameters (:data:`AUTO_FLOAT64_MAX_PARAMS`), float32 above them and on a GPU.
        info: provenance recorded in :attr:`Problem.info` (with ``"output"``, the output that was chosen).
        dataset: the whole dataset ``(x, y)`` the batch came from, for :meth:`Problem.batch_from_dataset`.
        source: the name of the data in error messages (a file name).
        shift_labels: causal LM: position t is scored against token t+1 (Hugging Face's convention; ``ce`` on
            sequence outputs only).
        output: the attribute or key of a structured output (a Hugging Face ``ModelOutput``, a dict, a tuple
            index) to analyse; default: the output when it is a tensor, else ``logits``, else element 0. What
            was chosen is recorded in ``info["output"]``.
        use_vmap: ``False`` forces the plain-autograd paths (the engine also falls back by itself when ``vmap``
            cannot trace the model; :attr:`Problem.path` says which ran).
        held: the batch's samples held where they came from (:mod:`curvscope.io.held`), in place of ``inputs``
            and ``targets`` (``None``). A batch given as tensors of ``curvscope.io.held.HOLD_BYTES`` or more is
            held where the tensors are (referenced, not copied) and moved to the device a chunk at a time.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device, sum(p.numel() for p in model.parameters() if p.requires_grad))
    check_module_modes(model)
    if held is None:
        if inputs is None or targets is None:
            raise CurvscopeError(f"{source}: a batch needs inputs and targets")
        if inputs.shape[0] != targets.shape[0]:
            raise CurvscopeError(f"{source}: {inputs.shape[0]} inputs but {targets.shape[0]} targets")
        if nonfinite_inputs(inputs) is not None:
            raise CurvscopeError(f"{source}: inputs contain NaN or Inf")
        held = hold_tensors(inputs, targets, source)
        first = inputs[:2], targets[:2]
    else:
        first = held.read(0, min(2, len(held)))
    loss = loss if isinstance(loss, Loss) else get_loss(loss or default_loss_name(first[1]))
    params = {n: p.detach().to(device=device, dtype=dtype)
              for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise CurvscopeError("the model has no trainable parameters")
    buffers = {n: b.detach().to(device=device, dtype=dtype if b.is_floating_point() else b.dtype)
               for n, b in model.named_buffers()}
    buffers.update({n: p.detach().to(device=device, dtype=dtype)
                    for n, p in model.named_parameters() if not p.requires_grad})
    # probe with two samples: a forward that squeezes its batch dim breaks on one
    x0 = cast_inputs(first[0], device, dtype)
    with torch.no_grad():
        try:
            out, chosen = probe_model(model, {**buffers, **params}, x0, output)
        except CurvscopeError:
            raise
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CurvscopeError(f"{source}: the model cannot run on inputs of shape "
                                 f"{tuple(first[0].shape[1:])} per sample: {msg}") from exc
    if not isinstance(out, Tensor) or out.dim() < 2 or out.shape[0] != x0.shape[0]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise CurvscopeError(f"the model must return outputs of shape (N, C) or (N, T, C), got {shape} for "
                             f"{x0.shape[0]} sample{'s' if x0.shape[0] > 1 else ''}")
    output_shape = tuple(out.shape[1:])
    num_outputs = out[0].numel()
    if out.dim() > 2:
        loss = loss.sequence(positions=num_outputs // out.shape[-1], classes=out.shape[-1])
    check_loss_outputs(loss, out)
    if shift_labels and not (loss.positions and loss.is_categorical and loss.user is None):
        raise CurvscopeError("shift_labels needs sequence outputs (N, T, C) and loss 'ce' (a causal LM), got "
                             f"outputs {tuple(out.shape[1:])} per sample and loss '{loss.name}'")
    if held is None:
        inputs, targets = _prepare_batch(inputs, targets, loss, num_outputs, device, dtype, source)
        if shift_labels:
            targets = _shift_labels(targets)
        loss, batch = loss.for_batch(targets), Batch(inputs, targets)
    else:  # checked (and the loss normalized) a chunk at a time; only the probe's samples reach the device
        batch, loss = hold_batch(held, loss, num_outputs, dtype, shift_labels)
        targets = _prepare_batch(*first, loss, num_outputs, device, dtype, source)[1]
        targets = _shift_labels(targets) if shift_labels else targets
    if loss.user is not None:
        check_per_sample(loss, out.reshape(out.shape[0], -1), targets[:out.shape[0]])
    info = {**(info or {}), "output": chosen}
    # below float64, only a model that casts down on purpose (a Hugging Face model's config, autocast) computes in
    # less than the run's dtype: the probe (a dispatch mode, which imports PyTorch's symbolic-shape machinery and
    # costs a quarter of a second) runs for float64 runs and Hugging Face models
    probe = dtype == torch.float64 or hasattr(model, "config")
    reduced = probe_precision(model, lambda: call_model(model, {**buffers, **params}, x0, output), dtype) if probe \
        else None
    if reduced is not None:
        info["precision_note"] = reduced.note(dtype)
    return Problem(model=model, params=params, buffers=buffers, batch=batch, loss=loss,
                   device=device, dtype=dtype, num_outputs=num_outputs, info=info,
                   dataset=dataset, output_shape=output_shape, shift_labels=shift_labels, use_vmap=use_vmap,
                   output=output, compute_dtype=None if reduced is None else reduced.dtype)
