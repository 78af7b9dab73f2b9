"""Memory budgets of the streaming estimators, counted in vectors of ``dim`` numbers (``docs/conventions.md`` §9).

The trace and density estimators (:mod:`~curvscope.curvature.matfree.trace`,
:mod:`~curvscope.curvature.matfree.density`) take ``max_vectors``: how many ``dim``-length vectors of their dtype
they may hold at once, the product ``A v`` they receive included, the operator's own memory (its autograd graph,
its internal buffers) not. A caller with a byte budget derives it with :func:`vectors_within`. What each estimator
holds, in vectors:

- :func:`~curvscope.curvature.matfree.trace.exact_trace`, :func:`~curvscope.curvature.matfree.trace.hutchinson`:
  :data:`TRACE_MIN_VECTORS` (a probe and its product; one vector at a time is streamed, the samples are numbers);
- :func:`~curvscope.curvature.matfree.trace.hutchpp`: :func:`hutchpp_vectors` for the sketch the budget allows
  (:func:`hutchpp_sketch`), at least :data:`TRACE_MIN_VECTORS` (no sketch: plain Hutchinson);
- :func:`~curvscope.curvature.matfree.density.spectral_density`: :func:`density_vectors` with a full basis,
  else :data:`WINDOW_WORK` more than the window of basis vectors the budget allows (:func:`density_window`),
  at least :data:`DENSITY_MIN_VECTORS`.

Random Rademacher vectors drawn on the CPU pass through one byte per entry while they are drawn, and a few
vectors of ``dim`` bits or bytes can be alive for an instant; the counts above leave that out.
"""

from __future__ import annotations

import torch

from curvscope.errors import OptionError, at_least

TRACE_MIN_VECTORS = 2  # a probe vector and its product
SKETCH_WORK = 2  # vectors besides the sketch basis Q in streamed Hutch++: a probe or basis vector and its product
FULL_HUTCHPP_WORK = 3  # vectors besides Q (s vectors) in the one-piece Hutch++ (sketch matrix and QR: 2 s)
KRYLOV_WORK = 5  # besides the basis, a _Krylov step holds q, A q, and two passes of Gram-Schmidt (3 vectors)
PLAIN_KRYLOV_VECTORS = 6  # a _Krylov step without reorthogonalization: 2 basis rows and 4 work vectors
WINDOW_WORK = 2  # vectors besides the window in a windowed Lanczos step: the product and its orthogonalized copy
MIN_WINDOW = 2  # the three-term recurrence needs the last two basis vectors
DENSITY_MIN_VECTORS = MIN_WINDOW + WINDOW_WORK


def vectors_within(budget_bytes: int, dim: int, itemsize: int, reserve: int = 0) -> int:
    """How many vectors of ``dim`` numbers of ``itemsize`` bytes fit in ``budget_bytes`` after ``reserve`` bytes.

    Args:
        budget_bytes: the memory budget in bytes.
        dim: length of the vectors.
        itemsize: bytes per number (``torch.finfo(dtype).bits // 8``; 4 for float32).
        reserve: bytes of the budget held by something else (the operator's graph, a basis kept elsewhere).

    Returns:
        ``(budget_bytes - reserve) // (dim * itemsize)``, 0 when the reserve exhausts the budget; pass it as
        ``max_vectors`` to the estimators.
    """
    at_least("budget_bytes", budget_bytes, 0)
    at_least("dim", dim, 1)
    at_least("itemsize", itemsize, 1)
    at_least("reserve", reserve, 0)
    return max(0, (int(budget_bytes) - int(reserve)) // (int(dim) * int(itemsize)))


def check_max_vectors(max_vectors: int | None) -> int | None:
    """``max_vectors`` as an int (``None`` stays ``None``: no limit); an :class:`OptionError` when negative."""
    if max_vectors is None:
        return None
    if int(max_vectors) != max_vectors or max_vectors < 0:
        raise OptionError("max_vectors", f"must be a count of vectors (an integer >= 0), got {max_vectors}")
    return int(max_vectors)


def require_vectors(max_vectors: int | None, need: int, dim: int, dtype: torch.dtype, what: str) -> None:
    """An :class:`OptionError` on ``max_memory`` when ``max_vectors`` holds fewer than ``need`` vectors."""
    if max_vectors is None or max_vectors >= need:
        return
    from curvscope.curvature.memory import format_bytes

    itemsize = torch.empty((), dtype=dtype).element_size()
    have, needed = max_vectors * dim * itemsize, need * dim * itemsize
    raise OptionError("max_memory", f"is too small: it holds {max_vectors} vector{'s' * (max_vectors != 1)} of "
                      f"{dim:,} {str(dtype).removeprefix('torch.')} numbers ({have:,} bytes); {what} needs at "
                      f"least {need} ({needed:,} bytes, {format_bytes(needed)})")


def hutchpp_sketch(num_matvecs: int, max_vectors: int | None) -> int:
    """The Hutch++ sketch size: ``num_matvecs // 3``, or what ``max_vectors`` leaves beside :data:`SKETCH_WORK`
    (0: plain Hutchinson)."""
    s = num_matvecs // 3
    return s if max_vectors is None else max(0, min(s, max_vectors - SKETCH_WORK))


def hutchpp_vectors(sketch: int, streamed: bool = True) -> int:
    """Vectors Hutch++ holds with a sketch of ``sketch``: ``sketch + 2`` streamed, ``max(2 sketch, sketch + 3)``
    in one piece (the sketch matrix beside its QR factor); 2 without a sketch."""
    if sketch == 0:
        return TRACE_MIN_VECTORS
    return sketch + SKETCH_WORK if streamed else max(2 * sketch, sketch + FULL_HUTCHPP_WORK)


def density_vectors(steps: int, reorthogonalize: bool = True) -> int:
    """Vectors one SLQ Lanczos run holds with its whole basis: ``steps + 5`` (or 6 without reorthogonalization)."""
    return steps + KRYLOV_WORK if reorthogonalize else PLAIN_KRYLOV_VECTORS


def density_window(steps: int, max_vectors: int | None, reorthogonalize: bool = True) -> int | None:
    """The basis window of an SLQ run under ``max_vectors``: ``None`` when the whole basis fits (the unbounded
    Lanczos), else ``min(steps, max_vectors - 2)`` (2 without reorthogonalization); below
    :data:`MIN_WINDOW` the budget is too small."""
    if max_vectors is None or max_vectors >= density_vectors(steps, reorthogonalize):
        return None
    return min(steps, max_vectors - WINDOW_WORK) if reorthogonalize else MIN_WINDOW
