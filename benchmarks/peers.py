"""The tools under comparison, behind one interface: ``prepare(tool, task, workload)`` -> a runner.

A runner is a zero-argument callable that performs the whole measured computation once (forward, backward,
Gram or matrix-vector products, eigensolver) and returns an :class:`Output`. Everything that is set up once per
model (``make_problem``, BackPACK's ``extend``) happens in ``prepare`` and is not timed.

Tasks (issue 7):

- ``eig``: all GGN eigenvalues. curvscope ``compute_spectrum(directional=False)`` vs ViViT
  ``EigvalshComputation``.
- ``dd``: eigenvalues and per-sample directional derivatives (gamma_nk, lambda_nk) along the top-K
  eigenvectors (K = all nonzero, at most 1000, as curvscope's default). curvscope
  ``compute_spectrum(directional=True)`` vs ViViT ``DirectionalDerivativesComputation`` with a criterion that
  keeps the same K directions.
- ``top10``: curvscope's full spectrum vs the top-10 eigenvalues from curvlinops' ``GGNLinearOperator`` with
  scipy's ``eigsh`` (ARPACK, default tolerance).

The peers import lazily: this module imports without them (the smoke test runs curvscope only).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.cases import Workload

TASKS: dict[str, tuple[str, str]] = {"eig": ("curvscope", "vivit"), "dd": ("curvscope", "vivit"),
                                     "top10": ("curvscope", "curvlinops")}
TASK_TITLES = {"eig": "all GGN eigenvalues", "dd": "eigenvalues + per-sample directional derivatives",
               "top10": "full spectrum vs top-10 (curvlinops + eigsh)"}
TOOLS = ("curvscope", "vivit", "curvlinops")
PEER_MODULES = {"vivit": ("vivit", "backpack"), "curvlinops": ("curvlinops", "scipy")}
MAX_DIRECTIONS = 1000  # curvscope's DEFAULT_TOP_K


@dataclass
class Output:
    """What a tool returns: eigenvalues descending (float64, CPU; all nonzero ones, or the top 10 for
    curvlinops), and for ``dd`` the per-sample directional derivatives ``gamma`` ``(N, K)``, ``lambdas``
    ``(N, K)`` along the same K directions."""

    eigenvalues: Tensor
    gamma: Tensor | None = None
    lambdas: Tensor | None = None


Runner = Callable[[], Output]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (``unknown`` elsewhere), for the results' machine section."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def peer_missing(tool: str, modules: dict[str, tuple[str, ...]] | None = None) -> str | None:
    """``None`` when the tool's packages import, else the reason (for the results table); ``modules``: tool ->
    the modules it needs (default :data:`PEER_MODULES`)."""
    for mod in (PEER_MODULES if modules is None else modules).get(tool, ()):
        try:
            importlib.import_module(mod)
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            return f"{mod} not importable ({type(exc).__name__}: {exc})"
    return None


def patch_symeig() -> None:
    """vivit-for-pytorch 1.0.0 calls ``Tensor.symeig``, removed in torch 2: put it back (benchmark only).

    Old convention: ``(eigenvalues ascending, eigenvectors)``; without eigenvectors the second entry is empty.
    (torch 2 still has a ``Tensor.symeig`` attribute, a stub that raises: it is replaced.)
    """
    if getattr(getattr(torch.Tensor, "symeig", None), "_curvscope_bench", False):
        return

    def symeig(self: Tensor, eigenvectors: bool = False, upper: bool = True) -> tuple[Tensor, Tensor]:
        uplo = "U" if upper else "L"
        if eigenvectors:
            evals, evecs = torch.linalg.eigh(self, UPLO=uplo)
            return evals, evecs
        return torch.linalg.eigvalsh(self, UPLO=uplo), torch.empty(0, dtype=self.dtype, device=self.device)

    symeig._curvscope_bench = True  # type: ignore[attr-defined]
    torch.Tensor.symeig = symeig  # type: ignore[method-assign]


def nonzero_threshold(evals: Tensor, num_columns: int, dtype: torch.dtype) -> float:
    """curvscope's rank threshold (``docs/conventions.md`` §2): ``lambda_max * NC * eps``."""
    lam_max = float(evals.max()) if evals.numel() else 0.0
    return max(lam_max, 0.0) * num_columns * torch.finfo(dtype).eps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- curvscope ----------------------------------------------------------------------------------------------

def _curvscope(task: str, w: Workload, max_memory: int | None) -> Runner:
    from curvscope.curvature.gram.spectrum import compute_spectrum
    from curvscope.problem import make_problem

    problem = make_problem(w.model, w.x, w.y, loss="ce", device=w.x.device, dtype=w.x.dtype)
    directional = task == "dd"

    def run() -> Output:
        res = compute_spectrum(problem, directional=directional, max_memory=max_memory)
        _sync(problem.device)
        g = res.groups[0]
        d = g.directions
        return Output(g.eigenvalues.detach().cpu(), None if d is None else d.gamma.detach().cpu(),
                      None if d is None else d.lambdas.detach().cpu())

    return run


# -- ViViT (on BackPACK) ------------------------------------------------------------------------------------

def _vivit(task: str, w: Workload) -> Runner:
    if w.peer_model is None:
        raise RuntimeError(f"ViViT cannot run {w.case}: {w.peer_note}")
    from backpack import backpack, extend

    patch_symeig()
    model = extend(w.peer_model)
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = w.peer_x, w.y
    num_columns = x.shape[0] * int(model(x[:1]).shape[1])

    def backward(extensions: list, hook: Callable) -> None:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        with backpack(*extensions, extension_hook=hook):
            loss.backward()

    if task == "eig":
        from vivit.linalg.eigvalsh import EigvalshComputation

        def run_eig() -> Output:
            comp = EigvalshComputation()
            groups = [{"params": params}]
            backward([comp.get_extension()], comp.get_extension_hook(groups))
            evals = comp.get_result(groups[0]).detach()
            _sync(x.device)
            evals = evals.flip(0).cpu()
            return Output(evals[evals > nonzero_threshold(evals, num_columns, x.dtype)])

        return run_eig

    from vivit.optim.directional_derivatives import DirectionalDerivativesComputation

    kept: dict[str, Tensor] = {}

    def criterion(evals: Tensor) -> list[int]:
        """The same K directions as curvscope: nonzero by its threshold, the top MAX_DIRECTIONS of them."""
        nonzero = (evals > nonzero_threshold(evals, num_columns, x.dtype)).nonzero().flatten()
        kept["evals"] = evals.detach()
        return nonzero[-MAX_DIRECTIONS:].tolist()

    def run_dd() -> Output:
        comp = DirectionalDerivativesComputation(warn_small_eigvals=0.0)
        groups = [{"params": params, "criterion": criterion}]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backward(comp.get_extensions(), comp.get_extension_hook(groups))
        gamma, lambdas = comp.get_result(groups[0])
        _sync(x.device)
        evals = kept["evals"].flip(0).cpu()
        # ViViT orders directions like the eigenvalues (ascending): flip to curvscope's descending order
        return Output(evals[evals > nonzero_threshold(evals, num_columns, x.dtype)],
                      gamma.detach().flip(1).cpu(), lambdas.detach().flip(1).cpu())

    return run_dd


# -- curvlinops + scipy eigsh ---------------------------------------------------------------------------------

def _curvlinops(w: Workload, k: int = 10) -> Runner:
    import numpy as np
    from curvlinops import GGNLinearOperator
    from scipy.sparse.linalg import eigsh

    model = w.model
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = torch.nn.CrossEntropyLoss()
    data = [(w.x, w.y)]

    def run() -> Output:
        op = GGNLinearOperator(model, loss_fn, params, data, check_deterministic=False, num_data=w.batch_size)
        evals = eigsh(op.to_scipy(dtype=np.float64), k=k, which="LA", return_eigenvectors=False)
        return Output(torch.from_numpy(np.sort(evals)[::-1].copy()))

    return run


def prepare(tool: str, task: str, w: Workload, max_memory: int | None = None) -> Runner:
    """The runner of ``tool`` for ``task`` on ``w`` (see the module docstring)."""
    if tool == "curvscope":
        return _curvscope(task, w, max_memory)
    if tool == "vivit":
        return _vivit(task, w)
    if tool == "curvlinops":
        return _curvlinops(w)
    raise KeyError(f"unknown tool '{tool}': choose from {', '.join(TOOLS)}")


def agreement(a: Output, b: Output, k: int = 10) -> float:
    """Largest relative difference of the top-k eigenvalues: ``max_i |a_i - b_i| / |b_i|``."""
    k = min(k, a.eigenvalues.numel(), b.eigenvalues.numel())
    if k == 0:
        return float("inf")
    x, y = a.eigenvalues[:k].to(torch.float64), b.eigenvalues[:k].to(torch.float64)
    return float(((x - y).abs() / y.abs().clamp_min(torch.finfo(torch.float64).tiny)).max())


def directional_agreement(a: Output, b: Output, k: int = 10) -> float | None:
    """Largest relative difference of the per-sample curvatures lambda_nk along the top-k directions
    (sign-free, unlike gamma), relative to each direction's largest |lambda_nk|. Informational: directions
    of (nearly) repeated eigenvalues are not unique, so this is not asserted."""
    if a.lambdas is None or b.lambdas is None:
        return None
    k = min(k, a.lambdas.shape[1], b.lambdas.shape[1])
    x, y = a.lambdas[:, :k].to(torch.float64), b.lambdas[:, :k].to(torch.float64)
    return float(((x - y).abs().amax(0) / y.abs().amax(0).clamp_min(1e-300)).max())
