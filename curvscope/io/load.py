"""A :class:`~curvscope.problem.Problem` from files, exactly as the CLI builds it: the checkpoint (or a model
spec's own initialization), the dataset and which rows form the batch, the loss and the label shift its files
imply, in the requested device and dtype."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from curvscope.errors import CurvscopeError, Metavar, OptionError
from curvscope.losses import default_loss_name, get_loss
from curvscope.problem import AUTO_FLOAT64_MAX_PARAMS, Problem, make_problem, resolve_device, resolve_dtype

if TYPE_CHECKING:
    from curvscope.io.sources import Source

SPEC = Metavar("SPEC")
"""A model spec in messages: ``model=SPEC`` (``--model SPEC`` on the command line)."""


def load_problem(checkpoint: str | os.PathLike | None = None, data: Any = None,
                 model: str | None = None, model_kwargs: dict[str, Any] | str | None = None,
                 batch_size: int | None = 128, shuffle: bool = False, seed: int = 0, loss: str | None = None,
                 device: str | None = "auto", dtype: str | None = "auto", trust_model_code: bool = False,
                 output: str | None = None, shift_labels: bool | None = None,
                 data_kwargs: dict[str, Any] | str | None = None, split: str | None = None,
                 columns: str | dict[str, str] | None = None, pad_token: int | None = None,
                 label_smoothing: float = 0.0, class_weights: str | list[float] | None = None,
                 huber_delta: float | None = None, smooth_l1_beta: float | None = None) -> Problem:
    """Build a :class:`Problem` from files, exactly as the CLI does.

    Args:
        checkpoint: ``.safetensors`` / ``.pt`` / ``.pth`` state dict, or a Hugging Face directory
            (``config.json`` + ``model.safetensors`` or a sharded index; needs ``curvscope[hf]``).
            Self-describing safetensors checkpoints carry ``curvscope.model``, ``curvscope.model_kwargs``,
            ``curvscope.loss`` (and ``curvscope.shift_labels``) metadata. A
            :class:`~curvscope.io.checkpoints.Checkpoint` already read is taken as it is.
        data: a dataset file (``.safetensors``, ``.npz``, ``.pt``) with tensors ``x`` and ``y``, or keyword
            inputs: without ``x`` every tensor but the targets (``y``, ``labels`` or ``label``) is passed to the
            model as a keyword argument under its name (``input_ids``, ``attention_mask``, ...); a ``.parquet`` or
            ``.arrow`` file or a Hugging Face ``save_to_disk`` directory (columns as keyword inputs; needs
            ``curvscope[parquet]``); a data factory ``path/to/file.py:factory`` or ``package.module:factory``
            (called with ``data_kwargs``) returning a map-style ``Dataset``, a ``DataLoader``, an iterable of
            batches or a dict of tensors; or such an object itself (docs/loading.md). Files of
            ``curvscope.io.files.LAZY_BYTES`` or more are read row by row (only the rows used).
        model: a model spec (``path/to/file.py:factory``, ``package.module:factory`` or ``mlp``/``cnn``/
            ``transformer``/``char_lm``); overrides the checkpoint's. Without a checkpoint the factory's own
            initialization is used, seeded by ``seed``.
        model_kwargs: factory keyword arguments (dict or JSON string); default: the checkpoint's.
        batch_size: the first ``batch_size`` samples in file order (all when ``None``; capped at the dataset
            size), or a seeded random subset with ``shuffle=True``.
        shuffle: draw the batch as a random permutation of the dataset seeded by ``seed`` instead of in file
            order.
        seed: seeds the batch permutation (with ``shuffle``) and a factory's initialization (without a
            checkpoint); between 0 and ``2**63 - 1``.
        loss: ``ce``/``mse``/``bce``/``nll``/``huber``/``smooth-l1`` or a user loss ``file.py:fn`` (imported:
            you named it); default: the checkpoint's (a user loss there needs ``trust_model_code``), else the
            Hugging Face architecture's (``...ForCausalLM``: ``ce`` on next tokens;
            ``...ForSequenceClassification``/``...ForTokenClassification``: ``ce``), else by target dtype.
        device: ``"auto"`` (default: ``cuda`` when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        dtype: the model is built in this dtype before the weights are copied in (a float64 checkpoint
            stays exact in float64; bfloat16/float16 weights are widened exactly); ``"auto"``: float64 on the
            CPU, float32 on a GPU.
        trust_model_code: allow the checkpoint's metadata to name a model factory outside curvscope's
            built-ins (importing it runs its code). Without it such a checkpoint is refused; ``model``
            given here is always trusted (you named it).
        output: the attribute or key of a structured model output to analyse; default: the output itself
            when it is a tensor, else its ``logits``, else the first element of a tuple.
        shift_labels: targets ``(N, T)`` are the input tokens and position ``t`` predicts token ``t + 1``
            (Hugging Face's causal-LM convention); ``None``: the checkpoint's ``curvscope.shift_labels``
            metadata, else ``True`` for a causal LM architecture, else ``False``.
        data_kwargs: a data factory's keyword arguments (dict or JSON string).
        split: the split of a Hugging Face ``DatasetDict`` (needed when it has more than one).
        columns: renames columns before the inputs and targets are chosen: ``"x=image,y=label"`` (or a dict).
        pad_token: pad ragged list columns of tables to the longest row: inputs with it, masks with 0, targets
            with -100.
        label_smoothing: ``ce``'s label smoothing (PyTorch's ``label_smoothing``).
        class_weights: ``ce``/``nll`` class weights: a list, a string ``"1,2,0.5"``, or a file holding them
            (``.json`` list, or numbers separated by commas or whitespace).
        huber_delta: ``huber``'s delta (default 1).
        smooth_l1_beta: ``smooth-l1``'s beta (default 1).
    """
    from curvscope.io.data import select_batch
    from curvscope.io.held import hold_rows
    from curvscope.io.inputs import check_keywords

    if data is None:
        raise OptionError("data", lambda name: f"no data: pass {name('data', Metavar('FILE'))} (tensors 'x' and 'y', "
                          "or keyword inputs and 'y' or 'labels')")
    if not 0 <= seed < 2**63:
        raise CurvscopeError(f"seed must be between 0 and 2**63 - 1, got a {len(str(abs(seed)))}-digit number"
                             if abs(seed) >= 2**63 else f"seed must be at least 0, got {seed}")
    if batch_size is not None and batch_size < 1:
        raise OptionError("batch_size", f"must be at least 1, got {batch_size}")
    auto = dtype is None or dtype == "auto"
    dtype = resolve_dtype(dtype, resolve_device(device))  # auto: float64 on the CPU, float32 on a GPU
    net, info, defaults = _load_model(checkpoint, model, model_kwargs, seed, dtype, trust_model_code)
    if auto and dtype == torch.float64:  # auto on the CPU: float32 for a model too large for float64
        count = sum(p.numel() for p in net.parameters() if p.requires_grad)
        if resolve_dtype("auto", "cpu", count) == torch.float32:
            net, dtype = net.to(torch.float32), torch.float32
            info["dtype_note"] = (f"dtype auto: float32 for this model of {count:,} parameters (float64, the CPU's "
                                  f"default up to {AUTO_FLOAT64_MAX_PARAMS:,}, would double the memory and time)")
    net.eval()
    source = open_data(data, data_kwargs=data_kwargs, split=split, columns=columns, pad_token=pad_token,
                       shuffle=shuffle, seed=seed)
    dataset = source.pair()
    check_keywords(net, dataset[0], source.name, source.target_name)
    total = len(source) if source.sized else source.available(batch_size or 2**62)
    idx = select_batch(total, batch_size, shuffle=shuffle, seed=seed)
    held = hold_rows(source, idx)  # a large batch stays where it came from, moved to the device a chunk at a time
    x, y = source.read(idx) if held is None else (None, None)
    loss_name = loss or defaults["loss"]
    if loss_name is None:
        loss_name = default_loss_name(y if held is None else held.read(0, 1)[1])
    if loss is None and defaults["loss"] is not None:  # a user loss named by the checkpoint: code from a file
        from curvscope.user_loss import check_trusted_loss

        where = getattr(checkpoint, "path", checkpoint)  # a Checkpoint already read: its path, not its tensors
        check_trusted_loss(defaults["loss"], f"{where}: the checkpoint's metadata", trust_model_code)
    loss_object = get_loss(loss_name, label_smoothing=label_smoothing, class_weights=parse_class_weights(class_weights),
                           huber_delta=huber_delta, smooth_l1_beta=smooth_l1_beta)
    shift = shift_labels if shift_labels is not None else bool(defaults["shift_labels"])
    info.update({
        "data": source.name,
        "dataset_size": len(source) if source.sized else None,
        "shuffle": shuffle,
        "seed": seed,
        "batch_indices": idx.tolist(),
        "loss_default": defaults["loss_reason"] if loss is None else f"{loss} (given)",
        "shift_labels": shift,
        "output_name": output,
    })
    if source.target_name != "y":
        info["targets"] = source.target_name
    if source.notes:
        info["data_notes"] = list(source.notes)
    problem = make_problem(net, x, y, loss=loss_object, device=device, dtype=dtype, info=info, dataset=dataset,
                           source=source.name, shift_labels=shift, output=output, held=held)
    if shift_labels is None and not shift:
        note = unshifted_causal_lm(problem)
        if note:
            problem.info["shift_labels_note"] = note
    return problem


def unshifted_causal_lm(problem: Problem) -> str | None:
    """A warning when the problem looks like a causal LM whose labels were not shifted: per-token ``ce`` whose
    labels are the model's own input tokens, and scoring position t against token t+1 fits the model clearly
    better than against token t (lower loss, higher accuracy) while the unshifted accuracy is near chance.
    One forward pass of the batch; ``None`` otherwise."""
    import torch

    from curvscope.io.inputs import KeywordInputs
    from curvscope.losses import IGNORE_INDEX

    loss = problem.loss
    if problem.held and problem.is_sequence:  # judged on the first samples, not moving the whole batch
        problem = problem.part(0, min(problem.batch_size, 256))
    if not (problem.is_sequence and loss.name == "ce" and loss.user is None) or problem.targets.dim() != 2:
        return None
    inputs = problem.inputs.values() if isinstance(problem.inputs, KeywordInputs) else [problem.inputs]
    if not any(t.shape == problem.targets.shape and not t.is_floating_point() and bool((t == problem.targets).all())
               for t in inputs):
        return None  # labels that are not the inputs: a token classifier, not a causal LM
    with torch.no_grad():
        logits = problem.forward().reshape(problem.batch_size, problem.positions, problem.classes)[:, :-1]
    scores = {}
    for name, labels in (("unshifted", problem.targets[:, :-1]), ("shifted", problem.targets[:, 1:])):
        valid = labels != IGNORE_INDEX
        if not bool(valid.any()):
            return None
        flat = logits[valid].to(torch.float64)
        target = labels[valid]
        scores[name] = (float(torch.nn.functional.cross_entropy(flat, target)),
                        float((flat.argmax(-1) == target).to(torch.float64).mean()))
    (loss_u, acc_u), (loss_s, acc_s) = scores["unshifted"], scores["shifted"]
    chance = 1.0 / problem.classes
    if loss_s < 0.9 * loss_u and acc_s > acc_u and acc_u <= 2 * chance:
        return (f"the labels are the input tokens and the model scores them as a causal LM: next-token labels fit "
                f"(loss {loss_s:.3g}, accuracy {acc_s:.1%}) where unshifted ones score at chance (loss {loss_u:.3g}, "
                f"accuracy {acc_u:.1%}); pass shift_labels=True unless position t really predicts token t")


def parse_class_weights(value: str | os.PathLike | list[float] | None) -> list[float] | None:
    """Class weights from a list, a string ``"1,2,0.5"`` (or ``"[1, 2, 0.5]"``) or a file holding such text.

    Raises:
        OptionError: of ``class_weights``, for text that is not a list of numbers or a file that cannot be read.
    """
    import json
    import re

    if value is None or isinstance(value, list | tuple):
        return None if value is None else list(value)
    text = str(value)
    if not re.fullmatch(r"[\s\[\]0-9eE.,+-]+", text):  # not a list of numbers: a file of them
        try:
            text = Path(text).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise OptionError("class_weights", lambda name: f"{name('class_weights')}: '{value}' is neither a list "
                              f"of numbers nor a readable file ({reason})") from None
    try:
        values = json.loads(text) if text.strip().startswith("[") else [
            float(v) for v in text.replace(",", " ").split()]
    except (ValueError, RecursionError):
        values = None
    if not isinstance(values, list) or not values:
        raise OptionError("class_weights", lambda name: f"{name('class_weights')}: expected numbers such as "
                          "'1,2,0.5', a JSON list, or a file of them")
    return values


def open_data(data: Any, data_kwargs: dict[str, Any] | str | None = None, split: str | None = None,
              columns: str | dict[str, str] | None = None, pad_token: int | None = None, shuffle: bool = False,
              seed: int = 0) -> Source:
    """The :class:`~curvscope.io.sources.Source` of ``data`` (a file, a directory, a data factory spec, or a
    ``Dataset``/``DataLoader``/iterable/dict object); the arguments are :func:`load_problem`'s.

    A data factory named here runs: the caller named it. A spec that comes from a file (a config) must pass
    :func:`curvscope.io.spec.check_trusted` first.
    """
    from curvscope.io.data import parse_columns
    from curvscope.io.factory import call_data_factory, from_object, is_data_spec
    from curvscope.io.files import open_data_file
    from curvscope.io.spec import parse_model_kwargs

    mapping = parse_columns(columns)
    if isinstance(data, (str, os.PathLike)):
        text = str(data)
        if is_data_spec(text):
            kwargs = _data_kwargs(data_kwargs, parse_model_kwargs)
            name = text + (f" {json.dumps(kwargs, sort_keys=True)}" if kwargs else "")
            obj = call_data_factory(text, kwargs, seed=seed)
            return from_object(obj, name, columns=mapping, shuffle=shuffle, split=split, pad_token=pad_token)
        if data_kwargs:
            raise OptionError("data_kwargs", lambda name: f"{name('data_kwargs')} is for a data factory "
                              f"({name('data', Metavar('file.py:factory'))}); {text} is a file")
        return open_data_file(Path(text), mapping, split=split, pad_token=pad_token,
                              name=_qualified(str(Path(text)), split, mapping, pad_token))
    if data_kwargs:
        raise OptionError("data_kwargs", "is for a data factory named by a spec; the data is an object already")
    name = f"<{type(data).__name__}>"
    return from_object(data, name, columns=mapping, shuffle=shuffle, split=split, pad_token=pad_token)


def _data_kwargs(value: dict[str, Any] | str | None, parse: Any) -> dict[str, Any]:
    if value is None or isinstance(value, str):
        try:
            return parse(value)
        except OptionError as exc:  # the same JSON rules as model_kwargs, named as data_kwargs
            error = exc
        raise OptionError("data_kwargs", lambda name: error.render(
            lambda p, *v: name("data_kwargs" if p == "model_kwargs" else p, *v))) from None
    if not isinstance(value, dict):
        raise OptionError("data_kwargs", f"must be a dict or a JSON object, got {type(value).__name__}")
    return dict(value)


def _qualified(name: str, split: str | None, columns: dict[str, str], pad_token: int | None) -> str:
    """The data's name in reports: the path, and how it was read when that changes the samples."""
    extra = [f"split={split}"] if split else []
    extra += [f"columns={','.join(f'{k}={v}' for k, v in columns.items())}"] if columns else []
    extra += [f"pad_token={pad_token}"] if pad_token is not None else []
    return name + (f" ({', '.join(extra)})" if extra else "")


def _load_model(checkpoint: str | os.PathLike | None, model: str | None,
                model_kwargs: dict[str, Any] | str | None, seed: int, dtype: str | None, trust_model_code: bool
                ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The model with its weights in ``dtype``, the provenance for ``info``, and the defaults its files give:
    ``{"loss": str | None, "shift_labels": bool | None, "loss_reason": str}``."""
    from curvscope.io.checkpoints import Checkpoint, apply_state_dict, load_checkpoint
    from curvscope.io.hf import is_hf_directory, load_hf_model
    from curvscope.io.spec import build_model, canonical_spec, check_trusted, parse_model_kwargs, relative_to

    loaded = isinstance(checkpoint, Checkpoint)  # a checkpoint already read (curvscope track's first one)
    if checkpoint is not None and not loaded and is_hf_directory(checkpoint):
        if model is not None or model_kwargs:
            raise OptionError("model", lambda name: f"{checkpoint}: a Hugging Face directory names its model in "
                              f"config.json; {name('model')} and {name('model_kwargs')} cannot be used with it")
        hf = load_hf_model(checkpoint, resolve_dtype(dtype))
        info = {"checkpoint": str(checkpoint), "model": f"transformers:{hf.architecture}", "model_kwargs": {},
                **hf.info}
        return hf.model, info, {"loss": hf.loss, "shift_labels": hf.shift_labels, "loss_reason": hf.loss_reason}
    ckpt = checkpoint if loaded else load_checkpoint(checkpoint) if checkpoint is not None else None
    spec = model or (relative_to(ckpt.model_spec, ckpt.path.parent) if ckpt and ckpt.model_spec else None)
    if spec is None:
        if ckpt is None:
            raise OptionError("model", lambda name: f"no model: pass a {name('checkpoint')}, or "
                              f"{name('model', SPEC)} to use a factory's initialization")
        raise OptionError("model", lambda name: f"{ckpt.path}: the checkpoint does not say which model it holds "
                          f"(no 'curvscope.model' metadata); pass {name('model', SPEC)}")
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
    given = ckpt.path if loaded else checkpoint
    info = {"checkpoint": str(given) if checkpoint is not None else None, "model": spec, "model_kwargs": kwargs}
    loss = ckpt.loss if ckpt else None
    reason = f"{loss} from the checkpoint's metadata" if loss else "by the targets' dtype (ce for integer labels)"
    shift = ckpt.shift_labels if ckpt else None
    if shift is not None:
        reason += f"; shift_labels {str(shift).lower()} from the checkpoint's metadata"
    return net, info, {"loss": loss, "shift_labels": shift, "loss_reason": reason}
