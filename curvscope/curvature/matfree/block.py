"""Extreme eigenpairs of a symmetric operator by restarted block Krylov iterations in a bounded basis.

:func:`block_eigenpairs` finds the k largest and/or smallest eigenvalues from products ``v -> A v`` (or ``X -> A X``),
multiplicities included, in at most ``max_basis`` vectors of length dim; :func:`plan_block` sizes it from a budget.

**Algorithm**: block Krylov-Schur with thick restart and locking (Stewart 2001; Zhou & Saad 2008). Basis rows
``[locked | Q | P]``: converged Ritz vectors, a Krylov basis Q with known products, the next block P. A step applies
A to P (b vectors at a time), fills the float64 ``T = Q^T A Q`` from the products and orthogonalizes them twice
against the current basis (classical Gram-Schmidt; a row the second pass shrinks by over ``1/sqrt(2)`` is in the
span: Kahan-Parlett), dropping the locked rows' coefficients (deflation); a column with nothing left is replaced by
a random vector orthogonal to the basis (null spaces, further copies). Ritz pairs ``(theta, Q y)`` have residual
``||T[P, Q] y||``. A full basis restarts with the wanted Ritz vectors, extras next to them and P, locking the
converged wanted pairs (residual ``<= tol/2 * ||A||``, the stopping test of every wanted value).

**Certainty**: a generic block of b vectors holds ``min(b, d)`` copies of an eigenvalue of multiplicity d, converging
together, so a cluster (values within ``10 tol ||A||``) of fewer than b copies is complete. After a cluster of
``>= b`` that ends before the k-th value, a *final check* restarts from random vectors orthogonal to the locked
wanted pairs; it passes when the extreme Ritz pair of that space converges outside the wanted range, else the value
found joins the wanted ones and another check follows.

**Memory** (vectors of length dim, counted in ``peak_vectors``): the basis, the product block and the operator's result
or a random vector, ``<= max_basis + 2 b``; :func:`plan_block` reserves ``3 b`` (a result that must be reshaped is
copied once more), plus the returned vectors with ``want_vectors``. The operator's own memory is not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from curvscope.errors import CurvscopeError, OptionError, at_least, one_of
from curvscope.progress import Progress, or_silent

WHICH = ("both", "largest", "smallest")
ENDS = {"top": ("both", "largest"), "bottom": ("both", "smallest")}
MAX_BLOCK = 2  # default block size min(k, MAX_BLOCK): the fewest products (see plan_block)
WORK_BLOCKS = 3  # vectors reserved beside the basis: WORK_BLOCKS * block_size
BASIS_CAP = 64  # default basis without a budget: max(BASIS_CAP, 3 k_total + 4 block_size), at most dim
SAFETY = 0.5  # converged (and lockable) at an estimated residual <= SAFETY * tol * ||A||
CLUSTER = 10.0  # values within CLUSTER * tol * ||A|| of each other form a cluster


def _k_total(dim: int, k: int, which: str) -> int:
    return min(dim, (2 if which == "both" else 1) * min(k, dim))


def min_basis(dim: int, k: int, which: str, block_size: int) -> int:
    """The smallest ``max_basis``, ``k_total + 2 block_size + 1`` (``k_total = 2k`` for both ends), at most dim."""
    return min(dim, _k_total(dim, k, which) + 2 * min(block_size, dim) + 1)


def default_max_basis(dim: int, k: int, which: str, block_size: int) -> int:
    """The basis without a budget: ``max(64, 3 k_total + 4 block_size)``, at most ``dim``."""
    return min(dim, max(BASIS_CAP, 3 * _k_total(dim, k, which) + 4 * block_size))


@dataclass(frozen=True)
class BlockPlan:
    """A memory plan: ``block_size`` (b), ``max_basis`` and ``bytes = (max_basis + work) * dim * itemsize`` with
    ``work = 3 b`` (``max(3 b, k_total)`` with ``want_vectors``), the operator's own memory not counted."""

    block_size: int
    max_basis: int
    bytes: int
    solver: str = "block"
    """``"block"`` (:func:`block_eigenpairs`) or ``"lean"`` (:func:`~curvscope.curvature.matfree.lean.lean_extremes`:
    one value per end in two vectors, ``max_basis`` 0)."""


def plan_block(dim: int, k: int, which: str, budget_bytes: int | None, itemsize: int, block_size: int | None = None,
               *, want_vectors: bool = False) -> BlockPlan:
    """Block size and basis size of :func:`block_eigenpairs` within ``budget_bytes``.

    The block size is ``block_size``, else the largest of ``min(k, 2), ..., 1`` whose basis holds ``k_total + 4 b``
    (else the largest that reaches :func:`min_basis`; blocks of 4-8 took 1.3-5x the products of blocks of 2 on
    dim-2000 test spectra); the basis takes the rest of the budget, up to :func:`default_max_basis`.

    Args:
        dim: length of the vectors A acts on.
        k: eigenvalues wanted at each requested end (clipped to ``dim``).
        which: ``"both"``, ``"largest"`` or ``"smallest"``.
        budget_bytes: bytes the solver may hold; ``None``: no limit (the default basis).
        itemsize: bytes per number of the basis dtype (4 for float32).
        block_size: a fixed block size.
        want_vectors: reserve room for the returned eigenvectors.

    Raises:
        OptionError: (field ``max_memory``) when even the smallest plan does not fit; it names the bytes needed.
    """
    at_least("dim", dim, 1)
    at_least("k", k, 1)
    one_of("which", which, WHICH)
    at_least("block_size", block_size, 1, optional=True)
    kt, vector = _k_total(dim, k, which), dim * itemsize

    def plan(b: int, room: int | None) -> BlockPlan:
        basis = max(default_max_basis(dim, k, which, b), min_basis(dim, k, which, b))
        basis = basis if room is None else min(room, basis)
        return BlockPlan(b, basis, (basis + max(WORK_BLOCKS * b, kt if want_vectors else 0)) * vector)

    sizes = [min(block_size, dim)] if block_size else list(range(min(k, MAX_BLOCK, dim), 0, -1))
    if budget_bytes is None:
        return plan(sizes[0], None)
    fits = [plan(b, budget_bytes // vector - max(WORK_BLOCKS * b, kt if want_vectors else 0)) for b in sizes]
    fits = [p for p in fits if p.max_basis >= min_basis(dim, k, which, p.block_size)]
    if fits:
        return next((p for p in fits if p.max_basis >= min(dim, kt + 4 * p.block_size)), fits[0])
    need = plan(sizes[-1], min_basis(dim, k, which, sizes[-1]))
    raise OptionError("max_memory", f"of {budget_bytes:,} bytes is too small: {kt} extreme eigenvalues of a {dim}-"
                      f"dimensional operator need at least {need.bytes:,} bytes ({need.bytes / 2**30:.3g} GiB: "
                      f"{need.max_basis} basis vectors and the work vectors of block size {need.block_size})")


@dataclass
class BlockEigenResult:
    """The result of :func:`block_eigenpairs`; the fields it shares with the Lanczos ``EigenResult`` mean the same.

    Attributes:
        top: ``(k,)`` largest algebraic eigenvalue estimates, descending (empty unless largest/both).
        bottom: ``(k,)`` smallest, ascending (empty unless smallest/both).
        top_residuals, bottom_residuals: ``(k,)`` ``||A v - theta v||`` of the unit Ritz vectors (explicit products).
        converged: every residual is ``<= tol * norm_estimate`` and no value is in doubt (``certain_* == k``).
        certain_top, certain_bottom: how many leading values are within tolerance and not in doubt (values after a
            cluster that might miss copies might be displaced).
        norm_estimate, tol: the largest lower bound of ``||A||_2`` seen (``|theta|``, ``||A v||`` of unit vectors);
            the relative tolerance.
        matvecs: operator applications (vectors), explicit residual checks included; ``steps`` without them.
        restarts, checks: thick restarts (the basis was full) and final-check rounds.
        block_size, max_basis: vectors per product block, and basis vectors kept at most.
        peak_vectors: the most vectors of length dim held at once (the solver's own bookkeeping).
        top_vectors, bottom_vectors: ``(k, dim)`` unit Ritz vectors (rows), with ``want_vectors``.
    """

    top: Tensor
    bottom: Tensor
    top_residuals: Tensor
    bottom_residuals: Tensor
    converged: bool
    certain_top: int
    certain_bottom: int
    norm_estimate: float
    tol: float
    matvecs: int
    steps: int
    restarts: int
    checks: int
    block_size: int
    max_basis: int
    peak_vectors: int
    top_vectors: Tensor | None = field(default=None, repr=False)
    bottom_vectors: Tensor | None = field(default=None, repr=False)


def _doubt_free(values: list[float], block: int, ctol: float) -> int:
    """How many leading ``values`` no missed copy can displace: up to the first cluster of >= block before the end."""
    first = 0
    for j in range(len(values) - 1):
        if abs(values[j + 1] - values[j]) > ctol:  # a cluster ends at j
            if j + 1 - first >= block:
                return j + 1
            first = j + 1
    return len(values)


def _priority(theta: Tensor, which: str) -> list[int]:
    """Indices of ``theta`` from the wanted extreme(s) inwards (both ends interleaved)."""
    desc = torch.argsort(theta, descending=True).tolist()
    both = dict.fromkeys(i for pair in zip(desc, reversed(desc), strict=True) for i in pair)
    return desc if which == "largest" else desc[::-1] if which == "smallest" else list(both)


class _State(NamedTuple):
    theta: Tensor  # Ritz values of the known block, with their vectors Y (of T) and estimated residuals est
    Y: Tensor
    est: Tensor
    values: Tensor  # the candidates: locked values, then theta
    ends: dict[str, list[int]]  # per end, the wanted candidates from the extreme inwards
    converged: bool  # every wanted one


class _Solver:
    """One run: basis rows ``[0, L)`` locked, ``[L, L+m)`` known, ``[L+m, L+m+p)`` pending; T indexed from row L."""

    def __init__(self, apply, dim: int, k: int, which: str, tol: float, b: int, bk: int, max_basis: int,
                 max_matvecs: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device,
                 progress: Progress | None, verify: bool) -> None:
        self.apply_raw, self.dim, self.k, self.which, self.tol, self.b, self.bk = apply, dim, k, which, tol, b, bk
        self.max_basis, self.max_matvecs, self.gen, self.progress = max_basis, max_matvecs, gen, or_silent(progress)
        self.ends, self.verify = [e for e, whiches in ENDS.items() if which in whiches], verify
        self.V = torch.empty(max_basis, dim, dtype=dtype, device=device)
        self.T = torch.zeros(max_basis, max_basis, dtype=torch.float64)
        self.live = self.peak = max_basis
        self.L = self.m = self.p = self.rows = self.matvecs = self.steps = self.restarts = self.checks = 0
        self.locked, self.locked_res = [], []  # values and residuals of the locked rows
        self.norm, self.tiny, self.safety = 0.0, torch.finfo(dtype).eps ** 0.75, SAFETY
        self.round_found = self.full = False  # a value found in the final check under way; the basis spanned all
        self.checking, self.verified = set(), set()  # ends of the final check under way, ends it passed

    def hold(self, n: int) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)

    def apply(self, r0: int, r1: int) -> Tensor:
        """``A`` applied to rows ``V[r0:r1]``, as contiguous rows (held: the caller releases them)."""
        W = torch.empty(r1 - r0, self.dim, dtype=self.V.dtype, device=self.V.device)
        self.hold(r1 - r0)
        for j0, j1, out in self.apply_raw(self.V[r0:r1]):
            self.hold(j1 - j0)
            if not isinstance(out, Tensor) or out.numel() != (j1 - j0) * self.dim:
                raise CurvscopeError(f"the operator returned {getattr(out, 'shape', type(out))} for {j1 - j0} vectors")
            W[j0:j1].copy_(out.reshape(self.dim, j1 - j0).T)
            del out
            self.hold(j0 - j1)
        self.matvecs += r1 - r0
        self.norm = max(self.norm, float(torch.linalg.vector_norm(W, dim=1).max()))
        if not math.isfinite(self.norm):
            raise CurvscopeError(f"the operator returned non-finite values after {self.matvecs} products")
        self.progress("lanczos", min(self.matvecs, self.max_matvecs), self.max_matvecs)
        return W

    def orth(self, W: Tensor, lo: int, hi: int) -> tuple[Tensor, list[bool]]:
        """Project the rows of ``W`` off ``V[lo:hi]`` twice, in place: the summed coefficients ``(hi - lo, rows)``
        (float64, CPU) and per row whether the second pass kept ``>= 1/sqrt(2)`` of its norm (Kahan-Parlett)."""
        total, norms = torch.zeros(max(hi - lo, 0), W.shape[0], dtype=torch.float64), []
        for _ in range(2 if hi > lo else 0):
            H = self.V[lo:hi] @ W.T
            W.addmm_(H.T, self.V[lo:hi], alpha=-1.0)
            total += H.to(device="cpu", dtype=torch.float64)
            norms.append(torch.linalg.vector_norm(W, dim=1).tolist())
        return total, [b >= a / math.sqrt(2) for a, b in zip(*norms, strict=True)] if norms else [True] * W.shape[0]

    def push(self, src: Tensor | None = None) -> bool:
        """Append ``src`` (default: a random vector, three tries) orthonormalized; False if nothing is left."""
        r, g = self.rows, self.gen
        for _ in range((1 if src is not None else 3) if r < min(self.dim, self.max_basis) else 0):
            self.hold(1)  # random vectors are drawn on the generator's device: a seed gives the same ones anywhere
            self.V[r].copy_(torch.randn(self.dim, generator=g, device=g.device, dtype=self.V.dtype) if src is None
                            else src)
            self.hold(-1)
            before = float(torch.linalg.vector_norm(self.V[r]))
            independent = self.orth(self.V[r:r + 1], 0, r)[1][0]
            norm = float(torch.linalg.vector_norm(self.V[r]))
            if independent and norm > self.tiny * before:
                self.V[r] /= norm
                self.rows += 1
                return True
        return False

    def fill(self) -> None:
        while self.rows - self.L - self.m < self.bk and self.push():
            pass
        self.p = self.rows - self.L - self.m

    def step(self) -> None:
        """Products of the pending block: fill T, orthonormalize the remainders into the next pending block."""
        L, m, p = self.L, self.m, self.p
        for c0 in range(0, p, self.b):
            c1 = min(p, c0 + self.b)
            W = self.apply(L + m + c0, L + m + c1)
            n_cur = self.rows
            coef, independent = self.orth(W, 0, n_cur)
            self.T[: n_cur - L, m + c0: m + c1] = coef[L:]  # the locked rows' coefficients are dropped (deflation)
            self.T[m + c0: m + c1, : n_cur - L] = coef[L:].T
            for j in range(c1 - c0):
                r, col = self.rows, m + c0 + j
                full = r >= min(self.dim, self.max_basis)  # by the capacity check only when r == dim: nothing left
                w = W[j: j + 1] if full else self.V[r: r + 1].copy_(W[j: j + 1])
                before = float(torch.linalg.vector_norm(w))
                new = self.orth(w, n_cur, r)[0][:, 0]  # against this block's new rows
                self.T[n_cur - L: r - L, col] = self.T[col, n_cur - L: r - L] = new
                norm = float(torch.linalg.vector_norm(w))
                if not full and independent[j] and norm < before / math.sqrt(2):  # cancelled: again on everything
                    independent[j] = self.orth(w, 0, r)[1][0]
                    norm = float(torch.linalg.vector_norm(w))
                if not full and independent[j] and norm > self.tiny * self.norm:
                    self.V[r] /= norm
                    self.T[r - L, col] = self.T[col, r - L] = norm
                    self.rows += 1
                elif not full:  # nothing left of A x (an invariant subspace): go on from a random vector
                    self.push()
            del W
            self.hold(c0 - c1)
        self.T[m: m + p, m: m + p] = (self.T[m: m + p, m: m + p] + self.T[m: m + p, m: m + p].T) / 2
        self.steps += p
        self.m, self.p = m + p, self.rows - L - m - p

    def assess(self) -> _State:
        m, p = self.m, self.p
        theta, Y = torch.linalg.eigh(self.T[:m, :m])
        est = torch.linalg.vector_norm(self.T[m: m + p, :m] @ Y, dim=0) if p else torch.zeros(m, dtype=torch.float64)
        values = torch.cat([torch.tensor(self.locked, dtype=torch.float64), theta])
        residuals = torch.cat([torch.tensor(self.locked_res, dtype=torch.float64), est])
        self.norm = max([self.norm, *values.abs().tolist()])
        ends = {e: torch.argsort(values, descending=e == "top", stable=True)[: self.k].tolist() for e in self.ends}
        thr = self.safety * self.tol * self.norm
        converged = all(len(i) == self.k and bool((residuals[i] <= thr).all()) for i in ends.values())
        return _State(theta, Y, est, values, ends, converged)

    def round_status(self, st: _State, need: set[str]) -> tuple[bool, bool]:
        """``(passed, found)`` of the final check under way: at every end of ``need`` the extreme pair of the fresh
        space converged outside the wanted range (passed), or at one a converged value entered it (found)."""
        if not need <= self.checking or self.round_found:
            return False, True
        ctol, passed, found = CLUSTER * self.tol * self.norm, self.m > 0, False
        for e in need if self.m else ():
            i = int(torch.argmax(st.theta) if e == "top" else torch.argmin(st.theta))
            kth = float(st.values[st.ends[e][-1]])
            entered = bool(st.theta[i] > kth + ctol if e == "top" else st.theta[i] < kth - ctol)
            done = bool(st.est[i] <= self.safety * self.tol * self.norm)
            passed, found = passed and done and not entered, found or done and entered
        return passed, found

    def restart(self, st: _State, *, lock: bool, fresh: bool = False) -> tuple[dict[int, int], list[int]]:
        """Thick restart: drop the locked rows no longer wanted (values found later displaced them), lock the
        converged wanted pairs (``lock``), keep the other wanted Ritz vectors, extras next to them and the pending
        block (none of them when ``fresh``; all Ritz vectors without ``lock``). Returns the new rows of the wanted
        locked candidates and the kept Ritz indices (now rows ``L, L+1, ...``, the wanted ones first)."""
        L0, m, p = self.L, self.m, self.p
        wanted = {i for idx in st.ends.values() for i in idx}
        kept = [i for i in range(L0) if i in wanted]
        for dst, src in enumerate(kept + list(range(L0, self.rows))):
            if dst != src:
                self.V[dst].copy_(self.V[src])
        self.locked, self.locked_res = [self.locked[i] for i in kept], [self.locked_res[i] for i in kept]
        self.L, self.rows = len(kept), self.rows - L0 + len(kept)
        order = _priority(st.theta, self.which)
        locks = [i for i in order if i + L0 in wanted and lock and st.est[i] <= self.safety * self.tol * self.norm]
        self.round_found |= bool(locks) and bool(self.checking)  # a check round that locks a value found it
        unconverged = [i for i in order if i + L0 in wanted and i not in locks]
        room = self.max_basis - self.L - len(locks) - 2 * p
        n_keep = 0 if fresh else len(order) if not lock else min(
            max(len(unconverged), (room + len(unconverged) + 1) // 2), max(room, 0))
        keep = (unconverged + [i for i in order if i not in locks and i + L0 not in wanted])[:n_keep]
        coupling, Yt = self.T[m: m + p, :m] @ st.Y[:, keep], st.Y[:, locks + keep].T.to(self.V.device, self.V.dtype)
        chunk, L = max(1, self.b * self.dim // (m + Yt.shape[0] or 1)), self.L  # workspace: at most b vectors
        self.hold(self.b)
        for c0 in range(0, self.dim if Yt.shape[0] else 0, chunk):  # the Ritz vectors in place: rows [L, L+q)
            self.V[L: L + Yt.shape[0], c0: c0 + chunk] = Yt @ self.V[L: L + m, c0: c0 + chunk]
        self.hold(-self.b)
        rows = {old: new for new, old in enumerate(kept)} | {L0 + i: self.L + j for j, i in enumerate(locks)}
        self.locked, self.locked_res = self.locked + st.theta[locks].tolist(), self.locked_res + st.est[locks].tolist()
        src, self.L, self.m, self.p = self.L + m, self.L + len(locks), len(keep), 0 if fresh else p
        for j in range(self.p):
            self.V[self.L + self.m + j].copy_(self.V[src + j])
        self.T.zero_()
        self.T[range(self.m), range(self.m)] = st.theta[keep]
        self.T[self.m: self.m + self.p, : self.m] = coupling[: self.p]
        self.T[: self.m, self.m: self.m + self.p] = coupling[: self.p].T
        self.rows = self.L + self.m + self.p
        return rows, keep

    def finish(self, st: _State) -> tuple[dict[str, list[tuple[float, float, int]]], bool]:
        """Explicit residuals of the wanted pairs: per end ``(value, residual, row)`` from the extreme inwards, and
        whether a pair still in the iteration failed (worth going on)."""
        L0, self.full = self.L, self.L + self.m >= self.dim
        rows, keep = self.restart(st, lock=False)  # the wanted rows are now 0, 1, ..., n - 1
        rows |= {L0 + i: self.L + j for j, i in enumerate(keep)}
        value = dict(enumerate(self.locked)) | {self.L + j: float(st.theta[i]) for j, i in enumerate(keep)}
        ends = {e: [rows[i] for i in idx] for e, idx in st.ends.items()}
        n, residual = max(r for rs in ends.values() for r in rs) + 1, []
        for r0, r1 in ((r0, min(n, r0 + self.b)) for r0 in range(0, n, self.b)):
            W = self.apply(r0, r1)
            residual += [float(torch.linalg.vector_norm(W[j].add_(self.V[r], alpha=-value[r]))) for j, r in
                         enumerate(range(r0, r1))]
            del W
            self.hold(r0 - r1)
        retry = any(r > self.tol * self.norm for r in residual[self.L:])
        return {e: [(value[r], residual[r], r) for r in rs] for e, rs in ends.items()}, retry

    def run(self, cols: list[Tensor], want_vectors: bool) -> BlockEigenResult:
        for col in cols:
            self.push(col)
        self.fill()
        reserve = _k_total(self.dim, self.k, self.which)  # the explicit residual checks (at most)
        while True:
            if self.p and self.rows + min(self.p, self.dim - self.rows) > self.max_basis:
                self.restart(self.assess(), lock=True)
                self.restarts += 1
            if self.p == 0 or self.matvecs + self.p + reserve > self.max_matvecs:
                return self.result(self.finish(self.assess())[0], want_vectors)
            self.step()
            st = self.assess()
            need = set() if not st.converged or self.L + self.m >= self.dim else {  # ends that might miss copies
                e for e, idx in st.ends.items() if self.verify or _doubt_free(
                    st.values[idx].tolist(), self.bk, CLUSTER * self.tol * self.norm) < len(idx)}
            passed, found = self.round_status(st, need) if need else (True, False)
            if found:  # a final check: lock the wanted pairs, go on from random vectors orthogonal to them
                self.restart(st, lock=True, fresh=True)
                self.fill()
                self.checking, self.verified, self.round_found, self.checks = need, set(), False, self.checks + 1
            if st.converged and passed:
                self.verified = need
                out, retry = self.finish(st)
                if not retry or self.matvecs + self.p + reserve > self.max_matvecs:
                    return self.result(out, want_vectors)
                self.safety /= 10

    def result(self, out: dict[str, list[tuple[float, float, int]]], want_vectors: bool) -> BlockEigenResult:
        parts: dict[str, Any] = {}
        for e in ENDS:
            pairs = out.get(e, [])
            ok = next((i for i, (_, r, _) in enumerate(pairs) if not r <= self.tol * self.norm), len(pairs))
            if e not in self.verified and not self.full:
                ok = min(ok, _doubt_free([v for v, _, _ in pairs], self.bk, CLUSTER * self.tol * self.norm))
            parts[f"certain_{e}"] = ok
            for name, j in ((e, 0), (f"{e}_residuals", 1)):
                parts[name] = torch.tensor([x[j] for x in pairs], dtype=torch.float64).to(self.V.device, self.V.dtype)
            if want_vectors:
                self.hold(len(pairs))
                parts[f"{e}_vectors"] = self.V[[r for _, _, r in pairs]]
        self.progress("lanczos", self.max_matvecs, self.max_matvecs)
        return BlockEigenResult(
            **parts, converged=all(parts[f"certain_{e}"] == self.k for e in self.ends), norm_estimate=self.norm,
            tol=self.tol, matvecs=self.matvecs, steps=self.steps, restarts=self.restarts, checks=self.checks,
            block_size=self.b, max_basis=self.max_basis, peak_vectors=self.peak)


def _operator(op: Any, dim: int | None, batched: bool | None):
    """``(apply, dim)``: ``apply(X)`` on rows ``(c, dim)`` yields ``(j0, j1, A X[j0:j1]^T)``."""
    matmul = hasattr(op, "shape") and hasattr(op, "__matmul__")
    if not matmul and not callable(op):
        raise CurvscopeError(f"op must be a function v -> A v or have .shape and @, got {type(op).__name__}")
    dim = int(op.shape[-1]) if dim is None and hasattr(op, "shape") else dim
    if dim is None or hasattr(op, "shape") and tuple(op.shape) != (dim, dim):
        raise CurvscopeError(f"op has shape {getattr(op, 'shape', None)}, dim {dim}: need dim, or a (dim, dim) shape")
    at_least("dim", dim, 1)
    batched = isinstance(op, Tensor) or bool(getattr(op, "supports_matmat", False)) if batched is None else batched

    def apply(X: Tensor):
        for j0, j1 in [(0, X.shape[0])] if batched else [(j, j + 1) for j in range(X.shape[0])]:
            x = X[j0:j1].T if batched else X[j0]
            yield j0, j1, op @ x if matmul else op(x)

    return apply, dim


def block_eigenpairs(op: Any, dim: int | None = None, k: int = 6, *, which: str = "both", tol: float = 1e-6,
                     block_size: int | None = None, max_basis: int | None = None, max_matvecs: int | None = None,
                     start: Tensor | None = None, generator: torch.Generator | None = None,
                     dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                     want_vectors: bool = False, batched: bool | None = None, verify: bool = False,
                     progress: Progress | None = None) -> BlockEigenResult:
    """The k largest and/or k smallest algebraic eigenvalues of a symmetric operator, multiplicities included
    (algorithm, certainty rule and memory bound: the module docstring).

    Args:
        op: ``v -> A v`` on ``(dim,)`` tensors, or an object with ``.shape`` and ``@``; it must not modify its
            argument (a basis row). With ``batched`` it gets ``(dim, c)`` blocks and returns ``A X``, in any dtype.
        dim: length of the vectors A acts on (default ``op.shape[-1]``).
        k: eigenvalues wanted at each requested end; clipped to ``dim``.
        which: ``"both"``, ``"largest"`` or ``"smallest"``.
        tol: converged means ``||A v - theta v|| <= tol * norm_estimate`` (``>= 1e-5`` for a float32 basis).
        block_size: vectors per product block b (default ``min(k, 2)``, see :func:`plan_block`).
        max_basis: basis vectors kept at most (default :func:`default_max_basis`, at least :func:`min_basis`).
        max_matvecs: product budget, explicit residual checks included (default ``max(400, 40 k_total)``).
        start: ``(dim,)`` or ``(dim, s)`` start vectors (a previous run's Ritz vectors), filled up to b with random
            ones; with ``s > b`` the Krylov block has s vectors (at most ``(max_basis - k_total - 1) / 2``), applied
            b at a time. The certainty rule takes the start as generic (of full rank on each wanted eigenspace):
            after an exact-eigenvector start pass ``verify=True``.
        generator: randomness for start and replacement vectors (default: a CPU generator seeded with 0).
        dtype: the basis dtype (default: ``start``'s, else float64); the projected problems are float64.
        device: where the basis lives (default: ``start``'s device, else the CPU).
        want_vectors: also return the unit Ritz vectors (copied out of the basis at the end).
        batched: apply ``op`` to whole blocks (default: a tensor, or an op with ``supports_matmat = True``).
        verify: run the final check even when the block size rules out missed copies.
        progress: called as ``progress("lanczos", products, max_matvecs)`` after every product block.

    Raises:
        OptionError: a bad ``k``, ``which``, ``tol``, ``block_size``, ``max_basis`` or ``max_matvecs``.
        CurvscopeError: a bad operator or start block, or non-finite products.
    """
    apply, dim = _operator(op, dim, batched)
    at_least("k", k, 1)
    one_of("which", which, WHICH)
    if not (isinstance(tol, (int, float)) and 0 < tol < math.inf):
        raise OptionError("tol", f"must be positive, got {tol}")
    for name, value in (("block_size", block_size), ("max_basis", max_basis), ("max_matvecs", max_matvecs)):
        at_least(name, value, 1, optional=True)
    if start is not None and (start.shape[0] != dim or start.dim() > 2 or not bool(torch.isfinite(start).all())):
        raise CurvscopeError(f"start must be a finite ({dim},) or ({dim}, s) tensor, got {tuple(start.shape)}")
    cols = [] if start is None else list(start.reshape(dim, -1).T)
    dtype = dtype or (start.dtype if start is not None and start.is_floating_point() else torch.float64)
    device = torch.device(device) if device is not None else start.device if start is not None else torch.device("cpu")
    k, b = min(k, dim), min(block_size or min(k, MAX_BLOCK), dim)
    kt, lo = _k_total(dim, k, which), min_basis(dim, k, which, b)
    max_basis = min(dim, max(default_max_basis(dim, k, which, b), lo) if max_basis is None else max_basis)
    if max_basis < lo:
        raise OptionError("max_basis", f"must be at least {lo} ({kt} wanted vectors, a Ritz vector and two blocks of "
                          f"{b}), got {max_basis}")
    bk = min(max(b, len(cols)), dim if max_basis >= dim else max(b, (max_basis - kt - 1) // 2))
    max_matvecs = max(400, 40 * kt) if max_matvecs is None else max_matvecs
    if max_matvecs < bk + kt:
        raise OptionError("max_matvecs", f"must be at least {bk + kt} (a block and {kt} residual checks), "
                          f"got {max_matvecs}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    solver = _Solver(apply, dim, k, which, float(tol), b, bk, max_basis, max_matvecs, gen, dtype, device, progress,
                     verify)
    return solver.run(cols[:bk], want_vectors)
