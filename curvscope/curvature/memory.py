"""Memory budgets: how many parameters and columns of V the engine materializes at once.

The budget is ``max_memory`` bytes (default: a quarter of the available RAM, or half of the free GPU memory).
The generic path holds ``rows x D_chunk`` entries of V at a time plus the per-sample backward intermediates,
estimated as ``activation_factor`` times the rows; chunks of parameters and then of columns are sized to stay
inside the budget.

A batch too large for the budget is split, never refused: the columns of the extended ``[V, G]`` are cut
into rectangular blocks (samples x seeds, see :func:`column_blocks`) and the Gram is accumulated block pair by
block pair (:func:`pairwise`): for blocks ``i <= j`` the rows of both are in memory, their product fills the
``(i, j)`` and ``(j, i)`` blocks of ``vv``/``vg``/``gg``. When the rows of all blocks fit they are computed
once and kept; otherwise a stripe of blocks is kept and the others are recomputed for each stripe (memory
traded for recomputation).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvscope.errors import OptionError

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_memory(text: str | int | None) -> int | None:
    """``"4GiB"``, ``"512M"``, ``"2e9"`` -> bytes; ``None``/``"auto"`` -> ``None`` (use the default)."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "auto")):
        return None
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise OptionError("max_memory", f"'{str(text)[:40]}': expected a size like 4GiB, 512MB or 2e9 (bytes)")
    try:
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    except OverflowError:
        raise OptionError("max_memory", f"'{str(text)[:40]}' is out of range") from None
    if value < 2**20:
        raise OptionError("max_memory", f"'{text}' is below 1 MiB")
    return value


def format_bytes(size: float) -> str:
    """A byte count for messages, in the largest binary unit it reaches: ``"123 MiB"``, ``"5.4 GiB"``,
    ``"11.2 TiB"``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


def available_memory(device: torch.device) -> int:
    """Bytes free for the engine on ``device``."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


@dataclass
class MemoryPlan:
    """Chunk sizes derived from a byte budget."""

    budget: int
    activation_factor: float = 4.0
    requested: int | None = None
    """The ``max_memory`` asked for when it was more than the device has (the budget is then what it has)."""

    @classmethod
    def default(cls, device: torch.device, max_memory: int | None = None) -> MemoryPlan:
        """The plan for ``device``: a budget of ``max_memory`` bytes when given, else half the free GPU memory
        (a quarter of the available RAM on the CPU). A ``max_memory`` beyond the memory the device has available
        is capped at it (``requested`` keeps the value asked for): a plan never counts on memory that is not
        there, so a Gram matrix too large for the machine is planned as Lanczos or refused, never allocated."""
        if max_memory is not None:
            available = available_memory(device)
            if max_memory > available:
                return cls(budget=available, requested=max_memory)
            return cls(budget=max_memory)
        share = 0.5 if device.type == "cuda" else 0.25
        return cls(budget=int(available_memory(device) * share))

    def describe(self) -> str:
        """The budget for messages: ``"4 GiB"``, or ``"22 GiB available (max_memory 1 TiB is more)"``."""
        if self.requested is None:
            return format_bytes(self.budget)
        return f"{format_bytes(self.budget)} available; the {format_bytes(self.requested)} asked for is more"

    @property
    def limit(self) -> float:
        """Bytes one stage may hold: a third of the budget (rows kept, rows being computed, the rest)."""
        return self.budget / 3

    def param_chunks(self, names: Sequence[str], params: dict[str, Tensor], rows: int) -> list[list[str]]:
        """Consecutive parameter tensors grouped so that ``rows x D_chunk`` entries fit in a third of the
        budget (a tensor too large on its own gets a chunk of its own: its columns are then split)."""
        chunks: list[list[str]] = []
        current: list[str] = []
        size = 0.0
        for n in names:
            p = params[n]
            b = rows * p.numel() * p.element_size() * (1 + self.activation_factor)
            if current and size + b > self.limit:
                chunks.append(current)
                current, size = [], 0.0
            current.append(n)
            size += b
        if current:
            chunks.append(current)
        return chunks

    def sample_chunk(self, problem, names: Sequence[str], per_sample_rows: int, num_samples: int) -> int:
        """How many samples to backpropagate at once for parameters ``names`` (at least 1): their rows and
        backward intermediates fit in a third of the budget."""
        d = sum(problem.params[n].numel() for n in names)
        bytes_per_sample = per_sample_rows * d * problem.params[names[0]].element_size() * (
            1 + self.activation_factor)
        return max(1, min(num_samples, int(self.limit / max(bytes_per_sample, 1))))

    def blocking(self, total_columns: int, kept_bytes: float, work_bytes: float) -> tuple[int, int]:
        """Block sizes for :func:`pairwise`: ``(columns per block, blocks held at once)``.

        Args:
            total_columns: columns of the extended ``[V, G]``.
            kept_bytes: bytes per column of what is kept for the contraction (rows of V, or ghost factors).
            work_bytes: bytes per column needed transiently while computing them (backward intermediates).

        Everything in one block when it fits in a third of the budget. Otherwise half of that goes to
        computing one block (its rows and work) and half to the blocks held; when all blocks' rows fit there,
        each block is computed once, else they are held a stripe at a time and the rest recomputed.
        """
        kept, work = max(kept_bytes, 1.0), max(work_bytes, 1.0)
        if total_columns * (kept + work) <= self.limit:
            return max(total_columns, 1), 1
        columns = max(1, int(self.limit / 2 / (kept + work)))
        return columns, max(1, int(self.limit / 2 / (columns * kept)))

    def pair_samples(self, bytes_per_pair: float) -> int:
        """Samples per side of a sub-block when a contraction needs ``bytes_per_pair`` per pair of samples."""
        return max(1, math.isqrt(int(self.limit / max(bytes_per_pair, 1.0))))


@dataclass
class ColumnBlock:
    """A rectangle of columns of the extended ``[V, G]``: ``b`` samples times ``k`` seeds.

    Attributes:
        samples: ``(b,)`` batch indices.
        source: the seeds ``(b, k, C)``, or a function that builds them (read them as :attr:`seeds`; built
            seeds exist only while the block is processed).
        index: ``(b*k,)`` positions in the extended Gram, sample-major: ``n * K + c`` for seed c of curvature
            sample position n (the ``vv`` index), ``N_V * K + m`` for the gradient of batch sample m.
    """

    samples: Tensor
    source: Tensor | Callable[[], Tensor]
    index: Tensor

    @property
    def seeds(self) -> Tensor:
        """``(b, k, C)``: ``seeds[n, c]`` is backpropagated through sample ``samples[n]`` (built on each read
        when the block holds a function)."""
        return self.source if isinstance(self.source, Tensor) else self.source()

    @property
    def num_columns(self) -> int:
        """``b * k``: the number of columns in the block."""
        return self.index.numel()


def column_blocks(columns, grad_seeds: Tensor | None, max_columns: int, curvature: tuple[int, int] | None = None,
                  batch: tuple[int, int] | None = None) -> list[ColumnBlock]:
    """The columns of ``[V, G]`` cut into blocks of at most ``max_columns`` columns, with their extended indices.

    When V covers the whole batch a sample's gradient seed joins its K seeds (one backward for K + 1 columns;
    then ``batch`` is not used: a sample's gradient goes with its curvature sample). A sample whose columns alone
    exceed ``max_columns`` has its seeds split over several blocks.

    Args:
        columns: the :class:`~curvscope.curvature.gram.columns.Columns` of V (``N_V`` samples, K seeds each).
        grad_seeds: ``(N, 1, C)`` gradient seeds of all batch samples, or ``None`` (V only).
        max_columns: the most columns in one block.
        curvature: only the curvature samples ``[c0, c1)`` (default: all ``N_V``). A rank of a sharded layout
            passes its range.
        batch: only the gradients of the batch samples ``[b0, b1)`` (default: all N). A rank of a sharded layout
            passes its range.
    """
    N_V, K = columns.num_samples, columns.per_sample
    num_v = N_V * K
    c0, c1 = (0, N_V) if curvature is None else curvature
    samples = columns.samples[c0:c1]
    v_index = torch.arange(c0 * K, c1 * K, device=samples.device).reshape(c1 - c0, K)

    def v_seeds(r0: int, r1: int, a: int, b: int) -> Tensor:
        return columns.seed_chunk(c0 + r0, c0 + r1, a, b)

    def joined(r0: int, r1: int, a: int, b: int) -> Tensor:  # [V seeds, gradient seed] of each sample
        parts = [v_seeds(r0, r1, a, min(b, K))] if a < K else []
        if b > K:
            parts.append(grad_seeds[samples[r0:r1]])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    # (samples (m,), seeds of samples [r0, r1) and columns [a, b) as (r1 - r0, b - a, C), index (m, k))
    units: list[tuple[Tensor, Callable[[int, int, int, int], Tensor], Tensor]] = []
    if grad_seeds is None:
        units.append((samples, v_seeds, v_index))
    elif N_V == grad_seeds.shape[0]:
        units.append((samples, joined, torch.cat([v_index, num_v + samples.unsqueeze(1)], dim=1)))
    else:
        b0, b1 = (0, grad_seeds.shape[0]) if batch is None else batch
        mine = torch.arange(b0, b1, device=samples.device)
        units += [(samples, v_seeds, v_index),
                  (mine, lambda r0, r1, a, b: grad_seeds[b0 + r0:b0 + r1, a:b], (num_v + mine).unsqueeze(1))]
    blocks = []
    for idx, take, index in units:
        m, k = index.shape
        if m == 0:
            continue
        if max_columns >= k:
            step = max_columns // k
            blocks += [ColumnBlock(idx[i:i + step], _seeds(take, i, min(i + step, m), 0, k),
                                   index[i:i + step].reshape(-1)) for i in range(0, m, step)]
        else:
            step = max_columns
            blocks += [ColumnBlock(idx[n:n + 1], _seeds(take, n, n + 1, c, min(c + step, k)), index[n, c:c + step])
                       for n in range(m) for c in range(0, k, step)]
    return blocks


def _seeds(take: Callable[[int, int, int, int], Tensor], r0: int, r1: int, a: int, b: int) -> Callable[[], Tensor]:
    """A block's seeds as a function of nothing: a view of the columns' tensor, or built for the block (sequence
    outputs, or a sample's seeds joined with its gradient seed) each time the block is processed."""
    return lambda: take(r0, r1, a, b)


def pairwise(blocks: Sequence[ColumnBlock], compute: Callable[[ColumnBlock], Any],
             contract: Callable[[ColumnBlock, Any, ColumnBlock, Any], None], held: int) -> None:
    """Call ``contract(block_i, F_i, block_j, F_j)`` once for every pair ``i <= j``, ``F = compute(block)``.

    At most ``held`` blocks' ``F`` (plus one) are in memory: a stripe of ``held`` blocks is computed and kept,
    the blocks after it are computed one at a time and contracted with the stripe, then the next stripe.
    With ``held >= len(blocks)`` every block is computed once; in general about ``n^2 / (2 held)`` times.
    """
    n = len(blocks)
    for s0 in range(0, n, held):
        stripe = [(b, compute(b)) for b in blocks[s0:s0 + held]]
        for a, (ba, fa) in enumerate(stripe):
            for bb, fb in stripe[a:]:
                contract(ba, fa, bb, fb)
        for bj in blocks[s0 + held:]:
            fj = compute(bj)
            for ba, fa in stripe:
                contract(ba, fa, bj, fj)
