"""``curvscope.Monitor``: curvature over training from inside the training loop, without checkpoints.

::

    monitor = curvscope.Monitor(model, (x, y), loss="ce", optimizer=opt, every=50, out="curv-run")
    for step in range(1, steps + 1):
        ...                      # forward, backward, opt.step()
        monitor.step(step)       # measures the current parameters when step % every == 0
    monitor.close()              # also usable as a context manager

Every measured step is one point of ``curvscope track`` (:func:`curvscope.curvature.track.measure_point`): the
same fields, the same ``report.json`` (``track`` section) in ``out``, rewritten after every point, so ``curvscope
show`` and ``curvscope check`` work on it while training runs; ``track.png`` is redrawn at most every
``plot_interval`` seconds and at ``close()`` (:class:`curvscope.report.track_live.TrackWriter`). ``close()`` (or
the end of the ``with`` block; for a monitor never closed, its garbage collection or the interpreter's exit)
writes the final report and figure. The monitor never changes
training: it reads the parameters, buffers and optimizer state without writing them, leaves ``.grad`` alone,
draws its random vectors from its own ``torch.Generator`` (and puts the global CPU and CUDA RNG states back
anyway), and measures in eval mode (Dropout off, BatchNorm on its running statistics), restoring every module's
train/eval mode afterwards. Scaled dot-product attention runs on its math kernel while measuring (the fused
kernels have no double backward). ``docs/track.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvscope.errors import CurvscopeError, OptionError

TENSORBOARD_HINT = "the tensorboard package is needed for tensorboard=DIR: pip install 'curvscope[tensorboard]'"


class Monitor:
    """Measures the sharpness of a model every ``every`` steps of its training loop (``docs/track.md``).

    Args:
        model: the ``nn.Module`` being trained (never modified).
        batch: the fixed batch every point is measured on: a tuple ``(x, y)``, or a dict of keyword inputs with
            ``labels`` (or ``y``) as the targets, as the data files hold them.
        loss: ``ce``, ``mse`` or ``bce`` (``reduction="mean"``, as PyTorch computes them).
        optimizer: the ``torch.optim`` optimizer (its ``state_dict()`` gives the learning rate in force, momentum,
            betas and Adam's second moments), or ``None`` (then ``lr`` gives an SGD threshold, or none).
        every: measure when ``step % every == 0``.
        out: the output directory of ``report.json`` and ``track.png``.
        tensorboard: a directory for TensorBoard scalars (``curvscope/lambda_max``, ...), needs the
            ``tensorboard`` package (``pip install 'curvscope[tensorboard]'``); ``None``: none.
        curvature: ``hessian`` or ``ggn``.
        groups: ``all``, ``layer`` or ``tensor`` (each group's block sharpness too).
        measure: more of the spectrum, comma-separated: ``trace``, ``bottom``, ``ggn``, ``hessian``.
        tol: relative residual tolerance of every eigen-solve.
        warm_start: start each point from the previous point's Ritz vector.
        plot: write ``track.png``: at ``close()``, and while training at most every ``plot_interval`` seconds.
        lr: the learning rate when there is no ``optimizer``.
        dtype: the dtype of the measurement (default: the model's parameters').
        shift_labels: causal LM targets (position t scores token t + 1); ``None``: on for a model class named
            ``...ForCausalLM`` / ``...LMHeadModel`` with sequence outputs.
        output: which output of a structured model output to score (default: the tensor, else ``logits``).
        seed: seeds the monitor's own generator (Lanczos start vectors).
        plot_interval: seconds between two drawings of ``track.png`` while training (a figure takes tenths of a
            second; the report itself is rewritten after every point).
    """

    def __init__(self, model: nn.Module, batch: tuple[Any, Any] | Mapping[str, Any], loss: str = "ce",
                 optimizer: torch.optim.Optimizer | None = None, every: int = 50, out: str | os.PathLike = "curv-run",
                 tensorboard: str | os.PathLike | None = None, *, curvature: str = "hessian", groups: str = "all",
                 measure: str = "", tol: float = 1e-4, warm_start: bool = True, plot: bool = True,
                 lr: float | None = None, dtype: torch.dtype | str | None = None, shift_labels: bool | None = None,
                 output: str | None = None, seed: int = 0, plot_interval: float = 60.0) -> None:
        from curvscope.workflows.track import TrackOptions

        if not isinstance(model, nn.Module):
            raise CurvscopeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise OptionError("every", f"must be a positive integer, got {every!r}")
        self.options = TrackOptions(curvature=curvature, groups=groups, measure=measure, tol=tol, lr=lr,
                                    warm_start=warm_start, plot=plot)
        self.options.validate()
        self.model, self.optimizer, self.every, self.loss = model, optimizer, every, loss
        self.out = Path(out)
        self.inputs, self.targets = _split_batch(batch)
        self.dtype, self.shift_labels, self.output, self.seed = dtype, shift_labels, output, int(seed)
        if isinstance(plot_interval, bool) or not isinstance(plot_interval, (int, float)) or \
                not plot_interval >= 0:
            raise OptionError("plot_interval", f"must be a number of seconds >= 0, got {plot_interval!r}")
        self.plot_interval = float(plot_interval)
        self.points: list[Any] = []
        self.report: dict[str, Any] | None = None
        self._problem = None
        self._writer = None
        self._latest: list[Any] = [None]  # the run last written (what a final report left to the GC writes)
        self._finalizer: weakref.finalize | None = None
        self._settings: dict[str, Any] | None = None
        self._groups: list[str] = []
        self._vectors: dict[str, Tensor] | None = None
        self._board = _summary_writer(tensorboard) if tensorboard is not None else None
        from curvscope.io.atomic import check_directory

        check_directory(self.out, "out")

    # -- the loop -----------------------------------------------------------------------------------------
    def step(self, step: int) -> Any:
        """Measure the current parameters when ``step % every == 0`` and rewrite the report; else nothing.

        Returns:
            the point's :class:`~curvscope.curvature.track.PointResult`, or ``None`` when not measured.
        """
        if isinstance(step, bool) or not isinstance(step, int):
            raise OptionError("step", f"must be an integer, got {step!r}")
        if step % self.every:
            return None
        return self.measure(step)

    def measure(self, step: int) -> Any:
        """Measure the current parameters now, as point ``step`` (whatever ``every`` says)."""
        from curvscope.curvature.track import measure_point
        from curvscope.workflows.track import TrackPoint, point_optimizer

        with _untouched(self.model):
            started = time.perf_counter()
            problem = self._current_problem()
            state = self.optimizer.state_dict() if self.optimizer is not None else None
            info, notes = point_optimizer(problem, state, self.options, "optimizer")
            if state is not None:
                notes = ["optimizer from the optimizer's state_dict()"]
            measured = measure_point(problem, info, state, curvature=self.options.curvature,
                                     groups=self.options.groups, measures=self.options.measures(),
                                     tol=self.options.tol, seed=self.seed,
                                     start=self._vectors if self.options.warm_start else None)
            if self.points and self.points[-1].measured is not None:
                self.points[-1].measured.vectors = {}  # one set of D-sized vectors held: the newest point's
            self._vectors = measured.vectors
            point = TrackPoint(step=int(step), checkpoint=None, fingerprint=None,
                               seconds=time.perf_counter() - started, measured=measured, notes=notes)
            if self.points and self.points[-1].step >= point.step:  # a step measured again, or out of order
                self.points = sorted([p for p in self.points if p.step != point.step] + [point],
                                     key=lambda p: p.step)
            else:
                self.points.append(point)
        self._write(problem)
        self._scalars(point)
        return measured

    def close(self) -> None:
        """Write the final report and ``track.png`` (when points were added since the last full write) and close
        TensorBoard. The monitor can go on measuring afterwards."""
        try:
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
            if self._writer is not None and self._writer.pending:
                self.report = self._writer.finish(self._run())
        finally:
            if self._board is not None:
                self._board.close()
                self._board = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Monitor(every={self.every}, points={len(self.points)}, out={str(self.out)!r})"

    # -- inside -------------------------------------------------------------------------------------------
    def _current_problem(self):
        """The Problem at the model's current parameters and buffers (built once; its tensors refreshed)."""
        from curvscope.problem import make_problem

        first = next((p for p in self.model.parameters() if p.requires_grad), None)
        if first is None:
            raise CurvscopeError("the model has no trainable parameters")
        dtype = self.dtype if self.dtype is not None else first.dtype
        if self._problem is None:
            shift = self.shift_labels if self.shift_labels is not None else _causal(self.model)
            problem = make_problem(self.model, self.inputs, self.targets, loss=self.loss, device=first.device,
                                   dtype=dtype, output=self.output, shift_labels=False, info=self._info())
            if shift and problem.is_sequence and problem.loss.name == "ce":
                problem = make_problem(self.model, self.inputs, self.targets, loss=self.loss, device=first.device,
                                       dtype=dtype, output=self.output, shift_labels=True, info=self._info())
            self._problem = problem
        problem = self._problem
        params = {n: p.detach().to(device=problem.device, dtype=problem.dtype)
                  for n, p in self.model.named_parameters() if p.requires_grad}
        buffers = {n: b.detach().to(device=problem.device, dtype=problem.dtype if b.is_floating_point() else b.dtype)
                   for n, b in self.model.named_buffers()}
        buffers.update({n: p.detach().to(device=problem.device, dtype=problem.dtype)
                        for n, p in self.model.named_parameters() if not p.requires_grad})
        return dataclasses.replace(problem, params=params, buffers=buffers)

    def _info(self) -> dict[str, Any]:
        kind = type(self.model)
        return {"checkpoint": None, "model": f"{kind.__module__}.{kind.__qualname__}", "model_kwargs": {},
                "data": "curvscope.Monitor batch", "batch_indices": None, "seed": self.seed}

    def _run(self):
        """The points so far as a :class:`~curvscope.workflows.track.TrackRun` (what the report is made of)."""
        from curvscope.workflows.track import TrackRun

        if self._settings is None:
            problem = self._problem
            self._settings = self.options.settings(problem)
            self._groups = [g.name for g in problem.groups(self.options.groups)] \
                if self.options.groups != "all" else []
        return TrackRun(run=[f"curvscope.Monitor (every {self.every})"], total=len(self.points),
                        points=self.points, options=self.options, settings=self._settings,
                        group_names=self._groups)

    def _write(self, problem) -> None:
        """``report.json`` after a point (compact, put off when it would cost more than a small share of the
        time); ``track.png`` when due. Until :meth:`close`, a monitor that is garbage-collected, or alive when
        the interpreter exits, writes its final report and figure then (``weakref.finalize``)."""
        from curvscope.report.track_live import TrackWriter

        if self._writer is None:
            self._writer = TrackWriter(self.out, problem, plot=self.options.plot, option="out",
                                       plot_interval=self.plot_interval)
        run = self._run()
        self._latest[0] = run
        written = self._writer.update(run)
        if written is not None:
            self.report = written
        if self._finalizer is None:
            self._finalizer = weakref.finalize(self, _final_report, self._writer, self._latest, str(self.out))

    def _scalars(self, point: Any) -> None:
        if self._board is None:
            return
        m = point.measured
        values = {"lambda_max": m.lambda_max, "loss": m.loss, "gradient_norm": m.gradient_norm,
                  "threshold": m.threshold, "sharpness_ratio": m.sharpness_ratio,
                  "preconditioned_lambda_max": m.preconditioned_lambda_max, "trace": m.trace,
                  "lambda_min": m.lambda_min, **{f"groups/{k}": v for k, v in m.groups.items()}}
        for name, value in values.items():
            if value is not None:
                self._board.add_scalar(f"curvscope/{name}", float(value), point.step)
        self._board.flush()


def _final_report(writer: Any, latest: list[Any], out: str) -> None:
    """The final report and figure of a monitor that was never closed (a training loop stopped by Ctrl-C or an
    error, a monitor dropped): run when it is garbage-collected or at the interpreter's exit. A failure is one
    line on stderr."""
    if not writer.pending or latest[0] is None:
        return
    try:
        writer.finish(latest[0])
    except Exception as exc:  # noqa: BLE001 - at exit or in the GC: one line, no traceback
        print(f"curvscope.Monitor: the final report in {out} was not written ({exc})", file=sys.stderr)


def _split_batch(batch: Any) -> tuple[Any, Tensor]:
    """``(x, y)`` as given, or a dict's keyword inputs and its ``labels`` (or ``y``)."""
    from curvscope.io.inputs import TARGET_NAMES, KeywordInputs

    if isinstance(batch, Mapping):
        targets = [k for k in TARGET_NAMES if k in batch]
        if not targets:
            raise CurvscopeError(f"batch: a dict batch needs the targets under {' or '.join(TARGET_NAMES)}")
        inputs = {k: v for k, v in batch.items() if k not in TARGET_NAMES}
        return KeywordInputs(inputs, source="batch"), batch[targets[0]]
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Tensor):
        return batch[0], batch[1]
    raise CurvscopeError("batch must be a tuple (x, y) or a dict of keyword inputs with 'labels'")


def _causal(model: nn.Module) -> bool:
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel"))


def _summary_writer(directory: str | os.PathLike):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CurvscopeError(TENSORBOARD_HINT) from None
    return SummaryWriter(log_dir=str(directory))


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; every module's train/eval mode and the global CPU and CUDA RNG states restored after."""
    modes = [(m, m.training) for m in model.modules()]
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    model.eval()
    try:
        with _math_attention():
            yield
    finally:
        for module, training in modes:
            module.training = training
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _math_attention():
    """Scaled dot-product attention by its plain math kernel (twice differentiable; the fused kernels have no
    double backward), where PyTorch can choose the kernel."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older PyTorch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])
