"""All the rates of one batch, each rate set checked by taking the step (``docs/conventions.md §6``).

:func:`analyse_batch` puts the pieces together: the direction ``u``, the reduced model (:mod:`.reduced`), the
stability bounds (:mod:`.stability`), the rates and the recommended rule (:mod:`.rules`, :mod:`.cubic`), the
loss check that halves the recommended rates until the batch loss decreases, and the truth test of every rate
set: predicted versus realized decrease, on the batch and on a holdout.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvscope.curvature.lr import rules
from curvscope.curvature.lr.cubic import cubic_model, cubic_rates
from curvscope.curvature.lr.reduced import reduced_gradient, reduced_hessian, step_params, third_order_diagonal
from curvscope.curvature.lr.results import BatchRates, StepCheck
from curvscope.curvature.lr.stability import joint_sharpness, stability_bounds
from curvscope.errors import CurvscopeError
from curvscope.problem import ParamGroup, Problem
from curvscope.progress import Progress, counter

PARTITIONS = ("layer", "tensor", "all")
"""The parameter groups, one rate each: one per module with parameters, one per tensor, or one in all."""
DIRECTIONS = ("gradient", "symo")
"""The step direction ``u``: the gradient (plain SGD) or the SymO direction of the factors engine."""
STAGE = "lr"
"""The progress stage of :func:`analyse_batch` (its units: the steps of one batch)."""


def resolve_direction(problem: Problem, direction: str, gradient: dict[str, Tensor]) -> dict[str, Tensor]:
    """The direction ``u`` by name.

    Args:
        problem: the model, batch and loss.
        direction: ``gradient`` (``u = g``) or ``symo`` (the SymO direction).
        gradient: ``g``, one tensor per parameter.

    Raises:
        CurvscopeError: an unknown direction, or ``symo`` without the factors engine.
    """
    if direction == "gradient":
        return {n: t.detach() for n, t in gradient.items()}
    if direction == "symo":
        try:
            from curvscope.curvature.symmetry import symo_direction
        except ImportError as exc:
            raise CurvscopeError("direction 'symo' needs the factors engine (curvscope.curvature.symmetry), "
                                 "which this installation does not have; choose gradient") from exc
        u = symo_direction(problem, eps=1e-8)
        return {n: u[n].detach().to(problem.params[n]) if n in u else torch.zeros_like(p)
                for n, p in problem.params.items()}
    raise CurvscopeError(f"direction '{direction}': choose one of {', '.join(DIRECTIONS)}")


def _loss(problem: Problem, params: dict[str, Tensor]) -> float:
    with torch.no_grad():
        return float(problem.loss_value(params))


def _correlation(h_bar: Tensor) -> Tensor:
    """``H_bar_st / sqrt(|H_bar_ss H_bar_tt|)`` ``(S, S)``, ``nan`` where a diagonal entry is 0."""
    diag = torch.diagonal(h_bar)
    norm = torch.sqrt(diag.abs().outer(diag.abs()))
    return torch.where(norm > 0, h_bar / torch.where(norm > 0, norm, 1.0), torch.full_like(h_bar, math.nan))


def _joint_newton(g_hat: Tensor, h_bar: Tensor, diag_notes: list[str], ridge: float, dtype: torch.dtype
                  ) -> tuple[Tensor | None, Tensor, str]:
    """Joint Newton rates over the moving groups (a zero ``u_s`` would make ``H_bar`` singular for nothing).

    Returns the raw vector (or None), its positive part (``nan`` elsewhere) and a note.
    """
    S = g_hat.shape[0]
    active = [s for s in range(S) if not diag_notes[s].startswith("zero gradient")]
    lr_newton = torch.full((S,), math.nan, dtype=torch.float64)
    if not active:
        return None, lr_newton, "no group moves"
    idx = torch.tensor(active)
    sub, note = rules.newton_rates(g_hat[idx], h_bar[idx][:, idx], ridge, dtype)
    if sub is None:
        return None, lr_newton, note
    newton_eta = torch.zeros(S, dtype=torch.float64)
    newton_eta[idx] = sub
    lr_newton = torch.where(newton_eta > 0, newton_eta, torch.full_like(newton_eta, math.nan))
    if bool((sub <= 0).any()):
        note = "some joint Newton rates are negative (interactions between groups)"
    return newton_eta, lr_newton, note


def analyse_batch(problem: Problem, groups: list[ParamGroup], partition: str = "layer",
                  curvature: str = "hessian", direction: str = "gradient", ridge: float = 0.0,
                  cubic: bool = False, cubic_weight: float = 1.0, stability: bool = True,
                  holdout: Problem | None = None, progress: Progress | None = None) -> BatchRates:
    """All rates of one batch, with every rate set checked by the realized loss change.

    Args:
        problem: the model, batch and loss.
        groups: the S parameter groups (``problem.groups(partition)``).
        partition: the name of the grouping (for the stability bounds' GGN blocks).
        curvature: ``hessian`` or ``ggn`` (see :func:`~curvscope.curvature.lr.reduced.reduced_hessian`).
        direction: ``gradient`` or ``symo`` (see :func:`resolve_direction`).
        ridge: added to ``H_bar``'s diagonal for the joint Newton rates (>= 0).
        cubic: also the order-3 diagonal and the cubic-regularized rates.
        cubic_weight: the weight of the cubic term (> 0).
        stability: compute the stability bounds (one GGN spectrum pass); without them the rule has no caps.
        holdout: other samples on which every step's realized decrease is measured too.
        progress: reports stage ``"lr"``: done of the batch's steps (H-bar, bounds, order 3, truth test).

    Returns:
        The batch's rates, notes and truth tests; all per-group tensors ``(S,)`` float64 on the CPU.
    """
    advance = counter(progress, STAGE, 2 + int(stability) + int(cubic))
    gradient = problem.gradient()
    u = resolve_direction(problem, direction, gradient)
    S = len(groups)
    loss_before = _loss(problem, problem.params)
    # The reduced quantities are tiny (S, S x S): every solve and rule runs on them in float64 on the CPU.
    g_hat = reduced_gradient(gradient, u, groups).detach().to("cpu", torch.float64)
    h_bar = reduced_hessian(problem, u, groups, curvature).to("cpu", torch.float64)
    advance()
    evals = torch.linalg.eigvalsh(h_bar)
    pd = bool(float(evals[0]) > rules.pd_tolerance(h_bar, problem.precision))

    if stability:
        lam, lr_stab, lam_global, lr_stab_global = stability_bounds(problem, partition, groups)
        advance()
    else:
        lam = torch.full((S,), math.nan, dtype=torch.float64)
        lr_stab, lr_stab_global, lam_global = lam.clone(), math.nan, math.nan

    lr_diag, diag_notes = rules.diagonal_rates(g_hat, h_bar)
    if stability and lam_global > 0:
        # A numerically zero GGN block means J_P = 0, hence g_P = 0 in exact arithmetic: whatever g-hat_s and
        # H-bar_ss hold is rounding noise, and a rate made from it would be absurd.
        for s in range(S):
            if not math.isfinite(float(lr_stab[s])) and diag_notes[s] != "zero gradient":
                diag_notes[s] = "zero gradient (GGN block numerically zero)"
                lr_diag[s] = math.nan
    newton_eta, lr_newton, note = _joint_newton(g_hat, h_bar, diag_notes, ridge, problem.precision)

    # The bounds are plain-GD learning rates: they cap (and back up) rates along the gradient only.
    along_gradient = direction == "gradient"
    caps = lr_stab if along_gradient else torch.full_like(lr_stab, math.nan)
    recommended, rule_names = rules.recommend_rates(g_hat, h_bar, lr_newton, lr_diag, diag_notes, caps,
                                                    lr_stab_global if along_gradient else math.nan)

    sharpness = math.nan
    if stability and along_gradient and lam_global > 0:
        # per-group rates are stable while lambda_max(R^1/2 G R^1/2) < 2: scale them all down to that bound
        sharpness = joint_sharpness(problem, groups, recommended)
        if sharpness > 2.0:
            factor = 2.0 / sharpness
            recommended = recommended * factor
            rule_names = [f"{r}, joint stability x{factor:.3g}" for r in rule_names]
            sharpness = 2.0

    def decreases(rates: Tensor) -> bool:  # False for NaN too
        return _loss(problem, step_params(problem.params, u, groups, rates)) < loss_before

    halvings = 0
    if any(bool((u[n] != 0).any()) for n in u):
        while not decreases(recommended) and halvings < rules.MAX_HALVINGS:
            recommended = recommended / 2
            halvings += 1
        if halvings:
            suffix = f"halved x{halvings} (loss check)"
            if not decreases(recommended):
                suffix += ", no decrease found"
            rule_names = [f"{r}, {suffix}" for r in rule_names]
            sharpness /= 2 ** halvings

    result = BatchRates(
        batch_indices=problem.info.get("batch_indices"), loss_before=loss_before, g_hat=g_hat, h_bar=h_bar,
        h_bar_eigenvalues=evals, h_bar_positive_definite=pd, h_bar_correlation=_correlation(h_bar),
        newton_eta=newton_eta, newton_note=note, lr_newton=lr_newton, lr_diag=lr_diag, diag_notes=diag_notes,
        lambda_max=lam, lr_stability=lr_stab, lambda_max_global=lam_global, lr_stability_global=lr_stab_global,
        recommended=recommended, rules=rule_names, halvings=halvings, joint_sharpness=sharpness)

    sets: dict[str, Tensor] = {"diag": lr_diag, "stability": lr_stab, "recommended": recommended}
    if not along_gradient:
        del sets["stability"]
    if newton_eta is not None:
        sets = {"newton": newton_eta, **sets}
    if cubic:
        result.d3 = third_order_diagonal(problem, u, groups).to("cpu", torch.float64)
        result.cubic_eta, result.cubic_note = cubic_rates(g_hat, h_bar, result.d3, cubic_weight)
        if result.cubic_eta is not None:
            eta = result.cubic_eta
            result.lr_cubic = torch.where(eta > 0, eta, torch.full_like(eta, math.nan))
            sets["cubic"] = eta
        advance()
    holdout_before = _loss(holdout, holdout.params) if holdout is not None else None
    for name, rates in sets.items():
        if not bool(torch.isfinite(rates).any()):
            continue
        after = step_params(problem.params, u, groups, rates)
        check = StepCheck(rates=rates, predicted=rules.predicted_decrease(rates, g_hat, h_bar),
                          realized=loss_before - _loss(problem, after))
        if holdout is not None:
            check.realized_holdout = holdout_before - _loss(holdout, after)
        if cubic and result.d3 is not None:
            check.predicted_cubic = -cubic_model(torch.nan_to_num(rates, nan=0.0), g_hat, h_bar, result.d3,
                                                 cubic_weight)
        result.steps[name] = check
    advance()
    return result
