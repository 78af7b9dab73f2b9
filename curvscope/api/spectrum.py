"""``curvscope.spectrum``: the curvature spectrum of one batch, exact by Gram or matrix-free by Lanczos."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from curvscope.api._problem import as_problem, resolve_seed
from curvscope.errors import OptionError, at_least

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from curvscope.curvature.results import Spectrum
    from curvscope.problem import Problem
    from curvscope.progress import Progress


def spectrum(model_or_problem: nn.Module | Problem, inputs: Any = None, targets: Tensor | None = None, *,
             loss: str | None = None, curvature: str = "ggn", method: str = "auto", groups: str = "all",
             top_k: int | None = None, include_total: bool = True, directional: bool = True,
             eigenvectors: bool = False, mc_samples: int = 0, subsample: int | None = None,
             tol: float | None = None, trace_matvecs: int | None = None, density_vectors: int | None = None,
             seed: int | None = None, ghost: bool = True,
             max_memory: int | str | None = None, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None, process_group: ProcessGroup | None = None,
             progress: Progress | None = None, chunk_size: int | None = None) -> Spectrum:
    """The curvature spectrum of one batch: what ``curvscope spectrum`` computes, without the files.

    Two methods, chosen by ``method`` with the CLI's rule (:func:`~curvscope.curvature.method.choose_method`):

    - ``"gram"``: the exact GGN ``G = (1/N) sum_n J_n^T H_n J_n`` through its Gram matrix ``V^T V`` (``P x P``
      for ``P = N*C`` columns, instead of ``D x D``): every nonzero eigenvalue, and along the top-k
      eigenvectors ``e_k`` the per-sample gradients ``gamma_nk = e_k^T g_n`` and curvatures
      ``lambda_nk = e_k^T G_n e_k`` with their signal-to-noise ratios (ViViT);
    - ``"lanczos"``: matrix-free, for the Hessian (always) or a GGN too large for its Gram: the ``top_k``
      extreme eigenvalues with residuals, a Hutch++ trace and an SLQ spectral density;
    - ``"auto"`` (default): the Gram method when its Gram matrix fits ``max_memory``, else Lanczos.

    The same checks run as in the CLI: option values, the sizes against the memory budget, finite outputs and
    loss before computing, finite curvature after. Conventions: ``docs/conventions.md`` §2, §4, §9.

    Args:
        model_or_problem: a :class:`~curvscope.problem.Problem` (from :func:`curvscope.load_problem` or
            :func:`curvscope.make_problem`), or an ``nn.Module`` (in eval mode if it has BatchNorm/Dropout; not
            modified) together with ``inputs`` and ``targets``.
        inputs: with a model: the batch inputs ``(N, ...)`` (or a dict of keyword inputs); or, without
            ``targets``, the data itself: a map-style ``Dataset`` (items ``(x, y)`` or dicts with ``labels``/``y``),
            a ``DataLoader`` (its dataset, collated with its ``collate_fn``), an iterable of batches (an iterator
            or generator, read to its end; a list is a Dataset of samples) or a dict of tensors: every sample is
            the batch (the curvature of the whole dataset).
        targets: with a model: ``(N,)`` labels for ``ce``, ``(N, C)`` floats for ``mse``/``bce``; sequences
            ``(N, T)`` / ``(N, T, C)``.
        loss: with a model: ``"ce"``, ``"mse"`` or ``"bce"`` (``reduction="mean"`` as in PyTorch; default from
            the targets' dtype).
        curvature: ``"ggn"`` or ``"hessian"`` (matrix-free only: the Hessian has no Gram factor).
        method: ``"auto"``, ``"gram"`` or ``"lanczos"``.
        groups: ``"all"`` (the whole model), ``"layer"`` or ``"tensor"`` (block-diagonal: one spectrum per
            block).
        top_k: Gram: directional quantities for the top-k nonzero directions (default all, at most 1000);
            Lanczos: eigenvalues at each end (default: up to 10, as many as ``max_memory`` holds).
        include_total: with ``groups != "all"``, the whole model comes first as ``groups[0]`` (as in the CLI).
        directional: Gram: the per-sample directional derivatives (``False``: eigenvalues only, 2-3x cheaper).
        eigenvectors: also return the top-k eigenvectors of ``groups[0]`` as ``result.eigenvectors``:
            ``{parameter name: (k, *shape)}``, unit-norm and orthogonal across k (sign arbitrary).
        mc_samples: Gram: 0 for the exact GGN, ``M > 0`` for a Monte-Carlo GGN with M columns per sample.
        subsample: Gram: the curvature from the first ``subsample`` samples only.
        tol: Lanczos: a Ritz value counts as converged when its residual is below ``tol * |lambda_max|``
            (default 1e-6 in float64, 1e-4 in float32).
        trace_matvecs: Lanczos: products for the Hutch++ trace (exact when at least a group's size; 0: none;
            default 60, 16 for a model of over 10M parameters).
        density_vectors: Lanczos: SLQ start vectors for the density of ``groups[0]`` (0: none; default 4, 1 for
            a model of over 10M parameters).
        seed: seeds every random draw (default: the problem's seed, else 0).
        ghost: Gram: the fast per-layer rules where they are cheaper.
        max_memory: the memory budget: bytes or a size such as ``"4GiB"`` (default: a safe share of the free
            memory of the problem's device).
        device: with a model: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (default ``cuda`` when available).
        dtype: with a model: ``torch.float32`` or ``torch.float64``; default: float64 on the CPU up to 10M
            parameters, float32 above and on a GPU.
        process_group: an initialized ``torch.distributed`` group (e.g. ``torch.distributed.group.WORLD`` under
            ``torchrun``): the call is then collective. Every rank passes the *same full* batch and the same
            arguments; each rank computes its contiguous slice of the samples, and every rank returns the same
            result, equal to the single-process one up to rounding (``docs/distributed.md``).
        progress: ``progress(stage, done, total)`` (:mod:`curvscope.progress`).
        chunk_size: Lanczos: stream the samples through every product in chunks of this many (one chunk's
            autograd graph, and of a large batch one chunk's samples, on the device; the numbers equal the
            whole batch's to rounding); default: as the CLI, chunks only when the batch's graph would not fit
            ``max_memory``. Single process only.

    Returns:
        A :class:`~curvscope.curvature.results.Spectrum`: with the Gram method a
        :class:`~curvscope.curvature.gram.SpectrumResult`, with Lanczos a
        :class:`~curvscope.curvature.matfree.MatfreeResult`. Both have ``method``, ``curvature``,
        ``loss_value``, ``grouping``, ``converged``, ``eigenvectors`` and ``groups[i]`` with ``name``,
        ``param_names``, ``num_params``, ``eigenvalues`` (descending), ``lambda_max``, ``trace`` and
        ``stability_lr``. Gram groups add ``rank``, ``effective_rank`` and ``directions`` (``gamma`` ``(N, K)``,
        ``lambdas``, ``gamma_snr``, ``lambda_snr``, ``gradient_overlap``, ...); Lanczos groups add ``bottom``
        (Hessian), the residuals, ``trace_stderr`` and ``density``.

    Raises:
        CurvscopeError: bad input, a request that does not fit ``max_memory``, or non-finite numbers (the message
            names the parameter or the stage).

    Example::

        import torch, curvscope

        model.eval()
        res = curvscope.spectrum(model, x[:128], y[:128], loss="ce", dtype=torch.float64)
        g = res.groups[0]
        print(g.rank, g.lambda_max, g.trace, g.effective_rank, g.stability_lr)
        print(g.directions.gamma_snr[:5])         # which of the top directions are signal

        hess = curvscope.spectrum(model, x[:128], y[:128], curvature="hessian", top_k=5)
        print(hess.groups[0].eigenvalues, hess.groups[0].bottom)   # both ends of the Hessian spectrum
    """
    from curvscope.curvature.finite import check_finite, check_outputs
    from curvscope.curvature.method import plan_spectrum
    from curvscope.workflows.spectrum import SpectrumOptions

    options = SpectrumOptions(groups=groups, mc_samples=mc_samples, subsample=subsample, top_k=top_k,
                              directions=directional, max_memory="auto" if max_memory is None else max_memory,
                              ghost=ghost, plots=False, seed=seed, curvature=curvature, method=method, tol=tol,
                              trace_samples=trace_matvecs, density_vectors=density_vectors)
    options.validate()
    at_least("chunk_size", chunk_size, 1, optional=True)
    if chunk_size is not None and process_group is not None:
        raise OptionError("chunk_size", "streams the samples of one process; under a process group each rank "
                          "computes its own slice of the batch")
    if chunk_size is not None and method == "gram":
        raise OptionError("chunk_size", "applies to the matrix-free method (lanczos); the Gram method sizes its "
                          "own chunks from max_memory")
    problem = as_problem("spectrum", model_or_problem, inputs, targets, loss=loss, device=device, dtype=dtype)
    budget = options.parsed_memory()
    plan = plan_spectrum(problem, curvature=curvature, method=method, mc_samples=mc_samples, subsample=subsample,
                         max_memory=budget, top_k=top_k, eigenvectors=eigenvectors)
    check_outputs(problem)
    seed = resolve_seed(problem, seed)
    include_total = include_total and groups != "all"
    if plan.method == "lanczos":
        from curvscope.curvature.matfree import compute_matfree_spectrum
        from curvscope.curvature.method import matfree_defaults

        chunk, graph = _chunk(problem, chunk_size, curvature, budget, process_group)
        sizes = matfree_defaults(problem.num_params, problem.dtype, top_k=top_k, trace_matvecs=trace_matvecs,
                                 density_vectors=density_vectors, tol=tol)
        result = compute_matfree_spectrum(problem, curvature=curvature, groups=groups, top_k=sizes.top_k,
                                          tol=sizes.tol, max_memory=budget, trace_matvecs=sizes.trace_matvecs,
                                          density_vectors=sizes.density_vectors, eigenvectors=eigenvectors,
                                          include_total=include_total, seed=seed, progress=progress,
                                          process_group=process_group, max_matvecs=sizes.max_matvecs,
                                          chunk_size=chunk, graph_bytes=graph)
        if sizes.note:
            result.notes.insert(0, sizes.note)
        for group in result.groups:
            check_finite(f"the curvature of group {group.name}", eigenvalues=group.eigenvalues, trace=group.trace)
        return result
    from curvscope.curvature.gram import compute_spectrum
    from curvscope.curvature.gram import eigenvectors as gram_eigenvectors

    result = compute_spectrum(problem, groups=groups, mc_samples=mc_samples, subsample=subsample, top_k=top_k,
                              directional=directional, include_total=include_total, seed=seed, ghost=ghost,
                              max_memory=budget, progress=progress, process_group=process_group,
                              eigenvectors=eigenvectors or directional)
    check_finite("the loss and gradient", loss=result.loss_value, gradient_norm=result.gradient_norm)
    for group in result.groups:
        check_finite(f"the curvature of group {group.name}", eigenvalues=group.eigenvalues, trace=group.trace)
    if eigenvectors:
        result.eigenvectors = gram_eigenvectors(problem, result, group=0, process_group=process_group)
    return result



def _chunk(problem: Problem, chunk_size: int | None, curvature: str, budget: int | None,
           process_group: ProcessGroup | None) -> tuple[int | None, int | None]:
    """``(chunk, graph_bytes)``: samples per streamed chunk (``None``: the whole batch in one graph) and the bytes of
    a product's graph when planned: ``chunk_size`` as given (``None`` when it holds the whole batch), else the CLI's
    rule (:func:`~curvscope.curvature.matfree.stream.plan_stream`)."""
    if process_group is not None:
        return None, None
    if chunk_size is not None:
        return (None if chunk_size >= problem.batch_size else int(chunk_size)), None
    from curvscope.curvature.matfree.stream import plan_stream

    plan = plan_stream(problem, curvature, budget)
    return plan.chunk, plan.graph_bytes
