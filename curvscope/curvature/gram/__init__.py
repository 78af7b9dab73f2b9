"""The Gram wing of the engine: the GGN's spectrum through the Gram ``V^T V`` of its columns (``docs/conventions.md``
§2-§5), without forming the GGN or all of V.

One concern per module:

- :mod:`.columns`: the columns of V (which samples, which loss-Hessian root seeds), chosen by one
  :class:`ColumnSpec` ``(mc_samples, subsample, seed)``;
- :mod:`.rows`: rows of V by ``torch.func`` or plain autograd, for any model (the generic path), and
  :func:`apply_v` (V times coefficients);
- :mod:`.ghost`: the per-layer Gram rules (one module per layer kind, one table :data:`~.ghost.RULES`);
- :mod:`.accumulate`: the Gram of every parameter group in one pass (:func:`compute_gram`);
- :mod:`.layout`: where the Gram blocks live (:mod:`.layout.storage`), how the columns are paired and blocked
  (:mod:`.layout.strategy`), and the columns sharded over a ``torch.distributed`` group (:mod:`.layout.sharded`);
- :mod:`.spectrum`: :func:`compute_spectrum`, eigenvalues, rank, directional quantities, :func:`eigenvectors`;
- :mod:`.newton`: the damped Newton step along the eigen-directions (:func:`newton_step`).
"""

from __future__ import annotations

from curvscope.curvature.gram.accumulate import compute_gram, gram_rows, materialize_columns
from curvscope.curvature.gram.columns import (
    MAX_EXACT_SEQUENCE_COLUMNS,
    Columns,
    ColumnSpec,
    count_columns,
    gradient_seeds,
    make_columns,
    seed_bytes,
)
from curvscope.curvature.gram.layout import (
    GramAccumulator,
    GroupGram,
    Layout,
    LocalLayout,
    ShardedLayout,
    make_layout,
)
from curvscope.curvature.gram.newton import (
    BOOTSTRAP,
    NewtonStep,
    bootstrap_damping,
    newton_step,
    parse_damping,
    quadratic_decrease,
)
from curvscope.curvature.gram.rows import apply_v, per_sample_gradients, per_sample_vjp
from curvscope.curvature.gram.spectrum import (
    DEFAULT_TOP_K,
    Directions,
    GroupSpectrum,
    SpectrumResult,
    compute_spectrum,
    eigenvectors,
    numerical_rank,
)

__all__ = ["BOOTSTRAP", "DEFAULT_TOP_K", "MAX_EXACT_SEQUENCE_COLUMNS", "ColumnSpec", "Columns", "Directions",
           "GramAccumulator", "GroupGram", "GroupSpectrum", "Layout", "LocalLayout", "NewtonStep", "ShardedLayout",
           "SpectrumResult", "apply_v", "bootstrap_damping", "compute_gram", "compute_spectrum", "count_columns",
           "eigenvectors", "gradient_seeds", "gram_rows", "make_columns", "make_layout", "materialize_columns",
           "newton_step", "numerical_rank", "parse_damping", "per_sample_gradients", "per_sample_vjp",
           "quadratic_decrease", "seed_bytes"]
