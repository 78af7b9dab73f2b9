"""The precision a model really computes in: a dtype probe of its intermediate tensors.

Many models compute parts of themselves in a lower precision than their parameters: Hugging Face's Llama,
Mistral and Qwen2 upcast to float32 (never to float64) in RMSNorm, the rotary embeddings and the attention
softmax, T5 in its layer norm and softmax. At ``dtype=float64`` such a model's outputs, gradients and curvature
are float32-accurate, and a self-check sized for float64 rounding fails on a correct computation.

:func:`probe_precision` runs the model once on (up to) two samples under a torch-function mode that sees every
call of a torch function or tensor method (a dispatch mode would see the ATen operations too, but importing it
costs a quarter second of start-up). A call that takes a floating tensor of the run's dtype and returns a
floating tensor of lower precision (a downcast: ``.float()``, ``.to(torch.float32)``, ``softmax(...,
dtype=torch.float32)``) is recorded with the innermost module it ran in. Computations that merely start in a
lower precision (an integer mask turned into float32) are not downcasts and are not recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True)
class ReducedPrecision:
    """Where a model computes below the run's dtype.

    Attributes:
        dtype: the lowest precision found (``torch.float32``, ``torch.bfloat16``, ...).
        modules: ``(name, class name)`` of each module with a downcast, in the order first seen (``""``: the
            model itself).
        ops: the downcasting calls (``Tensor.to``, ``Tensor.float``, ``softmax``, ...), in the order first seen.
    """

    dtype: torch.dtype
    modules: tuple[tuple[str, str], ...]
    ops: tuple[str, ...]

    def describe(self, limit: int = 3) -> str:
        """``LlamaRMSNorm x3, LlamaAttention, LlamaRotaryEmbedding``: the module classes, counted."""
        counts: dict[str, int] = {}
        for _name, cls in self.modules:
            counts[cls] = counts.get(cls, 0) + 1
        parts = [f"{cls} x{n}" if n > 1 else cls for cls, n in counts.items()]
        more = f", +{len(parts) - limit} more" if len(parts) > limit else ""
        return ", ".join(parts[:limit]) + more

    def note(self, run_dtype: torch.dtype) -> str:
        """The one-line note for reports and the CLI."""
        low, run = _name(self.dtype), _name(run_dtype)
        return (f"the model computes parts of itself in {low} at dtype {run} ({self.describe()}): its outputs, "
                f"gradients and curvature are {low}-accurate, and rank floors and self-checks use {low}'s eps")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def probe_precision(model: nn.Module, call, dtype: torch.dtype) -> ReducedPrecision | None:
    """Run ``call()`` (the model on a couple of samples) and record its downcasts below ``dtype``.

    Args:
        model: the module ``call`` runs (its submodules are hooked to name where a downcast happens).
        call: a function of no arguments that runs the model once.
        dtype: the run's dtype (the parameters' and the floating inputs').

    Returns:
        :class:`ReducedPrecision`, or ``None`` when every floating intermediate of the run's dtype stays in it
        (or when the probe itself cannot run: then nothing is claimed).
    """
    from torch.overrides import TorchFunctionMode

    stack: list[tuple[str, str]] = [("", type(model).__name__)]
    found: dict[tuple[str, str], None] = {}
    ops: dict[str, None] = {}
    lowest: list[torch.dtype] = []
    run_eps = _eps(dtype)

    class Downcasts(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor) and t.is_floating_point()]
            if any(t.dtype == dtype for t in inputs):
                for o in tree_flatten(out)[0]:
                    if isinstance(o, Tensor) and o.is_floating_point() and _eps(o.dtype) > run_eps:
                        found.setdefault(stack[-1])
                        ops.setdefault(getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func)))
                        lowest.append(o.dtype)
            return out

    def leave(_module, _args, _output) -> None:  # a forward hook returning a value would replace the output
        if len(stack) > 1:
            stack.pop()

    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(module.register_forward_pre_hook(
            lambda _m, _a, name=name, cls=type(module).__name__: stack.append((name, cls)) and None))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad(), Downcasts():
            call()
    except Exception:  # the probe is advisory: a model it cannot run through was already run without it
        return None
    finally:
        for handle in handles:
            handle.remove()
    if not lowest:
        return None
    low = max(lowest, key=_eps)
    return ReducedPrecision(low, tuple(found), tuple(ops))
