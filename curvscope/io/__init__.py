"""Loading checkpoints, model specs and datasets. Everything here raises CurvscopeError on bad input."""

from curvscope.io.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from curvscope.io.data import Dataset, load_dataset, select_batch
from curvscope.io.spec import build_model

__all__ = ["Checkpoint", "Dataset", "build_model", "load_checkpoint", "load_dataset", "save_checkpoint",
           "select_batch"]
