"""``curvscope.factors``: symmetry-structured curvature factors, their ensemble ground truth, the SymO step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from curvscope.api._problem import as_problem

if TYPE_CHECKING:
    from curvscope.problem import Problem
    from curvscope.progress import Progress
    from curvscope.workflows.factors import FactorsRun


def factors(model_or_problem: nn.Module | Problem, inputs: Any = None, targets: Tensor | None = None, *,
            loss: str | None = None, symmetry: str = "auto", source: str = "batch", layers: str | None = None,
            mc_samples: int = 0, subsample: int | None = None, structure_check: bool = True, ensemble: int = 0,
            ensemble_checkpoints: str | None = None, init: str = "normal", symo: bool = False, eps: float = 1e-8,
            seed: int | None = None, device: str | torch.device | None = None,
            dtype: str | torch.dtype | None = None, progress: Progress | None = None) -> FactorsRun:
    """Symmetry-structured curvature factors: what ``curvscope factors`` computes, without the files.

    For the chain of Linear layers a symmetry group acts on (hidden units permuted, sign-flipped or rotated), the
    second moment ``R`` (of the batch gradient, the per-sample gradients or the GGN) projected onto the group's
    isotypic components: the factors ``Phi``, ``Psi`` per component, and optionally their ground truth from an
    ensemble of models and the SymO direction ``R^-1/2 g`` with a line search (``docs/conventions.md`` §7).

    Args:
        model_or_problem: a :class:`~curvscope.problem.Problem`, or an ``nn.Module`` together with ``inputs``
            and ``targets`` (see :func:`curvscope.spectrum`).
        inputs: with a model: the batch inputs.
        targets: with a model: the batch targets.
        loss: with a model: a loss name (``"ce"``, ``"mse"``, ``"bce"``, ``"nll"``, ``"huber"``, ``"smooth-l1"``),
            a :class:`~curvscope.losses.Loss` (:func:`~curvscope.losses.get_loss`) or a user loss function.
        symmetry: ``"auto"`` (the largest group the chain's activations allow), ``"orthogonal"``,
            ``"signed-permutation"``, ``"permutation"`` or ``"none"`` (dense, small chains).
        source: what ``R`` projects: ``"batch"`` (``g g^T``), ``"per-sample"`` (mean of ``g_n g_n^T``) or
            ``"ggn"`` (``V V^T``).
        layers: comma-separated Linear module names of the chain, in order (default: found in the model).
        mc_samples: source ``ggn``: 0 exact, ``M > 0`` Monte-Carlo columns per sample.
        subsample: source ``ggn``: the GGN of the first ``subsample`` samples only.
        structure_check: also the relative projection error of the per-sample second moment.
        ensemble: draw this many models from the initialization ``init`` for the ground truth (0: none).
        ensemble_checkpoints: a glob of checkpoints forming the ensemble instead.
        init: initialization of drawn models: ``"normal"`` or ``"default"``.
        symo: also the SymO direction and its line search (``result.symo``).
        eps: damping of the SymO inverse square root (``> 0``).
        seed: seeds drawn models and Monte-Carlo columns (default: the problem's seed, else 0).
        device: with a model: the device.
        dtype: with a model: ``torch.float32`` or ``torch.float64``; default: float64 on the CPU up to 10M
            parameters, float32 above and on a GPU.
        progress: ``progress(stage, done, total)`` (:mod:`curvscope.progress`).

    Returns:
        A :class:`~curvscope.workflows.factors.FactorsRun`: ``result`` (the
        :class:`~curvscope.curvature.symmetry.FactorsResult`: ``structure``, ``factors``, ``structure_error``,
        ``notes``),
        ``ensemble`` (or ``None``), ``symo`` (or ``None``).

    Raises:
        CurvscopeError: bad input, a model without a Linear chain, or non-finite numbers.

    Example::

        run = curvscope.factors(model, x, y, loss="ce", dtype=torch.float64, ensemble=8)
        print(run.result.structure.symmetry, run.result.structure_error)
    """
    from curvscope.workflows.factors import FactorsOptions, run_factors

    options = FactorsOptions(symmetry=symmetry, source=source, layers=layers, mc_samples=mc_samples,
                             subsample=subsample, structure_check=structure_check, ensemble=ensemble,
                             ensemble_checkpoints=ensemble_checkpoints, init=init, eps=eps, plots=False, seed=seed)
    options.validate()
    problem = as_problem("factors", model_or_problem, inputs, targets, loss=loss, device=device, dtype=dtype)
    run = run_factors(problem, options, progress)
    if symo:  # the CLI's symo_step names the file it is written to; here it is only computed
        from curvscope.curvature.symmetry.symo import symo_step
        from curvscope.progress import counter

        advance = counter(progress, "symo", 1)
        run.symo = symo_step(problem, run.result, eps=float(eps))
        advance()
    return run
