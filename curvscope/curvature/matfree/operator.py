"""The curvature operator a user can hold: a symmetric ``(D, D)`` matrix of one parameter group, available
through products only (``docs/conventions.md`` §9).

An :class:`Operator` acts on the group's parameters (``names``, in that order) flattened and concatenated: ``D``
entries in the problem's dtype on its device. ``op @ x`` takes

- a flat vector ``(D,)`` and returns ``(D,)``;
- a matrix ``(D, K)`` and returns ``(D, K)`` (one product per column);
- a dict ``{name: tensor}`` with every name of the group, each tensor of the parameter's shape (or with one
  trailing column dimension ``K``), and returns a dict of the same form;
- a list or tuple of such tensors in the order of ``names``, and returns a list.

Results are detached, in the operator's dtype on its device. The operator is symmetric: ``op.T is op`` and
``x @ op`` is ``(op @ x.T).T``. :meth:`Operator.to_scipy` wraps it as a ``scipy.sparse.linalg.LinearOperator``
(SciPy imported only there). The products themselves are built by
:func:`~curvscope.curvature.matfree.operators.hessian_operator` and
:func:`~curvscope.curvature.matfree.operators.ggn_operator`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy
import torch
from torch import Tensor

from curvscope.errors import CurvscopeError


@dataclass(repr=False)
class Operator:
    """A symmetric curvature matrix ``A`` ``(D, D)`` of one parameter group, available through products only.

    Attributes:
        dim: D, the length of the flat vectors the operator acts on (the group's number of parameters).
        names: the group's parameter names, in the order their entries appear in the flat vectors.
        kind: ``"hessian"`` or ``"ggn"``.
        shapes: the shape of every parameter in ``names``.
        dtype, device: those of the problem (products are computed and returned there).
        count: number of products ``A v`` computed so far (a ``(D, K)`` matrix counts K).
    """

    dim: int
    names: tuple[str, ...]
    kind: str
    shapes: tuple[torch.Size, ...]
    dtype: torch.dtype
    device: torch.device
    count: int = 0
    _product: Callable[[list[Tensor], list[Tensor] | None], list[Tensor]] = field(default=None, compare=False)
    """``(parts, out)``: ``A x`` for ``x`` given as parameter-shaped tensors; as new tensors (``out=None``) or added
    to ``out`` (zeroed parameter-shaped views of a flat result) and returned."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(D, D)``."""
        return (self.dim, self.dim)

    @property
    def T(self) -> Operator:
        """The transpose: the operator itself (it is symmetric)."""
        return self

    def adjoint(self) -> Operator:
        """The adjoint: the operator itself (it is symmetric)."""
        return self

    def matvec(self, v: Tensor, out: Tensor | None = None, *, accumulate: bool = False) -> Tensor:
        """``A v`` for a vector ``v`` with D entries (any shape, cast to the problem's dtype/device).

        Args:
            v: the vector.
            out: a contiguous ``(D,)`` tensor in ``dtype`` on ``device``, not overlapping ``v``, to write ``A v``
                into (e.g. a row of a preallocated basis): the backward pass accumulates straight into it, with no
                per-parameter results to concatenate and no copy. Default: a new tensor (the backward pass's own
                per-parameter results, concatenated once it has ended and freed its intermediate tensors: a result
                buffer allocated up front would live through the pass and raise its peak by D entries).
            accumulate: with ``out``, add ``A v`` to what ``out`` holds (``out += A v``) instead of overwriting it:
                a recurrence such as Lanczos' ``A q_j - beta q_{j-1}`` then needs no vector of its own.

        Returns:
            ``(D,)`` tensor, detached, in ``dtype`` on ``device`` (``out`` when given).
        """
        if not isinstance(v, Tensor) or v.numel() != self.dim:
            got = v.numel() if isinstance(v, Tensor) else type(v).__name__
            raise CurvscopeError(f"{self.kind} operator acts on vectors of {self.dim} entries, got {got}")
        flat = v.detach().reshape(-1).to(dtype=self.dtype, device=self.device)
        if accumulate and out is None:
            raise CurvscopeError("accumulate=True adds the product to out: pass out")
        if out is not None:
            self._check_out(out, flat)
            if not accumulate:
                out.zero_()
        with torch.enable_grad():
            parts = self._product(self.split(flat), None if out is None else self.split(out))
        self.count += 1
        return out if out is not None else torch.cat([p.reshape(-1) for p in parts])

    def _check_out(self, out: Tensor, v: Tensor) -> None:
        if not (isinstance(out, Tensor) and out.shape == (self.dim,) and out.dtype == self.dtype
                and out.device == self.device and out.is_contiguous() and not out.requires_grad):
            raise CurvscopeError(f"out must be a contiguous ({self.dim},) tensor of {self.dtype} on {self.device} "
                                 f"without grad, got {_shape_of(out)}")
        size = self.dim * out.element_size()
        if out.data_ptr() < v.data_ptr() + size and v.data_ptr() < out.data_ptr() + size:
            raise CurvscopeError("out must not overlap the vector multiplied")

    __call__ = matvec

    def matmat(self, x: Tensor) -> Tensor:
        """``A X`` for a matrix ``X`` ``(D, K)``, one product per column.

        Returns:
            ``(D, K)`` tensor, detached, in ``dtype`` on ``device``.
        """
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[0] != self.dim:
            raise CurvscopeError(f"{self._name()} multiplies a matrix of shape ({self.dim}, K), got {_shape_of(x)}")
        if x.shape[1] == 0:
            return torch.empty(self.dim, 0, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(x[:, j]) for j in range(x.shape[1])], dim=1)

    def __matmul__(self, x: Tensor | Mapping[str, Tensor] | Sequence[Tensor]) -> Any:
        """``A x`` for a flat vector ``(D,)``, a matrix ``(D, K)``, a dict ``{name: tensor}`` or a list of
        parameter-shaped tensors (each optionally with a trailing column dimension K); see the module."""
        if isinstance(x, Tensor):
            if x.ndim == 1 and x.shape[0] == self.dim:
                return self.matvec(x)
            if x.ndim == 2 and x.shape[0] == self.dim:
                return self.matmat(x)
            raise CurvscopeError(f"{self._name()} multiplies a vector of shape ({self.dim},) or a matrix of shape "
                                 f"({self.dim}, K), got {_shape_of(x)}")
        if isinstance(x, Mapping):
            out = self._apply_parts(self._parts_of(x))
            return dict(zip(self.names, out, strict=True))
        if isinstance(x, (list, tuple)):
            return self._apply_parts(list(x))
        raise CurvscopeError(f"{self._name()} multiplies a torch tensor, a dict or a list of parameter-shaped "
                             f"tensors, got {type(x).__name__} (for NumPy arrays use to_scipy())")

    def __rmatmul__(self, x: Tensor) -> Tensor:
        """``x A`` for a vector ``(D,)`` or a matrix ``(K, D)``: ``(A x^T)^T`` (A is symmetric)."""
        if isinstance(x, Tensor) and x.ndim == 1 and x.shape[0] == self.dim:
            return self.matvec(x)
        if isinstance(x, Tensor) and x.ndim == 2 and x.shape[1] == self.dim:
            return self.matmat(x.T).T
        raise CurvscopeError(f"{self._name()} is multiplied from the left by a vector of shape ({self.dim},) or a "
                             f"matrix of shape (K, {self.dim}), got {_shape_of(x)}")

    def _name(self) -> str:
        return f"the {self.kind} operator of shape ({self.dim}, {self.dim})"

    def _parts_of(self, tensors: Mapping[str, Tensor]) -> list[Tensor]:
        missing = [n for n in self.names if n not in tensors]
        unknown = [str(k) for k in tensors if k not in self.names]
        if missing or unknown:
            detail = "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                               + ([f"not in the group: {', '.join(unknown)}"] if unknown else []))
            raise CurvscopeError(f"{self._name()} multiplies a dict with the keys {', '.join(self.names)} ({detail})")
        return [tensors[n] for n in self.names]

    def _apply_parts(self, parts: list[Tensor]) -> list[Tensor]:
        """``A x`` for ``x`` given as parameter-shaped tensors (a vector) or with a trailing K (a matrix)."""
        expected = [tuple(s) for s in self.shapes]
        columns = _columns(parts, self.shapes)
        if columns is None:
            got = [_shape_of(p) for p in parts]
            raise CurvscopeError(f"{self._name()} multiplies {len(expected)} tensors of shapes {expected} (each "
                                 f"optionally with a trailing column dimension K), got {got}")
        sizes = [s.numel() for s in self.shapes]
        if columns == 0:  # a vector
            flat = torch.cat([p.reshape(-1).to(dtype=self.dtype, device=self.device) for p in parts])
            return [o.reshape(s) for o, s in zip(torch.split(self.matvec(flat), sizes), self.shapes, strict=True)]
        matrix = torch.cat([p.reshape(n, columns).to(dtype=self.dtype, device=self.device)
                            for p, n in zip(parts, sizes, strict=True)])
        out = torch.split(self.matmat(matrix), sizes)
        return [o.reshape(*s, columns) for o, s in zip(out, self.shapes, strict=True)]

    def split(self, v: Tensor) -> list[Tensor]:
        """A flat ``(D,)`` vector as a list of parameter-shaped tensors, one per name."""
        sizes = [s.numel() for s in self.shapes]
        return [p.reshape(s) for p, s in zip(torch.split(v, sizes), self.shapes, strict=True)]

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """A flat ``(..., D)`` tensor as name -> ``(..., *shape)`` tensors."""
        lead = v.shape[:-1]
        sizes = [s.numel() for s in self.shapes]
        return {n: p.reshape(*lead, *s)
                for n, p, s in zip(self.names, torch.split(v, sizes, dim=-1), self.shapes, strict=True)}

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        """Parameter-shaped tensors by name as one flat ``(D,)`` vector (missing names are zeros)."""
        parts = [tensors[n].reshape(-1) if n in tensors else torch.zeros(s.numel(), dtype=self.dtype,
                                                                          device=self.device)
                 for n, s in zip(self.names, self.shapes, strict=True)]
        return torch.cat([p.to(dtype=self.dtype, device=self.device) for p in parts])

    def dense(self) -> Tensor:
        """The ``(D, D)`` matrix, column by column (D products; for tiny groups and tests)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(e) for e in eye], dim=1)

    def to_scipy(self, dtype: Any = numpy.float64) -> Any:
        """The operator as a ``scipy.sparse.linalg.LinearOperator`` of shape ``(D, D)``.

        Its ``matvec``/``matmat`` (and ``rmatvec``/``rmatmat``, the same: A is symmetric) take NumPy arrays
        ``(D,)``, ``(D, 1)`` or ``(D, K)``, compute the products in torch in the operator's dtype on its device, and
        return NumPy arrays of ``dtype`` (a complex input is applied to its real and imaginary parts).

        Args:
            dtype: the NumPy dtype of the SciPy operator and of its results (default float64).

        Returns:
            ``scipy.sparse.linalg.LinearOperator``.
        """
        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError as exc:
            raise CurvscopeError("Operator.to_scipy needs SciPy, which is not installed: pip install scipy") from exc
        out_dtype = numpy.dtype(dtype)

        def apply(x: numpy.ndarray) -> numpy.ndarray:
            x = numpy.asarray(x)
            if numpy.iscomplexobj(x):
                return apply(x.real) + 1j * apply(x.imag)
            columns = torch.tensor(x).reshape(self.dim, -1)
            out = self.matmat(columns).cpu()
            if out.dtype in (torch.float16, torch.bfloat16):  # (no NumPy counterpart for bfloat16)
                out = out.float()
            return out.numpy().astype(out_dtype, copy=False).reshape(x.shape)

        return LinearOperator(self.shape, matvec=apply, rmatvec=apply, matmat=apply, rmatmat=apply, dtype=out_dtype)

    def __repr__(self) -> str:
        return f"Operator(kind={self.kind!r}, dim={self.dim}, names={len(self.names)}, count={self.count})"


def _shape_of(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def _columns(parts: list[Tensor], shapes: Sequence[torch.Size]) -> int | None:
    """0 when ``parts`` are tensors of exactly ``shapes`` (a vector); K when each is ``(*shape, K)`` with one K
    (a matrix); ``None`` otherwise."""
    if len(parts) != len(shapes) or not all(isinstance(p, Tensor) for p in parts):
        return None
    if all(p.shape == s for p, s in zip(parts, shapes, strict=True)):
        return 0
    if all(p.ndim == len(s) + 1 and p.shape[:-1] == s for p, s in zip(parts, shapes, strict=True)):
        ks = {p.shape[-1] for p in parts}
        if len(ks) == 1 and next(iter(ks)) > 0:
            return next(iter(ks))
    return None
