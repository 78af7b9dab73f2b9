"""The isotypic components of each symmetry group on a Linear chain: what R(Sigma) looks like for a model.

``docs/conventions.md §7``. :func:`build_structure` lists the components tau of ``orthogonal`` /
``signed-permutation`` (one per set of hidden labels), ``permutation`` (all-ones / complement codes) or
``none`` (one dense component), and :meth:`Structure.blocks` the named factors (``Phi_1``, ``Psi_1``,
``phi_2``, ...) as sub-blocks of the C_tau.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from curvscope.curvature.symmetry.chain import ChainTensor, LinearChain
from curvscope.errors import OptionError, one_of
from curvscope.reprs import compact_repr

SYMMETRIES = ("orthogonal", "signed-permutation", "permutation", "none")
DENSE_CAP = 4096
"""Symmetry ``none`` forms the dense D x D matrix: at most this many chain parameters."""


@dataclass(frozen=True)
class Member:
    """A chain tensor inside a component: rows ``offset .. offset + size`` of C_tau."""

    __repr__ = compact_repr

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

    __repr__ = compact_repr

    code: str
    kinds: tuple[tuple[int, str], ...]
    irrep_dim: int
    embed_size: int
    members: tuple[Member, ...]
    size: int

    @property
    def kind_map(self) -> dict[int, str]:
        """``kinds`` as a dict: hidden label h -> kind."""
        return dict(self.kinds)


@dataclass(frozen=True)
class BlockSpec:
    """A named factor: the sub-block ``(X, Y)`` of C_tau, reshaped to ``free shape of X + free shape of Y``."""

    __repr__ = compact_repr

    name: str
    component: int
    first: int
    second: int
    shape: tuple[int, ...]
    params: tuple[str, ...]

    @property
    def kind(self) -> str:
        """``"scalar"``, ``"vector"`` or ``"matrix"``, by the number of axes of the factor's shape."""
        return {0: "scalar", 1: "vector"}.get(len(self.shape), "matrix")


@dataclass(frozen=True)
class Structure:
    """The chain, the symmetry and its components (what R looks like for this model)."""

    __repr__ = compact_repr

    chain: LinearChain
    symmetry: str
    components: tuple[Component, ...]

    @property
    def num_params(self) -> int:
        """The number of parameters (scalars) in the chain."""
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
                if self.symmetry == "permutation" or self.chain.gate is not None:
                    name = f"{name}[{comp.code}]"
                shape = _free_shape(x, comp.kind_map) + _free_shape(y, comp.kind_map)
                params = (x.name,) if i == j else (x.name, y.name)
                specs.append(BlockSpec(name, c, i, j, shape, params))
        return specs


def _block_name(chain: LinearChain, x: ChainTensor, y: ChainTensor) -> str:
    if x is y:
        if x.is_bias:
            return f"phi_{x.short}" if x.hidden_labels else f"Phi_{x.short}"
        return f"phi_{x.short}" if len(x.hidden_labels) == 2 else f"Phi_{x.short}"
    if chain.num_layers == 2 and {x.short, y.short} == {"1", "2"}:
        return "Psi_1"
    return f"Psi_{x.short}_{y.short}"


def _free_shape(t: ChainTensor, kinds: dict[int, str]) -> tuple[int, ...]:
    return tuple(s for s, lab in zip(t.shape, t.labels, strict=True) if lab is None or lab not in kinds)


def build_structure(chain: LinearChain, symmetry: str) -> Structure:
    """The isotypic components of ``symmetry`` (``orthogonal``, ``signed-permutation``, ``permutation``,
    ``none``) on ``chain``."""
    one_of("symmetry", symmetry, SYMMETRIES)
    tensors = chain.tensors
    widths = chain.hidden_widths
    if symmetry == "none":
        if chain.num_params > DENSE_CAP:
            raise OptionError("symmetry", f"none forms the dense {chain.num_params} x {chain.num_params} "
                              f"matrix of the chain; that is above the cap of {DENSE_CAP} parameters: use a "
                              "structured symmetry or fewer layers")
        return Structure(chain, symmetry, (component("dense", (), tensors, range(len(tensors))),))
    if not widths:
        raise OptionError("symmetry", f"{symmetry} needs a hidden layer (at least two Linear layers in the "
                          "chain); use symmetry none for a single layer")
    if chain.gate is not None and symmetry != "permutation":
        from curvscope.curvature.symmetry.gated import gated_components

        return Structure(chain, symmetry, tuple(component(code, kinds, tensors, members, widths)
                                                for code, kinds, members in gated_components(chain, symmetry)))
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
            comps.append(component(code, kinds, tensors, members, widths))
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
            comps.append(component(code, kinds, tensors, members, widths))
    return Structure(chain, symmetry, tuple(comps))


def component(code: str, kinds: tuple[tuple[int, str], ...], tensors: Sequence[ChainTensor],
              members: Sequence[int], widths: dict[int, int] | None = None) -> Component:
    """The component ``code`` acting by ``kinds`` (hidden label -> ``std``/``perp``/``triv``) on the tensors
    ``members`` (indices into ``tensors``), with the hidden ``widths``."""
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

