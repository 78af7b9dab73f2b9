"""Estimating symmetry-structured factors on one model, the structure check, and the SymO line search.

Sources of the second moment Sigma that R projects (``CURVATURE.md`` sections 2 and 7):

* ``batch``: Sigma = g g^T of the full-batch gradient (the paper's single-gradient estimate);
* ``per-sample``: Sigma = (1/N) sum_n g_n g_n^T (a structured empirical Fisher);
* ``ggn``: Sigma = V V^T = G, the columns v_nc of the spectrum engine (``curvscope.curvature.gram``).

Structure check: ``||S - R(S)||_F / ||S||_F`` for the per-sample second moment S (and for the GGN with
``--source ggn``), computed without the dense D x D matrix: ``||S||_F^2`` from the Gram matrix of the vectors and
``||R(S)||_F^2`` from the factors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.func import functional_call, grad, jvp, vmap

from curvscope.curvature.symmetry import (
    Factors,
    Structure,
    add_factors,
    build_structure,
    flatten,
    inverse_sqrt,
    outer_sum_factors,
    parse_layers,
    relative_projection_error,
    single_gradient_factors,
)
from curvscope.curvature.symmetry_chain import find_chain
from curvscope.errors import CurvscopeError

SOURCES = ("batch", "per-sample", "ggn")
CHECK_CAP = 20_000_000
"""The structure check keeps the N x D per-sample gradients: at most this many numbers."""
CHUNK_NUMBERS = 4_000_000
"""Per-sample gradients are computed in chunks of about this many numbers."""
DEFAULT_STEPS = tuple(10.0 ** (k / 2) for k in range(-10, 1))
"""The SymO line-search step sizes: 1e-5 .. 1 in half decades."""

Progress = Callable[[int, int], None]


@dataclass
class FactorsResult:
    """Factors of one model.

    Attributes:
        structure: chain, symmetry and components.
        factors: the C_tau (unbatched).
        source: ``batch``, ``per-sample`` or ``ggn``.
        num_vectors: how many vectors built Sigma (1, N, or the number of GGN columns).
        gradient: the batch gradient g on the chain (by parameter name).
        structure_error: ``per_sample`` (and ``ggn``): relative Frobenius error of the projection, or ``None``
            when the model is too large for the check.
        notes: plain-text remarks for the report (skipped checks, symmetry assumptions).
    """

    structure: Structure
    factors: Factors
    source: str
    num_vectors: int
    gradient: dict[str, Tensor]
    structure_error: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def per_sample_gradients(problem, names: Sequence[str], start: int, stop: int) -> dict[str, Tensor]:
    """g_n = grad of l_n for samples ``start..stop`` of the batch, for parameters ``names``:
    name -> ``(stop - start, *shape)``."""
    chosen = {n: problem.params[n] for n in names}
    frozen = {**problem.buffers, **{n: p for n, p in problem.params.items() if n not in chosen}}

    def loss_one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(problem.model, {**frozen, **p}, (x.unsqueeze(0),))
        return problem.loss.per_sample(out, y.unsqueeze(0)).sum()

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(chosen, problem.inputs[start:stop],
                                                       problem.targets[start:stop])


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


def compute_factors(problem, symmetry: str = "orthogonal", source: str = "batch",
                    layers: str | Sequence[str] | None = None, mc_samples: int = 0, subsample: int | None = None,
                    seed: int = 0, structure_check: bool = True, progress: Progress | None = None
                    ) -> FactorsResult:
    """The symmetry-structured factors of R(Sigma) for ``problem``'s Linear chain.

    Args:
        symmetry: ``orthogonal`` (default), ``signed-permutation``, ``permutation`` or ``none`` (dense).
        source: ``batch``, ``per-sample`` or ``ggn`` (see the module docstring).
        layers: Linear module names of the chain (default: found in an ``nn.Sequential`` MLP).
        mc_samples, subsample, seed: for ``ggn``: Monte-Carlo columns and curvature sub-sampling.
        structure_check: also compute the relative projection error of the per-sample second moment.
        progress: called with ``(done, total)`` samples while per-sample gradients are computed.
    """
    if source not in SOURCES:
        raise CurvscopeError(f"--source '{source}' is not supported: choose one of {', '.join(SOURCES)}")
    chain = find_chain(problem.model, problem.params, parse_layers(layers))
    structure = build_structure(chain, symmetry)
    names = chain.param_names
    g_full = problem.gradient()
    g = {n: g_full[n] for n in names}
    notes: list[str] = []
    # orthogonal and signed permutations give the same factors: only a ReLU-type net is flagged
    if chain.activation_symmetry == "permutation" and symmetry in ("orthogonal", "signed-permutation"):
        notes.append(f"the activations ({', '.join(chain.activations)}) are only invariant under "
                     f"{chain.activation_symmetry}s of hidden units: --symmetry {symmetry} assumes more "
                     "symmetry than the model has (try --symmetry permutation)")
    errors: dict[str, float | None] = {}
    N = problem.batch_size
    D = chain.num_params
    need_per_sample = source == "per-sample" or structure_check
    keep = structure_check and N * D <= CHECK_CAP
    if structure_check and not keep:
        errors["per_sample"] = None
        notes.append(f"structure check skipped: {N} per-sample gradients x {D} parameters is above "
                     f"{CHECK_CAP:,} numbers (lower --batch-size)")
    per_sample: Factors | None = None
    if need_per_sample and (source == "per-sample" or keep):
        chunk = max(1, CHUNK_NUMBERS // max(D, 1))
        flats = []
        for start, stop in _chunks(N, chunk):
            gs = per_sample_gradients(problem, names, start, stop)
            per_sample = add_factors(per_sample, outer_sum_factors(structure, gs, 1.0 / N))
            if keep:
                flats.append(flatten(structure, gs))
            if progress is not None:
                progress(stop, N)
        if keep:
            V = torch.cat(flats)
            errors["per_sample"] = relative_projection_error(per_sample, _gram_frobenius_sq(V) / N ** 2)
    if source == "batch":
        factors, count = single_gradient_factors(structure, g), 1
    elif source == "per-sample":
        factors, count = per_sample, N
    else:
        from curvscope.curvature.gram import materialize_columns

        cols = materialize_columns(problem, names, mc_samples=mc_samples, subsample=subsample, seed=seed)
        factors = outer_sum_factors(structure, cols, 1.0)
        count = next(iter(cols.values())).shape[0]
        if structure_check:
            if count * D <= CHECK_CAP:
                errors["ggn"] = relative_projection_error(factors, _gram_frobenius_sq(flatten(structure, cols)))
            else:
                errors["ggn"] = None
                notes.append(f"GGN structure check skipped: {count} columns x {D} parameters is above "
                             f"{CHECK_CAP:,} numbers")
    return FactorsResult(structure, factors, source, count, g, errors, notes)


def _gram_frobenius_sq(V: Tensor) -> float:
    """``||V^T V||_F^2 = ||V V^T||_F^2`` for vectors ``(n, D)``, computed in float64."""
    V = V.to(torch.float64)
    return float((V @ V.T).pow(2).sum())


# -- SymO ----------------------------------------------------------------------------------------------------

@dataclass
class SymoResult:
    """The SymO direction u = (R(Sigma) + eps I)^{-1/2} g and a line search along ``theta - step * u``.

    Attributes:
        direction: parameter-shaped, keyed like ``problem.params`` (zeros outside the chain).
        eps: the damping.
        g_dot_u: g^T u (the first-order decrease per unit step).
        curvature: u^T H u with the loss Hessian H (one Hessian-vector product).
        steps: ``(K,)`` step sizes; predicted: ``(K,)`` quadratic-model change
            ``-step g^T u + step^2 u^T H u / 2``; predicted_linear: ``(K,)`` ``-step g^T u``; realized: ``(K,)``
            ``L(theta - step u) - L(theta)``.
        best_step: the step with the lowest realized loss, or ``None`` when no step lowers the loss.
    """

    direction: dict[str, Tensor]
    eps: float
    g_dot_u: float
    curvature: float
    steps: Tensor
    predicted: Tensor
    predicted_linear: Tensor
    realized: Tensor
    best_step: float | None


def symo_step(problem, result: FactorsResult, eps: float = 1e-8, steps: Sequence[float] = DEFAULT_STEPS
              ) -> SymoResult:
    """The SymO direction from ``result``'s factors, and a line search comparing the predicted and realized
    loss change."""
    u_chain = result.factors.apply(result.gradient, inverse_sqrt(eps))
    direction = {n: u_chain[n] if n in u_chain else torch.zeros_like(p) for n, p in problem.params.items()}
    return line_search(problem, direction, eps, steps)


def line_search(problem, direction: dict[str, Tensor], eps: float, steps: Sequence[float] = DEFAULT_STEPS
                ) -> SymoResult:
    """Predicted (quadratic model with the exact Hessian) vs realized loss change along ``-direction``."""
    params = problem.params
    grad_fn = grad(problem.loss_value)
    g, hu = jvp(grad_fn, (params,), (direction,))
    g_dot_u = float(sum((g[n].double() * direction[n].double()).sum() for n in params))
    curvature = float(sum((hu[n].double() * direction[n].double()).sum() for n in params))
    with torch.no_grad():
        base = float(problem.loss_value())
        realized = []
        for s in steps:
            moved = {n: p - s * direction[n] for n, p in params.items()}
            value = float(problem.loss_value(moved))
            realized.append(value - base if math.isfinite(value) else math.inf)
    t = torch.tensor(list(steps), dtype=torch.float64)
    predicted_linear = -t * g_dot_u
    predicted = predicted_linear + 0.5 * t ** 2 * curvature
    realized_t = torch.tensor(realized, dtype=torch.float64)
    best = int(torch.argmin(realized_t))
    best_step = float(t[best]) if realized_t[best] < 0 else None
    return SymoResult(direction, eps, g_dot_u, curvature, t, predicted, predicted_linear, realized_t, best_step)
