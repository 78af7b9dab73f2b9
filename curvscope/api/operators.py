"""``curvscope.ggn_operator`` / ``curvscope.hessian_operator``: curvature as linear operators a user can hold."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from curvscope.api._problem import as_problem

if TYPE_CHECKING:
    from curvscope.curvature.matfree import Operator
    from curvscope.problem import Problem


def ggn_operator(model_or_problem: nn.Module | Problem, inputs: Any = None, targets: Tensor | None = None, *,
                 names: Sequence[str] | None = None, loss: str | None = None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> Operator:
    """The GGN ``G = (1/N) sum_n J_n^T H_n J_n`` of one batch as a symmetric ``D x D`` linear operator.

    Nothing of size ``D x D`` is ever formed: each product is a Jacobian-vector product, the loss Hessian's
    product on the outputs, and a vector-Jacobian product (``docs/conventions.md`` §9).

    Args:
        model_or_problem: a :class:`~curvscope.problem.Problem`, or an ``nn.Module`` together with ``inputs``
            and ``targets`` (see :func:`curvscope.spectrum`).
        inputs: with a model: the batch inputs.
        targets: with a model: the batch targets.
        names: the parameters of the block (a parameter group, e.g. ``[g.param_names for g in
            problem.groups("layer")][0]``); default every trainable parameter. ``D`` is their total size.
        loss: with a model: a loss name (``"ce"``, ``"mse"``, ``"bce"``, ``"nll"``, ``"huber"``, ``"smooth-l1"``),
            a :class:`~curvscope.losses.Loss` (:func:`~curvscope.losses.get_loss`) or a user loss function.
        device: with a model: the device.
        dtype: with a model: ``torch.float32`` or ``torch.float64``; default: float64 on the CPU up to 10M
            parameters, float32 above and on a GPU.

    Returns:
        An :class:`~curvscope.curvature.matfree.Operator`: ``op.shape == (D, D)``; ``op @ v`` for a flat vector
        ``(D,)``, a matrix ``(D, K)``, a dict of parameter-shaped tensors or a list of them in ``op.names``'
        order; ``op.to_scipy()`` a ``scipy.sparse.linalg.LinearOperator``. curvscope's ``lanczos``,
        ``extreme_eigenpairs``, ``hutchpp`` and ``spectral_density`` take it directly.

    Example::

        from scipy.sparse.linalg import eigsh
        G = curvscope.ggn_operator(model, x, y, loss="ce", dtype=torch.float64)
        top = eigsh(G.to_scipy(), k=5, which="LA", return_eigenvectors=False)
    """
    from curvscope.curvature.matfree import ggn_operator as build

    return build(as_problem("ggn_operator", model_or_problem, inputs, targets, loss=loss, device=device,
                            dtype=dtype), names)


def hessian_operator(model_or_problem: nn.Module | Problem, inputs: Any = None, targets: Tensor | None = None, *,
                     names: Sequence[str] | None = None, loss: str | None = None,
                     device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
                     ) -> Operator:
    """The Hessian ``H = d^2 L / d theta^2`` of the batch loss as a symmetric ``D x D`` linear operator.

    Each product is one double-backward pass (Pearlmutter's trick; ``docs/conventions.md`` §9). Arguments and
    the returned :class:`~curvscope.curvature.matfree.Operator` as in :func:`ggn_operator`.

    Args:
        model_or_problem: a :class:`~curvscope.problem.Problem`, or an ``nn.Module`` with ``inputs``, ``targets``.
        inputs: with a model: the batch inputs.
        targets: with a model: the batch targets.
        names: the parameters of the block (default: every trainable parameter).
        loss: with a model: a loss name (``"ce"``, ``"mse"``, ``"bce"``, ``"nll"``, ``"huber"``, ``"smooth-l1"``),
            a :class:`~curvscope.losses.Loss` (:func:`~curvscope.losses.get_loss`) or a user loss function.
        device: with a model: the device.
        dtype: with a model: ``torch.float32`` or ``torch.float64``; default: float64 on the CPU up to 10M
            parameters, float32 above and on a GPU.

    Example::

        H = curvscope.hessian_operator(problem)
        hv = H @ {name: torch.randn_like(p) for name, p in problem.params.items()}   # parameter-shaped
        eig = curvscope.curvature.matfree.extreme_eigenpairs(H, k=3, which="both")
    """
    from curvscope.curvature.matfree import hessian_operator as build

    return build(as_problem("hessian_operator", model_or_problem, inputs, targets, loss=loss, device=device,
                            dtype=dtype), names)
