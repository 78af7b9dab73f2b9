"""Matrix-free curvature over a batch too large for one autograd graph: the samples stream through every product in
chunks (§9).

The batch's curvature is the sum of its chunks' parts, ``H = sum_c (|c|/N) H_c`` with ``H_c`` the Hessian of the
chunk's mean ``sum_{n in c} l_n / |c|`` of the batch's per-sample losses (likewise the GGN): each chunk is a
problem of its own (:meth:`~curvscope.problem.Problem.part`, with the batch's loss normalization), and its
operator (:func:`~curvscope.curvature.matfree.operators.curvature_operator`) takes the vector scaled by ``|c|/N``.
:func:`streamed_operator` builds each chunk's graph inside the product and drops it before the next, so a product
holds one chunk's graph (plus the Lanczos basis of the caller), never the whole batch's; it costs a forward and a
first backward more per chunk than the stored-graph operator. A problem whose samples are held off the device
(:mod:`curvscope.io.held`) reads and moves one chunk's samples per chunk: the device never holds the whole batch.
:func:`plan_stream` decides whether to stream: only when the whole batch's graph would not fit its share of the
memory budget (a third, or for a large model all but what its two-vector eigensolver and gradient need), measured
on a probe of a few samples (the storages autograd saves, by saved-tensor hooks, each counted once and the model's
own parameters not at all); it also returns the bytes that graph takes, which the vectors' budget leaves free.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from curvscope.curvature.matfree.operator import Operator
from curvscope.curvature.matfree.operators import _check_names, _operator, curvature_operator
from curvscope.progress import Progress

PROBE = 4
"""Samples of the probe that measures a sample's graph."""
WORK_FACTOR = 3.0
"""A product's peak over its saved graph: the backward's own intermediates."""


def graph_bytes_per_sample(problem, curvature: str = "hessian", names: Sequence[str] | None = None) -> float:
    """Bytes the autograd graph of a product holds per sample: the storages autograd saves for the forward and the
    first backward (``create_graph``) of a probe of :data:`PROBE` samples, divided by their number. A storage saved
    by several nodes counts once, and the parameters' storages (the model, held anyway) not at all."""
    n = min(PROBE, problem.batch_size)
    held = [*problem.params.values(), *problem.model.parameters(), *problem.model.buffers()]  # the model's, frozen too
    owned = set()
    for t in held:
        with contextlib.suppress(RuntimeError, NotImplementedError):
            owned.add(t.untyped_storage().data_ptr())
    seen: set[int] = set()
    saved = [0]

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without a plain storage (sparse, a subclass)
            key, size = id(t), t.numel() * t.element_size()
        if key not in seen and key not in owned:
            seen.add(key)
            saved[0] += size
        return t

    probe = problem.part(0, n)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        op = curvature_operator(probe, names, curvature, samples=(0, n))
        op.matvec(torch.zeros(op.dim, dtype=problem.dtype, device=problem.device))
    return saved[0] / n


def graph_room(problem) -> int | None:
    """Bytes that must fit beside a product's graph when the eigensolver of a large model
    (:data:`~curvscope.curvature.method.LARGE_MODEL_PARAMS`) runs in two vectors: its
    :data:`~curvscope.curvature.matfree.lean.LEAN_VECTORS` vectors and the gradient. The graph may take the rest of
    the budget (:func:`plan_stream`); ``None`` for a smaller model, whose basis gets the larger share."""
    from curvscope.curvature.matfree.lean import LEAN_VECTORS
    from curvscope.curvature.method import LARGE_MODEL_PARAMS

    if problem.num_params <= LARGE_MODEL_PARAMS:
        return None
    return (LEAN_VECTORS + 1) * problem.num_params * torch.empty(0, dtype=problem.dtype).element_size()


@dataclass(frozen=True)
class StreamPlan:
    """What :func:`plan_stream` decides.

    Attributes:
        chunk: samples per streamed chunk, or ``None`` when the whole batch's graph fits (no streaming).
        graph_bytes: the bytes one product's graph is expected to take at its peak (``chunk`` or all samples, times
            the per-sample bytes and :data:`WORK_FACTOR`, at most the graph's share of the budget): the vectors'
            budget leaves them free.
    """

    chunk: int | None
    graph_bytes: int


def plan_stream(problem, curvature: str, max_memory: int | None = None, names: Sequence[str] | None = None,
                beside: int | None = None) -> StreamPlan:
    """Whether to stream the batch, in chunks of how many samples, so that a product's graph fits its share of the
    memory budget (:class:`~curvscope.curvature.memory.MemoryPlan`).

    Args:
        problem: the problem (probed on :data:`PROBE` samples: one product).
        curvature: ``"hessian"`` or ``"ggn"``.
        max_memory: the budget in bytes (default: the device's default budget).
        names: the parameters of the operator (default: all).
        beside: bytes that must fit beside the graph (the eigensolver's fewest vectors and the gradient). The graph
            may take the rest of the budget, and at least a third of it; default: :func:`graph_room` (a large
            model's graph takes all but its two-vector eigensolver's share, a smaller model's a third).
    """
    from curvscope.curvature.memory import MemoryPlan

    budget = MemoryPlan.default(problem.device, max_memory).budget
    room = graph_room(problem) if beside is None else beside
    limit = budget / 3 if room is None else max(budget / 3, budget - room)
    per_sample = graph_bytes_per_sample(problem, curvature, names) * WORK_FACTOR
    chunk = max(1, int(limit // max(per_sample, 1.0)))
    if chunk >= problem.batch_size:
        return StreamPlan(None, int(per_sample * problem.batch_size))
    # one sample over the graph's share still streams one at a time; the vectors keep the rest of the budget
    return StreamPlan(chunk, int(min(per_sample * chunk, limit)))


def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(b0, min(n, b0 + chunk)) for b0 in range(0, n, chunk)]


class _Rate:
    """Reports ``progress("samples", done, None)``: samples through the products so far (the CLI shows the rate)."""

    def __init__(self, progress: Progress | None):
        self.progress, self.done = progress, 0

    def __call__(self, samples: int) -> None:
        self.done += samples
        if self.progress is not None:
            self.progress("samples", self.done, None)


def streamed_operator(problem, names: Sequence[str] | None = None, curvature: str = "hessian", chunk: int = 1024,
                      progress: Progress | None = None) -> Operator:
    """The curvature operator of the whole batch (as :func:`~curvscope.curvature.matfree.operators.curvature_operator`)
    whose products stream the samples through in chunks of ``chunk``: each chunk's graph is built, used and dropped
    within the product, on that chunk's samples only (a held batch's are read and moved per chunk).
    ``progress("samples", done, None)`` counts the samples streamed."""
    names = _check_names(problem, names)
    rate = _Rate(progress)
    n = problem.batch_size

    def product(parts: list[Tensor], out: list[Tensor] | None = None) -> list[Tensor]:
        total: list[Tensor] | None = out  # a product into ``out`` adds to it: the chunks accumulate there
        for b0, b1 in _chunks(n, chunk):
            scaled = [p * ((b1 - b0) / n) for p in parts]  # the chunk's operator is its mean: weight it by |c|/N
            op = curvature_operator(problem.part(b0, b1), names, curvature, samples=(0, b1 - b0))
            part = op._product(scaled, out)
            del op, scaled  # the chunk's graph and samples go before the next chunk's are built
            if out is None:
                total = part if total is None else [t + p for t, p in zip(total, part, strict=True)]
            rate(b1 - b0)
        return total

    return _operator(problem, names, curvature, product)


def streamed_loss(problem, chunk: int) -> float:
    """The batch loss ``L = sum_n l_n / N``, chunk by chunk, without autograd."""
    with torch.no_grad():
        total = sum(float(problem.per_sample_loss(samples=c).double().sum()) for c in _chunks(problem.batch_size,
                                                                                               chunk))
    return total / problem.batch_size


def streamed_gradient(problem, chunk: int) -> dict[str, Tensor]:
    """The batch gradient ``g = dL/dtheta`` by name, chunk by chunk (one chunk's graph at a time)."""
    names = list(problem.params)
    grads = {n: torch.zeros_like(p) for n, p in problem.params.items()}
    for c in _chunks(problem.batch_size, chunk):
        with torch.enable_grad():
            leaves = {n: p.detach().requires_grad_(True) for n, p in problem.params.items()}
            part = problem.per_sample_loss(leaves, samples=c).sum() / problem.batch_size
            if not part.requires_grad:
                continue
            found = torch.autograd.grad(part, [leaves[n] for n in names], allow_unused=True)
        for n, g in zip(names, found, strict=True):
            if g is not None:
                grads[n] += g
    return grads
