"""Loading checkpoints, model specs and datasets. Everything here raises CurvscopeError on bad input.

Names are imported on first use: the submodules that need no PyTorch (``io.atomic``, ``io.spec``'s trust rule)
stay light, so ``curvscope --help`` and ``curvscope check REPORT.json`` start without loading it.
"""

from __future__ import annotations

from curvscope.lazy import lazy_exports

__all__ = ["Checkpoint", "Dataset", "build_model", "load_checkpoint", "load_dataset", "save_checkpoint",
           "select_batch"]

__getattr__, __dir__ = lazy_exports(globals(), {
    "Checkpoint": "curvscope.io.checkpoints",
    "load_checkpoint": "curvscope.io.checkpoints",
    "save_checkpoint": "curvscope.io.checkpoints",
    "Dataset": "curvscope.io.data",
    "load_dataset": "curvscope.io.data",
    "select_batch": "curvscope.io.data",
    "build_model": "curvscope.io.spec",
})
