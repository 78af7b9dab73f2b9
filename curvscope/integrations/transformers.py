"""A Hugging Face ``Trainer`` callback that measures curvature over training (the ``[hf]`` extra).

::

    from curvscope.integrations.transformers import CurvscopeCallback

    batch = {"input_ids": ids[:16], "labels": ids[:16]}       # a fixed batch of the training data
    trainer = Trainer(model, args, train_dataset=train, callbacks=[CurvscopeCallback(batch, every=50)])
    trainer.train()                                          # curv-run/report.json and track.png as it trains

It wraps :class:`curvscope.Monitor`: at the end of every ``every``-th optimizer step (``state.global_step``) it
measures the model with the ``Trainer``'s own optimizer state (the learning rate in force, AdamW's second
moments), writes the ``track`` report and leaves training unchanged. A causal LM (``...ForCausalLM``,
``...LMHeadModel``) is scored on next tokens (``shift_labels``), as the model's own loss does. ``docs/track.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from curvscope.errors import CurvscopeError

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - the [hf] extra is missing
    raise CurvscopeError("curvscope.integrations.transformers needs transformers: pip install 'curvscope[hf]'"
                         ) from exc

__all__ = ["CurvscopeCallback"]


class CurvscopeCallback(TrainerCallback):
    """Measure the sharpness every ``every`` optimizer steps of a ``Trainer`` run (a :class:`curvscope.Monitor`).

    Args:
        batch: the fixed batch: a dict of keyword inputs with ``labels`` (or a tuple ``(x, y)``).
        every: measure when ``global_step % every == 0``.
        out: the output directory of ``report.json`` and ``track.png``.
        loss: ``ce``, ``mse`` or ``bce``.
        tensorboard: a directory for TensorBoard scalars, or ``None``.
        **monitor: further keyword arguments of :class:`curvscope.Monitor` (``curvature``, ``groups``,
            ``measure``, ``tol``, ``dtype``, ...).
    """

    def __init__(self, batch: Mapping[str, Any] | tuple[Any, Any], every: int = 50,
                 out: str | os.PathLike = "curv-run", loss: str = "ce", tensorboard: str | os.PathLike | None = None,
                 **monitor: Any) -> None:
        self.batch, self.every, self.out, self.loss = batch, every, out, loss
        self.tensorboard, self.kwargs = tensorboard, monitor
        self.monitor = None

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: D102
        if state.global_step % self.every:
            return control
        if self.monitor is None:
            from curvscope.monitor import Monitor

            if model is None:
                raise CurvscopeError("the Trainer passed no model to the callback")
            self.monitor = Monitor(model, self.batch, loss=self.loss, optimizer=optimizer, every=self.every,
                                   out=self.out, tensorboard=self.tensorboard, **self.kwargs)
        self.monitor.step(int(state.global_step))
        return control

    def on_train_end(self, args, state, control, **kwargs):  # noqa: D102
        if self.monitor is not None:
            self.monitor.close()
        return control
