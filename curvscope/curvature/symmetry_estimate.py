"""Old path of :func:`curvscope.curvature.symmetry.estimate.compute_factors`, kept until
``curvscope/__init__.py`` imports it from there (nothing else lives here)."""

from curvscope.curvature.symmetry.estimate import compute_factors

__all__ = ["compute_factors"]
