"""Trace estimates of a symmetric operator: exact from unit vectors, Hutchinson, Hutch++ (§9).

- :func:`exact_trace`: ``sum_i e_i^T A e_i`` from the ``dim`` unit vectors;
- :func:`hutchinson`: ``(1/m) sum_i z_i^T A z_i`` with Rademacher ``z_i``, with a standard error;
- :func:`hutchpp` (Meyer, Musco, Musco, Woodruff 2021): a low-rank sketch traced exactly plus Hutchinson on the
  rest.

The conventions (operators, randomness, dtype, device, progress) are those of
:mod:`curvscope.curvature.matfree.krylov`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from curvscope.curvature.matfree.adapter import _apply, _resolve
from curvscope.curvature.matfree.vectors import _device, _generator, _rademacher, _require_positive
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
                device: torch.device | str | None = None, progress: Progress | None = None) -> TraceEstimate:
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

    Returns:
        :class:`TraceEstimate` with ``stderr == 0.0``, ``matvecs == dim`` and ``method == "exact"``.
    """
    matvec, dim, home = _resolve(operator, dim)
    _require_positive(dim=dim)
    device, report = _device(device, home), stage(progress, "trace")
    total = 0.0
    for i in range(dim):
        e = torch.zeros(dim, dtype=dtype, device=device)
        e[i] = 1.0
        total += float(_apply(matvec, e)[i])
        report(i + 1, dim)
    return TraceEstimate(trace=total, stderr=0.0, matvecs=dim, method="exact")


def hutchinson(operator: Any, dim: int | None = None, num_matvecs: int = DEFAULT_MATVECS, *,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None, progress: Progress | None = None) -> TraceEstimate:
    """Hutchinson's trace estimator ``(1/m) sum_i z_i^T A z_i`` with Rademacher ``z_i``.

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

    Returns:
        :class:`TraceEstimate` (``stderr`` NaN when ``m == 1``).
    """
    matvec, dim, home = _resolve(operator, dim)
    _require_positive(dim=dim, num_matvecs=num_matvecs)
    device = _device(device, home)
    if num_matvecs >= dim:
        return exact_trace(matvec, dim, dtype=dtype, device=device, progress=progress)
    gen, report = _generator(generator), stage(progress, "trace")
    samples = []
    for i in range(num_matvecs):
        z = _rademacher(dim, gen, dtype, device)
        samples.append(float(z @ _apply(matvec, z)))
        report(i + 1, num_matvecs)
    trace, stderr = _mean_and_stderr(samples)
    return TraceEstimate(trace=trace, stderr=stderr, matvecs=num_matvecs, method="hutchinson")


def hutchpp(operator: Any, dim: int | None = None, num_matvecs: int = DEFAULT_MATVECS, *,
            generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
            device: torch.device | str | None = None, progress: Progress | None = None) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021) with Rademacher vectors.

    With ``m = num_matvecs`` and ``s = m // 3``: a sketch ``A S`` of ``s`` Rademacher vectors (s matvecs), its
    orthonormal basis ``Q = qr(A S)``, the exact ``tr(Q^T A Q)`` (s matvecs), and Hutchinson on
    ``(I - Q Q^T) A (I - Q Q^T)`` with the remaining ``m - 2s`` Rademacher vectors. The estimate is unbiased;
    ``stderr`` is the standard error of the Hutchinson part, which carries all its randomness given Q. For
    ``m < 3`` this is plain :func:`hutchinson`; for ``m >= dim`` the exact trace from ``dim`` unit vectors.

    Args:
        operator: the symmetric ``A`` of shape ``(dim, dim)``: a curvscope ``Operator``, a SciPy
            ``LinearOperator``, a curvlinops operator, a ``(dim, dim)`` tensor, or a function ``v -> A v`` on
            ``(dim,)`` tensors (see :func:`~curvscope.curvature.matfree.adapter.as_matvec`).
        dim: length of the vectors A acts on; required for a plain function, else read from ``operator.shape``.
        num_matvecs: total budget of matvecs m (all of it is used: ``result.matvecs == min(m, dim)``).
        generator: randomness (default: seeded with 0).
        dtype: the dtype of the vectors (default float64).
        device: where the vectors live (default: the operator's device when it has one, else the CPU). Memory: two
            ``(dim, s)`` matrices.
        progress: ``progress(stage, done, total)``; called as ``("trace", matvecs done, m)`` after every matvec.

    Returns:
        :class:`TraceEstimate` (``stderr`` NaN when a single Hutchinson vector is left, i.e. ``m == 3``).
    """
    matvec, dim, home = _resolve(operator, dim)
    _require_positive(dim=dim, num_matvecs=num_matvecs)
    device = _device(device, home)
    if num_matvecs >= dim:
        return exact_trace(matvec, dim, dtype=dtype, device=device, progress=progress)
    if num_matvecs < 3:
        return hutchinson(matvec, dim, num_matvecs, generator=generator, dtype=dtype, device=device,
                          progress=progress)
    gen, report = _generator(generator), stage(progress, "trace")
    s, total = num_matvecs // 3, num_matvecs
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
