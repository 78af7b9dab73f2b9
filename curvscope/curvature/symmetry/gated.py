"""Gated MLPs (Llama, Mistral, Qwen2: ``down(act(gate(x)) * up(x))``): their symmetry group and its components.

``docs/factors.md`` (Gated MLPs). Hidden unit i of a gated MLP is the product ``act(gate_i . x) * (up_i . x)``
(rows ``gate_i``, ``up_i``), read by column i of down. The transformations of the parameters that leave every
such model unchanged, for any activation on the gate:

* a permutation of the hidden units, acting on the rows of gate and of up and on the columns of down together;
* a sign flip of up row i with down column i (``act(g) * (-u) * (-c) = act(g) * u * c``);
* for an odd (or linear) gate activation also a sign flip of gate row i with down column i;
* scalings: up row i times a > 0, down column i times 1/a (and, for a positively homogeneous activation such
  as ReLU, gate row i too).

Rotations of the hidden units are not symmetries: a rotation mixes the units, and the elementwise product of
two mixed vectors is not the mixture of the products. The scalings are not used either: they are not
orthogonal, and they form a non-compact group that has no invariant probability distribution, so the average
``R(Sigma) = E_G[G Sigma G^T]`` is not defined (and no distribution of parameters could be invariant under them);
their compact part is exactly the sign flips. The group of the ``signed-permutation`` choice is therefore the
hyperoctahedral group (signed permutations) acting on up and down, and by plain permutations on the gate
(or, with ``gate_signed``, by its own sign flips).

Its isotypic components (every element is orthogonal, so R is the projection onto them, as for plain chains):

* the gate's activation is not odd (SiLU, GELU): ``u`` = the signed representation on the up rows, up bias and
  down columns (one ``std`` component: Phi_1, Psi_1, Phi_2 as in a plain two-layer chain); the gate carries
  the permutation representation, which splits into its all-ones direction (``1``, with the down bias: the
  trivial component) and its complement (``p``). Gate and up are not coupled: the sign flips of up average the
  cross terms to zero;
* an odd gate activation (``gate_signed``): three different signed representations (up: the up signs, gate:
  the gate signs, down: their product), ``u``, ``g`` and ``gu``, never coupled, and the down bias alone (``1``).

``permutation`` needs nothing new: all three layers carry the same permutation representation, handled by the
plain chain's code (:func:`~curvscope.curvature.symmetry.groups.build_structure`).
"""

from __future__ import annotations

from curvscope.curvature.symmetry.chain import ChainTensor, LinearChain
from curvscope.errors import OptionError

ROLES = {"1g": "gate", "b1g": "gate", "1": "up", "b1": "up", "2": "down", "b2": "out"}
"""The role of each gated-chain tensor, by its short name."""


def role(t: ChainTensor) -> str:
    """``gate``, ``up``, ``down`` (down's weight) or ``out`` (down's bias)."""
    return ROLES[t.short]


def no_rotations(chain: LinearChain) -> str:
    """Why ``orthogonal`` is refused on a gated chain (one line)."""
    return (f"orthogonal: no rotation of the hidden units leaves the gated MLP {chain.spec} unchanged (each unit "
            "is the elementwise product act(gate_i.x) * (up_i.x); a rotation mixes units, and products of mixtures "
            "are not mixtures of products): use signed-permutation (sign flips of up row i with down column i, "
            "and permutations) or permutation")


def gated_components(chain: LinearChain, symmetry: str) -> list[tuple[str, tuple[tuple[int, str], ...], list[int]]]:
    """The isotypic components of ``signed-permutation`` on a gated chain (module docstring), as ``(code, kinds,
    member tensor indices)`` for :func:`~curvscope.curvature.symmetry.groups.component`.

    Raises:
        OptionError: of ``symmetry`` for ``orthogonal`` (rotations are no symmetry of a gated MLP).
    """
    if symmetry == "orthogonal":
        raise OptionError("symmetry", no_rotations(chain))
    tensors = chain.tensors
    d = chain.widths[1]
    members: dict[str, list[int]] = {"gate": [], "up": [], "down": [], "out": []}
    for i, t in enumerate(tensors):
        members[role(t)].append(i)
    std = ((1, "std"),)
    if chain.gate_signed:
        parts = [("u", std, members["up"]), ("g", std, members["gate"]), ("gu", std, members["down"]),
                 ("1", (), members["out"])]
    else:
        parts = [("u", std, sorted(members["up"] + members["down"])),
                 ("1", ((1, "triv"),), sorted(members["gate"] + members["out"]))]
        if d >= 2:
            parts.append(("p", ((1, "perp"),), members["gate"]))
    return [(code, kinds, idx) for code, kinds, idx in parts if idx]


def gated_note(chain: LinearChain, symmetry: str) -> str:
    """The report note on a gated chain: which transformations the group has, and why the scalings are left
    out."""
    if symmetry == "signed-permutation":
        signs = " and of gate row i with down column i" if chain.gate_signed else ""
        group = (f"permutes the hidden units of gate, up and down together and flips the signs of up row i with down "
                 f"column i{signs}")
    else:
        group = "permutes the hidden units of gate, up and down together"
    return (f"gated MLP: the group {group}; scaling up row i by a > 0 and down column i by 1/a also "
            "leaves the model unchanged, but these scalings are not orthogonal and form a non-compact group with no "
            "invariant average, so only their compact part, the sign flips, can enter R")
