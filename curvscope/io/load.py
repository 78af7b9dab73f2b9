"""A :class:`~curvscope.problem.Problem` from files, exactly as the CLI builds it: the checkpoint (or a model
spec's own initialization), the dataset and which rows form the batch, the loss and the label shift its files
imply, in the requested device and dtype."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvscope.errors import CurvscopeError, Metavar, OptionError
from curvscope.losses import default_loss_name
from curvscope.problem import Problem, make_problem, resolve_dtype

SPEC = Metavar("SPEC")
"""A model spec in messages: ``model=SPEC`` (``--model SPEC`` on the command line)."""


def load_problem(checkpoint: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
                 model: str | None = None, model_kwargs: dict[str, Any] | str | None = None,
                 batch_size: int | None = 128, shuffle: bool = False, seed: int = 0, loss: str | None = None,
                 device: str | None = "auto", dtype: str | None = "float32", trust_model_code: bool = False,
                 output: str | None = None, shift_labels: bool | None = None) -> Problem:
    """Build a :class:`Problem` from files, exactly as the CLI does.

    Args:
        checkpoint: ``.safetensors`` / ``.pt`` / ``.pth`` state dict, or a Hugging Face directory
            (``config.json`` + ``model.safetensors`` or a sharded index; needs ``curvscope[hf]``).
            Self-describing safetensors checkpoints carry ``curvscope.model``, ``curvscope.model_kwargs``,
            ``curvscope.loss`` (and ``curvscope.shift_labels``) metadata.
        data: dataset file (``.safetensors``, ``.npz``, ``.pt``) with tensors ``x`` and ``y``, or keyword
            inputs: without ``x`` every tensor but the targets (``y`` or ``labels``) is passed to the model
            as a keyword argument under its name (``input_ids``, ``attention_mask``, ...).
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
        loss: ``ce``/``mse``/``bce``; default: the checkpoint's, else the Hugging Face architecture's
            (``...ForCausalLM``: ``ce`` on next tokens; ``...ForSequenceClassification``/
            ``...ForTokenClassification``: ``ce``), else by target dtype.
        device: ``"auto"`` (default: ``cuda`` when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        dtype: the model is built in this dtype before the weights are copied in (a float64 checkpoint
            stays exact in float64; bfloat16/float16 weights are widened exactly).
        trust_model_code: allow the checkpoint's metadata to name a model factory outside curvscope's
            built-ins (importing it runs its code). Without it such a checkpoint is refused; ``model``
            given here is always trusted (you named it).
        output: the attribute or key of a structured model output to analyse; default: the output itself
            when it is a tensor, else its ``logits``, else the first element of a tuple.
        shift_labels: targets ``(N, T)`` are the input tokens and position ``t`` predicts token ``t + 1``
            (Hugging Face's causal-LM convention); ``None``: the checkpoint's ``curvscope.shift_labels``
            metadata, else ``True`` for a causal LM architecture, else ``False``.
    """
    from curvscope.io.data import load_dataset, select_batch
    from curvscope.io.inputs import check_keywords

    if data is None:
        raise OptionError("data", lambda name: f"no data: pass {name('data', Metavar('FILE'))} (tensors 'x' and 'y', "
                          "or keyword inputs and 'y' or 'labels')")
    if not 0 <= seed < 2**63:
        raise CurvscopeError(f"seed must be between 0 and 2**63 - 1, got a {len(str(abs(seed)))}-digit number"
                             if abs(seed) >= 2**63 else f"seed must be at least 0, got {seed}")
    net, info, defaults = _load_model(checkpoint, model, model_kwargs, seed, dtype, trust_model_code)
    net.eval()
    dataset = load_dataset(data)
    check_keywords(net, dataset.x, str(data), dataset.target_name)
    idx = select_batch(len(dataset), batch_size, shuffle=shuffle, seed=seed)
    loss_name = loss or defaults["loss"]
    if loss_name is None:
        loss_name = default_loss_name(dataset.y)
    shift = shift_labels if shift_labels is not None else bool(defaults["shift_labels"])
    info.update({
        "data": str(Path(data)),
        "dataset_size": len(dataset),
        "shuffle": shuffle,
        "seed": seed,
        "batch_indices": idx.tolist(),
        "loss_default": defaults["loss_reason"] if loss is None else f"{loss} (given)",
        "shift_labels": shift,
        "output_name": output,
    })
    if dataset.target_name != "y":
        info["targets"] = dataset.target_name
    return make_problem(net, dataset.x[idx], dataset.y[idx], loss=loss_name, device=device, dtype=dtype,
                        info=info, dataset=(dataset.x, dataset.y), source=str(data), shift_labels=shift,
                        output=output)


def _load_model(checkpoint: str | os.PathLike | None, model: str | None,
                model_kwargs: dict[str, Any] | str | None, seed: int, dtype: str | None, trust_model_code: bool
                ) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The model with its weights in ``dtype``, the provenance for ``info``, and the defaults its files give:
    ``{"loss": str | None, "shift_labels": bool | None, "loss_reason": str}``."""
    from curvscope.io.checkpoints import apply_state_dict, load_checkpoint
    from curvscope.io.hf import is_hf_directory, load_hf_model
    from curvscope.io.spec import build_model, canonical_spec, check_trusted, parse_model_kwargs, relative_to

    if checkpoint is not None and is_hf_directory(checkpoint):
        if model is not None or model_kwargs:
            raise OptionError("model", lambda name: f"{checkpoint}: a Hugging Face directory names its model in "
                              f"config.json; {name('model')} and {name('model_kwargs')} cannot be used with it")
        hf = load_hf_model(checkpoint, resolve_dtype(dtype))
        info = {"checkpoint": str(checkpoint), "model": f"transformers:{hf.architecture}", "model_kwargs": {},
                **hf.info}
        return hf.model, info, {"loss": hf.loss, "shift_labels": hf.shift_labels, "loss_reason": hf.loss_reason}
    ckpt = load_checkpoint(checkpoint) if checkpoint is not None else None
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
    info = {"checkpoint": str(checkpoint) if checkpoint is not None else None, "model": spec,
            "model_kwargs": kwargs}
    loss = ckpt.loss if ckpt else None
    reason = f"{loss} from the checkpoint's metadata" if loss else "by the targets' dtype (ce for integer labels)"
    shift = ckpt.shift_labels if ckpt else None
    if shift is not None:
        reason += f"; shift_labels {str(shift).lower()} from the checkpoint's metadata"
    return net, info, {"loss": loss, "shift_labels": shift, "loss_reason": reason}
