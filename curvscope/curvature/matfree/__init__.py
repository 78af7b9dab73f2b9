"""The matrix-free wing of the engine: curvature through products only (``docs/conventions.md`` §9).

One concern per module:

- :mod:`~curvscope.curvature.matfree.operator`: :class:`Operator`, the symmetric ``(D, D)`` curvature matrix of
  one parameter group a user can hold (``shape``, ``@`` on vectors, matrices, dicts and lists, ``to_scipy()``);
- :mod:`~curvscope.curvature.matfree.operators`: :func:`hessian_operator`, :func:`ggn_operator` (the products
  of a Problem), :func:`loss_hessian_product`, :func:`curvature_operator`;
- :mod:`~curvscope.curvature.matfree.adapter`: :func:`as_matvec`, any operator (curvscope, SciPy, curvlinops,
  a dense tensor, a function) as ``v -> A v``;
- :mod:`~curvscope.curvature.matfree.krylov`: the Lanczos loop and :func:`lanczos`;
- :mod:`~curvscope.curvature.matfree.eigen`: :func:`extreme_eigenpairs`, single-vector Lanczos with true residuals
  (a single Krylov vector sees each eigenvalue once: repeated extremes may be under-reported);
- :mod:`~curvscope.curvature.matfree.block`: :func:`block_eigenpairs`, restarted block Krylov in a bounded basis
  (multiplicities included, a final check for missed copies), and :func:`plan_block` (the basis from a budget);
- :mod:`~curvscope.curvature.matfree.trace`: :func:`exact_trace`, :func:`hutchinson`, :func:`hutchpp`;
- :mod:`~curvscope.curvature.matfree.density`: :func:`spectral_density` (stochastic Lanczos quadrature);
- :mod:`~curvscope.curvature.matfree.spectrum`: :func:`compute_matfree_spectrum`, the matrix-free spectrum of
  a Problem per parameter group;
- :mod:`~curvscope.curvature.matfree.vectors`: random vectors and argument checks (internal).

The estimators take any operator :func:`as_matvec` accepts; ``dim`` is needed only for a plain function.
"""

from curvscope.curvature.matfree.adapter import MatVec, as_matvec
from curvscope.curvature.matfree.block import BlockEigenResult, BlockPlan, block_eigenpairs, plan_block
from curvscope.curvature.matfree.density import Density, default_sigma, gaussian_density, spectral_density
from curvscope.curvature.matfree.eigen import EigenResult, default_max_steps, extreme_eigenpairs
from curvscope.curvature.matfree.krylov import LanczosRun, lanczos
from curvscope.curvature.matfree.operator import Operator
from curvscope.curvature.matfree.operators import (
    CURVATURES,
    curvature_operator,
    ggn_operator,
    hessian_operator,
    loss_hessian_product,
)
from curvscope.curvature.matfree.spectrum import MatfreeGroup, MatfreeResult, compute_matfree_spectrum
from curvscope.curvature.matfree.trace import TraceEstimate, exact_trace, hutchinson, hutchpp

__all__ = [
    "BlockEigenResult",
    "BlockPlan",
    "CURVATURES",
    "Density",
    "EigenResult",
    "LanczosRun",
    "MatVec",
    "MatfreeGroup",
    "MatfreeResult",
    "Operator",
    "TraceEstimate",
    "as_matvec",
    "block_eigenpairs",
    "compute_matfree_spectrum",
    "curvature_operator",
    "default_max_steps",
    "default_sigma",
    "exact_trace",
    "extreme_eigenpairs",
    "gaussian_density",
    "ggn_operator",
    "hessian_operator",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "loss_hessian_product",
    "plan_block",
    "spectral_density",
]
