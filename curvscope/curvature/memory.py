"""Memory budgets: how many parameters and samples the engine materializes at once.

The budget is ``max_memory`` bytes (default: a quarter of the available RAM, or half of the free GPU memory).
The generic path holds ``rows x D_chunk`` entries of V at a time plus the per-sample backward intermediates,
estimated as ``activation_factor`` times the sample's share of the parameter rows; chunks of parameters and
then of samples are sized to stay inside the budget. A batch too large for the budget is split, never refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from curvscope.errors import CurvscopeError

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
        raise CurvscopeError(f"--max-memory '{text}': expected a size like 4GiB, 512MB or 2e9 (bytes)")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value < 2**20:
        raise CurvscopeError(f"--max-memory '{text}' is below 1 MiB")
    return value


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

    @classmethod
    def default(cls, device: torch.device, max_memory: int | None = None) -> MemoryPlan:
        if max_memory is not None:
            return cls(budget=max_memory)
        share = 0.5 if device.type == "cuda" else 0.25
        return cls(budget=int(available_memory(device) * share))

    def param_chunks(self, names: Sequence[str], params: dict[str, Tensor], rows: int) -> list[list[str]]:
        """Consecutive parameter tensors grouped so that ``rows x D_chunk`` entries fit in a third of the
        budget (a tensor too large on its own gets a chunk of its own: its samples are then split)."""
        limit = self.budget / 3
        chunks: list[list[str]] = []
        current: list[str] = []
        size = 0.0
        for n in names:
            p = params[n]
            b = rows * p.numel() * p.element_size() * (1 + self.activation_factor)
            if current and size + b > limit:
                chunks.append(current)
                current, size = [], 0.0
            current.append(n)
            size += b
        if current:
            chunks.append(current)
        return chunks

    def sample_chunk(self, problem, names: Sequence[str], per_sample_rows: int, num_samples: int) -> int:
        """How many samples to backpropagate at once for parameters ``names``."""
        d = sum(problem.params[n].numel() for n in names)
        bytes_per_sample = per_sample_rows * d * problem.params[names[0]].element_size() * (
            1 + self.activation_factor)
        # the rows of all samples are kept (they are contracted afterwards): the whole set must fit too
        total = bytes_per_sample * num_samples / (1 + self.activation_factor)
        if total > self.budget * 0.6:
            raise CurvscopeError(
                f"the rows of V for parameters {names[0]}... need {total / 2**30:.1f} GiB, more than the memory "
                f"budget allows ({self.budget / 2**30:.1f} GiB): lower --batch-size, use --subsample or "
                "--mc-samples, or raise --max-memory")
        return max(1, min(num_samples, int(self.budget / 3 / max(bytes_per_sample, 1))))
