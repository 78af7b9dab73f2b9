"""Trace estimates of a symmetric operator: exact from unit vectors, Hutchinson, Hutch++ (§9).

- :func:`exact_trace`: ``sum_i e_i^T A e_i`` from the ``dim`` unit vectors;
- :func:`hutchinson`: ``(1/m) sum_i z_i^T A z_i`` with Rademacher ``z_i``, with a standard error;
- :func:`hutchpp` (Meyer, Musco, Musco, Woodruff 2021): a low-rank sketch traced exactly plus Hutchinson on the
  rest.

Every estimator streams its probe vectors one at a time and takes ``max_vectors``, how many vectors of ``dim``
numbers it may hold at once (:mod:`~curvscope.curvature.matfree.budget`): two for the exact trace and
Hutchinson; for Hutch++ the sketch is cut to what the budget holds and the rest of its products go to
Hutchinson on the deflated operator.

The conventions (operators, randomness, dtype, device, progress) are those of
:mod:`curvscope.curvature.matfree.krylov`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from curvscope.curvature.matfree.adapter import MatVec, _apply, _resolve
from curvscope.curvature.matfree.budget import (
    TRACE_MIN_VECTORS,
    check_max_vectors,
    hutchpp_sketch,
    hutchpp_vectors,
    require_vectors,
)
from curvscope.curvature.matfree.vectors import _device, _generator, _rademacher, _require_positive
from curvscope.errors import CurvscopeError
from curvscope.progress import Progress, stage

DEFAULT_MATVECS = 60  # default budget of hutchinson() and hutchpp() (compute_matfree_spectrum's trace_matvecs)


@dataclass
class TraceEstimate:
    """A trace estimate.

    Attributes:
        trace: the estimate of ``tr(A)``.
        stderr: standard error of its random part (sample standard deviation of the Hutchinson samples over
            ``sqrt(#samples)``); 0.0 when exact, NaN with a single sample.
        matvecs: operator applications used.
        method: ``"hutch++"``, ``"hutchinson"`` or ``"exact"``.
    """

    trace: float
    stderr: float
    matvecs: int
    method: str

    @property
    def exact(self) -> bool:
        """The trace is exact (from the unit vectors), not estimated."""
        return self.method == "exact"


def _mean_and_stderr(samples: list[float]) -> tuple[float, float]:
    x = torch.tensor(samples, dtype=torch.float64)
    stderr = float(x.std(unbiased=True) / math.sqrt(x.numel())) if x.numel() > 1 else math.nan
    return float(x.mean()), stderr


def exact_trace(operator: Any, dim: int | None = None, *, dtype: torch.dtype = torch.float64,
                device: torch.device | str | None = None, progress: Progress | None = None,
                max_vectors: int | None = None) -> TraceEstimate:
    """The exact trace ``sum_i e_i^T A e_i`` from the ``dim`` unit vectors.

    Args:
        operator: the symmetric ``A`` of shape ``(dim, dim)``: a curvscope ``Operator``, a SciPy
            ``LinearOperator``, a curvlinops operator, a ``(dim, dim)`` tensor, or a function ``v -> A v`` on
            ``(dim,)`` tensors (see :func:`~curvscope.curvature.matfree.adapter.as_matvec`).
        dim: length of the vectors A acts on; required for a plain function, else read from ``operator.shape``.
        dtype: the dtype of the vectors (default float64).
        device: where the vectors live (default: the operator's device when it has one, else the CPU).
        progress: ``progress(stage, done, total)``; called as ``("trace", matvecs done, dim)`` after every
            matvec.
        max_vectors: vectors of ``dim`` numbers it may hold at once (``None``: no limit); it holds 2, a unit
            vector and its product.

    Returns:
        :class:`TraceEstimate` with ``stderr == 0.0``, ``matvecs == dim`` and ``method == "exact"``.

    Raises:
        OptionError: ``max_memory`` when ``max_vectors < 2`` (the message names the bytes needed).
    """
    matvec, dim, home = _resolve(operator, dim)
    _require_positive(dim=dim)
    require_vectors(check_max_vectors(max_vectors), TRACE_MIN_VECTORS, dim, dtype, "the exact trace")
    device, report = _device(device, home), stage(progress, "trace")
    total = 0.0
    for i in range(dim):
        e = torch.zeros(dim, dtype=dtype, device=device)
        e[i] = 1.0
        total += float(_apply(matvec, e)[i])
        del e
        report(i + 1, dim)
    return TraceEstimate(trace=total, stderr=0.0, matvecs=dim, method="exact")


def hutchinson(operator: Any, dim: int | None = None, num_matvecs: int = DEFAULT_MATVECS, *,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None, progress: Progress | None = None,
               max_vectors: int | None = None) -> TraceEstimate:
    """Hutchinson's trace estimator ``(1/m) sum_i z_i^T A z_i`` with Rademacher ``z_i``, streamed: one ``z_i``
    and its product at a time, only the numbers ``z_i^T A z_i`` kept.

    Args:
        operator: the symmetric ``A`` of shape ``(dim, dim)``: a curvscope ``Operator``, a SciPy
            ``LinearOperator``, a curvlinops operator, a ``(dim, dim)`` tensor, or a function ``v -> A v`` on
            ``(dim,)`` tensors (see :func:`~curvscope.curvature.matfree.adapter.as_matvec`).
        dim: length of the vectors A acts on; required for a plain function, else read from ``operator.shape``.
        num_matvecs: number of random vectors m. With ``m >= dim`` the trace is computed exactly from the
            ``dim`` unit vectors instead (``stderr`` 0.0, ``matvecs == dim``).
        generator: randomness (default: seeded with 0).
        dtype: the dtype of the vectors (default float64).
        device: where the vectors live (default: the operator's device when it has one, else the CPU).
        progress: ``progress(stage, done, total)``; called as ``("trace", matvecs done, m)`` after every matvec.
        max_vectors: vectors of ``dim`` numbers it may hold at once (``None``: no limit); it holds 2, ``z_i``
            and ``A z_i``, whatever the budget (the numbers do not depend on it).

    Returns:
        :class:`TraceEstimate` (``stderr`` NaN when ``m == 1``).

    Raises:
        OptionError: ``max_memory`` when ``max_vectors < 2`` (the message names the bytes needed).
    """
    matvec, dim, home = _resolve(operator, dim)
    _require_positive(dim=dim, num_matvecs=num_matvecs)
    require_vectors(check_max_vectors(max_vectors), TRACE_MIN_VECTORS, dim, dtype, "a trace estimate")
    device = _device(device, home)
    if num_matvecs >= dim:
        return exact_trace(matvec, dim, dtype=dtype, device=device, progress=progress)
    gen, report = _generator(generator), stage(progress, "trace")
    samples = []
    for i in range(num_matvecs):
        z = _rademacher(dim, gen, dtype, device)
        samples.append(float(z @ _apply(matvec, z)))
        del z
        report(i + 1, num_matvecs)
    trace, stderr = _mean_and_stderr(samples)
    return TraceEstimate(trace=trace, stderr=stderr, matvecs=num_matvecs, method="hutchinson")


def hutchpp(operator: Any, dim: int | None = None, num_matvecs: int = DEFAULT_MATVECS, *,
            generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
            device: torch.device | str | None = None, progress: Progress | None = None,
            max_vectors: int | None = None) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021) with Rademacher vectors, within ``max_vectors``.

    With ``m = num_matvecs`` and a sketch of ``s`` vectors: a sketch ``A S`` of ``s`` Rademacher vectors (s
    matvecs), its orthonormal basis ``Q``, the exact ``tr(Q^T A Q)`` (one matvec per basis vector), and
    Hutchinson on ``(I - Q Q^T) A (I - Q Q^T)`` with the ``r`` remaining Rademacher vectors:
    ``tr A ~= tr(Q^T A Q) + (1/r) sum_j w_j^T A w_j`` with ``w_j = (I - Q Q^T) z_j``. The estimate is unbiased
    for any ``s`` (Q is independent of the ``z_j``); ``stderr`` is the standard error of the Hutchinson part,
    which carries all its randomness given Q: the sample standard deviation of the ``w_j^T A w_j`` over
    ``sqrt(r)``. Its variance given Q is ``(2 / r) (||B||_F^2 - sum_i B_ii^2)`` with ``B = (I - QQ^T) A (I -
    QQ^T)``; Meyer et al. bound ``||B||_F`` by about ``||A - A_s||_F`` (A_s: the best rank-s approximation),
    so the error falls as fast as A's tail beyond s.

    The sketch is ``s = m // 3`` (Meyer et al.'s split), cut to ``max_vectors - 2`` when the budget is smaller
    (the guarantee of Meyer et al., relative error ``O(1/m)`` for positive semi-definite A, then holds only with
    A's tail beyond the smaller sketch). Without a budget, or with one of ``max(2 s, s + 3)`` vectors, Q is
    ``qr(A S)`` from the whole ``(dim, s)`` sketch. Otherwise the sketch is streamed: each ``A z`` is
    orthogonalized twice (classical Gram-Schmidt) against the basis so far and kept when it adds a direction
    (its norm after projection above ``sqrt(eps)`` of its own), so Q spans the same space in ``s + 2``
    vectors; a sketch direction already in Q (A of low rank) gives its matvec to the Hutchinson part. Every
    matvec is used: ``r = m - s - rank(Q)``. With no room for a sketch (``max_vectors`` 2 or 3, or ``m < 3``)
    this is plain :func:`hutchinson`; for ``m >= dim`` the exact trace from ``dim`` unit vectors.

    Args:
        operator: the symmetric ``A`` of shape ``(dim, dim)``: a curvscope ``Operator``, a SciPy
            ``LinearOperator``, a curvlinops operator, a ``(dim, dim)`` tensor, or a function ``v -> A v`` on
            ``(dim,)`` tensors (see :func:`~curvscope.curvature.matfree.adapter.as_matvec`).
        dim: length of the vectors A acts on; required for a plain function, else read from ``operator.shape``.
        num_matvecs: total budget of matvecs m (all of it is used: ``result.matvecs == min(m, dim)``).
        generator: randomness (default: seeded with 0).
        dtype: the dtype of the vectors (default float64).
        device: where the vectors live (default: the operator's device when it has one, else the CPU).
        progress: ``progress(stage, done, total)``; called as ``("trace", matvecs done, m)`` after every matvec.
        max_vectors: vectors of ``dim`` numbers it may hold at once, the products included (``None``: no limit,
            the one-piece sketch of ``max(2 s, s + 3)`` vectors); at least 2.

    Returns:
        :class:`TraceEstimate` (``stderr`` NaN when a single Hutchinson vector is left, i.e. ``m == 3``).

    Raises:
        OptionError: ``max_memory`` when ``max_vectors < 2`` (the message names the bytes needed).
    """
    matvec, dim, home = _resolve(operator, dim)
    _require_positive(dim=dim, num_matvecs=num_matvecs)
    max_vectors = check_max_vectors(max_vectors)
    require_vectors(max_vectors, TRACE_MIN_VECTORS, dim, dtype, "a trace estimate")
    device = _device(device, home)
    if num_matvecs >= dim:
        return exact_trace(matvec, dim, dtype=dtype, device=device, progress=progress)
    s = hutchpp_sketch(num_matvecs, max_vectors)
    if num_matvecs < 3 or s == 0:
        return hutchinson(matvec, dim, num_matvecs, generator=generator, dtype=dtype, device=device,
                          progress=progress)
    gen, report = _generator(generator), stage(progress, "trace")
    if max_vectors is None or max_vectors >= hutchpp_vectors(s, streamed=False):
        return _hutchpp_whole(matvec, dim, num_matvecs, s, gen, dtype, device, report)
    return _hutchpp_streamed(matvec, dim, num_matvecs, s, gen, dtype, device, report)


def _hutchpp_whole(matvec: MatVec, dim: int, total: int, s: int, gen: torch.Generator, dtype: torch.dtype,
                   device: torch.device, report) -> TraceEstimate:
    """Hutch++ with the whole ``(dim, s)`` sketch and its QR factor in memory (``max(2 s, s + 3)`` vectors)."""
    sketch = torch.empty(dim, s, dtype=dtype, device=device)
    for i in range(s):
        sketch[:, i] = _apply(matvec, _rademacher(dim, gen, dtype, device))
        report(i + 1, total)
    q, _ = torch.linalg.qr(sketch)
    del sketch
    low_rank = 0.0
    for i in range(s):
        low_rank += float(q[:, i] @ _apply(matvec, q[:, i].contiguous()))
        report(s + i + 1, total)
    samples = []
    for i in range(total - 2 * s):
        z = _rademacher(dim, gen, dtype, device)
        z = z - q @ (q.T @ z)
        samples.append(float(z @ _apply(matvec, z)))
        report(2 * s + i + 1, total)
    rest, stderr = _mean_and_stderr(samples)
    return TraceEstimate(trace=low_rank + rest, stderr=stderr, matvecs=total, method="hutch++")


def _hutchpp_streamed(matvec: MatVec, dim: int, total: int, s: int, gen: torch.Generator, dtype: torch.dtype,
                      device: torch.device, report) -> TraceEstimate:
    """Hutch++ with the sketch orthonormalized as it is drawn: Q (``s`` rows) and two work vectors."""
    q = torch.empty(s, dim, dtype=dtype, device=device)
    rank, keep = 0, torch.finfo(dtype).eps ** 0.5
    for i in range(s):
        y = _apply(matvec, _rademacher(dim, gen, dtype, device))
        norm = float(torch.linalg.vector_norm(y))
        for _ in range(2):  # classical Gram-Schmidt, twice ("twice is enough")
            y = torch.addmv(y, q[:rank].T, q[:rank] @ y, alpha=-1.0) if rank else y
        after = float(torch.linalg.vector_norm(y))
        if not (math.isfinite(norm) and math.isfinite(after)):
            raise CurvscopeError(f"matvec returned non-finite values at sketch vector {i + 1}")
        if after > keep * norm:
            torch.div(y, after, out=q[rank])
            rank += 1
        del y
        report(i + 1, total)
    low_rank = 0.0
    for i in range(rank):
        low_rank += float(q[i] @ _apply(matvec, q[i]))
        report(s + i + 1, total)
    samples, done = [], s + rank
    for i in range(total - done):
        z = _rademacher(dim, gen, dtype, device)
        z = torch.addmv(z, q[:rank].T, q[:rank] @ z, alpha=-1.0) if rank else z
        samples.append(float(z @ _apply(matvec, z)))
        del z
        report(done + i + 1, total)
    rest, stderr = _mean_and_stderr(samples)
    return TraceEstimate(trace=low_rank + rest, stderr=stderr, matvecs=total, method="hutch++")
