"""Matrix-free Hessian/GGN estimators: curvscope vs PyHessian and curvlinops (the Hessian issue).

    python -m benchmarks.hessian            # the full suite (about 8 minutes on 2 CPU cores)
    python -m benchmarks.hessian --quick    # sample models at tiny batches, into benchmarks/results-quick

Two questions, answered in one process (one intra-op thread), with results in ``hessian.json``/``hessian.md``:

1. **Time to the top eigenvalue at equal accuracy.** A reference ``lambda_ref`` comes from curvscope's Lanczos run
   to a residual of ``--ref-tol`` (1e-10, both ends for the Hessian) and is cross-checked against the tightest
   curvlinops + ``eigsh`` answer. Each tool then runs a ladder of its own stopping tolerances, loosest first
   (curvscope ``extreme_eigenpairs(which="largest", tol)`` on ``hessian_operator``/``ggn_operator``; PyHessian's
   power iteration ``hessian.eigenvalues(tol=...)``; curvlinops ``HessianLinearOperator``/``GGNLinearOperator``
   with ``scipy.sparse.linalg.eigsh(k=1, which="LA", tol=...)``), until its answer is within the tightest target
   of ``lambda_ref``. The time to accuracy eps is the wall time of the loosest setting whose answer is within
   eps (the tolerance a user would need to pick), from "model and batch in hand" to the number: the operator set-up
   (curvscope's gradient graph, PyHessian's ``create_graph`` backward) is inside the timing. The selected
   settings are re-timed ``--repeats`` times in all (alternating the tools' order) and the median is reported.
   One warm-up run per tool pays the one-time costs first. curvscope's whole ``compute_matfree_spectrum``
   (top *and* bottom eigenvalue, what ``curvscope spectrum --curvature hessian`` runs) is timed alongside.

2. **Trace error at equal numbers of products.** On the Hessian operator, for budgets m and seeds, curvscope's
   ``hutchpp`` against Hutchinson with the same m (curvscope's ``hutchinson`` and PyHessian's ``trace`` with
   ``maxIter=m`` and its early stop disabled), relative RMS error over the seeds against the exact trace: from
   ``D`` unit vectors when ``D <= --exact-limit``, and for the piecewise-linear 3c3d CNN from the identity
   ``tr(H) = tr(G)`` (each output is linear in every single weight away from the ReLU/max-pool kinks, so the
   diagonal of the residual term ``sum_c r_c d^2 f_c`` vanishes), with ``tr(G)`` from per-sample gradients and
   the identity checked on random diagonal entries. The variances behind the errors are reported too.

Peers that are not installed are skipped (they come with the ``bench`` extra); nothing here is a test.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.cases import Workload, build_workload

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("curvscope", "curvscope-both", "pyhessian", "pyhessian-noeps", "curvlinops")
TOOL_NAMES = {"curvscope": "curvscope Lanczos", "curvscope-both": "curvscope spectrum (both ends)",
              "pyhessian": "PyHessian power iteration", "pyhessian-noeps": "PyHessian without +1e-6 (patched)",
              "curvlinops": "curvlinops + eigsh"}
PEERS = ("pyhessian", "pyhessian-noeps", "curvlinops")
PEER_MODULES = {"pyhessian": ("pyhessian",), "pyhessian-noeps": ("pyhessian",), "curvlinops": ("curvlinops", "scipy")}
PEER_DISTS = {"pyhessian": "pyhessian", "curvlinops": "curvlinops-for-pytorch", "scipy": "scipy"}
# each tool's stopping tolerances, loosest first (curvscope: relative residual; PyHessian: relative change of the
# Rayleigh quotient between two iterations; eigsh: ARPACK's relative accuracy of the Ritz values)
LADDERS = {
    "curvscope": (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8),
    "curvscope-both": (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8),
    "pyhessian": (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10),
    "pyhessian-noeps": (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10),
    "curvlinops": (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10),
}
TARGETS = (1e-4, 1e-6)
GOAL_TIME_RATIO = 0.5  # curvscope time / PyHessian time at equal accuracy
GOAL_ERROR_RATIO = 2.0
PYHESSIAN_SEED_OFFSET = 10_000  # Hutchinson RMS error / Hutch++ RMS error at equal matvecs


# -- configuration ----------------------------------------------------------------------------------------------

@dataclass
class EigCase:
    case: str
    n: int
    curvatures: tuple[str, ...] = ("hessian", "ggn")


@dataclass
class TraceCase:
    case: str
    n: int
    budgets: tuple[int, ...]
    seeds: int
    reference: str = "exact"  # "exact" (D unit vectors) or "ggn-identity" (piecewise-linear models)


@dataclass
class Config:
    eig: list[EigCase]
    trace: list[TraceCase]
    tools: tuple[str, ...] = TOOLS
    targets: tuple[float, ...] = TARGETS
    repeats: int = 3
    ref_tol: float = 1e-10
    ref_steps: int = 200
    pyhessian_max_iter: int = 3000
    tool_budget: float = 150.0  # seconds of ladder runs per tool and (case, curvature)
    exact_limit: int = 20_000
    diag_checks: int = 10
    threads: int = 1
    dtype: str = "float64"
    out: str = ""
    ladders: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(LADDERS))


FULL = {"eig": [EigCase("3c3d-n16", 16), EigCase("transformer-digits", 64)],
        "trace": [TraceCase("mlp-digits", 64, (12, 30, 90), 20), TraceCase("transformer-digits", 32, (30, 90), 12),
                  TraceCase("3c3d-n8", 8, (30, 90), 4, reference="ggn-identity")]}
QUICK = {"eig": [EigCase("mlp-digits", 16), EigCase("transformer-digits", 8)],
         "trace": [TraceCase("mlp-digits", 16, (12, 30), 6), TraceCase("transformer-digits", 8, (30,), 4)]}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hessian", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="sample models at tiny batches (about 1 minute)")
    ap.add_argument("--parts", default="eig,trace", help="comma-separated subset of eig, trace")
    ap.add_argument("--peers", default=",".join(PEERS),
                    help="peers to run when installed (comma-separated; empty: curvscope only)")
    ap.add_argument("--no-both", action="store_true", help="skip curvscope's two-ended compute_matfree_spectrum")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs of each selected setting (default 3)")
    ap.add_argument("--tool-budget", type=float, default=150.0,
                    help="seconds of ladder runs per tool and case before the ladder stops")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per trace budget (default: per case)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1, as benchmarks.run)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results, quick: results-quick)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else FULL
    parts = set(args.parts.split(","))
    peers = tuple(p for p in args.peers.split(",") if p)
    unknown = [p for p in peers if p not in PEER_MODULES]
    if unknown:
        ap.error(f"unknown peer(s) {', '.join(unknown)}: choose from {', '.join(PEERS)}")
    tools = ("curvscope",) + (() if args.no_both else ("curvscope-both",)) + peers
    trace = [copy.copy(t) for t in plan["trace"]] if "trace" in parts else []
    if args.seeds:
        for t in trace:
            t.seeds = args.seeds
    cfg = Config(eig=list(plan["eig"]) if "eig" in parts else [], trace=trace, tools=tools,
                 repeats=args.repeats or (1 if args.quick else 3), tool_budget=args.tool_budget,
                 threads=args.threads,
                 out=args.out or str(ROOT / "benchmarks" / ("results-quick" if args.quick else "results")))
    return args, cfg


def peer_missing(tool: str) -> str | None:
    """``None`` when the tool's packages import, else the reason."""
    from benchmarks.peers import peer_missing as missing

    return missing(tool, PEER_MODULES)


def versions() -> dict[str, str | None]:
    from importlib.metadata import version

    out: dict[str, str | None] = {"torch": torch.__version__, "python": platform.python_version()}
    for mod, dist in PEER_DISTS.items():
        try:
            out[mod] = version(dist)
        except Exception:  # noqa: BLE001
            out[mod] = None
    return out


# -- helpers ------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """PyHessian draws its vectors with ``torch.randn(p.size())`` (the default dtype): match the model's."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def pyhessian_without_eps() -> Iterator[None]:
    """PyHessian's ``normalization`` divides by ``||v|| + 1e-6``: every iterate has norm ``1 - 1e-6`` and the
    Rayleigh quotient ``v.Hv`` is ``(1 - 2e-6) lambda``, a relative floor of 2e-6. This variant (a benchmark-only
    patch, both module references) divides by ``||v||``, to time the power iteration itself below that floor."""
    importlib.import_module("pyhessian")
    utils, ph = sys.modules["pyhessian.utils"], sys.modules["pyhessian.hessian"]
    original = utils.normalization

    def normalization(v):
        s = math.sqrt(float(utils.group_product(v, v)))
        return [vi / s for vi in v]

    utils.normalization = ph.normalization = normalization
    try:
        yield
    finally:
        utils.normalization = ph.normalization = original


@contextlib.contextmanager
def counting_pyhessian() -> Iterator[list[float]]:
    """Count (and time) PyHessian's Hessian-vector products (its module-level ``hessian_vector_product``):
    yields ``[count, seconds]``."""
    importlib.import_module("pyhessian")
    ph = sys.modules["pyhessian.hessian"]  # the package's ``hessian`` attribute is the class, not the module
    original = ph.hessian_vector_product
    count = [0, 0.0]

    def counted(grads, params, v):
        t = time.perf_counter()
        out = original(grads, params, v)
        count[0] += 1
        count[1] += time.perf_counter() - t
        return out

    ph.hessian_vector_product = counted
    try:
        yield count
    finally:
        ph.hessian_vector_product = original


def _problem(w: Workload):
    from curvscope.problem import make_problem

    return make_problem(w.model, w.x, w.y, loss="ce", device=w.x.device, dtype=w.x.dtype)


def _release(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


@dataclass
class EigRun:
    tool: str
    tol: float
    value: float | None
    seconds: float
    matvecs: int
    converged: bool
    error: str | None = None
    rel_err: float | None = None
    setup_seconds: float | None = None  # building the operator (gradient graph, PyHessian's constructor)
    matvec_seconds: float | None = None  # inside the products
    stop: str | None = None  # why the ladder stopped after this run, when not at the target


# -- top eigenvalue: the tools --------------------------------------------------------------------------------------

def eig_curvscope(problem, curvature: str, tol: float, seed: int = 0, max_steps: int | None = None,
                  which: str = "largest") -> tuple[EigRun, Any]:
    """curvscope: the operator (its gradient graph) and Lanczos for the top eigenvalue (``which="both"``: the
    reference run, both ends)."""
    from curvscope.curvature.matfree import curvature_operator, extreme_eigenpairs

    spent = [0.0]

    def matvec(v: Tensor) -> Tensor:
        t = time.perf_counter()
        out = op.matvec(v)
        spent[0] += time.perf_counter() - t
        return out

    t0 = time.perf_counter()
    op = curvature_operator(problem, None, curvature)
    setup = time.perf_counter() - t0
    res = extreme_eigenpairs(matvec, op.dim, 1, which=which, tol=tol, max_steps=max_steps,
                             generator=torch.Generator().manual_seed(seed), dtype=problem.dtype,
                             device=problem.device)
    value = float(res.top[0])
    seconds = time.perf_counter() - t0
    return EigRun("curvscope", tol, value, seconds, op.count, res.converged, setup_seconds=setup,
                  matvec_seconds=spent[0]), res


def eig_curvscope_both(problem, curvature: str, tol: float, seed: int = 0) -> EigRun:
    """curvscope's whole matrix-free spectrum as the CLI runs it: top and bottom (Hessian), no trace/density."""
    from curvscope.curvature.matfree import compute_matfree_spectrum

    t0 = time.perf_counter()
    res = compute_matfree_spectrum(problem, curvature=curvature, groups="all", top_k=1, tol=tol, trace_matvecs=0,
                                   density_vectors=0, seed=seed)
    g = res.groups[0]
    return EigRun("curvscope-both", tol, float(g.top[0]), time.perf_counter() - t0, res.matvecs, g.converged)


def eig_pyhessian(w: Workload, tol: float, seed: int = 0, max_iter: int = 3000, noeps: bool = False) -> EigRun:
    """PyHessian: its constructor (forward + ``backward(create_graph=True)``) and its power iteration
    (``noeps``: with :func:`pyhessian_without_eps`)."""
    from pyhessian import hessian as PyHessian

    model = copy.deepcopy(w.model)
    patch = pyhessian_without_eps() if noeps else contextlib.nullcontext()
    try:
        with default_dtype(w.x.dtype), counting_pyhessian() as count, patch, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # create_graph backward: "reference cycle" warning
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            h = PyHessian(model, nn.CrossEntropyLoss(), data=(w.x, w.y), cuda=False)
            setup = time.perf_counter() - t0
            evals, _ = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
            seconds = time.perf_counter() - t0
            del h
        return EigRun("pyhessian-noeps" if noeps else "pyhessian", tol, float(evals[0]), seconds, int(count[0]),
                      count[0] < max_iter, setup_seconds=setup, matvec_seconds=count[1])
    finally:
        _release(model)


def eig_curvlinops(w: Workload, curvature: str, tol: float, seed: int = 0) -> EigRun:
    """curvlinops: ``HessianLinearOperator``/``GGNLinearOperator`` wrapped for scipy, ``eigsh(k=1, which="LA")``."""
    import numpy as np
    from curvlinops import GGNLinearOperator, HessianLinearOperator
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    params = [p for p in w.model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    v0 = np.random.default_rng(seed).standard_normal(dim)
    cls = HessianLinearOperator if curvature == "hessian" else GGNLinearOperator
    count = [0, 0.0]
    t0 = time.perf_counter()
    op = cls(w.model, nn.CrossEntropyLoss(), params, [(w.x, w.y)], check_deterministic=False,
             num_data=w.batch_size).to_scipy(dtype=np.float64)
    setup = time.perf_counter() - t0

    def matvec(v):
        t = time.perf_counter()
        out = op.matvec(v)
        count[0] += 1
        count[1] += time.perf_counter() - t
        return out

    counted = LinearOperator(op.shape, matvec=matvec, dtype=np.float64)
    try:
        value = float(eigsh(counted, k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False)[0])
        converged = True
    except ArpackNoConvergence as exc:
        value = float(exc.eigenvalues[-1]) if len(exc.eigenvalues) else None
        converged = False
    return EigRun("curvlinops", tol, value, time.perf_counter() - t0, count[0], converged, setup_seconds=setup,
                  matvec_seconds=count[1])


def curvlinops_operator_check(w: Workload, problem, curvature: str, seed: int = 0) -> dict[str, float]:
    """curvlinops' product against curvscope's on one random vector, and its symmetry ``|u.Av - v.Au|``
    (untimed; explains an accuracy floor: curvlinops' Hessian goes through ``torch.func`` forward-over-reverse)."""
    import numpy as np
    from curvlinops import GGNLinearOperator, HessianLinearOperator

    from curvscope.curvature.matfree import curvature_operator

    params = [p for p in w.model.parameters() if p.requires_grad]
    cls = HessianLinearOperator if curvature == "hessian" else GGNLinearOperator
    cl = cls(w.model, nn.CrossEntropyLoss(), params, [(w.x, w.y)], check_deterministic=False,
             num_data=w.batch_size).to_scipy(dtype=np.float64)
    op = curvature_operator(problem, None, curvature)
    gen = torch.Generator().manual_seed(seed)
    u, v = (torch.randn(op.dim, generator=gen, dtype=torch.float64) for _ in range(2))
    au, bu = op.matvec(u).double(), torch.from_numpy(cl.matvec(u.numpy()))
    bv = torch.from_numpy(cl.matvec(v.numpy()))
    return {"rel_diff": float((au - bu).norm() / au.norm()),
            "asymmetry": float(abs(u @ bv - v @ bu) / abs(u @ bv).clamp_min(1e-300))}


def run_tool(tool: str, w: Workload, problem, curvature: str, tol: float, cfg: Config) -> EigRun:
    try:
        if tool == "curvscope":
            return eig_curvscope(problem, curvature, tol)[0]
        if tool == "curvscope-both":
            return eig_curvscope_both(problem, curvature, tol)
        if tool in ("pyhessian", "pyhessian-noeps"):
            return eig_pyhessian(w, tol, max_iter=cfg.pyhessian_max_iter, noeps=tool == "pyhessian-noeps")
        if tool == "curvlinops":
            return eig_curvlinops(w, curvature, tol)
    except Exception as exc:  # noqa: BLE001 - a failing tool is a result, not a crash of the suite
        return EigRun(tool, tol, None, math.nan, 0, False, error=f"{type(exc).__name__}: {exc}")
    raise KeyError(tool)


def tools_for(curvature: str, cfg: Config) -> list[str]:
    """PyHessian has no GGN; curvscope's two-ended run is the one-ended one for the (PSD) GGN."""
    no_ggn = ("pyhessian", "pyhessian-noeps", "curvscope-both")
    return [t for t in cfg.tools if not (t in no_ggn and curvature != "hessian")]


# -- top eigenvalue: the protocol -----------------------------------------------------------------------------------

def rel_err(value: float | None, ref: float) -> float | None:
    return None if value is None or not math.isfinite(value) else abs(value - ref) / abs(ref)


def eig_compare(ec: EigCase, curvature: str, cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """Reference, warm-up, ladders, re-timing of the selected settings: one (case, curvature) row group."""
    dtype = getattr(torch, cfg.dtype)
    w = build_workload(ec.case, ec.n, torch.device("cpu"), dtype)
    problem = _problem(w)
    tools = [t for t in tools_for(curvature, cfg) if not peer_missing(t)]
    out: dict[str, Any] = {"case": ec.case, "n": ec.n, "dim": w.num_params, "curvature": curvature,
                           "tools": tools, "missing": {t: peer_missing(t) for t in tools_for(curvature, cfg)
                                                       if peer_missing(t)}}
    which = "both" if curvature == "hessian" else "largest"
    ref_run, ref = eig_curvscope(problem, curvature, cfg.ref_tol, seed=12345, max_steps=cfg.ref_steps, which=which)
    lam = ref_run.value
    out["reference"] = {"value": lam, "tol": cfg.ref_tol, "converged": ref.converged, "matvecs": ref.matvecs,
                        "seconds": ref_run.seconds, "residual": float(ref.top_residuals[0]),
                        "lambda_min": float(ref.bottom[0]) if ref.bottom.numel() else None}
    log(f"  reference lambda_max = {lam:.12g} ({ref.matvecs} matvecs, residual {float(ref.top_residuals[0]):.1e}, "
        f"converged {ref.converged})" + (f", lambda_min = {float(ref.bottom[0]):.6g}" if ref.bottom.numel() else ""))
    warm = build_workload(ec.case, 2, torch.device("cpu"), dtype)
    warm_problem = _problem(warm)
    for tool in tools:  # warm-up on 2 samples: lazy imports, first autograd/vmap traces, allocator
        run_tool(tool, warm, warm_problem, curvature, cfg.ladders[tool][0], cfg)
    del warm, warm_problem
    ladders: dict[str, list[EigRun]] = {}
    for tool in tools:
        runs: list[EigRun] = []
        spent = 0.0
        for tol in cfg.ladders[tool]:
            r = run_tool(tool, w, problem, curvature, tol, cfg)
            r.rel_err = rel_err(r.value, lam)
            runs.append(r)
            spent += r.seconds if math.isfinite(r.seconds) else 0.0
            log(f"  {tool:15s} tol {tol:.0e}: {r.seconds:7.2f} s, {r.matvecs:5d} matvecs, rel. err "
                f"{'-' if r.rel_err is None else f'{r.rel_err:.1e}'}" + (f" [{r.error}]" if r.error else ""))
            if r.error or (r.rel_err is not None and r.rel_err <= min(cfg.targets)):
                break
            if spent > cfg.tool_budget:
                r.stop = "budget"
                break
            prev = runs[-2] if len(runs) >= 2 else None
            if (prev is not None and None not in (r.rel_err, prev.rel_err) and r.matvecs > prev.matvecs
                    and r.rel_err > 0.5 * prev.rel_err):
                r.stop = "plateau"  # more products for a decade tighter, not half the error: an accuracy floor
                break
        ladders[tool] = runs
    # the selected setting of each tool per target, re-timed (alternating order) for the median
    selected: dict[str, dict[float, EigRun | None]] = {
        tool: {eps: next((r for r in runs if r.rel_err is not None and r.rel_err <= eps), None)
               for eps in cfg.targets} for tool, runs in ladders.items()}
    times: dict[tuple[str, float], list[float]] = {}
    for tool, per in selected.items():
        for r in per.values():
            if r is not None:
                times[(tool, r.tol)] = [r.seconds]
    for rep in range(1, cfg.repeats):
        order = list(times) if rep % 2 == 0 else list(times)[::-1]
        for tool, tol in order:
            r = run_tool(tool, w, problem, curvature, tol, cfg)
            if r.error is None:
                times[(tool, tol)].append(r.seconds)
    rows = []
    for eps in cfg.targets:
        row: dict[str, Any] = {"target": eps}
        for tool in tools:
            r = selected[tool][eps]
            if r is None:
                runs = ladders[tool]
                best = min((x.rel_err for x in runs if x.rel_err is not None), default=None)
                row[tool] = {"reached": False, "best_rel_err": best,
                             "why": next((x.error or x.stop for x in runs if x.error or x.stop), "ladder exhausted"),
                             "ladder_seconds": sum(x.seconds for x in runs if math.isfinite(x.seconds)),
                             "ladder_matvecs": sum(x.matvecs for x in runs)}
                continue
            ts = times[(tool, r.tol)]
            row[tool] = {"reached": True, "tol": r.tol, "median_s": statistics.median(ts), "times": ts,
                         "matvecs": r.matvecs, "rel_err": r.rel_err, "value": r.value,
                         "profile": {"seconds": r.seconds, "setup_s": r.setup_seconds, "matvec_s": r.matvec_seconds}}
        cs = row.get("curvscope", {})
        for peer in PEERS:
            pr = row.get(peer)
            if cs.get("reached") and pr and pr.get("reached"):
                row[f"ratio_{peer}"] = cs["median_s"] / pr["median_s"]
                row[f"matvec_ratio_{peer}"] = cs["matvecs"] / pr["matvecs"]
        rows.append(row)
    out["ladders"] = {t: [asdict(r) for r in runs] for t, runs in ladders.items()}
    out["rows"] = rows
    if "curvlinops" in tools:
        out["curvlinops_operator_check"] = curvlinops_operator_check(w, problem, curvature)
    tight = [r for r in ladders.get("curvlinops", []) if r.value is not None]
    if tight:  # independent cross-check of the reference
        out["reference"]["curvlinops_tightest_rel_diff"] = min(r.rel_err for r in tight if r.rel_err is not None)
    return out


# -- trace ----------------------------------------------------------------------------------------------------------

def ggn_trace(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """``tr(G)`` of the mean cross-entropy from per-sample gradients, independent of curvscope's engines.

    ``H_n = diag(p) - p p^T = A A^T`` with columns ``a_c = sqrt(p_c) (e_c - p)``, so
    ``tr(G) = (1/N) sum_n sum_c p_nc ||grad_theta (f_nc - p_n . f_n)||^2`` (``p`` held fixed).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    total = 0.0
    with torch.enable_grad():
        for i in range(x.shape[0]):
            out = model(x[i: i + 1])[0]
            p = out.softmax(-1).detach()
            centred = out - (p * out).sum()
            for c in range(out.shape[0]):
                grads = torch.autograd.grad(centred[c], params, retain_graph=True, allow_unused=True)
                total += float(p[c]) * sum(float((g**2).sum()) for g in grads if g is not None)
    return total / x.shape[0]


def diag_check(problem, count: int, seed: int = 0) -> dict[str, Any]:
    """``H_ii`` against ``G_ii`` on ``count`` random coordinates spread over the parameter tensors (the identity
    behind the 3c3d reference): the largest difference relative to the largest ``|G_ii|``."""
    from curvscope.curvature.matfree import ggn_operator, hessian_operator

    h, g = hessian_operator(problem), ggn_operator(problem)
    gen = torch.Generator().manual_seed(seed)
    sizes = [s.numel() for s in h.shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    picks = [offsets[i % len(sizes)] + int(torch.randint(0, sizes[i % len(sizes)], (1,), generator=gen))
             for i in range(count)]
    hd, gd = [], []
    for i in picks:
        e = torch.zeros(h.dim, dtype=problem.dtype, device=problem.device)
        e[i] = 1.0
        hd.append(float(h.matvec(e)[i]))
        gd.append(float(g.matvec(e)[i]))
    scale = max(max(abs(v) for v in gd), 1e-300)
    return {"coordinates": picks, "hessian": hd, "ggn": gd,
            "max_rel_diff": max(abs(a - b) for a, b in zip(hd, gd, strict=True)) / scale}


def pooled_ratio(row: dict[str, Any], ref: float) -> float:
    """Hutchinson's RMS error pooled over curvscope's and PyHessian's runs (the same estimator, independent
    seeds) over Hutch++'s: the number the goal is judged on."""
    xs = row["estimates"]["hutchinson"] + row["estimates"].get("pyhessian", [])
    rms = math.sqrt(sum((x - ref) ** 2 for x in xs) / len(xs)) / abs(ref)
    return rms / row["rms_hutchpp"]


def trace_compare(tc: TraceCase, cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """Hutch++ vs Hutchinson (curvscope's and PyHessian's) at equal matvecs, relative RMS error over seeds."""
    from curvscope.curvature.matfree import exact_trace, hessian_operator, hutchinson, hutchpp

    dtype = getattr(torch, cfg.dtype)
    w = build_workload(tc.case, tc.n, torch.device("cpu"), dtype)
    problem = _problem(w)
    op = hessian_operator(problem)
    out: dict[str, Any] = {"case": tc.case, "n": tc.n, "dim": op.dim, "budgets": list(tc.budgets), "seeds": tc.seeds}
    t0 = time.perf_counter()
    if tc.reference == "exact" and op.dim <= cfg.exact_limit:
        ref = exact_trace(op.matvec, op.dim, dtype=problem.dtype, device=problem.device).trace
        out["reference"] = {"method": f"exact ({op.dim} unit vectors)", "trace": ref}
    elif tc.reference == "ggn-identity":
        ref = ggn_trace(w.model, w.x, w.y)
        check = diag_check(problem, cfg.diag_checks)
        out["reference"] = {"method": "tr(G) (= tr(H) for piecewise-linear models)", "trace": ref,
                            "diag_check": check}
        log(f"  diag check H_ii vs G_ii on {cfg.diag_checks} coordinates: max rel. diff "
            f"{check['max_rel_diff']:.1e}")
    else:
        raise ValueError(f"{tc.case}: D = {op.dim} > exact limit {cfg.exact_limit} and no other reference")
    out["reference"]["seconds"] = time.perf_counter() - t0
    log(f"  reference trace {ref:.10g} ({out['reference']['method']}, {out['reference']['seconds']:.1f} s)")
    from curvscope.curvature.matfree import extreme_eigenpairs

    ends = extreme_eigenpairs(op.matvec, op.dim, 1, which="both", tol=1e-3, dtype=problem.dtype,
                              device=problem.device)
    out["spectral_radius"] = max(abs(float(ends.top[0])), abs(float(ends.bottom[0])))
    out["lambda_max"], out["lambda_min"] = float(ends.top[0]), float(ends.bottom[0])
    ph = None
    use_pyhessian = "pyhessian" in cfg.tools and not peer_missing("pyhessian")
    if use_pyhessian:
        from pyhessian import hessian as PyHessian

        ph_model = copy.deepcopy(w.model)
        with default_dtype(dtype), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ph = PyHessian(ph_model, nn.CrossEntropyLoss(), data=(w.x, w.y), cuda=False)
    elif "pyhessian" in cfg.tools:
        out["missing"] = {"pyhessian": peer_missing("pyhessian")}
    kw = {"dtype": problem.dtype, "device": problem.device}
    rows = []
    for m in tc.budgets:
        est: dict[str, list[float]] = {"hutchpp": [], "hutchinson": [], "pyhessian": []}
        var: dict[str, list[float]] = {"hutchpp": [], "hutchinson": []}
        matvecs: dict[str, set[int]] = {"hutchpp": set(), "hutchinson": set(), "pyhessian": set()}
        for seed in range(tc.seeds):
            before = op.count
            r = hutchpp(op.matvec, op.dim, m, generator=torch.Generator().manual_seed(seed), **kw)
            matvecs["hutchpp"].add(op.count - before)
            est["hutchpp"].append(r.trace)
            s = m // 3
            var["hutchpp"].append(r.stderr**2 * (m - 2 * s))  # sample variance of the deflated Hutchinson part
            before = op.count
            r = hutchinson(op.matvec, op.dim, m, generator=torch.Generator().manual_seed(seed), **kw)
            matvecs["hutchinson"].add(op.count - before)
            est["hutchinson"].append(r.trace)
            var["hutchinson"].append(r.stderr**2 * m)
            if ph is not None:
                with counting_pyhessian() as count:
                    # PYHESSIAN_SEED_OFFSET: with the same seed PyHessian draws exactly curvscope's Rademacher vectors
                    # (both take the CPU generator's bits in parameter order): same estimate, no new information
                    torch.manual_seed(PYHESSIAN_SEED_OFFSET + seed)
                    samples = ph.trace(maxIter=m, tol=-math.inf)  # tol -inf: never stop early
                matvecs["pyhessian"].add(int(count[0]))
                est["pyhessian"].append(float(sum(samples) / len(samples)))
        row: dict[str, Any] = {"m": m, "estimates": est, "matvecs": {k: sorted(v) for k, v in matvecs.items() if v}}
        for k, xs in est.items():
            if xs:
                row[f"rms_{k}"] = math.sqrt(sum((x - ref) ** 2 for x in xs) / len(xs)) / abs(ref)
                row[f"bias_{k}"] = (sum(xs) / len(xs) - ref) / abs(ref)
        row["ratio_hutchinson"] = row["rms_hutchinson"] / row["rms_hutchpp"]
        if est["pyhessian"]:
            row["ratio_pyhessian"] = row["rms_pyhessian"] / row["rms_hutchpp"]
        # what the variances predict: Hutchinson sample variance v_H over m vectors vs the deflated residual's v_R
        # over m - 2s vectors; Hutch++ wins by sqrt((v_H / m) / (v_R / (m - 2s)))
        v_h, v_r = statistics.mean(var["hutchinson"]), statistics.mean(var["hutchpp"])
        s = m // 3
        row["variance_left"] = v_r / v_h if v_h > 0 else None
        # Rademacher: v_H = 2 (||H||_F^2 - sum H_ii^2), so v_H / 2 <= ||H||_F^2; a rank-s sketch removes at most
        # s rho^2 of it: the stable rank ||H||_F^2 / rho^2 (here its lower bound) says how large s must be
        row["frobenius_sq_lower"] = v_h / 2
        row["stable_rank_lower"] = v_h / 2 / out["spectral_radius"] ** 2
        row["predicted_ratio"] = math.sqrt((v_h / m) / (v_r / (m - 2 * s))) if v_r > 0 and m > 2 * s else None
        rows.append(row)
        log(f"  m = {m:3d}: rel. RMS error Hutch++ {row['rms_hutchpp']:.2e}, Hutchinson {row['rms_hutchinson']:.2e}"
            + (f", PyHessian {row['rms_pyhessian']:.2e}" if est["pyhessian"] else "")
            + f"; Hutchinson / Hutch++ {row['ratio_hutchinson']:.2f} (variances predict "
            f"{row['predicted_ratio'] or math.nan:.2f}; variance left after the sketch {row['variance_left']:.2f})")
    out["rows"] = rows
    if ph is not None:
        del ph
        _release(ph_model)
    return out


# -- output -------------------------------------------------------------------------------------------------------

def _f(x: Any, fmt: str = "{:.3g}") -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return fmt.format(x)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("holds" if ok else "MISSED")


def eig_goal(row: dict[str, Any]) -> str:
    """The time goal against PyHessian: as shipped where it reaches the target, else against the patched power
    iteration (PyHessian itself cannot reach the target: a win by default, reported as such)."""
    if row.get("ratio_pyhessian") is not None:
        return _verdict(row["ratio_pyhessian"] <= GOAL_TIME_RATIO)
    ph = row.get("pyhessian")
    if ph and not ph["reached"] and row.get("curvscope", {}).get("reached"):
        patched = row.get("ratio_pyhessian-noeps")
        tail = "" if patched is None else f"; vs patched: {_verdict(patched <= GOAL_TIME_RATIO)}"
        return f"holds (PyHessian cannot reach it{tail})"
    return "n/a"


def _cell(c: dict[str, Any] | None, absent: str) -> str:
    if c is None:
        return absent
    if c["reached"]:
        return f"{c['median_s']:.3g} ({c['matvecs']} mv, tol {c['tol']:.0e})"
    return f"not reached: {c['why']}, best {_f(c['best_rel_err'], '{:.1e}')} ({c['ladder_matvecs']} mv in all)"


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    v = m["versions"]
    lines = [
        "# Matrix-free Hessian/GGN estimators: curvscope vs PyHessian and curvlinops",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {m['nproc']} CPU cores ({m['cpu']}); torch {v['torch']}, pyhessian {v.get('pyhessian')}, "
        f"curvlinops {v.get('curvlinops')}, scipy {v.get('scipy')}; float64, {m['threads']} thread(s); load "
        f"average at start {m['loadavg_start']}, at end {results.get('loadavg_end')}.  ",
        f"Started {results['started']}, took {results.get('wall_minutes', 0):.1f} min.",
    ]
    if results.get("eig"):
        lines += [
            "",
            "## Time to the top eigenvalue at equal accuracy",
            "",
            "Each cell: median wall time in s (set-up included) of the loosest setting of the tool's own tolerance "
            "whose answer is within the target of the reference, with its matvecs (mv) and tolerance. Ratios: "
            "curvscope Lanczos / peer, time (matvecs); < 1: curvscope faster. Goal: <= 0.5 against PyHessian.",
            "",
            "| case | N | D | curvature | target | " + " | ".join(TOOL_NAMES[t] for t in TOOLS)
            + " | ratio vs PyHessian | ratio vs patched PyHessian | ratio vs curvlinops | goal (<= 0.5 vs PyHessian) |",
            "|---|---|---|---|---|" + "---|" * len(TOOLS) + "---|---|---|---|",
        ]
        for g in results["eig"]:
            for row in g["rows"]:
                hessian = g["curvature"] == "hessian"
                cells = [_cell(row.get(t), "n/a" if hessian or t not in ("pyhessian", "pyhessian-noeps",
                                                                          "curvscope-both") else "-")
                         for t in TOOLS]
                ratios = [f"{row[f'ratio_{p}']:.2f} ({row[f'matvec_ratio_{p}']:.2f})" if f"ratio_{p}" in row else "-"
                          for p in PEERS]
                lines.append(
                    f"| {g['case']} | {g['n']} | {g['dim']} | {g['curvature']} | {row['target']:.0e} | "
                    + " | ".join(cells) + " | " + " | ".join(ratios)
                    + f" | {eig_goal(row) if hessian else '-'} |")
        lines += ["", "References (curvscope Lanczos, both ends for the Hessian, cross-checked with curvlinops + eigsh "
                  "at its tightest tolerance):", ""]
        for g in results["eig"]:
            r = g["reference"]
            lines.append(f"- {g['case']} {g['curvature']}: lambda_max = {r['value']:.10g} (residual "
                         f"{r['residual']:.1e}, {r['matvecs']} matvecs"
                         + (f"; lambda_min = {r['lambda_min']:.4g}" if r.get("lambda_min") is not None else "")
                         + (f"; curvlinops within {r['curvlinops_tightest_rel_diff']:.1e}"
                            if r.get("curvlinops_tightest_rel_diff") is not None else "")
                         + (f"; curvlinops' product differs from curvscope's by "
                            f"{g['curvlinops_operator_check']['rel_diff']:.1e} (relative), asymmetry "
                            f"{g['curvlinops_operator_check']['asymmetry']:.1e}"
                            if g.get("curvlinops_operator_check") else "") + ")")
        lines += ["", "Profile of the selected runs (first timed run): set-up (operator / gradient graph), time inside "
                  "the products, and the rest (the eigensolver's own work and Python):", "",
                  "| case | curvature | target | tool | total s | set-up s | products s (ms each) | rest s |",
                  "|---|---|---|---|---|---|---|---|"]
        for g in results["eig"]:
            for row in g["rows"]:
                for t in TOOLS:
                    c = row.get(t)
                    if not c or not c["reached"] or c["profile"].get("matvec_s") is None:
                        continue
                    p = c["profile"]
                    rest = p["seconds"] - (p["setup_s"] or 0.0) - p["matvec_s"]
                    lines.append(f"| {g['case']} | {g['curvature']} | {row['target']:.0e} | {TOOL_NAMES[t]} "
                                 f"| {p['seconds']:.3g} | {p['setup_s']:.3g} | {p['matvec_s']:.3g} "
                                 f"({1e3 * p['matvec_s'] / max(c['matvecs'], 1):.3g}) | {rest:.3g} |")
        missing = {t: why for g in results["eig"] for t, why in g.get("missing", {}).items()}
        if missing:
            lines += [""] + [f"- {t} not run: {why}" for t, why in missing.items()]
    if results.get("trace"):
        lines += [
            "",
            "## Trace error at equal numbers of Hessian-vector products",
            "",
            "Relative RMS error over the seeds against the reference trace. Ratio: Hutchinson error / Hutch++ "
            "error (> 1: Hutch++ better); goal >= 2. Predicted: the same ratio from the sample variances "
            "(Hutchinson's over m vectors, the sketch-deflated residual's over m - 2 floor(m/3)); pooled: both "
            "Hutchinsons' runs together (the same estimator; PyHessian's seeds are offset so its vectors differ); "
            "variance left: "
            "their ratio. Stable rank: ||H||_F^2 / rho(H)^2 (lower bound from the Hutchinson variance); a rank-s "
            "sketch (s = floor(m/3)) can only remove much variance when s is comparable to it.",
            "",
            "| case | N | D | reference | m | seeds | Hutch++ (curvscope) | Hutchinson (curvscope) "
            "| Hutchinson (PyHessian) | ratio curvscope Hutchinson / Hutch++ | ratio PyHessian / Hutch++ "
            "| ratio pooled Hutchinson / Hutch++ | predicted | variance left | stable rank | goal (>= 2, pooled) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for g in results["trace"]:
            for row in g["rows"]:
                pooled = pooled_ratio(row, g["reference"]["trace"])
                lines.append(
                    f"| {g['case']} | {g['n']} | {g['dim']} | {g['reference']['method'].split(' (')[0]} "
                    f"| {row['m']} | {g['seeds']} | {_f(row.get('rms_hutchpp'), '{:.2e}')} "
                    f"| {_f(row.get('rms_hutchinson'), '{:.2e}')} | {_f(row.get('rms_pyhessian'), '{:.2e}')} "
                    f"| {_f(row.get('ratio_hutchinson'), '{:.2f}')} | {_f(row.get('ratio_pyhessian'), '{:.2f}')} "
                    f"| {pooled:.2f} "
                    f"| {_f(row.get('predicted_ratio'), '{:.2f}')} | {_f(row.get('variance_left'), '{:.2f}')} "
                    f"| >= {_f(row.get('stable_rank_lower'), '{:.3g}')} | {_verdict(pooled >= GOAL_ERROR_RATIO)} |")
        lines += [""]
        for g in results["trace"]:
            r = g["reference"]
            extra = (f"; H_ii vs G_ii on {len(r['diag_check']['coordinates'])} random coordinates: max rel. diff "
                     f"{r['diag_check']['max_rel_diff']:.1e}" if r.get("diag_check") else "")
            lines.append(f"- {g['case']}: trace = {r['trace']:.10g} ({r['method']}, {r['seconds']:.1f} s{extra}); "
                         f"lambda_max = {g['lambda_max']:.4g}, lambda_min = {g['lambda_min']:.4g}")
    return "\n".join(lines) + "\n"


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def machine_info(cfg: Config) -> dict[str, Any]:
    from benchmarks.peers import cpu_name

    return {"nproc": os.cpu_count(), "cpu": cpu_name(), "platform": platform.platform(), "versions": versions(),
            "threads": cfg.threads, "loadavg_start": _loadavg()}


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "hessian.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "hessian.md").write_text(markdown(results))


def run(cfg: Config, command: str, log: Callable[[str], None] = print, out: Path | None = None) -> dict[str, Any]:
    """Run the suite described by ``cfg``; writes ``hessian.json``/``hessian.md`` into ``out`` when given."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    results: dict[str, Any] = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "machine": machine_info(cfg),
                               "config": json.loads(json.dumps(asdict(cfg), default=str)), "eig": [], "trace": []}
    for tool in cfg.tools:
        if tool in PEER_MODULES and peer_missing(tool):
            log(f"peer {tool} unavailable: {peer_missing(tool)}")
    for ec in cfg.eig:
        for curvature in ec.curvatures:
            log(f"{ec.case} (N={ec.n}) top {curvature} eigenvalue")
            results["eig"].append(eig_compare(ec, curvature, cfg, log))
            if out:
                write(results, out)
    for tc in cfg.trace:
        log(f"{tc.case} (N={tc.n}) Hessian trace, budgets {list(tc.budgets)}, {tc.seeds} seeds")
        results["trace"].append(trace_compare(tc, cfg, log))
        if out:
            write(results, out)
    results["wall_minutes"] = (time.time() - t0) / 60
    results["loadavg_end"] = _loadavg()
    if out:
        write(results, out)
    return results


def main(argv: list[str] | None = None) -> int:
    args, cfg = parse_args(argv)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    command = "python -m benchmarks.hessian " + " ".join(sys.argv[1:] if argv is None else argv)
    results = run(cfg, command.strip(), log, Path(cfg.out))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
