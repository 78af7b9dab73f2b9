"""Exact GGN eigenspectrum through the Gram trick, with per-sample directional derivatives and SNRs.

``docs/conventions.md`` §2 and §4. The GGN ``G = V V^T`` (D x D) is never formed: the Gram ``V^T V``
(NK x NK) has the same nonzero eigenvalues, and every directional quantity follows from the extended Gram
blocks ``vv``, ``vg`` of :mod:`curvscope.curvature.gram.accumulate`. One driver serves one process and a
``torch.distributed`` group alike (:mod:`curvscope.curvature.gram.layout`): group i's Gram is assembled and
decomposed on process ``i mod R``, and the per-group results are broadcast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from curvscope.curvature.gram.accumulate import gram_rows
from curvscope.curvature.gram.columns import Columns, ColumnSpec
from curvscope.curvature.gram.layout import GroupGram, make_layout
from curvscope.curvature.gram.rows import apply_v
from curvscope.curvature.memory import MemoryPlan
from curvscope.curvature.results import Spectrum, SpectrumGroup
from curvscope.errors import CurvscopeError
from curvscope.problem import GROUP_MODES
from curvscope.progress import Progress, stage
from curvscope.reprs import compact_repr

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

DEFAULT_TOP_K = 1000


@dataclass
class Directions:
    """Directional quantities along the top-k eigenvectors ``e_k`` of one group's GGN (ViViT section 2.2).

    Attributes:
        gamma: ``(N, K)``: gamma_nk = e_k^T g_n, first-order directional derivative of sample n's loss.
        lambdas: ``(N_V, K)``: lambda_nk = e_k^T G_n e_k, curvature of sample n (curvature samples only).
        gamma_mean, lambda_mean: ``(K,)`` means over samples (``lambda_mean`` equals the eigenvalues).
        gamma_snr, lambda_snr: ``(K,)``: mean^2 / var (var with N-1); ``inf`` where the variance is 0,
            ``nan`` with a single sample.
        gradient_overlap: ``(K,)``: gamma_k^2 / ||g||^2, the share of the batch gradient along e_k.
        flat_overlap: 1 - sum_k gradient_overlap_k (the gradient share outside the top-k directions).
        lambda_consistency: max_k |lambda_mean_k - eigenvalue_k| / lambda_max (rounding: ~1e-6 in float32,
            ~1e-13 in float64; relative to lambda_max, not to each eigenvalue, so that near-null directions do not
            raise a false alarm).
    """

    __repr__ = compact_repr

    gamma: Tensor
    lambdas: Tensor
    gamma_mean: Tensor
    lambda_mean: Tensor
    gamma_snr: Tensor
    lambda_snr: Tensor
    gradient_overlap: Tensor
    flat_overlap: float
    lambda_consistency: float


@dataclass
class GroupSpectrum(SpectrumGroup):
    """The spectrum of one block of the (block-diagonal) GGN.

    Attributes:
        eigenvalues: ``(R,)`` nonzero eigenvalues, descending, float64 (R = rank).
        gram_eigenvectors: ``(N_V*K, k)`` eigenvectors of the Gram for the top-k eigenvalues (the coordinates
            of the parameter-space eigenvectors in the columns of V), when directions were computed.
        gradient_norm: ||g_P||, the batch gradient restricted to the group.
    """

    __repr__ = compact_repr

    name: str
    param_names: tuple[str, ...]
    num_params: int
    eigenvalues: Tensor
    rank: int
    trace: float
    gradient_norm: float
    directions: Directions | None = None
    gram_eigenvectors: Tensor | None = None

    @property
    def effective_rank(self) -> float:
        """Participation ratio ``(sum lambda)^2 / sum lambda^2``: how many directions carry the curvature."""
        if not self.rank:
            return 0.0
        ev = self.eigenvalues
        return float(ev.sum() ** 2 / (ev**2).sum())

    @property
    def top_k(self) -> int:
        """k: the number of top directions whose Gram eigenvectors were kept (0 without them)."""
        return 0 if self.gram_eigenvectors is None else self.gram_eigenvectors.shape[1]


@dataclass
class SpectrumResult(Spectrum):
    """What :func:`compute_spectrum` returns.

    ``groups`` follows the requested grouping; with ``include_total=True`` and a grouping other than ``all``,
    ``groups[0]`` is the whole model. ``columns`` remembers which vectors built V, so that eigenvectors and
    Newton steps can be formed later without recomputing the Gram. ``path`` says how per-sample quantities were
    differentiated: ``vmap``, or ``autograd (vmap failed: <reason>)`` for a model ``vmap`` cannot trace
    (``problem.path``; the numbers are the same). ``rules`` maps every module with parameters (``problem``'s
    ``layer`` groups) to how its rows of V were formed: ``"ghost"`` or ``"materialize"`` by a fast rule, or
    ``"generic"``.
    """

    __repr__ = compact_repr

    groups: list[GroupSpectrum]
    loss_value: float
    gradient_norm: float
    columns: Columns
    grouping: str
    mc_samples: int = 0
    subsample: int | None = None
    extras: dict = field(default_factory=dict)
    path: str = "vmap"
    rules: dict = field(default_factory=dict)
    eigenvectors: dict[str, Tensor] | None = None
    """The top eigenvectors of ``groups[0]`` (``{name: (k, *shape)}``) when asked for (see :func:`eigenvectors`)."""

    curvature = "ggn"  # the Gram method computes the GGN only (class constants: not fields)
    method = "gram"

    @property
    def num_columns(self) -> int:
        """``N_V * K``: the number of columns of V (the size of each Gram)."""
        return self.columns.num_columns


# -- eigen-decomposition ---------------------------------------------------------------------------------

def gram_eigen(gram: Tensor, vectors: bool = True) -> tuple[Tensor, Tensor | None]:
    """Eigen-decompose a Gram matrix in float64 (its lower triangle, as LAPACK does).

    Returns the eigenvalues in *descending* order and the eigenvectors in LAPACK's *ascending* order (columns),
    so that only the top-k columns are ever copied (:func:`top_eigenvectors`). With ``vectors=False`` only the
    eigenvalues are computed (``eigvalsh``, 2-3x cheaper than ``eigh``) and the eigenvectors are ``None``.
    """
    g = gram if gram.dtype == torch.float64 else gram.to(torch.float64)
    if g.shape[0] >= RESPONSIVE_SIZE:  # seconds to minutes in LAPACK: Ctrl-C must still act within a second
        from curvscope.curvature.interrupt import responsive

        if not vectors:
            return responsive(torch.linalg.eigvalsh, g).flip(0), None
        evals, evecs = responsive(torch.linalg.eigh, g)
        return evals.flip(0), evecs
    if not vectors:
        return torch.linalg.eigvalsh(g).flip(0), None
    evals, evecs = torch.linalg.eigh(g)
    return evals.flip(0), evecs


RESPONSIVE_SIZE = 1024
"""Gram matrices from this size on are eigen-decomposed in a worker thread (:mod:`curvscope.curvature.interrupt`)."""


def top_eigenvectors(evecs_ascending: Tensor, k: int) -> Tensor:
    """The eigenvectors of the k largest eigenvalues, descending, from :func:`gram_eigen`'s ascending columns."""
    return evecs_ascending[:, evecs_ascending.shape[1] - k:].flip(1)


def numerical_rank(evals: Tensor, size: int, build_dtype: torch.dtype, reference: float = 0.0) -> int:
    """Number of eigenvalues above ``lambda_max * NK * eps(build_dtype)`` (``docs/conventions.md`` §2).

    Args:
        evals: descending eigenvalues of a Gram of ``size`` rows, built in ``build_dtype``.
        size: the number of rows of the Gram (``NK`` in the threshold).
        build_dtype: the dtype the Gram was accumulated in (its ``eps`` sets the threshold).
        reference: for a block of a larger GGN, the whole model's largest eigenvalue: the threshold uses the
            larger of the two, so that a block whose true GGN is zero (e.g. attention key biases) gets rank 0,
            not a rank of rounding noise.
    """
    if evals.numel() == 0:
        return 0
    if not bool(torch.isfinite(evals).all()) or not math.isfinite(reference):
        raise CurvscopeError("the curvature is not finite: eigenvalues contain NaN or Inf (the model overflows "
                             "at this checkpoint; try float64, or check the weights and inputs)")
    lam_max = max(float(evals.max()), reference)
    if lam_max <= 0:
        return 0
    return int((evals > lam_max * size * torch.finfo(build_dtype).eps).sum())


def directional_quantities(gg: GroupGram, evals: Tensor, evecs: Tensor, columns: Columns,
                           gradient_sq: float) -> Directions:
    """gamma_nk, lambda_nk, their means, SNRs and gradient overlaps for the given top eigenpairs.

    Args:
        gg: the group's Gram blocks; ``vv`` and ``vg`` are used.
        evals: ``(K,)`` positive eigenvalues.
        evecs: ``(N_V*Kc, K)`` Gram eigenvectors.
        columns: the columns of V the Gram was built from (``N_V`` samples, ``Kc`` seeds each).
        gradient_sq: ``||g_P||^2``.
    """
    sqrt_l = evals.sqrt()
    gamma = (gg.vg.T @ evecs) / sqrt_l  # (N, K): e_k^T g_n = ~e_k^T V^T g_n / sqrt(lambda_k)
    proj = (gg.vv @ evecs).reshape(columns.num_samples, columns.per_sample, -1)  # V_n^T V ~e_k
    lambdas = columns.num_samples * (proj**2).sum(dim=1) / evals  # (N_V, K)
    gamma_mean, lambda_mean = gamma.mean(0), lambdas.mean(0)
    overlap = gamma_mean**2 / gradient_sq if gradient_sq > 0 else torch.zeros_like(gamma_mean)
    return Directions(
        gamma=gamma, lambdas=lambdas, gamma_mean=gamma_mean, lambda_mean=lambda_mean,
        gamma_snr=snr(gamma), lambda_snr=snr(lambdas), gradient_overlap=overlap,
        flat_overlap=float(1.0 - overlap.sum()) if gradient_sq > 0 else 0.0,
        # relative to lambda_max: near-null directions carry rounding of the size of the largest eigenvalue
        lambda_consistency=float(((lambda_mean - evals).abs() / evals.max()).max()) if evals.numel() else 0.0,
    )


def snr(x: Tensor) -> Tensor:
    """Signal-to-noise ratio per column of ``x`` ``(N, K)``: ``mean^2 / var`` with the unbiased variance."""
    if x.shape[0] < 2:
        return torch.full((x.shape[1],), float("nan"), dtype=x.dtype, device=x.device)
    mean, var = x.mean(0), x.var(0, unbiased=True)
    return mean**2 / var


# -- the main entry point ---------------------------------------------------------------------------------

def compute_spectrum(problem, groups: str = "all", mc_samples: int = 0, subsample: int | None = None,
                     top_k: int | None = None, directional: bool = True, include_total: bool = False,
                     seed: int = 0, ghost: bool = True, max_memory: int | None = None,
                     progress: Progress | None = None, process_group: ProcessGroup | None = None,
                     eigenvectors: bool | None = None) -> SpectrumResult:
    """Exact (or MC / sub-sampled) GGN eigenspectrum of ``problem``'s batch, per parameter group.

    Args:
        problem: the :class:`~curvscope.problem.Problem`.
        groups: ``all`` (the full GGN), ``layer`` (one block per module with parameters) or ``tensor``.
        mc_samples: 0 for the exact loss-Hessian square root, M > 0 for M Monte-Carlo columns per sample.
        subsample: build the curvature from the first ``subsample`` samples of the batch only.
        top_k: directional quantities for the top-k nonzero directions (default: all nonzero, at most 1000).
        directional: compute gamma/lambda/SNRs/overlaps (needs per-sample gradients; a little more work).
        eigenvectors: keep the top-k Gram eigenvectors (for :func:`eigenvectors` and Newton steps). Default:
            as ``directional``. Without them only eigenvalues are computed, which is 2-3x cheaper.
        include_total: with ``groups != "all"``, also return the whole model as ``groups[0]``.
        seed: seeds the Monte-Carlo columns.
        ghost: use the fast per-layer rules where they are cheaper.
        max_memory: byte budget for materialized rows of V (default: a safe share of free memory).
        progress: :class:`~curvscope.progress.Progress`; stages ``"gram"`` (parameter tensors) and ``"eigen"``
            (groups).
        process_group: an initialized ``torch.distributed`` process group (e.g. ``dist.group.WORLD``). Then the
            call is collective: every rank passes the *same full* problem (model, parameters, all N samples)
            and the same arguments; rank r works on its contiguous slice of the samples, group i's Gram is
            decomposed on rank ``i mod R``, and every rank returns the same result, equal to the
            single-process one up to rounding (``docs/distributed.md``).
    """
    if groups not in GROUP_MODES:
        raise CurvscopeError(f"groups '{groups}': choose one of {', '.join(GROUP_MODES)}")
    if top_k is not None and top_k < 1:
        raise CurvscopeError(f"top_k must be at least 1, got {top_k}")
    blocks = [(g.name, g.param_names) for g in problem.groups(groups)]
    if include_total and groups != "all":
        blocks = [("all", tuple(problem.params)), *blocks]
    vectors = directional if eigenvectors is None else (eigenvectors or directional)
    spec = ColumnSpec(mc_samples=mc_samples, subsample=subsample, seed=seed)
    layout = make_layout(problem, process_group)
    acc, columns, outputs = gram_rows(problem, blocks, layout, with_gradients=directional, spec=spec, ghost=ghost,
                                      plan=MemoryPlan.default(problem.device, max_memory), progress=progress)
    with layout.stage():
        loss_value = float(problem.loss(outputs, problem.targets))
    grad = layout.gradient(problem)
    grad_sq = {n: float((g.to(torch.float64) ** 2).sum()) for n, g in grad.items()}

    owners = [i % layout.world for i in range(len(blocks))]
    grams = layout.assemble(acc, columns, owners, with_gg=False)
    report = stage(progress, "eigen")
    decompositions: dict[int, tuple[Tensor, Tensor | None]] = {}
    with layout.stage():
        for i, gg in enumerate(grams):
            if gg is not None:
                report(len(decompositions), len(grams))
                decompositions[i] = gram_eigen(gg.vv, vectors)
    # the whole model's largest eigenvalue bounds every block's (a block is a principal submatrix of G)
    reference = layout.all_reduce_max(max((float(ev[0]) for ev, _ in decompositions.values() if ev.numel()),
                                          default=0.0))
    mine: dict[int, GroupSpectrum] = {}
    with layout.stage():
        for i, (evals, evecs) in decompositions.items():
            mine[i] = _group_spectrum(problem, grams[i], evals, evecs, reference, top_k, directional, grad_sq,
                                      columns)
            grams[i] = None
    del decompositions
    results = [layout.broadcast(mine.pop(i, None), owner) for i, owner in enumerate(owners)]
    report(len(blocks), len(blocks))
    rules = {g.name: acc.rules.get(g.name, "generic") for g in problem.groups("layer")}
    return SpectrumResult(groups=results, loss_value=loss_value, gradient_norm=sum(grad_sq.values()) ** 0.5,
                          columns=columns, grouping=groups, mc_samples=spec.mc_samples, subsample=spec.subsample,
                          path=problem.path, rules=rules)


def _group_spectrum(problem, gg: GroupGram, evals: Tensor, evecs: Tensor | None, reference: float, top_k: int | None,
                    directional: bool, grad_sq: dict[str, float], columns: Columns) -> GroupSpectrum:
    """One group's spectrum from its Gram blocks and their eigen-decomposition (descending)."""
    rank = numerical_rank(evals, gg.vv.shape[0], problem.precision, reference)
    g_sq = sum(grad_sq[n] for n in gg.param_names)
    k = min(rank, top_k if top_k is not None else DEFAULT_TOP_K)
    directions, top_vecs = None, None
    if k > 0 and evecs is not None:
        top_vecs = top_eigenvectors(evecs, k)
        if directional:
            directions = directional_quantities(gg, evals[:k], top_vecs, columns, g_sq)
    return GroupSpectrum(
        name=gg.name, param_names=gg.param_names,
        num_params=sum(problem.params[n].numel() for n in gg.param_names),
        eigenvalues=evals[:rank].clone(), rank=rank, trace=float(torch.diagonal(gg.vv).sum()),
        gradient_norm=g_sq**0.5, directions=directions, gram_eigenvectors=top_vecs)


def eigenvectors(problem, result: SpectrumResult, group: int | str = 0, k: int | None = None,
                 process_group: ProcessGroup | None = None) -> dict[str, Tensor]:
    """The top-k parameter-space eigenvectors of one group, ``e_k = V ~e_k / sqrt(lambda_k)``.

    Returns name -> ``(k, *param.shape)`` (zeros outside the group); orthonormal across k.
    ``process_group``: collective (same problem and result on every rank); each rank multiplies its samples'
    columns of V and the parts are all-reduced, so every rank gets the eigenvectors.
    """
    g = result.group(group) if isinstance(group, str) else result.groups[group]
    if g.gram_eigenvectors is None:
        if g.rank:
            raise CurvscopeError("this spectrum was computed without eigenvectors: call compute_spectrum with "
                                 "eigenvectors=True (or directional=True)")
        return {n: torch.zeros(0, *p.shape, dtype=p.dtype, device=p.device) for n, p in problem.params.items()}
    k = g.top_k if k is None else min(k, g.top_k)
    coeff = g.gram_eigenvectors[:, :k] / g.eigenvalues[:k].sqrt()
    return apply_v(problem, result.columns, coeff, names=g.param_names, process_group=process_group)
