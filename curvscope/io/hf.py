"""Hugging Face checkpoints as ``save_pretrained`` writes them: a directory with ``config.json`` and
``model.safetensors`` (or shards listed in ``model.safetensors.index.json``).

Needs the optional extra ``pip install "curvscope[hf]"`` (``transformers``). Nothing is downloaded (local files
only, ``HF_HUB_OFFLINE=1`` during the load) and no code from the directory runs: a ``config.json`` whose
``auto_map`` asks for custom code is refused, and the model class is looked up by the name in the config's
``architectures`` among ``transformers``' own classes. Pickled weights (``pytorch_model.bin``) are not read.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvscope.errors import CurvscopeError, Metavar, OptionError
from curvscope.jsontext import loads

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
META_SHIFT_LABELS = "curvscope.shift_labels"
INSTALL_HINT = 'pip install "curvscope[hf]"'


@dataclass
class HFModel:
    """A loaded Hugging Face model and what its architecture says about the loss.

    ``task``: ``causal-lm``, ``sequence-classification``, ``token-classification`` or ``None``;
    ``loss``/``shift_labels``: defaults for them (``None``: no default from the architecture).
    """

    path: Path
    model: nn.Module
    architecture: str
    task: str | None
    loss: str | None
    shift_labels: bool | None
    loss_reason: str
    info: dict[str, Any] = field(default_factory=dict)


def is_hf_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a ``config.json``."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file()


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` as a dict, refusing one that asks for custom code (``auto_map``)."""
    try:
        config = loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and absurd JSON are ValueErrors
        raise CurvscopeError(f"{path / CONFIG}: cannot be read as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CurvscopeError(f"{path / CONFIG}: expected a JSON object")
    if config.get("auto_map"):
        names = ", ".join(str(v) for v in dict(config["auto_map"]).values()) if isinstance(
            config["auto_map"], dict) else str(config["auto_map"])
        raise OptionError("checkpoint", lambda name: f"{path / CONFIG}: 'auto_map' asks to run custom model code "
                          f"from the checkpoint ({names}); curvscope never runs remote or checkpoint code: load the "
                          "model yourself and use curvscope.make_problem, or pass "
                          f"{name('model', Metavar('SPEC'))} with its weights")
    return config


def import_transformers():
    """``transformers``, or a one-line error saying how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise CurvscopeError(f"loading a Hugging Face checkpoint directory needs the 'transformers' package, "
                             f"which is not installed: {INSTALL_HINT}") from exc
    return transformers


@contextmanager
def _offline(transformers):
    """No network, no progress bars, only errors logged, for the duration of the load."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _task(transformers, architecture: str) -> str | None:
    from transformers.models.auto import modeling_auto as auto

    def names(mapping: str) -> set[str]:
        out: set[str] = set()
        for v in getattr(auto, mapping, {}).values():
            out.update([v] if isinstance(v, str) else v)
        return out

    if architecture.endswith("ForCausalLM") or architecture in names("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
        return "causal-lm"
    if architecture.endswith("ForSequenceClassification") or architecture in names(
            "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"):
        return "sequence-classification"
    if architecture.endswith("ForTokenClassification") or architecture in names(
            "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"):
        return "token-classification"
    if architecture.endswith("ForImageClassification") or architecture in names(
            "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"):
        return "image-classification"
    return None


def _loss_default(task: str | None, config, architecture: str) -> tuple[str | None, bool | None, str]:
    if task == "causal-lm":
        return "ce", True, f"ce on next tokens (shift_labels): {architecture} is a causal language model"
    if task in ("sequence-classification", "image-classification"):
        problem_type = getattr(config, "problem_type", None)
        if problem_type == "regression" or (problem_type is None and getattr(config, "num_labels", 2) == 1):
            return "mse", False, f"mse: {architecture} with one output is a regression head"
        if problem_type == "multi_label_classification":
            return "bce", False, f"bce: {architecture} has problem_type multi_label_classification"
        return "ce", False, f"ce on one label per sample: {architecture} is a classifier"
    if task == "token-classification":
        return "ce", False, f"ce per token: {architecture} labels every token"
    return None, None, f"no default from the architecture {architecture}"


def _shift_labels_metadata(path: Path) -> bool | None:
    """``curvscope.shift_labels`` from the safetensors metadata of the weights (first shard), if set."""
    from safetensors import safe_open

    files = [path / WEIGHTS] if (path / WEIGHTS).is_file() else []
    if not files and (path / WEIGHTS_INDEX).is_file():
        try:
            index = loads((path / WEIGHTS_INDEX).read_text())
            files = [path / sorted(set(index["weight_map"].values()))[0]]
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise CurvscopeError(f"{path / WEIGHTS_INDEX}: not a valid safetensors index ({exc})") from exc
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                value = (handle.metadata() or {}).get(META_SHIFT_LABELS)
        except Exception as exc:  # safetensors raises its own error types
            raise CurvscopeError(f"{f}: not a valid safetensors file ({exc})") from exc
        if value is not None:
            return parse_bool(value, f"{f}: metadata '{META_SHIFT_LABELS}'")
    return None


def parse_bool(value: str, source: str) -> bool:
    """A metadata flag: ``true``/``1``/``yes`` or ``false``/``0``/``no`` (any case, surrounding spaces ignored).

    Raises:
        CurvscopeError: for any other text, naming ``source``.
    """
    text = value.strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise CurvscopeError(f"{source} is '{value}', expected true or false")


def load_hf_model(path: str | os.PathLike, dtype: torch.dtype) -> HFModel:
    """Build the model a Hugging Face directory holds, in ``dtype``, with its weights (strictly), in eval mode.

    The model is created in ``dtype`` and the saved tensors (float32, bfloat16, float16) are copied into it,
    so bfloat16 weights are exact in float32/float64. ``use_cache`` is turned off (curvscope computes no
    generation caches) and the eager attention implementation is used (differentiable by ``torch.func``).
    """
    path = Path(path)
    config_dict = read_config(path)
    if not (path / WEIGHTS).is_file() and not (path / WEIGHTS_INDEX).is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8])
        raise CurvscopeError(f"{path}: a Hugging Face directory needs {WEIGHTS} or {WEIGHTS_INDEX} next to "
                             f"{CONFIG} (found {found}); pickled weights (pytorch_model.bin) are not loaded")
    architectures = config_dict.get("architectures") or []
    if not isinstance(architectures, list) or not architectures or not isinstance(architectures[0], str):
        raise CurvscopeError(f"{path / CONFIG}: no 'architectures' entry says which model class to build")
    architecture = architectures[0]
    transformers = import_transformers()
    cls = getattr(transformers, architecture, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CurvscopeError(f"{path / CONFIG}: architecture '{architecture}' is not a model class of the "
                             f"installed transformers {transformers.__version__}")
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    with _offline(transformers):
        try:
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True,
                                                             trust_remote_code=False)
            if hasattr(config, "use_cache"):
                config.use_cache = False
            model, loading = cls.from_pretrained(
                str(path), config=config, local_files_only=True, trust_remote_code=False, use_safetensors=True,
                output_loading_info=True, attn_implementation="eager", **{dtype_key: dtype})
        except CurvscopeError:
            raise
        except Exception as exc:  # transformers raises many types for bad directories
            raise CurvscopeError(f"{path}: transformers cannot load this directory as {architecture} "
                                 f"({type(exc).__name__}: {_one_line(exc)})") from exc
    problems = []
    for key, label in (("missing_keys", "missing keys"), ("unexpected_keys", "unexpected keys"),
                       ("mismatched_keys", "shape mismatches")):
        items = [str(k[0]) if isinstance(k, tuple) else str(k) for k in loading.get(key) or []]
        if items:
            problems.append(f"{label} {', '.join(sorted(items)[:3])}"
                            + (f" (and {len(items) - 3} more)" if len(items) > 3 else ""))
    if problems:
        raise CurvscopeError(f"{path}: the weights do not match {architecture}: {'; '.join(problems)}")
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise CurvscopeError(f"{path}: weights '{name}' contain NaN or Inf")
    model.eval()
    task = _task(transformers, architecture)
    loss, shift, reason = _loss_default(task, config, architecture)
    meta_shift = _shift_labels_metadata(path)
    if meta_shift is not None:
        shift = meta_shift
        reason += f"; shift_labels {str(meta_shift).lower()} from the metadata '{META_SHIFT_LABELS}'"
    saved_dtypes = sorted(_saved_dtypes(path))
    info = {"architecture": architecture, "task": task, "transformers": transformers.__version__,
            "saved_dtype": ", ".join(saved_dtypes)}
    return HFModel(path=path, model=model, architecture=architecture, task=task, loss=loss, shift_labels=shift,
                   loss_reason=reason, info=info)


def _saved_dtypes(path: Path) -> set[str]:
    """The dtypes of the saved tensors, as safetensors names them (``F32``, ``BF16``)."""
    from safetensors import safe_open

    if (path / WEIGHTS).is_file():
        files = [path / WEIGHTS]
    else:
        index = json.loads((path / WEIGHTS_INDEX).read_text())
        files = [path / f for f in sorted(set(index["weight_map"].values()))]
    out = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for k in handle.keys():
                out.add(handle.get_slice(k).get_dtype())
    return out


def _one_line(exc: BaseException, limit: int = 200) -> str:
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."
