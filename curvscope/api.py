"""The Python API for notebooks: the same engine functions as the CLI, on objects you already have."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from curvscope.curvature.gram.spectrum import SpectrumResult, compute_spectrum
from curvscope.curvature.memory import parse_memory
from curvscope.errors import CurvscopeError
from curvscope.problem import Problem, make_problem

if TYPE_CHECKING:
    from curvscope.curvature.hessian import MatfreeResult


def spectrum(model_or_problem: nn.Module | Problem, inputs: Tensor | None = None, targets: Tensor | None = None,
             loss: str = "ce", groups: str = "all", mc_samples: int = 0, subsample: int | None = None,
             top_k: int | None = None, directional: bool = True, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None, process_group: Any = None, curvature: str = "ggn",
             method: str = "gram", **kw: Any) -> SpectrumResult | MatfreeResult:
    """Exact GGN eigenspectrum of one batch, with per-sample directional derivatives and their noise.

    The same computation as ``curvscope spectrum`` (without the files): the nonzero eigenvalues of the
    generalized Gauss-Newton matrix ``G = (1/N) sum_n J_n^T H_n J_n`` via its Gram matrix, and along the top-k
    eigenvectors ``e_k`` the per-sample gradients ``gamma_nk = e_k^T g_n`` and curvatures
    ``lambda_nk = e_k^T G_n e_k`` with their signal-to-noise ratios (ViViT; conventions in ``docs/conventions.md``).

    Args:
        model_or_problem: an ``nn.Module`` (in eval mode if it has BatchNorm/Dropout; not modified) together
            with ``inputs`` ``(N, ...)`` and ``targets`` (``(N,)`` labels for ``ce``, ``(N, C)`` floats for
            ``mse``/``bce``); or a :class:`~curvscope.problem.Problem` (then leave ``inputs``/``targets``,
            ``loss``, ``device`` and ``dtype`` out).
        loss: ``"ce"``, ``"mse"`` or ``"bce"`` (``reduction="mean"`` as in PyTorch).
        groups: ``"all"`` (full GGN), ``"layer"`` or ``"tensor"`` (block-diagonal: one spectrum per block).
        mc_samples: 0 for exact, M > 0 for a Monte-Carlo GGN with M columns per sample.
        subsample: curvature from the first ``subsample`` samples only.
        top_k: directional quantities for the top-k nonzero directions (default: all nonzero, at most 1000).
        directional: ``False`` for eigenvalues only.
        inputs: the batch inputs ``(N, ...)`` that go with a model (``None`` with a Problem).
        targets: the batch targets that go with a model (``None`` with a Problem).
        device: ``"cpu"``/``"cuda"`` (default: ``cuda`` when available), with a model only.
        dtype: ``torch.float32`` (default) or ``torch.float64`` for reference-quality numbers, with a model only.
        process_group: an initialized ``torch.distributed`` group (e.g. ``torch.distributed.group.WORLD`` under
            ``torchrun``): the call is then collective. Every rank passes the *same full* batch (model, inputs,
            targets, or the same Problem) and the same arguments; rank r computes its contiguous slice of the
            samples, and every rank returns the same result, equal to the single-process one up to rounding.
            NCCL needs a CUDA problem on ``cuda:LOCAL_RANK`` (call ``torch.cuda.set_device`` first); gloo works
            on CPUs. See ``docs/distributed.md``.
        curvature: ``"ggn"``, or ``"hessian"``: the loss Hessian, matrix-free (implies ``method="lanczos"``).
        method: ``"gram"`` (exact, every eigenvalue) or ``"lanczos"``: the ``top_k`` (default 10) extreme
            eigenvalues with residuals, a Hutch++ trace and an SLQ density per
            :func:`~curvscope.curvature.hessian.compute_matfree_spectrum`, which then gets ``**kw`` (``tol``,
            ``trace_matvecs``, ``density_vectors``, ``eigenvectors``, ``seed``, ``progress``, ...) and
            returns a :class:`~curvscope.curvature.hessian.MatfreeResult`.
        **kw: passed on to :func:`~curvscope.curvature.gram.spectrum.compute_spectrum`: ``include_total`` (with
            ``groups != "all"``, the whole model as ``groups[0]``), ``seed``, ``ghost``, ``max_memory`` (bytes
            or ``"4GiB"``), ``progress``.

    Returns:
        A :class:`~curvscope.curvature.gram.spectrum.SpectrumResult`: ``result.groups[i]`` has ``eigenvalues``
        (descending, float64), ``rank``, ``trace``, ``lambda_max``, ``effective_rank``, ``stability_lr`` and
        ``directions`` (``gamma`` ``(N, K)``, ``lambdas`` ``(N_V, K)``, ``gamma_mean``, ``gamma_snr``,
        ``lambda_snr``, ``gradient_overlap``, ``flat_overlap``).

    Example (a notebook)::

        import numpy as np, torch, matplotlib.pyplot as plt
        import curvscope

        model.eval()
        res = curvscope.spectrum(model, x[:128], y[:128], loss="ce", dtype=torch.float64)
        g = res.groups[0]
        print(g.rank, g.lambda_max, g.trace, g.effective_rank, g.stability_lr)

        ev = g.eigenvalues.cpu().numpy()               # spectral density on a log axis
        plt.hist(ev, bins=np.logspace(np.log10(ev.min()), np.log10(ev.max()), 40))
        plt.xscale("log"); plt.xlabel("eigenvalue"); plt.ylabel("count")

        d, lam = g.directions, g.eigenvalues[: g.top_k].cpu()   # ViViT Fig. 2 (c, d)
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
        a.loglog(lam, d.lambda_snr.cpu(), "."); a.set_ylabel("SNR(lambda_k)")
        b.loglog(lam, d.gamma_snr.cpu(), "."); b.set_ylabel("SNR(gamma_k)")
        for ax in (a, b):
            ax.axhline(1, color="r", ls="--"); ax.set_xlabel("eigenvalue lambda_k")

        # the very figures the CLI writes, drawn from the same report fields:
        from curvscope.report import plots
        from curvscope.report.schema import to_jsonable
        from curvscope.report.spectrum_report import group_fields
        fields = to_jsonable(group_fields(g))
        plots.spectrum_figure(fields)                   # a matplotlib Figure (spectrum.png)
        plots.directions_figure(fields)                 # the four panels of ViViT Fig. 2 (directions.png)

        # top eigenvectors as parameter-shaped tensors {name: (k, *shape)}, e.g. for loss-landscape slices:
        from curvscope.curvature.gram.spectrum import eigenvectors
        problem = curvscope.make_problem(model, x[:128], y[:128], loss="ce", dtype=torch.float64)
        res = curvscope.spectrum(problem, top_k=5)
        vecs = eigenvectors(problem, res, k=5)
    """
    if isinstance(model_or_problem, Problem):
        if inputs is not None or targets is not None:
            raise CurvscopeError("pass either a Problem or a model with inputs and targets, not both")
        problem = model_or_problem
    elif isinstance(model_or_problem, nn.Module):
        if inputs is None or targets is None:
            raise CurvscopeError("spectrum(model, inputs, targets): inputs and targets are needed with a model")
        problem = make_problem(model_or_problem, inputs, targets, loss=loss, device=device, dtype=dtype)
    else:
        raise CurvscopeError(f"spectrum: expected an nn.Module or a Problem, got {type(model_or_problem).__name__}")
    if curvature not in ("ggn", "hessian") or method not in ("gram", "lanczos"):
        raise CurvscopeError(f"curvature '{curvature}' / method '{method}': choose ggn or hessian, gram or lanczos")
    if curvature == "hessian" or method == "lanczos":
        from curvscope.curvature.hessian import compute_matfree_spectrum

        if mc_samples or subsample is not None or process_group is not None:
            raise CurvscopeError("mc_samples, subsample and process_group apply to the Gram method only")
        kw.pop("max_memory", None)
        return compute_matfree_spectrum(problem, curvature=curvature, groups=groups, top_k=top_k or 10, **kw)
    if "max_memory" in kw:
        kw["max_memory"] = parse_memory(kw["max_memory"])
    return compute_spectrum(problem, groups=groups, mc_samples=mc_samples, subsample=subsample, top_k=top_k,
                            directional=directional, process_group=process_group, **kw)


def suggest_lr(*args: Any, **kwargs: Any):
    """Per-group learning rates from the reduced Hessian (see :func:`curvscope.workflows.lr.suggest_lr`)."""
    from curvscope.workflows.lr import suggest_lr as run

    return run(*args, **kwargs)


def factors(*args: Any, **kwargs: Any):
    """Symmetry-structured curvature factors (see :func:`curvscope.curvature.symmetry.compute_factors`)."""
    from curvscope.curvature.symmetry import compute_factors

    return compute_factors(*args, **kwargs)
