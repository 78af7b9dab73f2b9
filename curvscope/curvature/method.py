"""Which wing of the engine computes a spectrum: the exact Gram method or matrix-free Lanczos.

One rule, used by the CLI (``curvscope spectrum``, ``check``) and the Python API (:func:`curvscope.spectrum`):

- the Hessian has no Gram factor, so ``curvature="hessian"`` is always matrix-free (``lanczos``);
- ``method="lanczos"`` is matrix-free by request;
- ``method="auto"`` takes the Gram method when its float64 Gram matrix (``8 P^2`` bytes for ``P`` columns) fits
  the memory budget and the loss-Hessian seeds of its columns fit the budget's limit, else Lanczos on
  GGN-vector products (with a note saying why);
- ``method="gram"`` (or Monte-Carlo columns, which only the Gram method has) that does not fit is refused
  with the sizes, never silently replaced.

:func:`plan_spectrum` adds the checks that need the problem (``subsample`` against the batch, eigenvectors
against the budget), so every caller refuses the same requests with the same words before computing.
"""

from __future__ import annotations

from dataclasses import dataclass

from curvscope.errors import OptionError

METHODS = ("auto", "gram", "lanczos")
"""The spectrum methods: ``auto`` (Gram when it fits, else Lanczos), ``gram`` (exact), ``lanczos``."""
DEFAULT_LANCZOS_K = 10
"""Extreme eigenvalues per end that the matrix-free method computes when ``top_k`` is not given."""
LARGE_MODEL_PARAMS = 10_000_000
"""A model (a parameter group) above this many parameters is *large*: one vector costs as much memory as the
model, and every product seconds. The matrix-free method then computes one eigenvalue per end in two vectors
(:mod:`curvscope.curvature.matfree.lean`) unless more are asked for, and the CLI's defaults do less
(:func:`large_model_defaults`)."""


@dataclass(frozen=True)
class SpectrumPlan:
    """How a spectrum will be computed.

    Attributes:
        method: ``"gram"`` or ``"lanczos"`` (``auto`` resolved).
        note: why ``auto`` chose Lanczos (for the user), else ``None``.
        columns: ``P``, the number of Gram columns the exact method needs (N·C exact, N·M Monte-Carlo).
        gram_bytes: the float64 Gram matrix's size, ``8 P^2``.
        budget: the memory budget in bytes that the plan was made for.
    """

    method: str
    note: str | None
    columns: int
    gram_bytes: int
    budget: int


def gram_size(problem, mc_samples: int = 0, subsample: int | None = None) -> tuple[int, int]:
    """``(columns, bytes)`` of the float64 Gram matrix: N·C exact, N·M Monte-Carlo; for sequences N·T_v·C and
    N·T_v·M (T_v: the most valid tokens of one sequence)."""
    from curvscope.curvature.gram.columns import count_columns

    columns = count_columns(problem, mc_samples, subsample)
    return columns, 8 * columns**2


def choose_method(problem, *, curvature: str = "ggn", method: str = "auto", mc_samples: int = 0,
                  subsample: int | None = None, max_memory: int | None = None) -> SpectrumPlan:
    """The method that computes this spectrum (see the module docstring for the rule).

    Args:
        problem: the :class:`~curvscope.problem.Problem`.
        curvature: ``"ggn"`` or ``"hessian"``.
        method: ``"auto"``, ``"gram"`` or ``"lanczos"``.
        mc_samples: Monte-Carlo columns per sample (0: exact); only the Gram method has them.
        subsample: curvature from the first ``subsample`` samples (Gram method only).
        max_memory: the budget in bytes (``None``: the device's default, see
            :meth:`~curvscope.curvature.memory.MemoryPlan.default`).

    Raises:
        OptionError: ``method="gram"`` or ``mc_samples > 0`` and the Gram method does not fit the budget.
    """
    from curvscope.curvature.gram.columns import seed_bytes
    from curvscope.curvature.memory import MemoryPlan, format_bytes

    plan = MemoryPlan.default(problem.device, max_memory)
    budget = plan.budget
    if curvature == "hessian" or method == "lanczos":
        return SpectrumPlan("lanczos", None, 0, 0, budget)
    columns, size = gram_size(problem, mc_samples, subsample)
    seeds = seed_bytes(problem, mc_samples, subsample)
    if size <= budget and seeds <= plan.limit:
        return SpectrumPlan("gram", None, columns, size, budget)
    what = (f"the Gram matrix of {columns:,} columns needs {format_bytes(size)}" if size > budget else
            f"the seeds of the {columns:,} columns need {format_bytes(seeds)}")
    if method == "gram" or mc_samples:  # an explicit Gram request is refused, not replaced
        field = "mc_samples" if mc_samples else "max_memory"
        given = mc_samples if mc_samples else ("auto" if max_memory is None else format_bytes(max_memory))
        raise OptionError(field, lambda name: f"{name(field)} {given}: {what}, more than the memory budget "
                          f"({plan.describe()}); use fewer samples or Monte-Carlo columns, or "
                          f"{name('method', 'lanczos')}")
    return SpectrumPlan("lanczos", (f"the exact Gram method does not fit the memory budget "
                                    f"({plan.describe()}): {what}; used Lanczos on GGN-vector products (the "
                                    "extreme eigenvalues, a Hutch++ trace and an SLQ density)"),
                        columns, size, budget)


def plan_spectrum(problem, *, curvature: str = "ggn", method: str = "auto", mc_samples: int = 0,
                  subsample: int | None = None, max_memory: int | None = None, top_k: int | None = None,
                  eigenvectors: bool = False) -> SpectrumPlan:
    """:func:`choose_method` after the checks that need the problem.

    Raises:
        OptionError: ``subsample`` larger than the batch; ``eigenvectors`` whose ``k x D`` numbers exceed the
            memory budget (naming ``top_k``); a Gram request that does not fit.
    """
    from curvscope.curvature.memory import format_bytes

    if subsample is not None and subsample > problem.batch_size:
        raise OptionError("subsample", f"{subsample} is larger than the batch ({problem.batch_size} samples)")
    plan = choose_method(problem, curvature=curvature, method=method, mc_samples=mc_samples, subsample=subsample,
                         max_memory=max_memory)
    if eigenvectors:  # k x D numbers in memory and on disk: refuse what cannot fit
        from curvscope.curvature.gram.spectrum import DEFAULT_TOP_K

        columns = plan.columns if plan.method == "gram" else gram_size(problem, mc_samples, subsample)[0]
        k = min(top_k or (DEFAULT_TOP_K if plan.method == "gram" else DEFAULT_LANCZOS_K), columns)
        size = k * problem.num_params * next(iter(problem.params.values())).element_size()
        if size > plan.budget:
            text = (f"up to {k} eigenvectors of {problem.num_params:,} parameters need {format_bytes(size)}, more "
                    f"than the memory budget ({format_bytes(plan.budget)})")
            raise OptionError("eigenvectors", lambda name: f"{name('eigenvectors')} {text}: pass a smaller "
                              f"{name('top_k')}")
    return plan


LARGE_DEFAULTS = {"top_k": 1, "trace_matvecs": 16, "density_vectors": 1, "max_matvecs": 150}
"""The matrix-free defaults of a large model (:data:`LARGE_MODEL_PARAMS`): one eigenvalue per end, a 16-product
trace, one SLQ vector, at most 150 eigensolver products per group (each product of a 124M-parameter model takes
seconds on a CPU)."""
SMALL_DEFAULTS = {"top_k": None, "trace_matvecs": 60, "density_vectors": 4, "max_matvecs": None}
"""The matrix-free defaults otherwise: up to 10 eigenvalues per end, 60 trace products, 4 SLQ vectors, the
eigensolver's own product cap."""


def default_tol(dtype) -> float:
    """The eigensolver's default relative residual tolerance: 1e-6 in float64, 1e-4 in float32 (a float32
    product is accurate to about 1e-6 of ``||A||``: a tighter tolerance may never be met)."""
    import torch

    return 1e-6 if dtype == torch.float64 else 1e-4


@dataclass(frozen=True)
class MatfreeDefaults:
    """The matrix-free settings of a run: the values given, the rest from the model's size (:func:`matfree_defaults`).

    Attributes:
        top_k: eigenvalues per end (``None``: up to 10, as many as the memory budget holds).
        trace_matvecs: Hutch++ products per group.
        density_vectors: SLQ vectors.
        tol: the eigensolver's relative residual tolerance.
        max_matvecs: the eigensolver's product cap per group (``None``: its own).
        note: what a large model's defaults lowered (for the user), else ``None``.
    """

    top_k: int | None
    trace_matvecs: int
    density_vectors: int
    tol: float
    max_matvecs: int | None
    note: str | None


def matfree_defaults(num_params: int, dtype, *, top_k: int | None = None, trace_matvecs: int | None = None,
                     density_vectors: int | None = None, tol: float | None = None) -> MatfreeDefaults:
    """The given settings, and for those left ``None`` the defaults of a model of ``num_params`` parameters:
    :data:`LARGE_DEFAULTS` above :data:`LARGE_MODEL_PARAMS`, else :data:`SMALL_DEFAULTS`; ``tol`` by
    :func:`default_tol`. The product cap is lowered only when ``top_k`` is not given."""
    large = num_params > LARGE_MODEL_PARAMS
    base = LARGE_DEFAULTS if large else SMALL_DEFAULTS
    given = {"top_k": top_k, "trace_matvecs": trace_matvecs, "density_vectors": density_vectors}
    values = {name: base[name] if value is None else value for name, value in given.items()}
    lowered = [name for name, value in given.items() if large and value is None]
    note = None
    if lowered:
        note = (f"a large model ({num_params:,} parameters): matrix-free defaults sized for it (top_k "
                f"{values['top_k']} per end, trace_samples {values['trace_matvecs']}, density_vectors "
                f"{values['density_vectors']}); pass them for more")
    return MatfreeDefaults(values["top_k"], values["trace_matvecs"], values["density_vectors"],
                           default_tol(dtype) if tol is None else tol,
                           base["max_matvecs"] if top_k is None else None, note)
