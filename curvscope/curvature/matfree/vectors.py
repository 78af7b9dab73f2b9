"""Random vectors and argument checks shared by the matrix-free estimators (package-internal).

Randomness: every random vector is drawn from a ``torch.Generator`` (default: a CPU generator seeded with 0) on
the generator's device and then moved to the vectors' device, so a seed gives the same vectors on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvscope.errors import CurvscopeError

DISTRIBUTIONS = ("rademacher", "gaussian")


def _generator(generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(0)


def _device(device: torch.device | str | None, home: torch.device | None = None, start: Tensor | None = None
            ) -> torch.device:
    """Where the vectors live: ``device``, else the operator's device ``home``, else the start vector's device,
    else the CPU."""
    for choice in (device, home, None if start is None else start.device):
        if choice is not None:
            return torch.device(choice)
    return torch.device("cpu")


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise CurvscopeError(f"{name} must be a positive integer, got {value}")


def _rademacher(dim: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A ``(dim,)`` vector of independent +-1 entries.

    On a CPU generator the bits are drawn as int8 (one byte per entry instead of eight): CPU ``randint`` draws
    the same 32-bit numbers for every integer dtype when the range is below 2**32, so the vector is the same.
    """
    small = torch.int8 if generator.device.type == "cpu" else torch.int64
    z = torch.randint(0, 2, (dim,), generator=generator, device=generator.device, dtype=small)
    return z.to(device=device, dtype=dtype).mul_(2).sub_(1)


def _gaussian(dim: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A ``(dim,)`` standard normal vector."""
    return torch.randn(dim, generator=generator, device=generator.device, dtype=dtype).to(device)


def _unit(v: Tensor) -> Tensor:
    return v / torch.linalg.vector_norm(v)
