"""One adapter from every kind of symmetric operator to the ``v -> A v`` of the matrix-free estimators.

:func:`as_matvec` accepts, in this order:

- a curvscope :class:`~curvscope.curvature.matfree.operator.Operator` (``hessian_operator``, ``ggn_operator``);
- a NumPy/SciPy operator: a ``scipy.sparse.linalg.LinearOperator`` (which older curvlinops operators are, and
  what ``Operator.to_scipy()`` returns), a SciPy sparse matrix or a NumPy array; vectors cross as NumPy arrays
  on the CPU;
- a PyTorch operator with ``.shape`` and ``@`` on torch tensors: a curvlinops ``CurvatureLinearOperator``
  (curvlinops 2 and later) or a dense ``(D, D)`` tensor; vectors are cast to its ``dtype`` and moved to its
  ``device`` when it has them;
- any callable ``v -> A v`` on flat ``(dim,)`` tensors (``dim`` must then be given, unless it has ``.shape``).

SciPy is never imported here: an object can only be a SciPy operator once SciPy has been imported.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy
import torch
from torch import Tensor

from curvscope.curvature.matfree.operator import Operator
from curvscope.errors import CurvscopeError

MatVec = Callable[[Tensor], Tensor]


def _apply(matvec: MatVec, v: Tensor) -> Tensor:
    """``A v`` as a flat detached tensor of ``v``'s dtype and device, with a clear error on a wrong shape."""
    out = matvec(v)
    if not isinstance(out, Tensor) or out.numel() != v.numel():
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise CurvscopeError(f"matvec returned {shape} for a vector of {v.numel()} elements")
    return out.detach().reshape(-1).to(dtype=v.dtype, device=v.device)


def _is_numpy_operator(operator: Any) -> bool:
    if isinstance(operator, numpy.ndarray):
        return True
    linalg = sys.modules.get("scipy.sparse.linalg")
    if linalg is not None and isinstance(operator, linalg.LinearOperator):
        return True
    sparse = sys.modules.get("scipy.sparse")
    return sparse is not None and bool(sparse.issparse(operator))


def _attribute(operator: Any, name: str, kind: type) -> Any:
    """``operator.<name>`` when it exists and is a ``kind`` (a property that raises counts as absent)."""
    try:
        value = getattr(operator, name, None)
    except Exception:  # curvlinops infers dtype and device lazily; a base class raises
        return None
    return value if isinstance(value, kind) else None


def _square_dim(operator: Any) -> int | None:
    """``D`` of an operator with ``.shape == (D, D)``; ``None`` without a shape; an error when not square."""
    shape = _attribute(operator, "shape", tuple)  # (torch.Size is a tuple)
    if shape is None:
        return None
    if len(shape) != 2 or int(shape[0]) != int(shape[1]):
        raise CurvscopeError(f"the operator must be square, of shape (D, D); got shape {tuple(shape)}")
    return int(shape[0])


def _numpy_matvec(operator: Any) -> MatVec:
    def matvec(v: Tensor) -> Tensor:
        x = v.detach().to("cpu").numpy()
        return torch.as_tensor(numpy.asarray(operator @ x))

    return matvec


def _torch_matvec(operator: Any, dtype: torch.dtype | None, device: torch.device | None) -> MatVec:
    def matvec(v: Tensor) -> Tensor:
        return operator @ v.to(dtype=dtype or v.dtype, device=device or v.device)

    return matvec


def _resolve(operator: Any, dim: int | None = None) -> tuple[MatVec, int, torch.device | None]:
    """``(matvec, dim, device)``: the product on flat ``(dim,)`` tensors, the dimension, and the operator's device
    (``None`` when it has none: NumPy/SciPy operators and plain functions)."""
    size = _square_dim(operator)
    device = None
    if isinstance(operator, Operator):
        matvec, device = operator.matvec, operator.device
    elif _is_numpy_operator(operator):
        matvec = _numpy_matvec(operator)
    elif size is not None and hasattr(type(operator), "__matmul__"):
        device = _attribute(operator, "device", torch.device)
        matvec = _torch_matvec(operator, _attribute(operator, "dtype", torch.dtype), device)
    elif callable(operator):
        matvec = operator
    else:
        raise CurvscopeError(f"cannot use a {type(operator).__name__} as a linear operator: pass a curvscope "
                             "Operator, a scipy.sparse.linalg.LinearOperator, a curvlinops operator, a torch "
                             "tensor of shape (D, D) or a function v -> A v with dim")
    if size is None:
        if dim is None:
            raise CurvscopeError("dim is required with a plain function v -> A v (the length of the vectors it "
                                 "acts on)")
        size = int(dim)
    elif dim is not None and int(dim) != size:
        raise CurvscopeError(f"dim={dim} does not match the operator's shape ({size}, {size})")
    return matvec, size, device


def as_matvec(operator: Any, dim: int | None = None) -> tuple[MatVec, int]:
    """The product ``v -> A v`` of any supported symmetric operator, and its dimension D.

    Args:
        operator: a curvscope ``Operator``; a ``scipy.sparse.linalg.LinearOperator`` (older curvlinops operators,
            ``Operator.to_scipy()``), a SciPy sparse matrix or a NumPy ``(D, D)`` array; a PyTorch operator
            with ``.shape == (D, D)`` and ``@`` on torch tensors (a curvlinops ``CurvatureLinearOperator``, a
            dense tensor); or a function ``v -> A v`` on flat ``(D,)`` tensors.
        dim: D; required for a function without ``.shape``, else checked against the shape.

    Returns:
        ``(matvec, D)``: ``matvec`` takes a flat ``(D,)`` tensor and returns ``A v`` with D elements (a tensor,
        possibly of another dtype or device: the estimators cast it back).
    """
    matvec, size, _ = _resolve(operator, dim)
    return matvec, size
