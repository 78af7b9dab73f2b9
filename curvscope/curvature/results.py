"""What a spectrum is, whichever wing of the engine computed it.

The Gram wing (:class:`~curvscope.curvature.gram.SpectrumResult`, every nonzero eigenvalue of the GGN) and the
matrix-free wing (:class:`~curvscope.curvature.matfree.MatfreeResult`, the extreme eigenvalues of the Hessian or
GGN) return different results, but the same notions have the same names in both: a :class:`Spectrum` has
``groups``, each a :class:`SpectrumGroup` with ``eigenvalues`` (descending), ``lambda_max``, ``trace`` and
``stability_lr``. Code that only needs those (the report's headline, ``curvscope track``, a notebook) works
with either.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


class SpectrumGroup:
    """The spectrum of one parameter group (one block of a block-diagonal curvature, or the whole model).

    Attributes:
        name: the group's name (``all``, a module name, or a parameter name).
        param_names: the parameters of the group, in the problem's order.
        num_params: ``D_P``, the group's dimension.
        eigenvalues: ``(k,)`` descending: every nonzero eigenvalue (Gram), or the top Ritz values (Lanczos).
        trace: the block's trace (exact by Gram; exact or estimated by Lanczos; ``None`` when not computed).
    """

    name: str
    param_names: tuple[str, ...]
    num_params: int
    eigenvalues: Tensor
    trace: float | None

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue (0.0 when none is known: a zero GGN block)."""
        return float(self.eigenvalues[0]) if self.eigenvalues.numel() else 0.0

    @property
    def stability_lr(self) -> float:
        """``2 / lambda_max``: plain gradient descent on this block is stable below this learning rate
        (``inf`` when ``lambda_max <= 0``)."""
        return 2.0 / self.lambda_max if self.lambda_max > 0 else math.inf


class Spectrum:
    """A spectrum of one batch, per parameter group.

    Attributes:
        groups: one :class:`SpectrumGroup` per block; with ``include_total`` and a grouping other than ``all``,
            ``groups[0]`` is the whole model.
        grouping: ``all``, ``layer`` or ``tensor``.
        loss_value: the batch loss.
        eigenvectors: the top eigenvectors of ``groups[0]`` as ``{parameter: (k, *shape)}`` when asked for, else
            ``None``.
        curvature: ``"ggn"`` or ``"hessian"``.
        method: ``"gram"`` (exact, every nonzero eigenvalue) or ``"lanczos"`` (matrix-free, the extremes).
    """

    groups: list
    grouping: str
    loss_value: float
    eigenvectors: dict[str, Tensor] | None
    curvature: str
    method: str

    @property
    def converged(self) -> bool:
        """Every reported eigenvalue is within its tolerance (always true for the exact Gram method)."""
        return True

    def group(self, name: str) -> SpectrumGroup:
        """The group called ``name`` (``KeyError`` naming the groups there are when none is)."""
        from curvscope.problem import group_named

        return group_named(self.groups, name)
