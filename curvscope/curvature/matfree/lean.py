"""The extreme eigenvalues of a symmetric operator in two vectors: Lanczos without a stored basis.

:func:`lean_extremes` finds ``lambda_max`` and/or ``lambda_min`` (one value per end) of a symmetric operator from
products alone, holding two vectors of length dim for a curvscope ``Operator`` (the current Lanczos vector, and the
previous one, into which the product is accumulated: ``matvec(q_j, out=-beta q_{j-1}, accumulate=True)`` is
``A q_j - beta q_{j-1}``), the memory of a power iteration, with the convergence of an unrestarted Lanczos run. No
per-parameter results to concatenate, no new allocation per step. Other operators (a function, SciPy) return each
product as a new vector: three vectors, and their own result's temporaries. It is the
eigensolver of large models (:func:`curvscope.curvature.matfree.spectrum.plan_eigen` picks it for one eigenvalue
per end when the model has more than ``LARGE_MODEL_PARAMS`` parameters or the memory budget cannot hold a good
basis), where every basis vector costs as much memory as the model.

**Algorithm** (Lanczos 1950; Paige 1976; Cullum & Willoughby 1985): the three-term recurrence
``beta_j q_{j+1} = A q_j - alpha_j q_j - beta_{j-1} q_{j-1}``, each new vector orthogonalized twice against
``q_j`` and once against ``q_{j-1}`` (local reorthogonalization), no reorthogonalization against older vectors.
The tridiagonal ``T_j`` (float64, its entries from dot products accumulated in float64) gives the Ritz values;
the extreme ones converge as in exact arithmetic. Lost orthogonality only adds copies of converged values, which
does not change the largest or smallest one, so multiplicities need no care here (one value per end is reported).

**Convergence**: the residual of the extreme Ritz pair ``(theta, Q_j s)`` is ``beta_j |s_j|`` (the last entry of
its eigenvector of ``T_j``: Paige's bound, which holds in floating point to ``O(eps ||A||)`` for a converged Ritz
value). Converged when each wanted end's bound is ``<= tol * norm`` (``norm``: the largest ``|theta|``), after at
least ``MIN_STEPS`` steps. The residuals reported are these bounds, not explicit products (the Ritz vector is
never formed: that would need the basis, or a second pass of the same products).

**Invariant subspace**: ``beta_j <= eps^0.75 * norm`` ends the run with exact Ritz values of the Krylov space
(a random start reaches every eigenvector with probability 1; a given start is mixed with 1% of a random vector
for that reason).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from curvscope.curvature.matfree.adapter import _apply, _resolve
from curvscope.curvature.matfree.block import WHICH, BlockEigenResult
from curvscope.curvature.matfree.operator import Operator
from curvscope.curvature.matfree.vectors import _device, _gaussian, _generator
from curvscope.errors import CurvscopeError, OptionError, at_least, one_of
from curvscope.progress import Progress, or_silent

LEAN_VECTORS = 4
"""Vectors of length dim that :func:`lean_extremes` holds at most with any operator (three, and a function's result
while the previous one is released; a curvscope ``Operator`` needs two), the number
:func:`~curvscope.curvature.matfree.spectrum.plan_eigen` reserves."""
MIN_STEPS = 4
"""Steps before convergence can be declared (a start close to an eigenvector is not the extreme one yet)."""
START_MIX = 0.01
"""A given start vector gets this share (in norm) of a random vector: every eigenvector is then reachable."""


CHUNK = 1 << 20
"""Entries per float64 chunk of :class:`_Dots` (two preallocated 8 MB buffers)."""


class _Dots:
    """Dot products of float32 (or float64) vectors accumulated in float64, chunk by chunk through two preallocated
    float64 buffers: a float32 dot product of 10^8 entries loses about 1e-5 of its value, which the Ritz values would
    inherit (they came out above lambda_max); a new float64 copy per chunk would cost page faults."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device):
        self.exact = dtype == torch.float64
        self.buf = None if self.exact else torch.empty(2, min(CHUNK, dim), dtype=torch.float64, device=device)

    def __call__(self, a: Tensor, b: Tensor, also_bb: bool = False) -> tuple[float, float]:
        """``(a . b, b . b)`` (the second only with ``also_bb``, else 0), in one pass over the vectors."""
        if self.exact:
            return float(torch.dot(a, b)), float(torch.dot(b, b)) if also_bb else 0.0
        ab = bb = 0.0
        for i in range(0, a.numel(), self.buf.shape[1]):
            j = min(i + self.buf.shape[1], a.numel())
            x, y = self.buf[0, : j - i], self.buf[1, : j - i]
            x.copy_(a[i:j])
            y.copy_(b[i:j])
            ab += float(torch.dot(x, y))
            if also_bb:
                bb += float(torch.dot(y, y))
        return ab, bb


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if len(alphas) > 1:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t


def lean_extremes(op: Any, dim: int | None = None, *, which: str = "both", tol: float = 1e-6,
                  max_matvecs: int | None = None, start: Tensor | None = None,
                  generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, progress: Progress | None = None) -> BlockEigenResult:
    """The largest and/or smallest eigenvalue of a symmetric operator, in two vectors (three for an operator that is
    not a curvscope ``Operator``; module docstring).

    Args:
        op: a curvscope ``Operator``, a SciPy or curvlinops operator, a ``(dim, dim)`` tensor, or a function
            ``v -> A v`` on flat ``(dim,)`` tensors (then ``dim`` is required).
        dim: length of the vectors (default: the operator's shape).
        which: ``"both"``, ``"largest"`` or ``"smallest"``.
        tol: converged when each wanted residual bound ``beta_j |s_j|`` is ``<= tol * max |theta|`` (``>= 1e-5``
            in float32).
        max_matvecs: product budget (default ``min(dim, 400)`` steps).
        start: ``(dim,)`` start vector (mixed with 1% of a random one); default a Gaussian vector.
        generator: randomness of the start (default: a CPU generator seeded with 0).
        dtype: the vectors' dtype (default: ``start``'s, else float64); ``T`` is float64.
        device: where the vectors live (default: the operator's, else ``start``'s, else the CPU).
        progress: called as ``progress("lanczos", products, max_matvecs)`` after every product.

    Returns:
        A :class:`~curvscope.curvature.matfree.block.BlockEigenResult` with one value per wanted end (``top``
        ``(1,)`` and/or ``bottom`` ``(1,)``, the other empty), residual bounds as ``*_residuals``, ``block_size``
        1, ``max_basis`` 0 (no basis is kept), ``peak_vectors`` :data:`LEAN_VECTORS` and no vectors.

    Raises:
        OptionError: a bad ``which``, ``tol`` or ``max_matvecs``.
        CurvscopeError: a bad operator or start vector, or a non-finite product.
    """
    matvec, dim, home = _resolve(op, dim)
    owner = op if isinstance(op, Operator) else getattr(op, "__self__", None)  # op.matvec: its Operator
    one_of("which", which, WHICH)
    if not (isinstance(tol, (int, float)) and 0 < tol < math.inf):
        raise OptionError("tol", f"must be positive, got {tol}")
    at_least("max_matvecs", max_matvecs, 1, optional=True)
    steps_cap = min(dim, 400) if max_matvecs is None else min(dim, int(max_matvecs))
    progress = or_silent(progress)
    dtype = dtype or (start.dtype if start is not None and start.is_floating_point() else torch.float64)
    device = _device(device, home, start)
    gen = _generator(generator)
    q = _gaussian(dim, gen, dtype, device)
    dots = _Dots(dim, dtype, device)
    if start is not None:
        if start.numel() != dim or not bool(torch.isfinite(start).all()) or not bool(start.any()):
            raise CurvscopeError(f"start must be a finite, nonzero ({dim},) tensor")
        s = start.reshape(-1).to(dtype=dtype, device=device)
        q = s.div(dots(s, s)[0] ** 0.5).add_(q.div_(dots(q, q)[0] ** 0.5), alpha=START_MIX)
    q.div_(dots(q, q)[0] ** 0.5)
    # a curvscope Operator accumulates each product into the previous vector, scaled by -beta (two vectors)
    into = isinstance(owner, Operator) and owner.dtype == dtype and owner.device == device
    prev: Tensor | None = None
    alphas: list[float] = []
    betas: list[float] = []
    eps = torch.finfo(dtype).eps
    ends = {"top": which in ("both", "largest"), "bottom": which in ("both", "smallest")}
    theta = {"top": math.nan, "bottom": math.nan}
    bound = {"top": math.inf, "bottom": math.inf}
    norm, converged, invariant = 0.0, False, False
    while len(alphas) < steps_cap:
        if not into:
            w = _apply(matvec, q)
            if prev is not None:
                w.sub_(prev, alpha=betas[-1])
        elif prev is None:  # the first product: into a buffer (its per-parameter results would be a vector more)
            w = owner.matvec(q, out=torch.empty_like(q))
        else:
            w = owner.matvec(q, out=prev.mul_(-betas[-1]), accumulate=True)  # A q_j - beta q_{j-1}, in prev
        prev = None
        alpha = dots(q, w)[0]
        w.sub_(q, alpha=alpha)
        again, ww = dots(q, w, also_bb=True)  # local reorthogonalization: the recurrence's rounding against q_j
        if not (math.isfinite(alpha) and math.isfinite(ww)):  # a NaN or inf anywhere in A q_j reaches w . w
            raise CurvscopeError(f"the operator returned non-finite values at Lanczos step {len(alphas) + 1}")
        w.sub_(q, alpha=again)
        alphas.append(alpha + again)
        beta = max(ww - again * again, 0.0) ** 0.5  # ||w - again q||, q a unit vector
        betas.append(beta)
        progress("lanczos", len(alphas), steps_cap)
        values, vectors = torch.linalg.eigh(_tridiagonal(alphas, betas))
        norm = max(norm, float(values.abs().max()))
        for end, i in (("top", -1), ("bottom", 0)):
            theta[end], bound[end] = float(values[i]), beta * abs(float(vectors[-1, i]))
        invariant = beta <= eps ** 0.75 * max(norm, 1e-300) or len(alphas) == dim
        wanted = [bound[e] <= tol * norm for e, on in ends.items() if on]
        if invariant or (len(alphas) >= MIN_STEPS and all(wanted)):
            converged = True
            break
        prev, q = q, w.div_(beta)
        del w
    if invariant:
        bound = {e: 0.0 for e in bound}
    empty = torch.empty(0, dtype=torch.float64)
    one = {e: torch.tensor([theta[e]], dtype=torch.float64) for e in theta}
    res = {e: torch.tensor([bound[e]], dtype=torch.float64) for e in bound}
    certain = {e: int(ends[e] and bound[e] <= tol * norm) for e in ends}
    return BlockEigenResult(
        top=one["top"] if ends["top"] else empty, bottom=one["bottom"] if ends["bottom"] else empty,
        top_residuals=res["top"] if ends["top"] else empty, bottom_residuals=res["bottom"] if ends["bottom"] else empty,
        converged=converged and all(certain[e] for e in ends if ends[e]), certain_top=certain["top"],
        certain_bottom=certain["bottom"], norm_estimate=norm, tol=float(tol), matvecs=len(alphas), steps=len(alphas),
        restarts=0, checks=0, block_size=1, max_basis=0, peak_vectors=LEAN_VECTORS)
