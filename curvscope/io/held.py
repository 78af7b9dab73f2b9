"""A batch held where it came from: in host memory (the caller's tensors) or in its source (a file read by rows, a
Dataset), moved to the device one chunk at a time.

A :class:`~curvscope.problem.Problem` over tens of thousands of samples (the curvature of a whole dataset) need not
hold them all on its device: the matrix-free products stream the samples through in chunks
(:mod:`curvscope.curvature.matfree.stream`), and each chunk is read, collated, cast and moved when a product needs
it (:meth:`~curvscope.problem.Problem.part`), then dropped. A batch whose collated samples take
:data:`HOLD_BYTES` or more is held that way (:func:`hold_rows`); anything that asks for the whole batch at once
(``problem.inputs``, ``problem.targets``: the Gram method, lr-suggest, factors) moves it to the device then, once.

- :class:`SourceBatch`: the rows of a :class:`~curvscope.io.sources.Source`, read and collated per chunk: host
  memory holds one chunk plus what the source itself keeps (a memory map, a Dataset object);
- :class:`HostBatch`: tensors in host memory (given to :func:`~curvscope.problem.make_problem`, or the collated
  batch of a source that cannot be read twice alike: an iterable, or a Dataset whose items change between reads,
  such as random augmentations, which would make every product see other samples).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvscope.io.inputs import Inputs, KeywordInputs

HOLD_BYTES = 64 * 2**20
"""A batch whose collated samples take at least this many bytes is held where it came from (not moved to the
device whole)."""
CHECK_ITEMS = 4
"""Items of a map-style Dataset read twice to tell whether its items change between reads."""


class HeldBatch:
    """The samples of a batch off the device: ``len()`` samples, :meth:`read` the raw ``(x, y)`` of a range of them
    (collated, on the host, not yet cast or prepared)."""

    name: str = "data"
    note: str | None = None
    """How the samples are held, for the run's notes."""

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, b0: int, b1: int) -> tuple[Inputs, Tensor]:
        """``(x, y)`` of the batch samples ``b0 <= n < b1``."""
        raise NotImplementedError


class HostBatch(HeldBatch):
    """Tensors held where they are (host memory; referenced, not copied): a chunk is a slice."""

    def __init__(self, x: Inputs, y: Tensor, name: str = "data", note: str | None = None):
        self.x, self.y, self.name = x, y, name
        self.note = note or "held in host memory"

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def read(self, b0: int, b1: int) -> tuple[Inputs, Tensor]:
        """Slices of the tensors."""
        return self.x[b0:b1], self.y[b0:b1]


class SourceBatch(HeldBatch):
    """The rows ``indices`` of a :class:`~curvscope.io.sources.Source`, read (and collated) a chunk at a time."""

    def __init__(self, source: Any, indices: Tensor):
        self.source, self.indices, self.name = source, torch.as_tensor(indices, dtype=torch.int64), source.name
        self.note = "read from the data a chunk at a time"

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def read(self, b0: int, b1: int) -> tuple[Inputs, Tensor]:
        """The source's rows ``indices[b0:b1]``."""
        return self.source.read(self.indices[b0:b1])


class Batch:
    """A problem's samples: ``resident`` (inputs and targets on the device, prepared), or ``held`` (a
    :class:`HeldBatch`; moved to the device whole only when asked, and then kept as the resident copy).

    ``tokens``: the batch's valid-token count when it was counted while the held batch was checked."""

    def __init__(self, inputs: Inputs | None = None, targets: Tensor | None = None, held: HeldBatch | None = None,
                 tokens: int | None = None):
        if held is None and (inputs is None or targets is None):
            raise ValueError("a batch is resident (inputs and targets) or held")
        self.inputs, self.targets, self.held, self.tokens = inputs, targets, held, tokens

    @property
    def resident(self) -> bool:
        """Whether the whole batch is on the device."""
        return self.targets is not None

    def __len__(self) -> int:
        return int(self.targets.shape[0]) if self.targets is not None else len(self.held)


def sample_bytes(x: Any, y: Any) -> int:
    """Bytes of one sample: ``x`` and ``y`` are tensors (or :class:`KeywordInputs`) of samples, or a source's
    schema entries ``(dtype, shape)`` (a dict of them for keyword inputs)."""
    def size(part: Any) -> int:
        if isinstance(part, KeywordInputs):
            return sum(size(t) for t in part.values())
        if isinstance(part, dict):
            return sum(size(t) for t in part.values())
        if isinstance(part, Tensor):
            return part[0].numel() * part.element_size() if part.shape[0] else 0
        dtype, shape = part
        return int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()

    return size(x) + size(y)


def hold_tensors(x: Inputs, y: Tensor, name: str = "data") -> HostBatch | None:
    """A batch given as tensors: held where they are (a :class:`HostBatch`) at :data:`HOLD_BYTES` or more, else
    ``None`` (moved to the device whole)."""
    return HostBatch(x, y, name) if int(y.shape[0]) * sample_bytes(x, y) >= HOLD_BYTES else None


def hold_rows(source: Any, indices: Tensor) -> HeldBatch | None:
    """How a batch of the rows ``indices`` of ``source`` is held: ``None`` (read whole, then on the device) below
    :data:`HOLD_BYTES`; else a :class:`SourceBatch`, or a :class:`HostBatch` of the collated rows when the source
    cannot be read again alike (an iterable; a Dataset whose first items differ between two reads)."""
    from curvscope.io.factory import MapSource

    indices = torch.as_tensor(indices, dtype=torch.int64)
    n = int(indices.shape[0])
    if n * sample_bytes(*source.schema()) < HOLD_BYTES:
        return None
    if not source.sized:
        x, y = source.read(indices)
        return HostBatch(x, y, source.name, note="held in host memory (an iterable is read once)")
    if isinstance(source, MapSource) and not _same(source.read(indices[:CHECK_ITEMS], cached=False),
                                                   source.read(indices[:CHECK_ITEMS], cached=False)):
        x, y = source.read(indices)
        return HostBatch(x, y, source.name, note="held in host memory: the Dataset's items change between reads "
                         "(random transforms?), so they are read once")
    return SourceBatch(source, indices)


def _same(a: tuple[Inputs, Tensor], b: tuple[Inputs, Tensor]) -> bool:
    def parts(pair):
        x, y = pair
        return [*(x.values() if isinstance(x, KeywordInputs) else [x]), y]

    return all(s.shape == t.shape and bool(torch.equal(s, t)) for s, t in zip(parts(a), parts(b), strict=True))


def hold_batch(held: HeldBatch, loss: Any, num_outputs: int, dtype: torch.dtype, shift_labels: bool
               ) -> tuple[Batch, Any]:
    """The :class:`Batch` of a held batch and the loss normalized over it (as
    :meth:`~curvscope.losses.Loss.for_batch` on the whole batch): every chunk is read once and its targets checked
    against the loss on the host (the reads check the inputs finite), counting the target weights and valid
    tokens. Nothing reaches the device."""
    from dataclasses import replace

    from curvscope.losses import shift_labels as shift

    n = len(held)
    x, y = held.read(0, 1)
    step = max(1, HOLD_BYTES // max(1, sample_bytes(x, y)))
    weighted = not (loss.user is not None or (not loss.positions and loss.class_weights is None))
    weight, tokens = 0.0, 0
    for b0 in range(0, n, step):
        _, y = held.read(b0, min(n, b0 + step))
        targets = loss.prepare_targets(y, num_outputs, dtype, held.name)
        targets = shift(targets) if shift_labels else targets
        if weighted:
            weight += float(loss.target_weights(targets).sum())
        if loss.positions:
            tokens += int(loss.valid_tokens(targets).sum())
    if weighted:
        if weight == 0:  # no chunk carries loss: the whole batch's message
            loss.for_batch(targets)
        loss = replace(loss, token_scale=n / weight)
    return Batch(held=held, tokens=tokens if loss.positions else None), loss
