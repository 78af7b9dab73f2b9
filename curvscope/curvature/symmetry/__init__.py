"""Symmetry-structured curvature factors: the projection R, its factors, f(Sigma) g, and the SymO direction.

``docs/conventions.md §7``. A symmetry group acting on the hidden units of a Linear chain turns any second
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

One concern per module:

* :mod:`.chain`: the Linear chain a group acts on (found in an MLP or named by ``layers``);
* :mod:`.groups`: the isotypic components of each group and the named factors (:func:`build_structure`);
* :mod:`.coordinates`: Z = T_tau x, its adjoint, dense flattening;
* :mod:`.factors`: the C_tau (:class:`Factors`) from a gradient, a sum of outer products or a dense Sigma;
* :mod:`.estimate`: the factors of one model from a source, and the structure check (:func:`compute_factors`);
* :mod:`.symo`: the SymO direction and its line search;
* :mod:`.ensemble`: the ensemble ground truth and each model's correlation with it.
"""

from __future__ import annotations

from curvscope.curvature.symmetry.chain import LinearChain, find_chain, parse_layers
from curvscope.curvature.symmetry.coordinates import embeddings, flatten, unflatten
from curvscope.curvature.symmetry.estimate import FactorsResult, compute_factors
from curvscope.curvature.symmetry.factors import (
    Factors,
    add_factors,
    outer_sum_factors,
    project_dense,
    relative_projection_error,
    single_gradient_factors,
)
from curvscope.curvature.symmetry.groups import DENSE_CAP, SYMMETRIES, Structure, build_structure
from curvscope.curvature.symmetry.symo import inverse_sqrt, symo_direction

__all__ = ["DENSE_CAP", "SYMMETRIES", "Factors", "FactorsResult", "LinearChain", "Structure", "add_factors",
           "build_structure", "compute_factors", "embeddings", "find_chain", "flatten", "inverse_sqrt",
           "outer_sum_factors", "parse_layers", "project_dense", "relative_projection_error",
           "single_gradient_factors", "symo_direction", "unflatten"]
