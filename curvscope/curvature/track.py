"""One point of curvature over training: loss, gradient norm, sharpness and the optimizer's threshold at one set
of parameters (``docs/conventions.md`` §10).

:func:`measure_point` is what ``curvscope track`` computes at each checkpoint and :class:`curvscope.Monitor` at
each measured step: the batch loss, the gradient norm, λ_max of the Hessian (or GGN) through
:func:`~curvscope.curvature.sharpness.sharpness`, the stability threshold of the optimizer
(:func:`~curvscope.curvature.edge.threshold`), the compared sharpness (λ_max + coupled decay, or Adam's
preconditioned sharpness λ_max(P^-1/2 (H + W) P^-1/2)) and their ratio; optionally each group's block
sharpness, the trace (Hutch++), the smallest eigenvalue and the other curvature's λ_max. Every eigen-solve can
warm-start from the previous point's vectors. Pure: no files, no printing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvscope.curvature.edge import (
    NoPreconditioner,
    OptimizerInfo,
    compared_operator,
    compared_sharpness,
    needs_preconditioner,
    sharpness_ratio,
    threshold,
)
from curvscope.curvature.matfree.operators import curvature_operator, hessian_with_gradient
from curvscope.curvature.matfree.trace import hutchpp
from curvscope.curvature.sharpness import DEFAULT_TOL, Negated, SharpnessResult, sharpness
from curvscope.errors import CurvscopeError
from curvscope.progress import Progress

MEASURES = ("trace", "bottom", "ggn", "hessian")
"""What a point may add: ``trace`` (Hutch++ of the curvature), ``bottom`` (the Hessian's smallest eigenvalue),
``ggn`` (the GGN's λ_max beside the Hessian's), ``hessian`` (the Hessian's beside the GGN's)."""
DEFAULT_TRACE_SAMPLES = 30


@dataclass(repr=False)
class PointResult:
    """The measurements at one set of parameters.

    Attributes:
        loss: the batch loss.
        gradient_norm: ``||dL/dθ||``.
        curvature: ``"hessian"`` or ``"ggn"``.
        lambda_max: λ_max of the curvature (never preconditioned); ``None`` when the loss is not finite.
        optimizer: the optimizer's kind (``sgd``, ``adam``, ``adamw``) or ``None``.
        lr: its learning rate (the largest of the param groups).
        momentum: SGD's momentum (``None`` for Adam or without an optimizer).
        threshold: the stability threshold, or ``None`` where §10 defines none.
        compared_sharpness: the sharpness compared with it (λ_max + coupled decay, or the preconditioned one).
        preconditioned_lambda_max: λ_max(P^-1/2 (H + W) P^-1/2) where P is not the identity (Adam), else
            ``None``.
        sharpness_ratio: ``compared_sharpness / threshold``.
        groups: group name -> block λ_max (with groups), in the problem's order.
        trace, trace_stderr: Hutch++ of the curvature (``measures`` with ``trace``).
        lambda_min: the Hessian's smallest eigenvalue (``bottom``).
        ggn_lambda_max, hessian_lambda_max: the other curvature's λ_max (``ggn``/``hessian``).
        products: curvature-operator products of every solve and the trace.
        converged: every eigen-solve reached its tolerance.
        warm: the main solve started from the previous point's vector.
        notes: what was assumed, compared or undefined, in words.
        vectors: the unit Ritz vectors (``lambda_max``, ``preconditioned``, ``bottom``, ``ggn``/``hessian`` and
            ``group:<name>``): the warm starts of the next point. ``run_track`` and the monitor empty them once
            the next point is measured, so that a long run holds one set of these D-sized vectors.
    """

    loss: float
    gradient_norm: float
    curvature: str
    lambda_max: float | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    threshold: float | None = None
    compared_sharpness: float | None = None
    preconditioned_lambda_max: float | None = None
    sharpness_ratio: float | None = None
    groups: dict[str, float] = field(default_factory=dict)
    trace: float | None = None
    trace_stderr: float | None = None
    lambda_min: float | None = None
    ggn_lambda_max: float | None = None
    hessian_lambda_max: float | None = None
    products: int = 0
    converged: bool = True
    warm: bool = False
    notes: list[str] = field(default_factory=list)
    vectors: dict[str, Tensor] = field(default_factory=dict)

    def __repr__(self) -> str:
        def g(x: float | None) -> str:
            return "None" if x is None else f"{x:.6g}"

        return (f"PointResult(loss={g(self.loss)}, lambda_max={g(self.lambda_max)}, threshold={g(self.threshold)}, "
                f"sharpness_ratio={g(self.sharpness_ratio)}, products={self.products})")


def _finite(x: float) -> bool:
    return x is not None and math.isfinite(x)


def _start(vectors: Mapping[str, Tensor] | None, key: str, groups: bool = False) -> SharpnessResult | Tensor | None:
    if not vectors or key not in vectors:
        return None
    if not groups:
        return vectors[key]
    blocks = [_Block(name[len("group:"):], vectors[name]) for name in vectors if name.startswith("group:")]
    return SharpnessResult(lambda_max=0.0, vector=vectors[key], residual=0.0, products=0, steps=0, converged=True,
                           warm=False, curvature="", groups=blocks)


@dataclass
class _Block:  # a previous block vector, by name (what sharpness() reads from a previous result's groups)
    name: str
    vector: Tensor


def measure_point(problem, optimizer: OptimizerInfo | None, optimizer_state: Mapping[str, Any] | None = None, *,
                  curvature: str = "hessian", groups: str | Sequence[Any] | None = None,
                  measures: Sequence[str] = (), tol: float = DEFAULT_TOL, max_steps: int | None = None,
                  trace_samples: int = DEFAULT_TRACE_SAMPLES, seed: int = 0,
                  start: Mapping[str, Tensor] | None = None, progress: Progress | None = None) -> PointResult:
    """Loss, gradient norm, sharpness, threshold and ratio at ``problem``'s parameters.

    Args:
        problem: the :class:`~curvscope.problem.Problem` at the point's parameters.
        optimizer: the optimizer (from its state dict, :func:`~curvscope.curvature.edge.optimizer_info`, or built
            by hand), or ``None`` (no threshold).
        optimizer_state: its state dict (Adam's P needs ``exp_avg_sq`` and ``step``), or ``None``.
        curvature: ``"hessian"`` or ``"ggn"``: the matrix of ``lambda_max``.
        groups: ``None``/``"all"``, ``"layer"`` or ``"tensor"``: also each group's block sharpness.
        measures: any of :data:`MEASURES`.
        tol: relative residual tolerance of every eigen-solve.
        max_steps: cap on Lanczos steps per solve.
        trace_samples: Hutch++ budget (products) of the trace.
        seed: seeds every random vector.
        start: the previous point's :attr:`PointResult.vectors` (warm starts), or ``None``.
        progress: ``progress(stage, done, total)`` of stages ``"lanczos"`` and ``"trace"``.

    Raises:
        CurvscopeError: an unknown measure or curvature.
    """
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise CurvscopeError(f"unknown measure '{unknown[0]}': choose from {', '.join(MEASURES)}")
    if curvature not in ("hessian", "ggn"):
        raise CurvscopeError(f"unknown curvature '{curvature}': choose hessian or ggn")
    if curvature == "hessian":  # the loss and gradient of the Hessian's own gradient graph: one pass fewer
        hessian, loss, gradient_norm = hessian_with_gradient(problem)
    else:
        hessian, (loss, gradient_norm) = None, _loss_and_gradient(problem)
    point = PointResult(loss=loss, gradient_norm=gradient_norm, curvature=curvature)
    _describe_optimizer(point, optimizer)
    if not (_finite(loss) and _finite(gradient_norm)):
        point.notes.append("the loss or its gradient is not finite at these parameters: no curvature measured")
        return point
    solve = {"tol": tol, "seed": seed, "max_steps": max_steps, "progress": progress}
    main = sharpness(problem, curvature, start=_start(start, "lambda_max", groups=True), groups=groups,
                     operator=hessian, **solve)
    _record(point, main, "lambda_max")
    point.lambda_max = main.lambda_max
    point.warm = main.warm
    point.groups = {g.name: g.lambda_max for g in main.groups}
    for g in main.groups:
        point.vectors[f"group:{g.name}"] = g.vector
    _compare(point, problem, optimizer, optimizer_state, curvature, start, {**solve, "operator": hessian})
    if "bottom" in measures:
        if curvature == "hessian":
            bottom = sharpness(problem, "hessian", start=_start(start, "bottom"), wrap=Negated, operator=hessian,
                               **solve)
            _record(point, bottom, "bottom")
            point.lambda_min = -bottom.lambda_max
        else:
            point.notes.append("bottom: the GGN is positive semi-definite (its smallest eigenvalue is >= 0); the "
                               "Hessian's is measured with curvature hessian")
    other = {"ggn": "ggn", "hessian": "hessian"}
    for name, kind in other.items():
        if name in measures and kind != curvature:
            result = sharpness(problem, kind, start=_start(start, name), **solve)
            _record(point, result, name)
            setattr(point, f"{kind}_lambda_max", result.lambda_max)
    if "trace" in measures:
        op = hessian if hessian is not None else curvature_operator(problem, None, curvature)
        estimate = hutchpp(op.matvec, op.dim, trace_samples, dtype=problem.dtype, device=problem.device,
                           generator=torch.Generator().manual_seed(int(seed) * 1_000_003 + 2), progress=progress)
        point.trace, point.trace_stderr = estimate.trace, estimate.stderr
        point.products += estimate.matvecs
    if not point.converged:
        point.notes.append(f"an eigen-solve did not reach the tolerance {tol:g} within its step cap")
    return point


def _loss_and_gradient(problem) -> tuple[float, float]:
    with torch.enable_grad():
        leaves = {n: p.detach().requires_grad_(True) for n, p in problem.params.items()}
        loss = problem.loss_value(leaves)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    squares = sum(float(g.detach().double().pow(2).sum()) for g in grads if g is not None)
    return float(loss.detach()), math.sqrt(squares) if math.isfinite(squares) else float("nan")


def _record(point: PointResult, result: SharpnessResult, key: str) -> None:
    point.products += result.products
    point.converged = point.converged and result.converged
    point.vectors[key] = result.vector


def _describe_optimizer(point: PointResult, optimizer: OptimizerInfo | None) -> None:
    if optimizer is None:
        point.notes.append("no optimizer state and no learning rate given: no threshold")
        return
    point.optimizer, point.lr = optimizer.kind, optimizer.lr
    point.momentum = optimizer.momentum if optimizer.kind == "sgd" else None
    point.notes.extend(optimizer.notes)
    point.threshold, note = threshold(optimizer)
    point.notes.append(f"threshold: {note}")


def _compare(point: PointResult, problem, optimizer: OptimizerInfo | None, state: Mapping[str, Any] | None,
             curvature: str, start: Mapping[str, Tensor] | None, solve: dict[str, Any]) -> None:
    """The compared sharpness (plain or preconditioned) and the ratio."""
    if optimizer is None or optimizer.kind is None:
        return
    preconditioned = None
    if needs_preconditioner(optimizer):
        shapes = {n: p.shape for n, p in problem.params.items()}
        try:
            wrap = _compared_wrap(state, optimizer, shapes)
            result = sharpness(problem, curvature, start=_start(start, "preconditioned"), wrap=wrap, **solve)
        except NoPreconditioner as exc:
            point.notes.append(f"preconditioned sharpness: {exc}")
        else:
            _record(point, result, "preconditioned")
            preconditioned = result.lambda_max
            point.preconditioned_lambda_max = preconditioned
    value, note = compared_sharpness(preconditioned if preconditioned is not None else point.lambda_max, optimizer,
                                     preconditioned=preconditioned is not None)
    point.compared_sharpness = value
    point.notes.append(f"compared: {note}")
    point.sharpness_ratio = sharpness_ratio(value, point.threshold)


def _compared_wrap(state: Mapping[str, Any] | None, optimizer: OptimizerInfo, shapes: Mapping[str, torch.Size]):
    def wrap(op):
        compared = compared_operator(op, state, optimizer, shapes, dtype=op.dtype, device=op.device)
        if compared is None:
            raise CurvscopeError("internal: the compared operator is the plain one")
        return compared

    if optimizer.kind in ("adam", "adamw") and state is None:
        raise NoPreconditioner("needs Adam's optimizer state (exp_avg_sq, step), which this point does not have")
    return wrap
