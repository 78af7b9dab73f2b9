"""Model inputs and outputs beyond one tensor: keyword inputs, and choosing the tensor a model's output holds.

A data file without ``x`` holds **keyword inputs**: every tensor other than the targets (``y`` or ``labels``)
is passed to the model as a keyword argument under its own name (``input_ids``, ``attention_mask``,
``pixel_values``, ...). :class:`KeywordInputs` keeps them together and behaves like a batch tensor where the
engine uses one (indexing gives a sub-batch, ``.shape[0]``, ``.to``, ``.detach``, ``.unsqueeze``), and it is a
registered pytree, so ``torch.func.vmap`` maps over it like over a tensor.

:func:`call_model` is the one place that calls a model functionally: positionally for a tensor, with keywords
for :class:`KeywordInputs`, and returns the output tensor chosen by :func:`select_output`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import functional_call

from curvscope.errors import CurvscopeError, Metavar, OptionError

TARGET_NAMES = ("y", "labels")
"""Names a data file's targets may have; with keyword inputs every other tensor is an input."""


class KeywordInputs:
    """Named input tensors with a shared leading batch dimension ``N``: ``{name: (N, ...)}``.

    Acts as a batch where the engine expects an input tensor: ``inputs[idx]`` (an int, slice or index tensor)
    is the sub-batch of every tensor, ``len(inputs) == inputs.shape[0] == N``, ``.to(device, dtype)`` casts
    floating tensors only (token ids and masks keep their integer dtype), ``.detach()``, ``.unsqueeze(0)``;
    ``is_floating_point()`` is ``False``. A string key gives one tensor: ``inputs["input_ids"]``; ``keys()``,
    ``values()``, ``items()`` and ``dict(inputs)`` / ``**inputs`` give the mapping. Iterating yields the
    samples, as for a tensor.
    """

    __slots__ = ("_tensors",)

    def __init__(self, tensors: Mapping[str, Tensor], source: str = "inputs"):
        tensors = dict(tensors)
        if not tensors:
            raise CurvscopeError(f"{source}: no input tensors")
        sizes = {}
        for name, t in tensors.items():
            if not isinstance(t, Tensor):
                raise CurvscopeError(f"{source}: input '{name}' is a {type(t).__name__}, not a tensor")
            if not name.isidentifier():
                raise CurvscopeError(f"{source}: input name '{name}' cannot be a keyword argument")
            if t.dim() == 0:
                raise CurvscopeError(f"{source}: input '{name}' needs a leading sample dimension")
            sizes[name] = t.shape[0]
        if len(set(sizes.values())) > 1:
            shown = ", ".join(f"'{k}' {v}" for k, v in sizes.items())
            raise CurvscopeError(f"{source}: keyword inputs have different numbers of samples ({shown})")
        self._tensors = tensors

    @classmethod
    def _wrap(cls, tensors: dict[str, Tensor]) -> KeywordInputs:
        """No checks: inside ``vmap`` the per-sample tensors have no common leading dimension."""
        obj = cls.__new__(cls)
        obj._tensors = tensors
        return obj

    # -- the mapping --------------------------------------------------------------------------------
    def keys(self):
        """The input names."""
        return self._tensors.keys()

    def values(self):
        """The input tensors."""
        return self._tensors.values()

    def items(self):
        """``(name, tensor)`` pairs."""
        return self._tensors.items()

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, str):
            return self._tensors[index]
        return KeywordInputs._wrap({k: v[index] for k, v in self._tensors.items()})

    def map(self, fn: Callable[[Tensor], Tensor]) -> KeywordInputs:
        """``fn`` applied to every tensor."""
        return KeywordInputs._wrap({k: fn(v) for k, v in self._tensors.items()})

    # -- like a batch tensor ------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        """``(N,)``: the shared batch dimension (the per-input shapes are in :attr:`shapes`)."""
        return torch.Size([next(iter(self._tensors.values())).shape[0]])

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each input's full shape, by name."""
        return {k: tuple(v.shape) for k, v in self._tensors.items()}

    @property
    def device(self) -> torch.device:
        """The device of the (first) input tensor."""
        return next(iter(self._tensors.values())).device

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Iterator[KeywordInputs]:
        for i in range(len(self)):
            yield self[i]

    def dim(self) -> int:
        """1: the one shared batch dimension (each input's own shape is in :attr:`shapes`)."""
        return 1

    def is_floating_point(self) -> bool:
        """``False``: the batch as a whole is not a floating tensor (:meth:`to` casts its floating inputs)."""
        return False

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> KeywordInputs:
        """Moved to ``device``; floating tensors cast to ``dtype``, integer and bool tensors keep theirs."""
        return self.map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def detach(self) -> KeywordInputs:
        """Every tensor detached."""
        return self.map(Tensor.detach)

    def unsqueeze(self, dim: int) -> KeywordInputs:
        """Every tensor with a new axis at ``dim``."""
        return self.map(lambda t: t.unsqueeze(dim))

    def contiguous(self) -> KeywordInputs:
        """Every tensor contiguous."""
        return self.map(Tensor.contiguous)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}: {_describe(v)}" for k, v in self._tensors.items())
        return f"KeywordInputs({shown})"


def _describe(t: Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"


def _flatten(inputs: KeywordInputs) -> tuple[list[Tensor], list[str]]:
    return list(inputs.values()), list(inputs.keys())


def _unflatten(values: list[Tensor], names: list[str]) -> KeywordInputs:
    return KeywordInputs._wrap(dict(zip(names, values, strict=True)))


def _flatten_with_keys(inputs: KeywordInputs):
    return [(pytree.MappingKey(k), v) for k, v in inputs.items()], list(inputs.keys())


pytree.register_pytree_node(KeywordInputs, _flatten, _unflatten,
                            serialized_type_name="curvscope.io.inputs.KeywordInputs",
                            flatten_with_keys_fn=_flatten_with_keys)

Inputs = Union[Tensor, KeywordInputs]


def describe_inputs(inputs: Inputs) -> str:
    """``(12, 4) float32`` for a tensor; ``input_ids int64 (12, 8), attention_mask int64 (12, 8)`` for keywords."""
    if isinstance(inputs, KeywordInputs):
        return ", ".join(f"{k} {_describe(v)}" for k, v in inputs.items())
    return _describe(inputs)


def cast_inputs(inputs: Inputs, device: torch.device | str | None, dtype: torch.dtype) -> Inputs:
    """Inputs on ``device``, floating tensors in ``dtype``; integer ones (token ids, masks) kept."""
    if isinstance(inputs, KeywordInputs):
        return inputs.to(device=device, dtype=dtype)
    return inputs.to(device=device, dtype=dtype) if inputs.is_floating_point() else inputs.to(device)


def nonfinite_inputs(inputs: Inputs) -> str | None:
    """The name of the first floating input with NaN or Inf (``"x"`` for a plain tensor), else ``None``."""
    items = inputs.items() if isinstance(inputs, KeywordInputs) else [("x", inputs)]
    for name, t in items:
        if t.is_floating_point() and not torch.isfinite(t).all():
            return name
    return None


# -- calling the model and choosing its output ---------------------------------------------------------

def call_model(model: nn.Module, state: dict[str, Tensor], inputs: Inputs, output: str | None = None
               ) -> Tensor:
    """``model`` evaluated functionally at ``state`` (parameters and buffers by name) on ``inputs``.

    A tensor is passed positionally, ``model(x)``; :class:`KeywordInputs` as keywords, ``model(**inputs)``.
    The result is the output tensor :func:`select_output` picks (``output`` names an attribute or key).
    """
    if isinstance(inputs, KeywordInputs):
        out = functional_call(model, state, args=(), kwargs=dict(inputs.items()))
    else:
        out = functional_call(model, state, (inputs,))
    return select_output(out, output)


def probe_model(model: nn.Module, state: dict[str, Tensor], inputs: Inputs, output: str | None = None
                ) -> tuple[Tensor, str]:
    """:func:`call_model`, and what was chosen in words (for ``problem.info["output"]``)."""
    if isinstance(inputs, KeywordInputs):
        out = functional_call(model, state, args=(), kwargs=dict(inputs.items()))
    else:
        out = functional_call(model, state, (inputs,))
    return _select(out, output)


def select_output(out: Any, output: str | None = None) -> Tensor:
    """The tensor in a model's output: ``out.<output>`` / ``out[output]`` when ``output`` is given, else the
    output itself when it is a tensor, else its ``logits`` (attribute or key), else the first element of a
    tuple or list."""
    return _select(out, output)[0]


def _select(out: Any, output: str | None) -> tuple[Tensor, str]:
    kind = type(out).__name__
    if output is not None:
        value, how = _lookup(out, output)
        if how is None:
            raise OptionError("output", lambda name: f"{name('output', output)}: the model's output ({kind}) has no "
                              f"attribute or key '{output}'{_available(out)}")
        if not isinstance(value, Tensor):
            raise OptionError("output", lambda name: f"{name('output', output)}: '{output}' of the model's output "
                              f"({kind}) is a {type(value).__name__}, not a tensor")
        return value, f"{output} ({how} of {kind})"
    if isinstance(out, Tensor):
        return out, "the output tensor"
    value, how = _lookup(out, "logits")
    if isinstance(value, Tensor):
        return value, f"logits ({how} of {kind})"
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0], f"element 0 of {kind}"
    raise OptionError("output", lambda name: f"the model returned a {kind}, not a tensor, and it has no 'logits' "
                      f"nor a tensor as its first element; choose one with {name('output', Metavar('NAME'))}"
                      f"{_available(out)}")


def _lookup(out: Any, name: str) -> tuple[Any, str | None]:
    if isinstance(out, Mapping) and name in out:
        # Hugging Face ModelOutput is both: call it what users write, an attribute
        return out[name], "attribute" if hasattr(type(out), "__dataclass_fields__") else "key"
    if not isinstance(out, (Tensor, Mapping)) and hasattr(out, name):
        return getattr(out, name), "attribute"
    if isinstance(out, (tuple, list)) and name.isdigit() and int(name) < len(out):
        return out[int(name)], "element"
    return None, None


def _available(out: Any) -> str:
    if isinstance(out, Mapping):
        names = [str(k) for k in out.keys()]
    elif hasattr(out, "__dataclass_fields__"):
        names = list(out.__dataclass_fields__)
    elif isinstance(out, (tuple, list)):
        names = [str(i) for i in range(len(out))]
    else:
        return ""
    return f" (it has {', '.join(names)})" if names else ""


def check_keywords(model: nn.Module, inputs: Inputs, source: str, target_name: str = "y") -> None:
    """Refuse keyword inputs the model's ``forward`` does not accept, naming them (before any call)."""
    if not isinstance(inputs, KeywordInputs):
        return
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = {n for n, p in params.items()
                if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    unknown = [k for k in inputs.keys() if k not in accepted]
    if unknown:
        raise CurvscopeError(
            f"{source}: 'x' is missing (found {', '.join(sorted([*inputs.keys(), target_name]))}), so its tensors are "
            f"passed to the model as keyword arguments, but {type(model).__name__}.forward does not accept "
            f"{', '.join(repr(k) for k in unknown)} (it takes {', '.join(accepted) or 'no keywords'})")
