"""Coordinates of chain vectors in an isotypic component: Z = T_tau x and its adjoint, and dense flattening.

``docs/conventions.md §7``. T_tau maps a chain vector to a ``(k_tau, s_tau)`` matrix Z: the rows stack the free
axes of the component's tensors, the columns run over the hidden units its irreducible representation lives on
(``perp`` axes are centred, ``triv`` axes summed over and divided by sqrt(d)). Dense vectors (tests, symmetry
``none``) concatenate the chain tensors flattened row-major, in chain order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from curvscope.curvature.symmetry.chain import ChainTensor
from curvscope.curvature.symmetry.groups import Structure


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

