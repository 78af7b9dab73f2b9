"""Damped Newton steps along the GGN's eigen-directions (``docs/conventions.md`` §5, ViViT section 4.2).

In the eigenbasis of the GGN the damped Newton step splits into one-dimensional problems::

    delta_theta = sum_k s_k e_k,   s_k = -gamma_k / (lambda_k + delta_k)

over the top-k nonzero directions of each parameter group (the flat directions get no step). The step is formed
with one multiplication by V: ``V (sum_k s_k ~e_k / sqrt(lambda_k))`` (:func:`~curvscope.curvature.gram.rows.apply_v`).
With several groups (a block-diagonal GGN) the step is the sum of the per-group steps.

Damping is either one constant ``delta`` for every direction, or ``"bootstrap"``: a per-direction ``delta_k``
chosen from a log grid by the 5th percentile of the bootstrapped predicted loss reduction (:func:`bootstrap_damping`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from curvscope.curvature.gram.layout import make_layout
from curvscope.curvature.gram.rows import apply_v
from curvscope.errors import CurvscopeError, OptionError
from curvscope.progress import Progress, stage
from curvscope.reprs import compact_repr

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

BOOTSTRAP = "bootstrap"
DEFAULT_RESAMPLES = 200
DEFAULT_PERCENTILE = 5.0
GRID_DECADES = (-8.0, 2.0)
GRID_PER_DECADE = 5


@dataclass
class NewtonStep:
    """A damped Newton step and how well the quadratic model predicted its effect.

    Attributes:
        step: parameter-shaped tensors by name (zeros for parameters outside every block).
        damping: the constant ``delta``, or ``"bootstrap"``.
        blocks: names of the groups whose steps were summed; block_indices: their indices in ``result.groups``.
        deltas: per block, ``(K,)`` damping of each direction (``inf`` where bootstrap skipped the direction).
        coefficients: per block, ``(K,)`` step lengths ``s_k`` along ``e_k``.
        predicted_decrease: ``-(g^T d + 1/2 d^T G d)`` with the GGN ``G`` of the curvature columns (the quadratic
            model's decrease for the step actually taken).
        predicted_decrease_blocks: ``-sum_k (s_k gamma_k + 1/2 s_k^2 lambda_k)`` summed over the blocks: the
            block-diagonal model the step minimizes (equal to ``predicted_decrease`` for one group).
        realized_decrease: ``L(theta) - L(theta + d)``, re-evaluated on the batch.
        scale: when the summed step of several blocks raises the loss (the per-block steps interact: each
            minimizes its block's quadratic model, the cross-block curvature is ignored), the factor t that makes
            ``t d`` lower it: the whole-model quadratic model's optimum along d, ``-g^T d / d^T G d`` (at most 1),
            halved until the batch loss decreases; ``None`` when not needed (or no factor found).
        scaled_predicted_decrease, scaled_realized_decrease: the two decreases of ``t d``.
    """

    __repr__ = compact_repr

    step: dict[str, Tensor]
    damping: float | str
    blocks: list[str]
    block_indices: list[int]
    deltas: list[Tensor]
    coefficients: list[Tensor]
    predicted_decrease: float
    predicted_decrease_blocks: float
    realized_decrease: float
    loss_before: float
    loss_after: float
    step_norm: float
    scale: float | None = None
    scaled_predicted_decrease: float | None = None
    scaled_realized_decrease: float | None = None

    @property
    def num_directions(self) -> int:
        """The number of directions summed over the blocks (skipped ones included)."""
        return sum(int(c.numel()) for c in self.coefficients)

    @property
    def num_skipped(self) -> int:
        """The number of directions bootstrap skipped (infinite damping: no step along them)."""
        return sum(int(torch.isinf(d).sum()) for d in self.deltas)


def parse_damping(value: float | str | None) -> float | str:
    """``"bootstrap"`` or a constant ``delta >= 0`` (from a number or its text); raises OptionError otherwise."""
    if value is None:
        return BOOTSTRAP
    if isinstance(value, str):
        text = value.strip().lower()
        if text == BOOTSTRAP:
            return BOOTSTRAP
        try:
            value = float(text)
        except ValueError:
            raise OptionError("damping", f"'{value}': expected a number >= 0 or 'bootstrap'") from None
    try:
        value = float(value)
    except (OverflowError, TypeError, ValueError):
        raise OptionError("damping", f"'{str(value)[:40]}': expected a number >= 0 or 'bootstrap'") from None
    if not math.isfinite(value) or value < 0:
        raise OptionError("damping", f"{value}: expected a finite number >= 0 or 'bootstrap'")
    return value


def damping_grid(eigenvalues: Tensor) -> Tensor:
    """The candidate dampings for the bootstrap: ``lambda_max * 10^t`` for t from -8 to 2, 5 per decade (51)."""
    lam_max = float(eigenvalues.max()) if eigenvalues.numel() else 1.0
    lo, hi = GRID_DECADES
    t = torch.linspace(lo, hi, int((hi - lo) * GRID_PER_DECADE) + 1, dtype=torch.float64)
    return (lam_max if lam_max > 0 else 1.0) * 10.0**t


def bootstrap_indices(num: int, num_resamples: int, generator: torch.Generator) -> Tensor:
    """``(B, num)`` indices drawn with replacement: ``torch.randint(num, (B, num), generator=generator)``."""
    return torch.randint(num, (num_resamples, num), generator=generator)


def _resample_counts(num: int, num_resamples: int, generator: torch.Generator) -> Tensor:
    idx = bootstrap_indices(num, num_resamples, generator)
    counts = torch.zeros(num_resamples, num, dtype=torch.float64)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    return counts  # (B, num): how often each sample was drawn


def bootstrap_damping(gamma: Tensor, lambdas: Tensor, grid: Tensor | None = None,
                      num_resamples: int = DEFAULT_RESAMPLES, percentile: float = DEFAULT_PERCENTILE,
                      seed: int = 0) -> Tensor:
    """Noise-aware directional damping (ViViT section 4.2, ``docs/conventions.md`` §5).

    For each direction k and each candidate ``delta`` of ``grid`` the step is ``s = -gamma_k / (lambda_k + delta)``
    (means over all samples). The samples are resampled with replacement ``num_resamples`` times; on resample b
    the predicted reduction is ``R_b = -s mean_b(gamma_k) - 1/2 s^2 mean_b(lambda_k)``. The chosen ``delta_k``
    maximizes the ``percentile``-th percentile of ``R_b`` (linear interpolation, as ``numpy.percentile``);
    a direction where no candidate has a positive percentile gets ``delta_k = inf`` (no step).

    Resampling: a ``torch.Generator`` seeded with ``seed`` draws ``bootstrap_indices(N, B)`` for the rows of
    ``gamma``; when ``lambdas`` has as many rows (the same samples) the same indices resample the pairs
    ``(gamma_nk, lambda_nk)`` together, otherwise (curvature sub-sampling) a second draw
    ``bootstrap_indices(N_V, B)`` resamples the ``lambdas`` rows independently. The same draws serve every direction.

    Args:
        gamma: ``(N, K)`` per-sample directional derivatives.
        lambdas: ``(N_V, K)`` per-sample curvatures.
        grid: ``(J,)`` candidate dampings (default :func:`damping_grid` of the mean curvatures).
        num_resamples: B, the number of bootstrap resamples.
        percentile: the percentile of the resampled reductions that is maximized (0 to 100).
        seed: seeds the resampling.

    Returns:
        ``(K,)`` float64 dampings.
    """
    gamma, lambdas = gamma.detach().cpu().to(torch.float64), lambdas.detach().cpu().to(torch.float64)
    if gamma.dim() != 2 or lambdas.dim() != 2 or gamma.shape[1] != lambdas.shape[1]:
        raise ValueError(f"gamma {tuple(gamma.shape)} and lambdas {tuple(lambdas.shape)} must be (N, K), (N_V, K)")
    K = gamma.shape[1]
    if K == 0:
        return torch.zeros(0, dtype=torch.float64)
    gamma_mean, lambda_mean = gamma.mean(0), lambdas.mean(0)
    grid = damping_grid(lambda_mean) if grid is None else grid.detach().cpu().to(torch.float64)
    generator = torch.Generator().manual_seed(seed)
    counts_g = _resample_counts(gamma.shape[0], num_resamples, generator)
    counts_l = counts_g if lambdas.shape[0] == gamma.shape[0] else _resample_counts(lambdas.shape[0],
                                                                                      num_resamples, generator)
    gamma_b = counts_g @ gamma / gamma.shape[0]  # (B, K) resampled means
    lambda_b = counts_l @ lambdas / lambdas.shape[0]
    steps = -gamma_mean[:, None] / (lambda_mean[:, None] + grid[None, :])  # (K, J)
    q = percentile / 100.0
    deltas = torch.empty(K, dtype=torch.float64)
    chunk = max(1, 2**22 // max(1, grid.numel() * num_resamples))
    for i in range(0, K, chunk):
        s = steps[i:i + chunk, :, None]  # (k, J, 1)
        R = -s * gamma_b.T[i:i + chunk, None, :] - 0.5 * s**2 * lambda_b.T[i:i + chunk, None, :]  # (k, J, B)
        lower = torch.quantile(R, q, dim=-1)  # (k, J)
        best, arg = lower.max(dim=-1)
        deltas[i:i + chunk] = torch.where(best > 0, grid[arg], torch.full_like(best, math.inf))
    return deltas


def newton_coefficients(gamma_mean: Tensor, eigenvalues: Tensor, deltas: Tensor | float) -> Tensor:
    """``s_k = -gamma_k / (lambda_k + delta_k)`` (0 where ``delta_k`` is infinite)."""
    deltas = torch.as_tensor(deltas, dtype=torch.float64).expand_as(eigenvalues)
    s = -gamma_mean.to(torch.float64) / (eigenvalues.to(torch.float64) + deltas)
    return torch.where(torch.isinf(deltas), torch.zeros_like(s), s)


def default_blocks(result) -> list[int]:
    """The groups a step is built from: the whole model for ``grouping="all"``; otherwise the blocks (leaving out
    a whole-model ``groups[0]`` added by ``include_total``)."""
    groups = result.groups
    if result.grouping == "all" or len(groups) == 1:
        return [0]
    first = set(groups[0].param_names)
    rest = set().union(*(g.param_names for g in groups[1:]))
    return list(range(1, len(groups))) if first == rest else list(range(len(groups)))


def newton_step(problem, result, damping: float | str = BOOTSTRAP, blocks: Sequence[int] | None = None,
                num_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, grid: Tensor | None = None,
                process_group: ProcessGroup | None = None, progress: Progress | None = None) -> NewtonStep:
    """The damped Newton step along the top-k eigen-directions of ``result`` (a :class:`SpectrumResult` computed
    with directional quantities), summed over the (disjoint) ``blocks`` (indices into ``result.groups``; default
    :func:`default_blocks`), with its predicted and realized loss decrease.

    Args:
        problem: the :class:`~curvscope.problem.Problem` the spectrum was computed on.
        result: its :class:`SpectrumResult`, with directional quantities (and the columns it used).
        damping: a constant ``delta >= 0`` or ``"bootstrap"`` (:func:`bootstrap_damping`, seeded by ``seed``).
        blocks: indices into ``result.groups`` of disjoint groups (default :func:`default_blocks`).
        num_resamples: bootstrap resamples (with ``damping="bootstrap"``).
        seed: seeds the bootstrap.
        grid: bootstrap candidates (default: :func:`damping_grid` of each block's eigenvalues).
        process_group: collective over an initialized ``torch.distributed`` group, with the same problem and
            result on every rank (as ``compute_spectrum(..., process_group=)`` returns): the multiplications
            by V, the losses and the gradient are split over the ranks' samples; every rank gets the same step.
        progress: :class:`~curvscope.progress.Progress`; stage ``"newton"`` counts the blocks finished.
    """
    damping = parse_damping(damping)
    blocks = default_blocks(result) if blocks is None else list(blocks)
    seen: set[str] = set()
    for b in blocks:
        names = set(result.groups[b].param_names)
        if names & seen:
            raise ValueError("Newton step blocks must not share parameters")
        seen |= names
    step = {n: torch.zeros_like(p) for n, p in problem.params.items()}
    deltas, coefficients = [], []
    predicted_blocks = 0.0
    report = stage(progress, "newton")
    for done, b in enumerate(blocks):
        report(done, len(blocks))
        g = result.groups[b]
        if g.rank and g.directions is None:
            raise CurvscopeError("the Newton step needs the directional derivatives: compute the spectrum with "
                                 "directional=True")
        if g.top_k == 0:
            deltas.append(torch.zeros(0, dtype=torch.float64))
            coefficients.append(torch.zeros(0, dtype=torch.float64))
            continue
        d = g.directions
        evals = g.eigenvalues[:g.top_k].to(torch.float64)
        if damping == BOOTSTRAP:
            dk = bootstrap_damping(d.gamma, d.lambdas, grid=grid, num_resamples=num_resamples, seed=seed)
        else:
            dk = torch.full_like(evals, float(damping))
        dk = dk.to(evals.device)
        s = newton_coefficients(d.gamma_mean, evals, dk)
        predicted_blocks += float(-(s * d.gamma_mean.to(torch.float64) + 0.5 * s**2 * evals).sum())
        coeff = g.gram_eigenvectors @ (s / evals.sqrt())  # (num_columns,)
        part = apply_v(problem, result.columns, coeff, names=g.param_names, process_group=process_group)
        for n in g.param_names:
            step[n] = step[n] + part[n].to(step[n].dtype)
        deltas.append(dk.cpu())
        coefficients.append(s.cpu())

    moved = {n: p + step[n] for n, p in problem.params.items()}
    layout = make_layout(problem, process_group, check=False)
    loss_before, loss_after = layout.loss_value(problem), layout.loss_value(problem, moved)
    g_dot, curvature = quadratic_terms(problem, result.columns, step, process_group=process_group)
    result_step = NewtonStep(
        step=step, damping=damping, blocks=[result.groups[b].name for b in blocks], block_indices=blocks, deltas=deltas,
        coefficients=coefficients, predicted_decrease=-(g_dot + 0.5 * curvature),
        predicted_decrease_blocks=predicted_blocks, realized_decrease=loss_before - loss_after,
        loss_before=loss_before, loss_after=loss_after,
        step_norm=float(sum((t.to(torch.float64) ** 2).sum() for t in step.values()) ** 0.5))
    if len(blocks) > 1 and not result_step.realized_decrease > 0 and g_dot < 0 < curvature:
        _scale_down(problem, layout, result_step, g_dot, curvature)
    report(len(blocks), len(blocks))
    return result_step


MAX_HALVINGS = 30


def _scale_down(problem, layout, step: NewtonStep, g_dot: float, curvature: float) -> None:
    """The factor ``t`` of :attr:`NewtonStep.scale`: the whole-model quadratic optimum along the summed step
    (``-g^T d / d^T G d``, at most 1), halved until the batch loss decreases."""
    t = min(1.0, -g_dot / curvature)
    for _ in range(MAX_HALVINGS):
        moved = {n: p + t * step.step[n] for n, p in problem.params.items()}
        realized = step.loss_before - layout.loss_value(problem, moved)
        if realized > 0:
            step.scale, step.scaled_realized_decrease = t, realized
            step.scaled_predicted_decrease = -(t * g_dot + 0.5 * t * t * curvature)
            return
        t /= 2


def outputs_jvp(problem, inputs: Tensor, tangent: dict[str, Tensor]) -> Tensor:
    """``J d`` ``(n, C)``: the outputs' directional derivative along ``tangent`` on ``inputs``, by forward mode, or
    by two reverse passes where forward mode is not available for the model
    (:func:`curvscope.curvature.products.output_jvps`)."""
    from curvscope.curvature.products import output_jvps

    stacked = {n: tangent[n].unsqueeze(0) for n in problem.params}
    return output_jvps(problem, stacked, inputs)[0].detach()


def quadratic_decrease(problem, columns, step: dict[str, Tensor], process_group: ProcessGroup | None = None
                       ) -> float:
    """``-(g^T d + 1/2 d^T G d)``: the decrease the quadratic model with the GGN of ``columns`` predicts for ``d``.

    ``d^T G d = ||V^T d||^2`` with ``(V^T d)_nk = seeds[n, k] . (J_n d)``: one Jacobian-vector product.
    With a ``process_group`` (collective) the gradient and the products are split over the ranks' samples.
    """
    g_dot, curvature = quadratic_terms(problem, columns, step, process_group)
    return -(g_dot + 0.5 * curvature)


def quadratic_terms(problem, columns, step: dict[str, Tensor], process_group: ProcessGroup | None = None
                    ) -> tuple[float, float]:
    """``(g^T d, d^T G d)`` of :func:`quadratic_decrease`."""
    layout = make_layout(problem, process_group, check=False)
    grad = layout.gradient(problem)
    c0, c1 = layout.curvature_range(columns)
    samples = columns.samples[c0:c1]
    g_dot = float(sum((grad[n].to(torch.float64) * step[n].to(torch.float64)).sum() for n in problem.params))
    with layout.stage():
        vtd_sq = torch.zeros((), dtype=torch.float64, device=problem.device)
        if samples.numel():
            inputs = problem.inputs[samples]

            jd = outputs_jvp(problem, inputs, {n: step[n] for n in problem.params})  # (n, C)
            vtd = columns.project(c0, c1, jd)  # (n, K) in float64
            vtd_sq = (vtd**2).sum()
    vtd_sq = layout.all_reduce_sum({"s": vtd_sq.reshape(1)})["s"][0]
    return g_dot, float(vtd_sq)
