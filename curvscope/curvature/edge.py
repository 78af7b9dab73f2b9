"""Sharpness against the optimizer's stability threshold: the edge of stability (``docs/conventions.md`` §10).

On a quadratic with curvature λ, a first-order optimizer with learning rate η is stable while λ stays below a
threshold (PyTorch's update conventions; the boundary is where an eigenvalue of the 2x2 linear recurrence
reaches -1):

- SGD: 2/η; heavy-ball momentum β with dampening d: (2 + 2β) / (η (1 - d)); Nesterov: (2 + 2β) / (η (1 + 2β)).
- Adam/AdamW: the preconditioned sharpness λ_max(P^-1/2 H P^-1/2) below (2 + 2β₁) / ((1 - β₁) η), 38/η at
  β₁ = 0.9, with P = (1 - β₁ᵗ) (sqrt(v / (1 - β₂ᵗ)) + ε) from the optimizer state.
- Coupled weight decay w (SGD's, Adam's, not AdamW's) adds w to the Hessian of the optimized objective.
- Several param groups with different learning rates: the threshold of the largest rate η_ref, and the
  compared operator has each group's rate folded into P as P_g η_ref / η_g (§10's P_g / η_g, scaled so that the
  threshold keeps its usual form).

What is compared is always λ_max(P^-1/2 (H + W) P^-1/2) for the optimizer's P (identity for SGD with one rate)
and W the coupled weight decay. Where that is the Hessian plus a constant (SGD, one rate, one decay), the plain
λ_max serves (:func:`compared_sharpness` adds w); otherwise :func:`compared_operator` builds the operator for
Lanczos. Pure functions: no files, no printing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from curvscope.curvature.optimizer_state import (
    ADAM_KINDS,
    OPTIMIZER_KINDS,
    OptimizerGroup,
    OptimizerInfo,
    optimizer_info,
    optimizer_tensors,
)
from curvscope.errors import CurvscopeError

__all__ = ["ADAM_KINDS", "OPTIMIZER_KINDS", "NoPreconditioner", "OptimizerGroup", "OptimizerInfo",
           "PreconditionedOperator", "adam_preconditioner", "compared_operator", "compared_preconditioner",
           "compared_sharpness", "decay_shift", "flat_diagonal", "needs_preconditioner", "optimizer_info",
           "preconditioned_operator", "sharpness_ratio", "threshold"]


class NoPreconditioner(CurvscopeError):
    """Adam's P is undefined at this checkpoint (a parameter without state yet, step 0): the preconditioned
    sharpness is ``null`` there, with this message as its note; other checkpoints of a run are unaffected."""


def _g(x: float) -> str:
    return f"{x:.4g}"


# -- thresholds -------------------------------------------------------------------------------------------

def threshold(info: OptimizerInfo) -> tuple[float | None, str]:
    """The stability threshold of ``info``'s optimizer at its learning rate, and a note saying which.

    Returns:
        ``(value, note)``; ``value`` is ``None`` where §10 defines none: an unknown optimizer, no or a zero
        learning rate, ``maximize``, momentum >= 1 or dampening 1, param groups that differ in momentum,
        dampening, Nesterov or β₁. With different learning rates per group the threshold is that of the largest
        (``info.lr``), and the note says that the compared sharpness needs each group's rate folded into P.
    """
    if info.kind is None:
        return None, "; ".join(info.notes) or "optimizer unknown: no threshold"
    if info.lr is None:
        return None, "no learning rate: no threshold"
    if info.maximize:
        return None, "the optimizer maximizes (maximize=True): no threshold for the loss's sharpness"
    mixed = [f for f in ("momentum", "dampening", "nesterov") if f in info.differing]
    if info.kind in ADAM_KINDS and len({g.betas[0] for g in info.all_groups() if g.params or not info.groups}) > 1:
        mixed.append("beta1")
    if mixed:
        return None, f"param groups differ in {', '.join(mixed)}: no single threshold"
    constant, formula = _constant(info)
    if constant is None:
        return None, formula
    if info.lr == 0:
        return None, "lr is 0: nothing moves, no threshold"
    value = constant / info.lr
    note = f"{formula} = {_g(value)} at lr {_g(info.lr)}"
    if info.group_lrs is not None:
        note += (f"; param groups with different lrs ({', '.join(_g(lr) for lr in info.group_lrs)}): the "
                 "threshold of the largest, compared with the sharpness of P^-1/2 H P^-1/2 with each group's lr "
                 "relative to it folded into P")
    return value, note


def _constant(info: OptimizerInfo) -> tuple[float | None, str]:
    """The threshold times η, and its formula (or ``None`` and why not)."""
    if info.kind in ADAM_KINDS:
        b1 = info.betas[0]
        return (2 + 2 * b1) / (1 - b1), f"(2 + 2 beta1) / ((1 - beta1) lr) with beta1 = {_g(b1)}"
    beta, d = info.momentum, info.dampening
    if beta == 0:
        return 2.0, "2 / lr"
    if beta >= 1:
        return None, f"momentum {_g(beta)} >= 1: no learning rate is stable"
    if info.nesterov:
        return (2 + 2 * beta) / (1 + 2 * beta), f"Nesterov (2 + 2 momentum) / (lr (1 + 2 momentum)) with " \
                                                f"momentum = {_g(beta)}"
    if d >= 1:
        return None, "dampening 1: the gradient never enters the momentum buffer, no threshold"
    return (2 + 2 * beta) / (1 - d), f"heavy-ball (2 + 2 momentum) / (lr (1 - dampening)) with momentum = " \
                                     f"{_g(beta)}, dampening = {_g(d)}"


def _coupled(group: OptimizerGroup, kind: str | None) -> float:
    return 0.0 if group.decoupled or kind == "adamw" else group.weight_decay


def needs_preconditioner(info: OptimizerInfo) -> bool:
    """Whether the compared sharpness is not the plain λ_max (plus a constant): Adam/AdamW, different learning
    rates per group, or coupled weight decays that differ between groups."""
    groups = [g for g in info.all_groups() if g.params or not info.groups]
    return (info.kind in ADAM_KINDS or info.group_lrs is not None
            or len({_coupled(g, info.kind) for g in groups}) > 1)


def compared_sharpness(lambda_max: float | None, info: OptimizerInfo, *, preconditioned: bool = False
                       ) -> tuple[float | None, str]:
    """The sharpness that is compared with :func:`threshold`, and a note saying which it is.

    Args:
        lambda_max: the largest eigenvalue of the Hessian (or GGN) when ``preconditioned`` is False; of the
            operator of :func:`compared_operator` (weight decay already inside) when True.
        info: the optimizer.
        preconditioned: ``lambda_max`` is the preconditioned operator's.

    Returns:
        ``(value, note)``. SGD with one learning rate: ``lambda_max`` plus the coupled weight decay. Where the
        comparison needs the preconditioned operator (:func:`needs_preconditioner`) and ``lambda_max`` is the
        plain one: ``None``, and the note says that the optimizer state is needed.
    """
    if info.kind is None:
        return None, "optimizer unknown: nothing to compare"
    if lambda_max is None or not math.isfinite(lambda_max):
        return None, "no sharpness"
    if needs_preconditioner(info):
        if not preconditioned:
            what = "Adam's preconditioner P (exp_avg_sq, step of the optimizer state)" if info.kind in ADAM_KINDS \
                else "each group's learning rate and weight decay folded in"
            return None, f"the threshold compares the preconditioned sharpness (compared_operator), which needs {what}"
        decay = ("AdamW's decoupled weight decay leaves H as it is" if info.kind == "adamw" else
                 "coupled weight decay W inside" if any(_coupled(g, info.kind) for g in info.all_groups())
                 else "no weight decay")
        return lambda_max, f"preconditioned sharpness lambda_max(P^-1/2 (H + W) P^-1/2) compared ({decay})"
    w = _coupled(info.all_groups()[0], info.kind)
    if preconditioned:
        return lambda_max, "lambda_max compared, as given"
    if w:
        return lambda_max + w, f"lambda_max + weight_decay {_g(w)} compared (coupled decay adds it to H)"
    return lambda_max, "lambda_max compared"


def sharpness_ratio(compared: float | None, threshold_value: float | None) -> float | None:
    """``compared / threshold`` (1 is the edge), or ``None`` when either is missing."""
    if compared is None or threshold_value is None or not threshold_value > 0:
        return None
    return compared / threshold_value


# -- the preconditioner -----------------------------------------------------------------------------------

def adam_preconditioner(optimizer_state: Mapping[str, Any], info: OptimizerInfo, param_names: Sequence[str]
                        ) -> dict[str, Tensor]:
    """Adam's diagonal P = (1 - β₁ᵗ) (sqrt(v / (1 - β₂ᵗ)) + ε) per parameter (``max_exp_avg_sq`` as v with
    amsgrad), so that the update is θ ← θ - η P⁻¹ m exactly as ``torch.optim.Adam`` takes it.

    Computed in the state's dtype (at least float32). t, v are the parameter's own ``step`` and
    ``exp_avg_sq``; β₁, β₂, ε its group's.

    Raises:
        NoPreconditioner: a parameter without state (step 0, or never updated), or P with a zero entry (ε = 0
            and an entry that never had a gradient). The message names the parameters.
        CurvscopeError: ``info`` is not Adam's or AdamW's.
    """
    if info.kind not in ADAM_KINDS:
        raise CurvscopeError(f"Adam's preconditioner needs an Adam or AdamW optimizer state, not {info.kind}'s")
    state = optimizer_tensors(optimizer_state)
    out, missing, zero = {}, [], []
    for name in param_names:
        entry = state.get(info.param_ids[name]) if name in info.param_ids else None
        group = info.group_of(name)
        v = (entry or {}).get("max_exp_avg_sq" if group.amsgrad else "exp_avg_sq")
        step = (entry or {}).get("step")
        t = float(step) if step is not None else 0.0
        if not isinstance(v, Tensor) or t < 1:
            missing.append(name)
            continue
        b1, b2 = group.betas
        v = v.detach().to(torch.promote_types(v.dtype, torch.float32))
        p = (1 - b1 ** t) * (v.sqrt() / math.sqrt(1 - b2 ** t) + (group.eps or 0.0))  # torch's order
        if not bool((p > 0).all()):
            zero.append(name)
        out[name] = p
    if missing:
        raise NoPreconditioner(f"no Adam state for {_names(missing)} (step 0, or never updated): P and the "
                               "preconditioned sharpness are undefined at this checkpoint")
    if zero:
        raise NoPreconditioner(f"Adam's P has zero entries in {_names(zero)} (eps = 0 and entries that never had "
                               "a gradient): the preconditioned sharpness is undefined")
    return out


def _names(names: list[str], n: int = 3) -> str:
    shown = ", ".join(f"'{x}'" for x in names[:n])
    return f"parameter{'s' if len(names) > 1 else ''} {shown}" + (
        f" (and {len(names) - n} more)" if len(names) > n else "")


def compared_preconditioner(optimizer_state: Mapping[str, Any] | None, info: OptimizerInfo,
                            param_names: Sequence[str]) -> dict[str, Tensor] | None:
    """The P of the compared operator, per parameter; ``None`` where the plain λ_max serves (or the optimizer is
    unknown: nothing is compared).

    Adam/AdamW: :func:`adam_preconditioner`; SGD: 1 (a 0-d tensor, the same for every entry). Each group's
    learning rate is folded in as P · η_ref / η_g (η_ref = ``info.lr``; a group with lr 0 gets P = inf: its
    parameters do not move).

    Raises:
        NoPreconditioner: Adam without optimizer state, or see :func:`adam_preconditioner`.
    """
    if info.kind is None or not needs_preconditioner(info):
        return None
    if info.kind in ADAM_KINDS:
        if optimizer_state is None:
            raise NoPreconditioner("the preconditioned sharpness needs Adam's optimizer state (exp_avg_sq, step)")
        p = adam_preconditioner(optimizer_state, info, param_names)
    else:
        p = {n: torch.ones((), dtype=torch.float64) for n in param_names}
    if info.group_lrs is None:
        return p
    scaled = {}
    for name, value in p.items():
        lr = info.group_of(name).lr
        scaled[name] = value * (info.lr / lr) if lr > 0 else torch.full_like(value, math.inf)
    return scaled


def decay_shift(info: OptimizerInfo, param_names: Sequence[str]) -> dict[str, float] | None:
    """The coupled weight decay of each parameter (0 under AdamW), or ``None`` when there is none."""
    shift = {n: _coupled(info.group_of(n), info.kind) for n in param_names}
    return shift if any(shift.values()) else None


def flat_diagonal(values: Mapping[str, Tensor | float], param_names: Sequence[str],
                  param_shapes: Mapping[str, torch.Size | Sequence[int]], dtype: torch.dtype = torch.float64,
                  device: torch.device | str | None = None) -> Tensor:
    """Per-parameter values (tensors of the parameter's shape, 0-d tensors or numbers: one value for every entry)
    as one flat vector in ``param_names`` order, the layout of the curvature operators."""
    parts = []
    for name in param_names:
        if name not in values:
            raise CurvscopeError(f"no value for parameter '{name}'")
        shape = torch.Size(param_shapes[name])
        value = torch.as_tensor(values[name], dtype=dtype, device=device)
        if value.dim() == 0:
            value = value.expand(shape)
        elif value.shape != shape:
            raise CurvscopeError(f"parameter '{name}' has shape {tuple(shape)}, its value has {tuple(value.shape)}")
        parts.append(value.reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)


# -- the preconditioned operator --------------------------------------------------------------------------

class PreconditionedOperator:
    """The symmetric operator P^-1/2 (A + diag(s)) P^-1/2 on flat vectors; its eigenvalues are those of
    P⁻¹ (A + diag(s)), and Lanczos applies.

    Attributes:
        dim, shape: D and ``(D, D)``.
        p_diag: ``(D,)`` the diagonal of P (entries > 0; ``inf`` freezes an entry).
        shift: ``(D,)`` the diagonal added to A, or ``None``.
        count: products computed so far.
    """

    def __init__(self, product: Callable[[Tensor], Tensor], dim: int, p_diag: Tensor, shift: Tensor | None
                 ) -> None:
        self._product = product
        self.dim = dim
        self.shape = (dim, dim)
        self.p_diag = p_diag
        self.shift = shift
        self._root = p_diag.pow(-0.5)
        self._cast: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor | None]] = {}
        self.count = 0

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of ``p_diag`` (products come back in the dtype of the vector given)."""
        return self.p_diag.dtype

    @property
    def device(self) -> torch.device:
        """Where ``p_diag`` lives."""
        return self.p_diag.device

    def matvec(self, v: Tensor) -> Tensor:
        """P^-1/2 (A + diag(s)) P^-1/2 v for a vector with ``dim`` entries; ``(dim,)`` in ``v``'s dtype/device."""
        if not isinstance(v, Tensor) or v.numel() != self.dim:
            got = v.numel() if isinstance(v, Tensor) else type(v).__name__
            raise CurvscopeError(f"preconditioned operator acts on vectors of {self.dim} entries, got {got}")
        v = v.reshape(-1)
        root, shift = self._diagonals(v)
        x = root * v
        out = self._product(x)
        if not isinstance(out, Tensor) or out.numel() != self.dim:
            raise CurvscopeError(f"the operator returned {getattr(out, 'shape', type(out).__name__)} for a vector "
                                 f"of {self.dim} entries")
        y = out.reshape(-1).to(dtype=v.dtype, device=v.device)
        if shift is not None:
            y = y + shift * x
        self.count += 1
        return root * y

    def _diagonals(self, v: Tensor) -> tuple[Tensor, Tensor | None]:
        """P^-1/2 and the shift in ``v``'s dtype and device (cast once per dtype and device)."""
        key = (v.dtype, v.device)
        if key not in self._cast:
            self._cast[key] = (self._root.to(dtype=v.dtype, device=v.device),
                               None if self.shift is None else self.shift.to(dtype=v.dtype, device=v.device))
        return self._cast[key]

    __call__ = matvec

    def __matmul__(self, v: Tensor) -> Tensor:
        """``op @ v`` for a ``(dim,)`` vector or the columns of a ``(dim, k)`` block."""
        if isinstance(v, Tensor) and v.dim() == 2 and v.shape[0] == self.dim:
            return torch.stack([self.matvec(c) for c in v.T], dim=1)
        return self.matvec(v)

    def to_parameters(self, u: Tensor) -> Tensor:
        """P^-1/2 u: an eigenvector u of this operator as the (unnormalized) eigenvector of P⁻¹ (A + diag(s))."""
        return self._root.to(dtype=u.dtype, device=u.device) * u.reshape(-1)

    def dense(self) -> Tensor:
        """The ``(dim, dim)`` matrix, column by column (``dim`` products; for tiny problems and tests)."""
        return self @ torch.eye(self.dim, dtype=self.dtype, device=self.device)

    def __repr__(self) -> str:
        return f"PreconditionedOperator(dim={self.dim}, shift={self.shift is not None}, count={self.count})"


def _product_of(op: Any, dim: int | None) -> tuple[Callable[[Tensor], Tensor], int]:
    if isinstance(op, Tensor):
        if op.dim() != 2 or op.shape[0] != op.shape[1]:
            raise CurvscopeError(f"a dense operator must be a square matrix, got {tuple(op.shape)}")
        return (lambda x: op @ x.to(dtype=op.dtype, device=op.device)), op.shape[0]
    dtype, device = getattr(op, "dtype", None), getattr(op, "device", None)

    def cast(x: Tensor) -> Tensor:  # into the operator's dtype and device, where it names them
        return x.to(dtype=dtype if isinstance(dtype, torch.dtype) else x.dtype,
                    device=device if isinstance(device, (torch.device, str)) else x.device)

    if callable(getattr(op, "matvec", None)):
        size = getattr(op, "dim", None)
        return (lambda x: op.matvec(cast(x))), int(size if size is not None else op.shape[0])
    if hasattr(op, "shape") and hasattr(op, "__matmul__"):
        return (lambda x: op @ cast(x)), int(op.shape[0])
    if callable(op):
        if dim is None:
            raise CurvscopeError("a plain matvec function needs its dim")
        return op, int(dim)
    raise CurvscopeError(f"not an operator: {type(op).__name__} (needs .shape and @, .matvec, or a matvec with dim)")


def preconditioned_operator(op: Any, p_diag: Tensor, *, shift: Tensor | None = None, dim: int | None = None
                            ) -> PreconditionedOperator:
    """P^-1/2 (A + diag(shift)) P^-1/2 for an operator A on flat ``(D,)`` vectors.

    Args:
        op: an object with ``.shape`` and ``@`` (a dense matrix too), an object with ``.matvec`` and ``.dim``
            (:class:`curvscope.curvature.matfree.Operator`), or a plain ``matvec`` function with ``dim``.
        p_diag: ``(D,)`` the diagonal of P, every entry > 0 (``inf``: that entry does not move).
        shift: ``(D,)`` diagonal added to A before preconditioning (coupled weight decay), or ``None``.
        dim: D, for a plain ``matvec`` function.

    Raises:
        CurvscopeError: not an operator, or ``p_diag``/``shift`` of the wrong size or with invalid entries.
    """
    product, size = _product_of(op, dim)
    if dim is not None and int(dim) != size:
        raise CurvscopeError(f"dim {dim} does not match the operator's {size}")
    p_diag = torch.as_tensor(p_diag).reshape(-1)
    if p_diag.numel() != size or not p_diag.is_floating_point():
        raise CurvscopeError(f"the preconditioner needs {size} floating entries, got {p_diag.numel()} "
                             f"({p_diag.dtype})")
    if not bool((p_diag > 0).all()):
        raise CurvscopeError("the preconditioner has entries that are not positive (or NaN)")
    if shift is not None:
        shift = torch.as_tensor(shift, dtype=p_diag.dtype, device=p_diag.device).reshape(-1)
        if shift.numel() != size or not bool(torch.isfinite(shift).all()):
            raise CurvscopeError(f"the shift needs {size} finite entries, got {shift.numel()}")
    return PreconditionedOperator(product, size, p_diag, shift)


def compared_operator(op: Any, optimizer_state: Mapping[str, Any] | None, info: OptimizerInfo,
                      param_shapes: Mapping[str, torch.Size | Sequence[int]],
                      param_names: Sequence[str] | None = None, *, dtype: torch.dtype = torch.float64,
                      device: torch.device | str | None = None) -> PreconditionedOperator | None:
    """The operator whose λ_max is compared with :func:`threshold`, or ``None`` where the plain one serves.

    ``op`` acts on the flat vectors of ``param_names`` (default ``op.names``, in that order): P from
    :func:`compared_preconditioner`, the coupled weight decay of :func:`decay_shift` inside. Its λ_max goes to
    :func:`compared_sharpness` with ``preconditioned=True``. P and the shift are held in ``dtype`` on ``device``
    (default: ``op.device`` where the operator has one, else the CPU).

    Raises:
        NoPreconditioner: P is undefined at this checkpoint.
    """
    names = list(param_names if param_names is not None else op.names)
    p = compared_preconditioner(optimizer_state, info, names)
    if p is None:
        return None
    device = device if device is not None else getattr(op, "device", None)
    p_flat = flat_diagonal(p, names, param_shapes, dtype=dtype, device=device)
    shift = decay_shift(info, names)
    s_flat = flat_diagonal(shift, names, param_shapes, dtype=dtype, device=device) if shift is not None else None
    return preconditioned_operator(op, p_flat, shift=s_flat)
