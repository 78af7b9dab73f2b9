"""Per-group learning rates from the reduced Hessian (Wolinski; ``CURVATURE.md`` section 6).

Partition the parameters into S groups and pick a direction ``u`` (default the gradient ``g``). The step
``theta(eta) = theta - sum_s eta_s u_s`` (``u_s``: ``u`` restricted to group s) has the second-order model

    L(theta(eta)) ~ L(theta) - eta^T g_hat + 1/2 eta^T H_bar eta,
    g_hat_s = g_s^T u_s,   H_bar_st = u_s^T H u_t   (S x S),

where ``H`` is the Hessian (S batched Hessian-vector products) or the GGN (S batched Jacobian-vector
products). From it: joint Newton rates ``(H_bar + ridge I)^{-1} g_hat``, diagonal rates
``g_hat_s / H_bar_ss``, the stability bounds ``2 / lambda_max`` of each group's GGN block and of the whole
GGN, a ``recommended`` rate per group (rule: :func:`recommend_rates`) and, optionally, the cubic-regularized
rates of the paper (:func:`cubic_rates`). Every rate set is checked by taking the step and re-evaluating the
loss: predicted versus realized decrease.

Python use::

    from curvscope.curvature.lr import suggest_lr
    result = suggest_lr(problem, partition="layer", curvature="hessian")
    result.main.recommended, result.main.rules
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap

from curvscope.errors import CurvscopeError
from curvscope.io.data import select_batch
from curvscope.problem import ParamGroup, Problem

PARTITIONS = ("layer", "tensor", "all")
CURVATURES = ("hessian", "ggn")
DIRECTIONS = ("gradient", "symo")
FALLBACK_LR = 1e-2
"""The rate of last resort, used only when a group has no usable curvature *and* no stability bound exists
(the whole GGN is zero, or stability bounds were not computed)."""
ASCENT_FACTOR = 1e-3
"""A group whose direction is not a descent direction (g_hat_s < 0) gets this fraction of its fallback."""
MAX_HALVINGS = 30
RECOMMENDED_RULE = (
    "joint Newton rates when those of all moving groups are positive; else the diagonal rates "
    "g-hat_s/H-bar_ss, all scaled by the best common factor t<=1 of the quadratic model; a group with neither "
    "(zero gradient or numerically zero GGN block, H-bar_ss<=0, g-hat_s<0) falls back to its block stability "
    "bound, else the whole-model bound, else 0.01; every rate is capped at its block bound 2/lambda_max(G_PP) "
    "(bounds only along the gradient); finally all are halved until the batch loss decreases.")
"""The rule of :func:`recommend_rates` and :func:`analyse_batch` in one sentence (for reports)."""

Progress = Callable[[str], None]


def _choice(flag: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CurvscopeError(f"{flag} '{value}': choose one of {', '.join(choices)}")


def _number(flag: str, value: object, low: float, strict: bool = False, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value < low or \
            (strict and value == low):
        what = "an integer" if integer else "a finite number"
        raise CurvscopeError(f"{flag} must be {what} {'>' if strict else '>='} {low:g}, got {value!r}")


# -- the reduced model --------------------------------------------------------------------------------------

def group_tangents(direction: dict[str, Tensor], groups: list[ParamGroup]) -> dict[str, Tensor]:
    """The S restrictions ``u_s`` stacked: for each parameter a tensor ``(S, *shape)`` whose row s is the
    parameter's part of ``u`` when it belongs to group s, zero otherwise."""
    out = {}
    for name, u in direction.items():
        rows = [u if name in group.param_names else torch.zeros_like(u) for group in groups]
        out[name] = torch.stack(rows)
    return out


def _batched(fn: Callable[[dict[str, Tensor]], object], tangents: dict[str, Tensor]):
    """``fn`` applied to each of the S stacked tangents at once (``vmap``), one by one when the model does
    something ``vmap`` does not support."""
    try:
        return vmap(fn)(tangents)
    except (RuntimeError, NotImplementedError):
        S = next(iter(tangents.values())).shape[0]
        results = [fn({n: t[s] for n, t in tangents.items()}) for s in range(S)]
        if isinstance(results[0], dict):
            return {n: torch.stack([r[n] for r in results]) for n in results[0]}
        return torch.stack(results)


def _pairwise(a: dict[str, Tensor], b: dict[str, Tensor]) -> Tensor:
    """``(S, T)`` matrix of inner products ``<a_s, b_t>`` summed over parameters (rows stacked first)."""
    return sum(x.reshape(x.shape[0], -1) @ b[n].reshape(b[n].shape[0], -1).T for n, x in a.items())


def reduced_gradient(gradient: dict[str, Tensor], direction: dict[str, Tensor],
                     groups: list[ParamGroup]) -> Tensor:
    """``g_hat`` ``(S,)``: ``g_hat_s = g_s^T u_s`` (minus the derivative of ``L(theta(eta))`` at ``eta = 0``)."""
    return torch.stack([sum((gradient[n] * direction[n]).sum() for n in group.param_names)
                        for group in groups])


def reduced_hessian(problem: Problem, direction: dict[str, Tensor], groups: list[ParamGroup],
                    curvature: str = "hessian") -> Tensor:
    """``H_bar`` ``(S, S)``: ``u_s^T H u_t`` with the Hessian (S batched Hessian-vector products) or
    ``(1/N) sum_n (J_n u_s)^T H_n (J_n u_t)`` with the GGN (S batched Jacobian-vector products).

    Symmetrized (``(A + A^T)/2``) against rounding.
    """
    U = group_tangents(direction, groups)
    if curvature == "hessian":
        gradient_fn = grad(problem.loss_value)

        def hvp(u: dict[str, Tensor]) -> dict[str, Tensor]:
            return jvp(gradient_fn, (problem.params,), (u,))[1]

        h_bar = _pairwise(U, _batched(hvp, U))
    elif curvature == "ggn":
        def jvp_outputs(u: dict[str, Tensor]) -> Tensor:
            return jvp(problem.forward, (problem.params,), (u,))[1]

        JU = _batched(jvp_outputs, U)  # (S, N, C)
        with torch.no_grad():
            outputs = problem.forward()
        H = problem.loss.hessian(outputs, problem.targets)  # (N, C, C)
        h_bar = torch.einsum("snc,ncd,tnd->st", JU, H, JU) / problem.batch_size
    else:
        _choice("--curvature", curvature, CURVATURES)
    return ((h_bar + h_bar.T) / 2).detach()


def third_order_diagonal(problem: Problem, direction: dict[str, Tensor], groups: list[ParamGroup]) -> Tensor:
    """``d3`` ``(S,)``: ``d^3 L(theta(eta)) / d eta_s^3`` at ``eta = 0``, i.e. ``-D^3 L[u_s, u_s, u_s]``
    (three nested forward-mode derivatives along ``u_s``, batched over s)."""
    U = group_tangents(direction, groups)

    def third(u: dict[str, Tensor]) -> Tensor:
        def d1(p: dict[str, Tensor]) -> Tensor:
            return jvp(problem.loss_value, (p,), (u,))[1]

        def d2(p: dict[str, Tensor]) -> Tensor:
            return jvp(d1, (p,), (u,))[1]

        return -jvp(d2, (problem.params,), (u,))[1]

    return _batched(third, U).detach()


def step_params(params: dict[str, Tensor], direction: dict[str, Tensor], groups: list[ParamGroup],
                eta: Tensor) -> dict[str, Tensor]:
    """``theta(eta) = theta - sum_s eta_s u_s`` (``eta`` ``(S,)``; ``nan`` entries count as 0)."""
    eta = torch.nan_to_num(eta.to(torch.float64), nan=0.0).tolist()
    out = dict(params)
    for s, group in enumerate(groups):
        for name in group.param_names:
            out[name] = params[name] - eta[s] * direction[name]
    return out


# -- rates from the reduced model ---------------------------------------------------------------------------

def _pd_tolerance(matrix: Tensor, dtype: torch.dtype) -> float:
    """Eigenvalues at or below this count as zero: ``S * eps(dtype) * max |eigenvalue|``."""
    evals = torch.linalg.eigvalsh(matrix)
    return matrix.shape[0] * torch.finfo(dtype).eps * float(evals.abs().max()) if evals.numel() else 0.0


def newton_rates(g_hat: Tensor, h_bar: Tensor, ridge: float = 0.0, dtype: torch.dtype = torch.float64
                 ) -> tuple[Tensor | None, str]:
    """Joint rates ``eta = (H_bar + ridge I)^{-1} g_hat`` ``(S,)`` (float64), or ``None`` with the reason when
    ``H_bar + ridge I`` is not positive definite (its eigenvalues at or below ``S eps(dtype) max|lambda|``
    count as zero; ``dtype``: the one ``H_bar`` was computed in). Components may be negative."""
    A = h_bar.to(torch.float64) + ridge * torch.eye(h_bar.shape[0], dtype=torch.float64)
    evals = torch.linalg.eigvalsh(A)
    if not bool(torch.isfinite(evals).all()):
        return None, "H-bar is not finite"
    tol = _pd_tolerance(A, dtype)
    if float(evals[0]) <= tol:
        what = "singular" if float(evals[0]) >= -tol else "not positive definite"
        return None, f"H-bar{' + ridge' if ridge else ''} is {what} (smallest eigenvalue {float(evals[0]):.3g})"
    eta = torch.linalg.solve(A, g_hat.to(torch.float64))
    return eta, "ok"


def diagonal_rates(g_hat: Tensor, h_bar: Tensor) -> tuple[Tensor, list[str]]:
    """Per-group rates ``g_hat_s / H_bar_ss`` ``(S,)`` (float64) with a note per group; ``nan`` where there is
    no positive finite rate: zero gradient, ``g_hat_s < 0`` (not a descent direction) or ``H_bar_ss <= 0``."""
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


def cubic_model(eta: Tensor, g_hat: Tensor, h_bar: Tensor, d3: Tensor, weight: float = 1.0) -> float:
    """``m3(eta) = -eta^T g_hat + 1/2 eta^T H_bar eta + (weight/6) sum_s |d3_s| |eta_s|^3`` (float64)."""
    e, g, H = eta.to(torch.float64), g_hat.to(torch.float64), h_bar.to(torch.float64)
    a = weight * d3.to(torch.float64).abs()
    return float(-e @ g + 0.5 * e @ H @ e + (a * e.abs() ** 3).sum() / 6)


def cubic_rates(g_hat: Tensor, h_bar: Tensor, d3: Tensor, weight: float = 1.0, max_iter: int = 500
                ) -> tuple[Tensor | None, str]:
    """Rates minimizing the anisotropically cubic-regularized model of the paper (order 3):

        m3(eta) = -eta^T g_hat + 1/2 eta^T H_bar eta + (weight/6) sum_s |d3_s| |eta_s|^3,

    ``d3`` from :func:`third_order_diagonal`. The term makes the model bounded below even where ``H_bar``
    is not positive definite, and it is invariant under rescaling one group's direction (``u_s -> c u_s``
    scales ``eta_s`` by ``1/c``, ``d3_s`` by ``c^3``). Minimized from ``eta = 0`` by a modified Newton method
    (Hessian shifted to positive definite, Armijo backtracking): a local minimizer. Returns ``(S,)`` float64,
    or ``None`` with the reason when the model is unbounded below (``H_bar`` not positive definite on the
    groups whose ``d3_s`` is 0).
    """
    g, H = g_hat.to(torch.float64), h_bar.to(torch.float64)
    a = weight * d3.to(torch.float64).abs()
    S = g.shape[0]
    flat = a == 0
    if bool(flat.any()):
        sub = H[flat][:, flat]
        if float(torch.linalg.eigvalsh(sub)[0]) <= 0 and float(g[flat].abs().max()) > 0:
            return None, "unbounded: H-bar is not positive definite where the third derivative vanishes"

    def value(e: Tensor) -> float:
        return cubic_model(e, g, H, d3, weight)

    eta = torch.zeros(S, dtype=torch.float64)
    scale = float(g.abs().max())
    if scale == 0:
        return eta, "zero gradient"
    eye = torch.eye(S, dtype=torch.float64)
    for _ in range(max_iter):
        gradient = -g + H @ eta + 0.5 * a * eta.abs() * eta
        if float(gradient.abs().max()) <= 1e-13 * scale:
            return eta, "ok"
        hess = H + torch.diag(a * eta.abs())
        lam_min = float(torch.linalg.eigvalsh(hess)[0])
        shift = 0.0 if lam_min > 1e-12 * float(hess.abs().max()) else -lam_min + 1e-8 * (1 + abs(lam_min))
        d = -torch.linalg.solve(hess + shift * eye, gradient)
        f0, slope, t = value(eta), float(gradient @ d), 1.0
        while value(eta + t * d) > f0 + 1e-4 * t * slope and t > 1e-20:
            t /= 2
        if t <= 1e-20:
            return eta, "stopped: the line search found no further decrease"
        eta = eta + t * d
    return eta, f"stopped after {max_iter} iterations"


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

    (:func:`analyse_batch` then halves all rates until the realized batch loss decreases.)
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


def stability_bounds(problem: Problem, partition: str, groups: list[ParamGroup]
                     ) -> tuple[Tensor, Tensor, float, float]:
    """The stability bounds from the GGN spectrum (the blocks of ``partition`` and the whole, from one pass).

    Returns ``lambda_max`` of each group's GGN block ``(S,)``, the block bounds ``2 / lambda_max(G_PP)`` ``(S,)``,
    ``lambda_max(G)`` and ``2 / lambda_max(G)``. A block whose ``lambda_max`` is at or below
    ``eps(dtype) * lambda_max(G)`` is numerically zero (its parameters do not move the outputs): no bound
    (``nan``); likewise the whole bound when ``lambda_max(G) = 0``.
    """
    from curvscope.curvature.spectrum import compute_spectrum

    # one pass: the whole model comes first (groups[0]), then the blocks of the partition
    spectrum = compute_spectrum(problem, groups=partition, directional=False, include_total=True).groups
    whole = float(spectrum[0].lambda_max)
    blocks = {g.name: g.lambda_max for g in (spectrum if partition == "all" else spectrum[1:])}
    missing = [g.name for g in groups if g.name not in blocks]
    if missing:
        raise RuntimeError(f"the spectrum engine returned no block for group(s) {missing}")
    lam = torch.tensor([float(blocks[g.name]) for g in groups], dtype=torch.float64)
    resolved = lam > max(whole * torch.finfo(problem.dtype).eps, 0.0)
    bound = torch.where(resolved, 2.0 / lam, torch.full_like(lam, math.nan))
    return lam, bound, whole, (2.0 / whole if whole > 0 else math.nan)


# -- results ------------------------------------------------------------------------------------------------

@dataclass
class StepCheck:
    """One rate set taken as a step: ``rates`` ``(S,)`` (``nan`` = group not moved), the decrease the
    quadratic model predicts, the realized ``L(theta) - L(theta(eta))`` on the batch and on the holdout."""

    rates: Tensor
    predicted: float
    realized: float
    realized_holdout: float | None = None
    predicted_cubic: float | None = None


@dataclass
class BatchRates:
    """Everything computed on one batch. All per-group tensors are ``(S,)`` float64.

    Attributes:
        g_hat, h_bar: the reduced gradient ``(S,)`` and curvature ``(S, S)``.
        h_bar_eigenvalues: ``(S,)`` ascending; ``h_bar_positive_definite`` says whether all are above the
            rounding tolerance.
        h_bar_correlation: ``(S, S)`` ``H_bar_st / sqrt(|H_bar_ss H_bar_tt|)`` (``nan`` where a diagonal is 0).
        newton_eta: the joint solution ``(H_bar + ridge I)^{-1} g_hat`` (may have negative entries), or None.
        lr_newton: ``newton_eta`` where positive, ``nan`` elsewhere (never a negative or infinite rate).
        lr_stability: ``2/lambda_max(G_PP)`` per group; ``lambda_max`` the block eigenvalues.
        recommended, rules: see :func:`recommend_rates`; ``halvings``: how often the safeguard halved them.
        d3, cubic_eta: order-3 diagonal and the minimizer of the cubic-regularized model (``--cubic``);
            ``lr_cubic``: ``cubic_eta`` where positive, ``nan`` elsewhere.
        steps: rate-set name -> :class:`StepCheck`.
    """

    batch_indices: list[int] | None
    loss_before: float
    g_hat: Tensor
    h_bar: Tensor
    h_bar_eigenvalues: Tensor
    h_bar_positive_definite: bool
    h_bar_correlation: Tensor
    newton_eta: Tensor | None
    newton_note: str
    lr_newton: Tensor
    lr_diag: Tensor
    diag_notes: list[str]
    lambda_max: Tensor
    lr_stability: Tensor
    lambda_max_global: float
    lr_stability_global: float
    recommended: Tensor
    rules: list[str]
    halvings: int
    d3: Tensor | None = None
    cubic_eta: Tensor | None = None
    lr_cubic: Tensor | None = None
    cubic_note: str | None = None
    steps: dict[str, StepCheck] = field(default_factory=dict)


@dataclass
class RateStats:
    """Mean and std (N-1) of one rate over the batches where it exists, ``(S,)`` each; ``noisy`` flags
    ``std > mean``; ``count`` how many batches gave a finite rate."""

    mean: Tensor
    std: Tensor
    noisy: list[bool]
    count: list[int]


@dataclass
class LRResult:
    """Per-group learning rates: the main batch (the problem's own) first, then the other batches."""

    partition: str
    curvature: str
    direction: str
    ridge: float
    groups: list[ParamGroup]
    num_params: list[int]
    batches: list[BatchRates]
    holdout_size: int = 0
    cubic_weight: float | None = None

    @property
    def main(self) -> BatchRates:
        return self.batches[0]

    def statistics(self) -> dict[str, RateStats]:
        """Rate name (``lr_newton``, ``lr_diag``, ``lr_stability``, ``recommended``, ``lr_cubic``) -> stats
        over the batches."""
        names = ["lr_newton", "lr_diag", "lr_stability", "recommended"]
        if self.main.lr_cubic is not None:
            names.append("lr_cubic")
        out = {}
        for name in names:
            stack = torch.stack([getattr(b, name) if getattr(b, name) is not None
                                 else torch.full((len(self.groups),), math.nan, dtype=torch.float64)
                                 for b in self.batches])  # (B, S)
            out[name] = rate_stats(stack)
        return out


def rate_stats(values: Tensor) -> RateStats:
    """Stats of ``values`` ``(B, S)`` per column, ignoring ``nan`` entries."""
    B, S = values.shape
    mean = torch.full((S,), math.nan, dtype=torch.float64)
    std = torch.full((S,), math.nan, dtype=torch.float64)
    noisy, count = [], []
    for s in range(S):
        col = values[:, s][torch.isfinite(values[:, s])].to(torch.float64)
        count.append(int(col.numel()))
        if col.numel():
            mean[s] = col.mean()
        if col.numel() > 1:
            std[s] = col.std(unbiased=True)
        noisy.append(bool(col.numel() > 1 and float(std[s]) > float(mean[s])))
    return RateStats(mean=mean, std=std, noisy=noisy, count=count)


# -- driver -------------------------------------------------------------------------------------------------

def resolve_direction(problem: Problem, direction: str, gradient: dict[str, Tensor]) -> dict[str, Tensor]:
    """The direction ``u`` by name: ``gradient`` (``u = g``) or ``symo`` (the SymO direction)."""
    if direction == "gradient":
        return {n: t.detach() for n, t in gradient.items()}
    if direction == "symo":
        try:
            from curvscope.curvature.symmetry import symo_direction
        except ImportError as exc:
            raise CurvscopeError("--direction symo needs the factors engine (curvscope.curvature.symmetry), "
                                 "which this installation does not have; use --direction gradient") from exc
        u = symo_direction(problem, eps=1e-8)
        return {n: u[n].detach().to(problem.params[n]) if n in u else torch.zeros_like(p)
                for n, p in problem.params.items()}
    _choice("--direction", direction, DIRECTIONS)
    raise AssertionError("unreachable")


def _loss(problem: Problem, params: dict[str, Tensor]) -> float:
    with torch.no_grad():
        return float(problem.loss_value(params))


def analyse_batch(problem: Problem, groups: list[ParamGroup], partition: str = "layer",
                  curvature: str = "hessian", direction: str = "gradient", ridge: float = 0.0,
                  cubic: bool = False, cubic_weight: float = 1.0, stability: bool = True,
                  holdout: Problem | None = None, progress: Progress | None = None) -> BatchRates:
    """All rates of one batch, with every rate set checked by the realized loss change."""
    say = progress or (lambda _msg: None)
    gradient = problem.gradient()
    u = resolve_direction(problem, direction, gradient)
    S = len(groups)
    loss_before = _loss(problem, problem.params)
    # The reduced quantities are tiny (S, S x S): every solve and rule runs on them in float64 on the CPU.
    g_hat = reduced_gradient(gradient, u, groups).detach().to("cpu", torch.float64)
    say(f"H-bar: {S} {'Hessian' if curvature == 'hessian' else 'Jacobian'}-vector products")
    h_bar = reduced_hessian(problem, u, groups, curvature).to("cpu", torch.float64)

    evals = torch.linalg.eigvalsh(h_bar)
    pd = bool(float(evals[0]) > _pd_tolerance(h_bar, problem.dtype))
    diag = torch.diagonal(h_bar)
    norm = torch.sqrt(diag.abs().outer(diag.abs()))
    correlation = torch.where(norm > 0, h_bar / torch.where(norm > 0, norm, 1.0), torch.full_like(h_bar, math.nan))

    if stability:
        say("stability bounds: GGN spectrum per group and whole")
        lam, lr_stab, lam_global, lr_stab_global = stability_bounds(problem, partition, groups)
    else:
        lam = torch.full((S,), math.nan, dtype=torch.float64)
        lr_stab, lr_stab_global, lam_global = lam.clone(), math.nan, math.nan

    lr_diag, diag_notes = diagonal_rates(g_hat, h_bar)
    if stability and lam_global > 0:
        # A numerically zero GGN block means J_P = 0, hence g_P = 0 in exact arithmetic: whatever g-hat_s and
        # H-bar_ss hold is rounding noise, and a rate made from it would be absurd.
        for s in range(S):
            if not math.isfinite(float(lr_stab[s])) and diag_notes[s] != "zero gradient":
                diag_notes[s] = "zero gradient (GGN block numerically zero)"
                lr_diag[s] = math.nan
    # Joint Newton over the moving groups (a zero u_s would make H-bar singular for nothing).
    active = [s for s in range(S) if not diag_notes[s].startswith("zero gradient")]
    newton_eta, lr_newton, note = None, torch.full((S,), math.nan, dtype=torch.float64), "no group moves"
    if active:
        idx = torch.tensor(active)
        sub, note = newton_rates(g_hat[idx], h_bar[idx][:, idx], ridge, problem.dtype)
        if sub is not None:
            newton_eta = torch.zeros(S, dtype=torch.float64)
            newton_eta[idx] = sub
            lr_newton = torch.where(newton_eta > 0, newton_eta, torch.full_like(newton_eta, math.nan))
            if bool((sub <= 0).any()):
                note = "some joint Newton rates are negative (interactions between groups)"

    # The bounds are plain-GD learning rates: they cap (and back up) rates along the gradient only.
    along_gradient = direction == "gradient"
    caps = lr_stab if along_gradient else torch.full_like(lr_stab, math.nan)
    recommended, rules = recommend_rates(g_hat, h_bar, lr_newton, lr_diag, diag_notes, caps,
                                         lr_stab_global if along_gradient else math.nan)

    def decreases(rates: Tensor) -> bool:  # False for NaN too
        return _loss(problem, step_params(problem.params, u, groups, rates)) < loss_before

    halvings = 0
    if any(bool((u[n] != 0).any()) for n in u):
        while not decreases(recommended) and halvings < MAX_HALVINGS:
            recommended = recommended / 2
            halvings += 1
        if halvings:
            suffix = f"halved x{halvings} (loss check)"
            if not decreases(recommended):
                suffix += ", no decrease found"
            rules = [f"{r}, {suffix}" for r in rules]

    result = BatchRates(
        batch_indices=problem.info.get("batch_indices"), loss_before=loss_before, g_hat=g_hat, h_bar=h_bar,
        h_bar_eigenvalues=evals, h_bar_positive_definite=pd, h_bar_correlation=correlation,
        newton_eta=newton_eta, newton_note=note, lr_newton=lr_newton, lr_diag=lr_diag, diag_notes=diag_notes,
        lambda_max=lam, lr_stability=lr_stab, lambda_max_global=lam_global, lr_stability_global=lr_stab_global,
        recommended=recommended, rules=rules, halvings=halvings)

    sets: dict[str, Tensor] = {"diag": lr_diag, "stability": lr_stab, "recommended": recommended}
    if not along_gradient:
        del sets["stability"]
    if newton_eta is not None:
        sets = {"newton": newton_eta, **sets}
    if cubic:
        say("order-3 diagonal: S third directional derivatives")
        result.d3 = third_order_diagonal(problem, u, groups).to("cpu", torch.float64)
        result.cubic_eta, result.cubic_note = cubic_rates(g_hat, h_bar, result.d3, cubic_weight)
        if result.cubic_eta is not None:
            eta = result.cubic_eta
            result.lr_cubic = torch.where(eta > 0, eta, torch.full_like(eta, math.nan))
            sets["cubic"] = eta
    say("truth test: taking each step and re-evaluating the loss")
    holdout_before = _loss(holdout, holdout.params) if holdout is not None else None
    for name, rates in sets.items():
        if not bool(torch.isfinite(rates).any()):
            continue
        after = step_params(problem.params, u, groups, rates)
        check = StepCheck(rates=rates, predicted=predicted_decrease(rates, g_hat, h_bar),
                          realized=loss_before - _loss(problem, after))
        if holdout is not None:
            check.realized_holdout = holdout_before - _loss(holdout, after)
        if cubic and result.d3 is not None:
            check.predicted_cubic = -cubic_model(torch.nan_to_num(rates, nan=0.0), g_hat, h_bar, result.d3,
                                                 cubic_weight)
        result.steps[name] = check
    return result


def extra_batches(problem: Problem, batches: int, holdout: int) -> tuple[list[Problem], Problem | None]:
    """``batches - 1`` further batches of the problem's batch size, disjoint from the problem's batch and
    from each other, and a holdout of ``holdout`` samples disjoint from all of them. Samples are taken in the
    order the batch was drawn (file order, or the ``--shuffle`` permutation of ``--seed``)."""
    _number("--batches", batches, 1, integer=True)
    _number("--holdout", holdout, 0, integer=True)
    if batches == 1 and holdout == 0:
        return [], None
    if problem.dataset is None or problem.info.get("batch_indices") is None:
        raise CurvscopeError("--batches and --holdout need a problem loaded from a data file "
                             "(the other samples are unknown)")
    total = len(problem.dataset[0])
    n = problem.batch_size
    order = select_batch(total, None, shuffle=bool(problem.info.get("shuffle")), seed=int(problem.info.get(
        "seed") or 0))
    taken = set(problem.info["batch_indices"])
    rest = order[torch.tensor([int(i) not in taken for i in order.tolist()], dtype=torch.bool)]
    need = (batches - 1) * n + holdout
    if need > rest.numel():
        raise CurvscopeError(
            f"--batches {batches} with --batch-size {n}{f' and --holdout {holdout}' if holdout else ''} needs "
            f"{batches * n + holdout} samples but the dataset has {total}; lower --batch-size, --batches or "
            "--holdout")
    others = [problem.batch_from_dataset(rest[b * n:(b + 1) * n]) for b in range(batches - 1)]
    held = problem.batch_from_dataset(rest[(batches - 1) * n:need]) if holdout else None
    return others, held


def suggest_lr(problem: Problem, partition: str = "layer", curvature: str = "hessian",
               direction: str = "gradient", ridge: float = 0.0, batches: int = 1, holdout: int = 0,
               cubic: bool = False, cubic_weight: float = 1.0, stability: bool = True,
               progress: Progress | None = None) -> LRResult:
    """Per-group learning rates (``CURVATURE.md`` section 6) on the problem's batch and ``batches - 1``
    further disjoint batches, each rate set checked by the realized loss change (on the batch, and on a
    holdout of ``holdout`` other samples when > 0).

    Args:
        partition: ``layer`` (one group per module with parameters), ``tensor`` or ``all``.
        curvature: ``hessian`` (S Hessian-vector products) or ``ggn`` (S Jacobian-vector products; PSD).
        direction: ``gradient`` or ``symo``.
        ridge: added to ``H_bar``'s diagonal for the joint Newton rates (>= 0).
        cubic: also compute the order-3 diagonal and the cubic-regularized rates (weight ``cubic_weight``).
        stability: compute the stability bounds (one GGN spectrum pass per batch); without them the recommended
            rule has no cap.
        progress: called with a short message before each stage.
    """
    _choice("--partition", partition, PARTITIONS)
    _choice("--curvature", curvature, CURVATURES)
    _choice("--direction", direction, DIRECTIONS)
    _number("--ridge", ridge, 0.0)
    _number("--cubic-weight", cubic_weight, 0.0, strict=True)
    groups = problem.groups(partition)
    others, held = extra_batches(problem, batches, holdout)
    results = []
    for b, batch_problem in enumerate([problem, *others]):
        def say(msg: str, b: int = b) -> None:
            if progress is not None:
                progress(f"batch {b + 1}/{batches}: {msg}")

        results.append(analyse_batch(batch_problem, groups, partition, curvature, direction, ridge, cubic,
                                     cubic_weight, stability, held, say))
    return LRResult(partition=partition, curvature=curvature, direction=direction, ridge=ridge, groups=groups,
                    num_params=[sum(problem.params[n].numel() for n in g.param_names) for g in groups],
                    batches=results, holdout_size=holdout if held is not None else 0,
                    cubic_weight=cubic_weight if cubic else None)
