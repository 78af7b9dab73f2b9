"""curvscope: curvature diagnosis for PyTorch models.

The public API mirrors the CLI: build a :class:`Problem` with :func:`load_problem` (or directly from a
model and a batch), then call the engine functions on it.
"""

__version__ = "0.1.0"

from curvscope.api import spectrum  # noqa: E402
from curvscope.curvature.lr import suggest_lr  # noqa: E402
from curvscope.curvature.symmetry_estimate import compute_factors as factors  # noqa: E402
from curvscope.errors import CurvscopeError  # noqa: E402
from curvscope.losses import get_loss  # noqa: E402
from curvscope.problem import Problem, load_problem, make_problem  # noqa: E402

__all__ = ["CurvscopeError", "Problem", "__version__", "factors", "get_loss", "load_problem", "make_problem",
           "spectrum", "suggest_lr"]
