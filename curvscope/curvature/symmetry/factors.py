"""Symmetry-structured curvature factors: the projection R, its factors, f(Sigma) g, and the SymO direction.

``CURVATURE.md`` section 7. A symmetry group acting on the hidden units of a Linear chain turns any second
moment Sigma of chain vectors into R(Sigma) = E_G[G Sigma G^T]. Because every G is orthogonal, R is the
orthogonal (Frobenius) projection onto the matrices that commute with the group, and those are
block-diagonal over the group's *isotypic components*:

  R(Sigma) = sum_tau T_tau^T (C_tau (x) I_s) T_tau,    C_tau = tr_s(T_tau Sigma T_tau^T) / dim_tau,

where T_tau maps a chain vector to its coordinates in component tau, a ``(k_tau, s_tau)`` matrix Z: the
rows (*multiplicity*) collect the free axes of the tensors that belong to tau, the columns run over the
hidden units the component's irreducible representation lives on. The factors are the C_tau
(``k_tau x k_tau``), and their named sub-blocks are the quantities of the paper:

* ``orthogonal`` / ``signed-permutation`` (both give the same R: only second moments of each V_h enter): a
  component per set S of hidden labels carried by some tensor; a tensor belongs to it when its hidden labels
  are exactly S, and its Z is the tensor itself with the free axes as rows. Components: {1} holds W_1 (rows
  d_0: Phi_1 = g_1^T g_1 / d_1), b_1, and W_2 when L = 2 (Psi_1 = g_1^T g_2^T / d_1); {L-1} holds b_{L-1} and
  W_L (Phi_L = g_L g_L^T / d_{L-1}); {l-1, l} holds a hidden-to-hidden W_l (phi_l = |g_l|^2 / (d_l d_{l-1}));
  {} holds the output bias (full).
* ``permutation``: each hidden axis splits into the all-ones direction (``triv``: one coordinate
  ``1^T x / sqrt(d)``) and its complement (``perp``: P_perp x). A component is a choice of ``perp`` for a set
  of hidden labels and ``triv`` for all others (code ``"p1"``: h_1 perp, h_2 all-ones); every tensor whose
  hidden labels include the perp set belongs to it. Single-layer blocks give C_1 / C_perp, hidden-to-hidden
  weights the four scalars lambda_ts, and the all-ones components couple every layer (cross-layer terms).
* ``none``: one component, the dense matrix (Sigma itself), only below ``DENSE_CAP`` chain parameters.

Single gradient: C_tau = Z Z^T / dim_tau. f(R(Sigma)) g = sum_tau T_tau^T (f(C_tau) Z_tau(g)) because the
components are orthogonal and cover the chain; this is the cheap SymO step with f(x) = (x + eps)^{-1/2}.
Dense vectors of the chain (tests, ``none``) concatenate the chain tensors flattened row-major, in chain
order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations

import torch
from torch import Tensor

from curvscope.curvature.symmetry_chain import ChainTensor, LinearChain, find_chain
from curvscope.errors import CurvscopeError

SYMMETRIES = ("orthogonal", "signed-permutation", "permutation", "none")
DENSE_CAP = 4096
"""``--symmetry none`` forms the dense D x D matrix: at most this many chain parameters."""


@dataclass(frozen=True)
class Member:
    """A chain tensor inside a component: rows ``offset .. offset + size`` of C_tau."""

    index: int
    size: int
    offset: int


@dataclass(frozen=True)
class Component:
    """One isotypic component tau.

    Attributes:
        code: ``"{1}"``-style label set (orthogonal), ``"p1"``-style perp/all-ones code (permutation),
            ``"dense"`` (none).
        kinds: ``(h, kind)`` per hidden label the component acts on; kind is ``std`` (orthogonal), ``perp``
            or ``triv`` (permutation). Labels not listed are treated as free axes.
        irrep_dim: dimension of the irreducible representation (multiplicity of each eigenvalue of C_tau).
        embed_size: s, the number of columns of Z (hidden units the representation is embedded in).
        members: the tensors in the component, in chain order.
        size: k_tau, the side of C_tau.
    """

    code: str
    kinds: tuple[tuple[int, str], ...]
    irrep_dim: int
    embed_size: int
    members: tuple[Member, ...]
    size: int

    @property
    def kind_map(self) -> dict[int, str]:
        return dict(self.kinds)


@dataclass(frozen=True)
class BlockSpec:
    """A named factor: the sub-block ``(X, Y)`` of C_tau, reshaped to ``free shape of X + free shape of Y``."""

    name: str
    component: int
    first: int
    second: int
    shape: tuple[int, ...]
    params: tuple[str, ...]

    @property
    def kind(self) -> str:
        return {0: "scalar", 1: "vector"}.get(len(self.shape), "matrix")


@dataclass(frozen=True)
class Structure:
    """The chain, the symmetry and its components (what R looks like for this model)."""

    chain: LinearChain
    symmetry: str
    components: tuple[Component, ...]

    @property
    def num_params(self) -> int:
        return self.chain.num_params

    def blocks(self) -> list[BlockSpec]:
        """The named factors, in component order (diagonal blocks, then cross blocks ``X < Y``)."""
        if self.symmetry == "none":
            D = self.num_params
            return [BlockSpec("Sigma", 0, 0, 0, (D, D), self.chain.param_names)]
        specs = []
        for c, comp in enumerate(self.components):
            pairs = [(i, i) for i in range(len(comp.members))]
            pairs += list(combinations(range(len(comp.members)), 2))
            for i, j in pairs:
                x, y = (self.chain.tensors[comp.members[k].index] for k in (i, j))
                name = _block_name(self.chain, x, y)
                if self.symmetry == "permutation":
                    name = f"{name}[{comp.code}]"
                shape = _free_shape(x, comp.kind_map) + _free_shape(y, comp.kind_map)
                params = (x.name,) if i == j else (x.name, y.name)
                specs.append(BlockSpec(name, c, i, j, shape, params))
        return specs


def _block_name(chain: LinearChain, x: ChainTensor, y: ChainTensor) -> str:
    if x is y:
        if x.is_bias:
            return f"phi_b{x.layer}" if x.hidden_labels else f"Phi_b{x.layer}"
        return f"phi_{x.layer}" if len(x.hidden_labels) == 2 else f"Phi_{x.layer}"
    if chain.num_layers == 2 and not x.is_bias and not y.is_bias:
        return "Psi_1"
    return f"Psi_{x.short}_{y.short}"


def _free_shape(t: ChainTensor, kinds: dict[int, str]) -> tuple[int, ...]:
    return tuple(s for s, lab in zip(t.shape, t.labels, strict=True) if lab is None or lab not in kinds)


def build_structure(chain: LinearChain, symmetry: str) -> Structure:
    """The isotypic components of ``symmetry`` (``orthogonal``, ``signed-permutation``, ``permutation``,
    ``none``) on ``chain``."""
    if symmetry not in SYMMETRIES:
        raise CurvscopeError(f"--symmetry '{symmetry}' is not supported: choose one of {', '.join(SYMMETRIES)}")
    tensors = chain.tensors
    widths = chain.hidden_widths
    if symmetry == "none":
        if chain.num_params > DENSE_CAP:
            raise CurvscopeError(f"--symmetry none forms the dense {chain.num_params} x {chain.num_params} "
                                 f"matrix of the chain; that is above the cap of {DENSE_CAP} parameters: use a "
                                 "structured --symmetry or fewer --layers")
        return Structure(chain, symmetry, (_component("dense", (), tensors, range(len(tensors))),))
    if not widths:
        raise CurvscopeError(f"--symmetry {symmetry} needs a hidden layer (at least two Linear layers in the "
                             "chain); use --symmetry none for a single layer")
    comps = []
    if symmetry in ("orthogonal", "signed-permutation"):
        seen: list[frozenset[int]] = []
        for t in tensors:
            if t.hidden_labels not in seen:
                seen.append(t.hidden_labels)
        for S in seen:  # chain order: {1}, {1,2}, ..., {L-1}, {} (the output bias)
            kinds = tuple((h, "std") for h in sorted(S))
            members = [i for i, t in enumerate(tensors) if t.hidden_labels == S]
            code = "{" + ",".join(str(h) for h in sorted(S)) + "}"
            comps.append(_component(code, kinds, tensors, members, widths))
    else:
        perp_sets: list[frozenset[int]] = []
        for t in tensors:
            labels = sorted(t.hidden_labels)
            for r in range(len(labels) + 1):
                for P in combinations(labels, r):
                    if frozenset(P) not in perp_sets:
                        perp_sets.append(frozenset(P))
        for P in sorted(perp_sets, key=lambda p: (len(p), sorted(p))):
            if any(widths[h] < 2 for h in P):
                continue  # the complement of the all-ones direction is empty
            kinds = tuple((h, "perp" if h in P else "triv") for h in sorted(widths))
            members = [i for i, t in enumerate(tensors) if P <= t.hidden_labels]
            code = "".join("p" if h in P else "1" for h in sorted(widths))
            comps.append(_component(code, kinds, tensors, members, widths))
    return Structure(chain, symmetry, tuple(comps))


def _component(code: str, kinds: tuple[tuple[int, str], ...], tensors: Sequence[ChainTensor],
               members: Sequence[int], widths: dict[int, int] | None = None) -> Component:
    widths = widths or {}
    kmap = dict(kinds)
    irrep_dim, embed = 1, 1
    for h, kind in kinds:
        if kind == "std":
            irrep_dim *= widths[h]
            embed *= widths[h]
        elif kind == "perp":
            irrep_dim *= widths[h] - 1
            embed *= widths[h]
    out, offset = [], 0
    for i in members:
        size = math.prod(_free_shape(tensors[i], kmap))
        out.append(Member(i, size, offset))
        offset += size
    return Component(code, kinds, irrep_dim, embed, tuple(out), offset)


# -- coordinates in a component ----------------------------------------------------------------------------

def _axis_roles(t: ChainTensor, kinds: dict[int, str]) -> tuple[list[int], list[int], list[int]]:
    """Tensor axes split into free, collapsed (``triv``) and irrep axes (``std``/``perp``, by hidden label)."""
    free, collapsed, irrep = [], [], []
    for ax, lab in enumerate(t.labels):
        kind = kinds.get(lab) if lab is not None else None
        if kind is None:
            free.append(ax)
        elif kind == "triv":
            collapsed.append(ax)
        else:
            irrep.append((lab, ax))
    return free, collapsed, [ax for _, ax in sorted(irrep)]


def extract(x: Tensor, t: ChainTensor, kinds: dict[int, str]) -> Tensor:
    """Coordinates Z = T_tau x of a tensor ``(*batch, *t.shape)`` in a component: ``(*batch, k_X, s)``."""
    nb = x.dim() - len(t.shape)
    free, collapsed, irrep = _axis_roles(t, kinds)
    for ax in collapsed:
        x = x.sum(nb + ax, keepdim=True) / math.sqrt(t.shape[ax])
    for ax in irrep:
        if kinds[t.labels[ax]] == "perp":
            x = x - x.mean(nb + ax, keepdim=True)
    order = free + collapsed + irrep
    x = x.permute(*range(nb), *(nb + ax for ax in order))
    k = math.prod(t.shape[ax] for ax in free)
    return x.reshape(*x.shape[:nb], k, -1)


def lift(z: Tensor, t: ChainTensor, kinds: dict[int, str]) -> Tensor:
    """The adjoint T_tau^T: coordinates ``(*batch, k_X, s)`` back to a tensor ``(*batch, *t.shape)``."""
    nb = z.dim() - 2
    free, collapsed, irrep = _axis_roles(t, kinds)
    order = free + collapsed + irrep
    sizes = [1 if ax in collapsed else t.shape[ax] for ax in order]
    y = z.reshape((*z.shape[:nb], *sizes))
    inverse = sorted(range(len(order)), key=lambda j: order[j])
    y = y.permute(*range(nb), *(nb + j for j in inverse))
    for ax in collapsed:
        d = t.shape[ax]
        y = y.expand(*y.shape[:nb + ax], d, *y.shape[nb + ax + 1:]) / math.sqrt(d)
    for ax in irrep:
        if kinds[t.labels[ax]] == "perp":
            y = y - y.mean(nb + ax, keepdim=True)
    return y


def coordinates(structure: Structure, c: int, tensors: dict[str, Tensor]) -> Tensor:
    """Z_tau of chain vectors given as tensors by name (``(*batch, *shape)`` each): ``(*batch, k_tau, s)``."""
    comp = structure.components[c]
    kinds = comp.kind_map
    parts = [extract(tensors[structure.chain.tensors[m.index].name], structure.chain.tensors[m.index], kinds)
             for m in comp.members]
    return torch.cat(parts, dim=-2)


# -- factors -----------------------------------------------------------------------------------------------

@dataclass
class Factors:
    """The factors C_tau of R(Sigma), one ``(*batch, k_tau, k_tau)`` matrix per component (a leading batch
    dimension holds one set per ensemble member)."""

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


def embeddings(structure: Structure) -> list[Tensor]:
    """T_tau as dense ``(k_tau * s_tau, D)`` matrices (tests and small models only)."""
    D = structure.num_params
    basis = unflatten(structure, torch.eye(D, dtype=torch.float64))
    out = []
    for c, comp in enumerate(structure.components):
        Z = coordinates(structure, c, basis)  # (D, k, s): column d of T is Z[d]
        out.append(Z.reshape(D, comp.size * comp.embed_size).T)
    return out


def flatten(structure: Structure, tensors: dict[str, Tensor]) -> Tensor:
    """Chain tensors ``(*batch, *shape)`` -> dense vectors ``(*batch, D)`` (chain order, row-major)."""
    parts = []
    for t in structure.chain.tensors:
        x = tensors[t.name]
        parts.append(x.reshape(*x.shape[:x.dim() - len(t.shape)], -1))
    return torch.cat(parts, dim=-1)


def unflatten(structure: Structure, flat: Tensor) -> dict[str, Tensor]:
    """Dense vectors ``(*batch, D)`` -> chain tensors by name."""
    out, offset = {}, 0
    for t in structure.chain.tensors:
        out[t.name] = flat[..., offset:offset + t.numel].reshape((*flat.shape[:-1], *t.shape))
        offset += t.numel
    return out


def single_gradient_factors(structure: Structure, g: dict[str, Tensor]) -> Factors:
    """The factors of R(g g^T): C_tau = Z Z^T / dim_tau, for gradients ``(*batch, *shape)`` by name (the
    closed forms of ``CURVATURE.md`` section 7: Phi_1 = g_1^T g_1 / d_1, ..., C_perp, lambda_ts, ...)."""
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


def inverse_sqrt(eps: float) -> Callable[[Tensor], Tensor]:
    """f(x) = (x + eps)^{-1/2} on eigenvalues clamped at zero (the SymO preconditioner)."""
    if eps <= 0:
        raise CurvscopeError(f"--eps must be positive, got {eps}")
    return lambda evals: (evals.clamp_min(0) + eps).rsqrt()


# -- SymO --------------------------------------------------------------------------------------------------

def parse_layers(layers: str | Sequence[str] | None) -> list[str] | None:
    """``"1,3,5"`` or ``["1", "3", "5"]`` -> module names (``None``/empty: find the chain)."""
    if layers is None:
        return None
    if isinstance(layers, str):
        names = [s.strip() for s in layers.split(",")]
        if any(not s for s in names):
            raise CurvscopeError(f"--layers '{layers}': expected module names separated by commas")
        return names or None
    return list(layers) or None


def symo_direction(problem, layers: str | Sequence[str] | None = None, symmetry: str = "orthogonal",
                   eps: float = 1e-8) -> dict[str, Tensor]:
    """The SymO direction Sigma^{-1/2} g, Sigma = R(g g^T) from the batch gradient g, damped by ``eps``.

    Returns parameter-shaped tensors keyed like ``problem.params``, zero outside the Linear chain; the SymO
    update is ``theta - lr * direction``. For two-layer nets this is the joint (Phi_1, Psi_1, Phi_2) inverse
    square root (the hidden bias joins it), for deeper nets one block per component.
    """
    chain = find_chain(problem.model, problem.params, parse_layers(layers))
    structure = build_structure(chain, symmetry)
    g = problem.gradient()
    factors = single_gradient_factors(structure, {n: g[n] for n in chain.param_names})
    u = factors.apply(g, inverse_sqrt(eps))
    return {n: u[n] if n in u else torch.zeros_like(p) for n, p in problem.params.items()}
