"""Rates from the reduced model ``(g_hat, H_bar)`` and the rule that recommends one (``docs/conventions.md §6``).

Joint Newton rates ``(H_bar + ridge I)^{-1} g_hat``, diagonal rates ``g_hat_s / H_bar_ss``, the decrease the
quadratic model predicts, and :func:`recommend_rates`: one positive finite rate per group. All on the tiny
reduced quantities, in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FALLBACK_LR = 1e-2
"""The rate of last resort, used only when a group has no usable curvature *and* no stability bound exists
(the whole GGN is zero, or stability bounds were not computed)."""
ASCENT_FACTOR = 1e-3
"""A group whose direction is not a descent direction (g_hat_s < 0) gets this fraction of its fallback."""
MAX_HALVINGS = 30
"""How often the loss check may halve the recommended rates."""
RECOMMENDED_RULE = (
    "joint Newton rates when those of all moving groups are positive; else the diagonal rates "
    "g-hat_s/H-bar_ss, all scaled by the best common factor t<=1 of the quadratic model; a group with neither "
    "(zero gradient or numerically zero GGN block, H-bar_ss<=0, g-hat_s<0) falls back to its block stability "
    "bound, else the whole-model bound, else 0.01; every rate is capped at its block bound 2/lambda_max(G_PP), "
    "then all are scaled down together until lambda_max(R^1/2 G R^1/2) <= 2 (the stability bound of per-group "
    "rates R; bounds only along the gradient); finally all are halved until the batch loss decreases.")
"""The rule of :func:`recommend_rates` and of the loss check of
:func:`~curvscope.curvature.lr.batch.analyse_batch` in one sentence (for reports)."""


def pd_tolerance(matrix: Tensor, dtype: torch.dtype) -> float:
    """Eigenvalues at or below this count as zero: ``S * eps(dtype) * max |eigenvalue|``.

    Args:
        matrix: a symmetric ``(S, S)`` matrix.
        dtype: the dtype it was computed in (its rounding sets the tolerance).
    """
    evals = torch.linalg.eigvalsh(matrix)
    return matrix.shape[0] * torch.finfo(dtype).eps * float(evals.abs().max()) if evals.numel() else 0.0


def newton_rates(g_hat: Tensor, h_bar: Tensor, ridge: float = 0.0, dtype: torch.dtype = torch.float64
                 ) -> tuple[Tensor | None, str]:
    """Joint rates ``eta = (H_bar + ridge I)^{-1} g_hat`` ``(S,)`` (float64); components may be negative.

    Args:
        g_hat: the reduced gradient ``(S,)``.
        h_bar: the reduced curvature ``(S, S)``.
        ridge: added to the diagonal (>= 0).
        dtype: the dtype ``H_bar`` was computed in: eigenvalues at or below ``S eps(dtype) max|lambda|`` count
            as zero.

    Returns:
        The rates and ``"ok"``, or ``None`` with the reason when ``H_bar + ridge I`` is not positive definite.
    """
    A = h_bar.to(torch.float64) + ridge * torch.eye(h_bar.shape[0], dtype=torch.float64)
    evals = torch.linalg.eigvalsh(A)
    if not bool(torch.isfinite(evals).all()):
        return None, "H-bar is not finite"
    tol = pd_tolerance(A, dtype)
    if float(evals[0]) <= tol:
        what = "singular" if float(evals[0]) >= -tol else "not positive definite"
        return None, f"H-bar{' + ridge' if ridge else ''} is {what} (smallest eigenvalue {float(evals[0]):.3g})"
    eta = torch.linalg.solve(A, g_hat.to(torch.float64))
    return eta, "ok"


def diagonal_rates(g_hat: Tensor, h_bar: Tensor) -> tuple[Tensor, list[str]]:
    """Per-group rates ``g_hat_s / H_bar_ss`` ``(S,)`` (float64) with a note per group.

    ``nan`` (and the reason in the note) where there is no positive finite rate: zero gradient, ``g_hat_s < 0``
    (not a descent direction) or ``H_bar_ss <= 0``.
    """
    g = g_hat.to(torch.float64)
    d = torch.diagonal(h_bar).to(torch.float64)
    rates = torch.full_like(g, math.nan)
    notes = []
    for s in range(g.shape[0]):
        gs, hs = float(g[s]), float(d[s])
        if gs == 0.0:
            notes.append("zero gradient")
        elif gs < 0:
            notes.append("g-hat < 0: not a descent direction")
        elif not hs > 0:
            notes.append(f"H-bar_ss = {hs:.3g} <= 0: no finite Newton rate")
        elif not math.isfinite(gs / hs):
            notes.append("g-hat / H-bar_ss overflows")
        else:
            rates[s] = gs / hs
            notes.append("ok")
    return rates, notes


def predicted_decrease(eta: Tensor, g_hat: Tensor, h_bar: Tensor) -> float:
    """Decrease predicted by the quadratic model: ``eta^T g_hat - 1/2 eta^T H_bar eta`` (``nan`` -> 0)."""
    e = torch.nan_to_num(eta.to(torch.float64), nan=0.0)
    return float(e @ g_hat.to(torch.float64) - 0.5 * e @ h_bar.to(torch.float64) @ e)


def recommend_rates(g_hat: Tensor, h_bar: Tensor, lr_newton: Tensor, lr_diag: Tensor, diag_notes: list[str],
                    lr_stability: Tensor, lr_stability_global: float) -> tuple[Tensor, list[str]]:
    """The recommended rate per group ``(S,)`` and the rule that produced it. Always positive and finite.

    1. The joint Newton rates when they exist for every group with a nonzero direction and are all
       positive ("newton").
    2. Otherwise each group's diagonal rate ``g_hat_s / H_bar_ss`` ("diag"). Diagonal rates ignore the
       interactions between groups, so the groups that have one are scaled together by
       ``t = min(1, eta^T g_hat / eta^T H_bar eta)``, the best common factor under the quadratic model
       ("diag xt (joint model)"; skipped when ``eta^T H_bar eta <= 0``).
    3. A group with neither (zero gradient or a numerically zero GGN block, ``H_bar_ss <= 0``,
       ``g_hat_s < 0``) falls back to its block stability bound ``2/lambda_max(G_PP)``, else the whole-model
       bound ``2/lambda_max(G)``, else ``FALLBACK_LR`` ("...: fallback to ..."); with ``g_hat_s < 0`` only
       ``ASCENT_FACTOR`` of it.
    4. A rate above its block stability bound ``2/lambda_max(G_PP)`` is lowered to it ("stability-capped").

    The stability bounds are plain gradient-descent rates: pass ``nan`` for them when the direction is not the
    gradient (no caps; fallback ``FALLBACK_LR``).

    (:func:`~curvscope.curvature.lr.batch.analyse_batch` then halves all rates until the realized batch loss
    decreases.)
    """
    S = g_hat.shape[0]
    g, H = g_hat.to(torch.float64), h_bar.to(torch.float64)
    rates = torch.empty(S, dtype=torch.float64)
    rules: list[str] = []
    active = [s for s in range(S) if not diag_notes[s].startswith("zero gradient")]
    use_newton = bool(active) and all(math.isfinite(float(lr_newton[s])) and float(lr_newton[s]) > 0
                                      for s in active)
    has_diag = [s for s in active if math.isfinite(float(lr_diag[s])) and float(lr_diag[s]) > 0]
    scale = 1.0
    if not use_newton and has_diag:
        eta = torch.zeros(S, dtype=torch.float64)
        eta[has_diag] = lr_diag[has_diag].to(torch.float64)
        curv = float(eta @ H @ eta)
        if curv > 0:
            scale = min(1.0, float(eta @ g) / curv)
    for s in range(S):
        bound = float(lr_stability[s])
        if use_newton and s in active:
            value, rule = float(lr_newton[s]), "newton"
        elif s in has_diag:
            value, rule = float(lr_diag[s]), "diag"
            if scale < 1.0:
                value, rule = value * scale, f"diag x{scale:.3g} (joint model)"
        else:
            if math.isfinite(bound) and bound > 0:
                value, source = bound, "block stability bound"
            elif math.isfinite(lr_stability_global) and lr_stability_global > 0:
                value, source = lr_stability_global, "global stability bound"
            else:
                value, source = FALLBACK_LR, f"{FALLBACK_LR:g}"
            note = diag_notes[s]
            if note.startswith("zero gradient"):
                rule = f"{note}: fallback to {source}"
            elif note.startswith("g-hat < 0"):
                value *= ASCENT_FACTOR
                rule = f"not a descent direction: {ASCENT_FACTOR:g} x {source}"
            else:
                rule = f"no curvature ({note.split(':')[0]}): fallback to {source}"
        if math.isfinite(bound) and bound > 0 and value > bound:
            value, rule = bound, f"{rule}, stability-capped"
        rates[s] = value
        rules.append(rule)
    return rates, rules
