"""The factors C_tau of R(Sigma): from one gradient, from sums of outer products, from a dense Sigma.

``docs/conventions.md §7``. R(Sigma) = sum_tau T_tau^T (C_tau (x) I_s) T_tau with
C_tau = tr_s(T_tau Sigma T_tau^T) / dim_tau; for a single gradient C_tau = Z Z^T / dim_tau. Because the
components are orthogonal and cover the chain, f(R(Sigma)) g = sum_tau T_tau^T (f(C_tau) Z_tau(g))
(:meth:`Factors.apply`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from curvscope.curvature.symmetry.coordinates import coordinates, embeddings, lift
from curvscope.curvature.symmetry.groups import Structure
from curvscope.reprs import compact_repr


@dataclass
class Factors:
    """The factors C_tau of R(Sigma), one ``(*batch, k_tau, k_tau)`` matrix per component (a leading batch
    dimension holds one set per ensemble member)."""

    __repr__ = compact_repr

    structure: Structure
    matrices: tuple[Tensor, ...]

    def blocks(self) -> dict[str, Tensor]:
        """Named factors (``Phi_1``, ``Psi_1``, ``phi_2``, ``Phi_b3``, ...), shaped as in :meth:`Structure.blocks`."""
        if self.structure.symmetry == "none":
            return {"Sigma": self.matrices[0]}
        out = {}
        for spec in self.structure.blocks():
            comp = self.structure.components[spec.component]
            C = self.matrices[spec.component]
            a, b = comp.members[spec.first], comp.members[spec.second]
            block = C[..., a.offset:a.offset + a.size, b.offset:b.offset + b.size]
            out[spec.name] = block.reshape((*C.shape[:-2], *spec.shape))
        return out

    def frobenius_sq(self) -> Tensor:
        """``||R(Sigma)||_F^2 = sum_tau dim_tau ||C_tau||_F^2``, shape ``(*batch,)``, in float64."""
        return sum(comp.irrep_dim * C.to(torch.float64).pow(2).sum((-1, -2))
                   for comp, C in zip(self.structure.components, self.matrices, strict=True))

    def dense(self) -> Tensor:
        """R(Sigma) as a dense ``(D, D)`` matrix (tests and small models only)."""
        D = self.structure.num_params
        T = embeddings(self.structure)
        out = torch.zeros(D, D, dtype=self.matrices[0].dtype, device=self.matrices[0].device)
        for comp, C, Tc in zip(self.structure.components, self.matrices, T, strict=True):
            eye = torch.eye(comp.embed_size, dtype=C.dtype, device=C.device)
            out += Tc.T @ torch.kron(C, eye) @ Tc
        return out

    def apply(self, vector: dict[str, Tensor], fn: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        """f(R(Sigma)) v for a chain vector ``v`` (tensors by name): per component f(C_tau) Z_tau(v), lifted
        back. ``fn`` maps eigenvalues ``(k,)`` (float64) to f(eigenvalues); f(C) comes from ``eigh``."""
        chain = self.structure.chain
        first = vector[chain.tensors[0].name]
        out = {t.name: torch.zeros(t.shape, dtype=first.dtype, device=first.device) for t in chain.tensors}
        for c, (comp, C) in enumerate(zip(self.structure.components, self.matrices, strict=True)):
            if C.dim() != 2:
                raise ValueError("apply() needs one set of factors, not a batch")
            evals, evecs = torch.linalg.eigh(C.to(torch.float64))
            F = (evecs * fn(evals)) @ evecs.T
            Z = F @ coordinates(self.structure, c, vector).to(torch.float64)
            kinds = comp.kind_map
            for m in comp.members:
                t = chain.tensors[m.index]
                out[t.name] += lift(Z[m.offset:m.offset + m.size], t, kinds).to(first.dtype)
        return out



def single_gradient_factors(structure: Structure, g: dict[str, Tensor]) -> Factors:
    """The factors of R(g g^T): C_tau = Z Z^T / dim_tau, for gradients ``(*batch, *shape)`` by name (the
    closed forms of ``docs/conventions.md §7``: Phi_1 = g_1^T g_1 / d_1, ..., C_perp, lambda_ts, ...)."""
    mats = []
    for c, comp in enumerate(structure.components):
        Z = coordinates(structure, c, g)
        mats.append(Z @ Z.transpose(-1, -2) / comp.irrep_dim)
    return Factors(structure, tuple(mats))


def outer_sum_factors(structure: Structure, vectors: dict[str, Tensor], scale: float = 1.0) -> Factors:
    """The factors of R(scale * sum_n v_n v_n^T) for vectors ``(n, *shape)`` by name (per-sample gradients
    with scale 1/N; GGN columns, which already carry 1/sqrt(N), with scale 1)."""
    mats = []
    for c, comp in enumerate(structure.components):
        Z = coordinates(structure, c, vectors)
        mats.append(torch.einsum("nks,nls->kl", Z, Z) * (scale / comp.irrep_dim))
    return Factors(structure, tuple(mats))


def add_factors(a: Factors | None, b: Factors) -> Factors:
    """Sum of two sets of factors of the same structure (``a`` may be ``None``)."""
    if a is None:
        return b
    return Factors(b.structure, tuple(x + y for x, y in zip(a.matrices, b.matrices, strict=True)))


def project_dense(structure: Structure, sigma: Tensor) -> Factors:
    """The factors of R(sigma) for a dense ``(D, D)`` sigma: C_tau = tr_s(T_tau sigma T_tau^T) / dim_tau."""
    mats = []
    for comp, T in zip(structure.components, embeddings(structure), strict=True):
        T = T.to(sigma.dtype)
        M = (T @ sigma @ T.T).reshape(comp.size, comp.embed_size, comp.size, comp.embed_size)
        mats.append(torch.einsum("aibi->ab", M) / comp.irrep_dim)
    return Factors(structure, tuple(mats))


def relative_projection_error(factors: Factors, sigma_frobenius_sq: float) -> float:
    """``||Sigma - R(Sigma)||_F / ||Sigma||_F`` from ``||Sigma||_F^2`` (R is an orthogonal projection, so
    ``||Sigma - R(Sigma)||^2 = ||Sigma||^2 - ||R(Sigma)||^2``)."""
    if sigma_frobenius_sq <= 0:
        return 0.0
    rest = max(sigma_frobenius_sq - float(factors.frobenius_sq()), 0.0)
    return math.sqrt(rest / sigma_frobenius_sq)

