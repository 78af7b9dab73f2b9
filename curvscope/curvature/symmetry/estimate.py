"""Estimating symmetry-structured factors on one model, and the structure check.

Sources of the second moment Sigma that R projects (``docs/conventions.md §2`` and ``§7``):

* ``batch``: Sigma = g g^T of the full-batch gradient (the paper's single-gradient estimate);
* ``per-sample``: Sigma = (1/N) sum_n g_n g_n^T (a structured empirical Fisher);
* ``ggn``: Sigma = V V^T = G, the columns v_nc of the spectrum engine (``curvscope.curvature.gram``).

Structure check: ``||S - R(S)||_F / ||S||_F`` for the per-sample second moment S (and for the GGN with
source ``ggn``), computed without the dense D x D matrix: ``||S||_F^2`` from the Gram matrix of the vectors and
``||R(S)||_F^2`` from the factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from curvscope.curvature.gram.rows import per_sample_gradients as per_sample_gradients_of
from curvscope.curvature.symmetry.coordinates import flatten
from curvscope.curvature.symmetry.discover import problem_chain
from curvscope.curvature.symmetry.factors import (
    Factors,
    add_factors,
    outer_sum_factors,
    relative_projection_error,
    single_gradient_factors,
)
from curvscope.curvature.symmetry.groups import Structure, build_structure
from curvscope.errors import one_of
from curvscope.progress import Progress, counter
from curvscope.reprs import compact_repr

SOURCES = ("batch", "per-sample", "ggn")
CHECK_CAP = 20_000_000
"""The structure check keeps the N x D per-sample gradients: at most this many numbers."""
CHUNK_NUMBERS = 4_000_000
"""Per-sample gradients are computed in chunks of about this many numbers."""


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
        path: the per-sample differentiation path that ran (``problem.path``: ``vmap`` or ``autograd (...)``).
    """

    __repr__ = compact_repr

    structure: Structure
    factors: Factors
    source: str
    num_vectors: int
    gradient: dict[str, Tensor]
    structure_error: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    path: str = "vmap"


def per_sample_gradients(problem, names: Sequence[str], start: int, stop: int) -> dict[str, Tensor]:
    """g_n = grad of l_n for samples ``start..stop`` of the batch, for parameters ``names``:
    name -> ``(stop - start, *shape)``."""
    idx = torch.arange(start, stop, device=problem.device)
    return per_sample_gradients_of(problem, names, idx)


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


def compute_factors(problem, symmetry: str = "orthogonal", source: str = "batch",
                    layers: str | Sequence[str] | None = None, mc_samples: int = 0, subsample: int | None = None,
                    seed: int = 0, structure_check: bool = True, progress: Progress | None = None
                    ) -> FactorsResult:
    """The symmetry-structured factors of R(Sigma) for ``problem``'s Linear chain.

    Args:
        problem: the :class:`~curvscope.problem.Problem` whose model holds the Linear chain.
        symmetry: ``orthogonal`` (default), ``signed-permutation``, ``permutation`` or ``none`` (dense).
        source: ``batch``, ``per-sample`` or ``ggn`` (see the module docstring).
        layers: module names of the chain (``a,b,c``; ``gate*up,down`` for a gated MLP; default: found in an
            ``nn.Sequential`` MLP, else discovered in the model, :mod:`~curvscope.curvature.symmetry.discover`).
        mc_samples: for ``ggn``: 0 for the exact GGN columns, M > 0 for M Monte-Carlo columns per sample.
        subsample: for ``ggn``: curvature from the first ``subsample`` samples only (default: all).
        seed: for ``ggn``: seeds the Monte-Carlo columns.
        structure_check: also compute the relative projection error of the per-sample second moment.
        progress: reports stage ``"per-sample"`` (samples done of N) while per-sample gradients are computed.
    """
    one_of("source", source, SOURCES)
    chain = problem_chain(problem, layers)
    structure = build_structure(chain, symmetry)
    names = chain.param_names
    g_full = problem.gradient()
    g = {n: g_full[n] for n in names}
    notes: list[str] = []
    if len(chain.found) > 1:
        notes.append(f"found {len(chain.found)} chains a symmetry acts on ({', '.join(chain.found[:4])}"
                     f"{', ...' if len(chain.found) > 4 else ''}): the factors are those of the first, "
                     f"{chain.found[0]}; name another with layers")
    # orthogonal and signed permutations give the same factors: only a ReLU-type net is flagged
    if chain.activation_symmetry == "permutation" and symmetry in ("orthogonal", "signed-permutation"):
        notes.append(f"the activations ({', '.join(chain.activations)}) are only invariant under "
                     f"{chain.activation_symmetry}s of hidden units: symmetry {symmetry} assumes more "
                     "symmetry than the model has (try symmetry permutation)")
    if chain.gate is not None and symmetry in ("signed-permutation", "permutation"):
        from curvscope.curvature.symmetry.gated import gated_note

        notes.append(gated_note(chain, symmetry))
    errors: dict[str, float | None] = {}
    N = problem.batch_size
    D = chain.num_params
    need_per_sample = source == "per-sample" or structure_check
    keep = structure_check and N * D <= CHECK_CAP
    if structure_check and not keep:
        errors["per_sample"] = None
        notes.append(f"structure check skipped: {N} per-sample gradients x {D} parameters is above "
                     f"{CHECK_CAP:,} numbers (use a smaller batch)")
    per_sample: Factors | None = None
    if need_per_sample and (source == "per-sample" or keep):
        chunk = max(1, CHUNK_NUMBERS // max(D, 1))
        advance = counter(progress, "per-sample", N)
        flats = []
        for start, stop in _chunks(N, chunk):
            gs = per_sample_gradients(problem, names, start, stop)
            per_sample = add_factors(per_sample, outer_sum_factors(structure, gs, 1.0 / N))
            if keep:
                flats.append(flatten(structure, gs))
            advance(stop - start)
        if keep:
            V = torch.cat(flats)
            errors["per_sample"] = relative_projection_error(per_sample, _gram_frobenius_sq(V) / N ** 2)
    if source == "batch":
        factors, count = single_gradient_factors(structure, g), 1
    elif source == "per-sample":
        factors, count = per_sample, N
    else:
        from curvscope.curvature.gram import ColumnSpec, materialize_columns

        cols = materialize_columns(problem, names, ColumnSpec(mc_samples=mc_samples, subsample=subsample, seed=seed))
        factors = outer_sum_factors(structure, cols, 1.0)
        count = next(iter(cols.values())).shape[0]
        if structure_check:
            if count * D <= CHECK_CAP:
                errors["ggn"] = relative_projection_error(factors, _gram_frobenius_sq(flatten(structure, cols)))
            else:
                errors["ggn"] = None
                notes.append(f"GGN structure check skipped: {count} columns x {D} parameters is above "
                             f"{CHECK_CAP:,} numbers")
    return FactorsResult(structure, factors, source, count, g, errors, notes, path=problem.path)


def _gram_frobenius_sq(V: Tensor) -> float:
    """``||V^T V||_F^2 = ||V V^T||_F^2`` for vectors ``(n, D)``, computed in float64."""
    V = V.to(torch.float64)
    return float((V @ V.T).pow(2).sum())
