"""One measurement of :mod:`benchmarks.scale` in a fresh process: ``python -m benchmarks.scale_tools SPEC``.

The child builds the model and batch (:func:`benchmarks.scale_models.build`, not timed), records its memory
baseline, resets the kernel's peak-RSS counter, then times one tool from "model and batch in hand" to the answer
(the tool's own set-up, e.g. the gradient graph, is inside the timing) and prints one line ``BENCH_RESULT {json}``:
``seconds``, ``products`` and the seconds spent inside them, ``peak_rss`` (``VmHWM``: the whole process, model
included) and ``baseline_rss`` (before the tool), the answer (``lambda_max``, ...) and tool-specific fields.

Tools (every eigenvalue tool is asked for the top eigenvalue at the same relative tolerance ``tol``):

- ``curvscope``: ``compute_matfree_spectrum(curvature="hessian", top_k=1, trace_matvecs=0, density_vectors=0)``
  (both ends of the Hessian: its largest *and* smallest eigenvalue, as ``curvscope spectrum`` computes them);
- ``curvscope-top``: the same eigensolver (``block_eigenpairs``, same memory plan) for the largest end only;
- ``curvscope-ggn``: ``compute_matfree_spectrum(curvature="ggn", top_k=1, ...)``;
- ``pyhessian``: ``hessian(model, criterion, data=(x, y), cuda=False).eigenvalues(top_n=1, tol=tol)`` (power
  iteration; its ``tol`` is the relative change between two iterates); every iterate's value and time is recorded,
  so the time at which it first came within the target of the reference is known afterwards;
- ``curvlinops`` / ``curvlinops-ggn``: ``HessianLinearOperator`` / ``GGNLinearOperator`` ``.to_scipy()`` with
  ``scipy.sparse.linalg.eigsh(k=1, which="LA", tol=tol, ncv=ncv)``;
- ``estimators``: ``compute_matfree_spectrum(curvature="hessian", top_k=1, max_matvecs=3, trace_matvecs=60,
  density_vectors=4, density_steps=40)`` with the default memory budget: the Hutch++ trace and the SLQ density of
  ``curvscope spectrum --curvature hessian`` (the eigensolver cut to its minimum), timed per stage;
- ``cli``: ``python -m curvscope spectrum CHECKPOINT --data FILE --curvature hessian`` with every other option at
  its default, as a subprocess (its peak RSS from ``getrusage(RUSAGE_CHILDREN)``; loading is inside its time);
  ``cli-ggn`` the same with ``--method lanczos`` (the GGN, matrix-free) instead of ``--curvature hessian``.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.memory import is_oom, proc_status, reset_peak_rss
from benchmarks.scale_models import MODELS, Logits, ShiftedLogits, Spec, build, num_params, shifted_ce

ROOT = Path(__file__).resolve().parent.parent
RESULT_MARK = "BENCH_RESULT "


@contextlib.contextmanager
def timed_products(owner: Any, name: str, record: dict[str, Any]) -> Iterator[None]:
    """Count and time the calls of ``owner.<name>`` (a product) into ``record["products"]``/``["product_s"]``."""
    original = getattr(owner, name)

    def counted(*args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        out = original(*args, **kw)
        record["products"] += 1
        record["product_s"] += time.perf_counter() - t
        return out

    setattr(owner, name, counted)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _problem(spec: Spec, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    from curvscope import make_problem

    lm = spec.kind == "gpt2"
    # float32, as the peers compute (and as dtype auto gives a model of over 10M parameters)
    return make_problem(Logits(model) if lm else model, x, y, loss="ce", shift_labels=lm, device="cpu",
                        dtype=torch.float32)


def _curvscope(spec: Spec, model, x, y, cfg: dict, rec: dict) -> None:
    from curvscope.curvature.matfree.operator import Operator
    from curvscope.curvature.matfree.spectrum import compute_matfree_spectrum

    curvature = "ggn" if cfg["tool"] == "curvscope-ggn" else "hessian"
    with timed_products(Operator, "matvec", rec):
        res = compute_matfree_spectrum(_problem(spec, model, x, y), curvature=curvature, top_k=1, tol=cfg["tol"],
                                       trace_matvecs=0, density_vectors=0, max_memory=cfg.get("max_memory"))
    g = res.groups[0]
    rec.update(lambda_max=float(g.top[0]), lambda_min=g.lambda_min, converged=bool(g.converged),
               residual=float(g.top_residuals[0]), block_size=g.block_size, max_basis=g.max_basis,
               solver=g.solver, notes=list(res.notes))


def _curvscope_top(spec: Spec, model, x, y, cfg: dict, rec: dict) -> None:
    from curvscope.curvature.matfree.block import block_eigenpairs
    from curvscope.curvature.matfree.lean import lean_extremes
    from curvscope.curvature.matfree.operators import hessian_operator
    from curvscope.curvature.matfree.spectrum import plan_eigen, vector_budget

    problem = _problem(spec, model, x, y)
    op = hessian_operator(problem)
    itemsize = torch.empty(0, dtype=problem.dtype).element_size()
    budget = vector_budget(problem, cfg.get("max_memory"), [op.dim])
    k, plan, _ = plan_eigen(op.dim, 1, "largest", budget, itemsize)
    with timed_products(op, "matvec", rec):
        if plan.solver == "lean":  # one value in two vectors (a large model, or a basis the budget cuts short)
            # the Operator itself (its counted matvec): lean_extremes then has each product written into its buffer,
            # as `curvscope spectrum` does; a plain function's per-parameter results would be one vector more
            eig = lean_extremes(op, op.dim, which="largest", tol=cfg["tol"], dtype=problem.dtype)
        else:
            eig = block_eigenpairs(op.matvec, op.dim, k, which="largest", tol=cfg["tol"], block_size=plan.block_size,
                                   max_basis=plan.max_basis, dtype=problem.dtype)
    rec.update(lambda_max=float(eig.top[0]), converged=bool(eig.converged), residual=float(eig.top_residuals[0]),
               block_size=eig.block_size, max_basis=eig.max_basis, solver=plan.solver, dtype=str(problem.dtype))


def _pyhessian(spec: Spec, model, x, y, cfg: dict, rec: dict) -> None:
    import pyhessian  # noqa: F401
    ph = sys.modules["pyhessian.hessian"]
    t0 = rec["_t0"]
    trajectory: list[tuple[float, float]] = []
    original = ph.group_product  # the module's own reference: used for the eigenvalue estimate of each iterate only

    def recorded(xs, ys):
        out = original(xs, ys)
        trajectory.append((time.perf_counter() - t0, float(out)))
        return out

    ph.group_product = recorded
    try:
        wrapped = Logits(model) if spec.kind == "gpt2" else model
        criterion = shifted_ce if spec.kind == "gpt2" else nn.CrossEntropyLoss()
        with timed_products(ph, "hessian_vector_product", rec):
            h = ph.hessian(wrapped, criterion, data=(x, y), cuda=False)
            values, _ = h.eigenvalues(maxIter=cfg["max_iter"], tol=cfg["tol"], top_n=1)
    finally:
        ph.group_product = original
    rec.update(lambda_max=float(values[0]), trajectory=trajectory, converged=rec["products"] < cfg["max_iter"])


def _curvlinops(spec: Spec, model, x, y, cfg: dict, rec: dict) -> None:
    import numpy
    from curvlinops import GGNLinearOperator, HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    lm = spec.kind == "gpt2"
    func = ShiftedLogits(model) if lm else model
    target = y[:, 1:].reshape(-1) if lm else y
    params = [p for p in func.parameters() if p.requires_grad]
    cls = GGNLinearOperator if cfg["tool"] == "curvlinops-ggn" else HessianLinearOperator
    op = cls(func, nn.CrossEntropyLoss(), params, [(x, target)], progressbar=False,
             check_deterministic=False).to_scipy()
    counted = {"products": 0, "product_s": 0.0}

    def matvec(v: numpy.ndarray) -> numpy.ndarray:
        t = time.perf_counter()
        out = op @ v
        counted["products"] += 1 if v.ndim == 1 else v.shape[1]
        counted["product_s"] += time.perf_counter() - t
        return out

    lin = LinearOperator(op.shape, matvec=matvec, matmat=matvec, dtype=op.dtype)
    ncv = min(cfg["ncv"], op.shape[0] - 1)
    values = eigsh(lin, k=1, which="LA", tol=cfg["tol"], ncv=ncv, return_eigenvectors=False)
    rec.update(lambda_max=float(values[-1]), ncv=ncv, converged=True, **counted)


def _estimators(spec: Spec, model, x, y, cfg: dict, rec: dict) -> None:
    from curvscope.curvature.matfree.operator import Operator
    from curvscope.curvature.matfree.spectrum import compute_matfree_spectrum, vector_budget

    t0, starts = rec["_t0"], {}

    def progress(stage: str, done: int, total: int | None) -> None:
        starts.setdefault(stage, time.perf_counter() - t0)

    problem = _problem(spec, model, x, y)
    from curvscope.curvature.memory import MemoryPlan

    rec["budget"] = MemoryPlan.default(problem.device, None).budget
    rec["vector_budget"] = vector_budget(problem, None, [problem.num_params])
    with timed_products(Operator, "matvec", rec):
        res = compute_matfree_spectrum(problem, curvature="hessian", top_k=1, max_matvecs=3, trace_matvecs=60,
                                       density_vectors=4, density_steps=40, progress=progress)
    g = res.groups[0]
    end = time.perf_counter() - t0
    rec.update(trace=g.trace, trace_stderr=g.trace_stderr, trace_method=g.trace_method,
               density_nodes=int(g.density.nodes.numel()) if g.density is not None else 0,
               trace_s=starts.get("density", end) - starts.get("trace", end),
               density_s=end - starts.get("density", end), stages=starts)


def _cli(spec: Spec, model, x, y, cfg: dict, rec: dict) -> None:
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix="curvscope-scale-"))
    data = tmp / "data.safetensors"
    save_file({"x": x.contiguous(), "y": y.contiguous()}, str(data))
    if spec.kind == "gpt2":
        model.save_pretrained(str(tmp / "model"))
        args = [str(tmp / "model")]
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        args = [str(tmp / "model.safetensors"), "--model", str(ROOT / "benchmarks" / "scale_models.py") + ":resnet",
                "--model-kwargs", json.dumps(spec.config)]
    what = ["--method", "lanczos"] if cfg["tool"] == "cli-ggn" else ["--curvature", "hessian"]
    cmd = [sys.executable, "-m", "curvscope", "spectrum", *args, "--data", str(data), "--batch-size", str(spec.n),
           *what, "--out", str(tmp / "out")]
    rec["command"] = "curvscope spectrum CHECKPOINT --data FILE --batch-size N " + " ".join(what)
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg["cli_timeout"],
                              env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"})
        rec["exit"], tail = proc.returncode, (proc.stderr.strip().splitlines() or [""])[-3:]
    except subprocess.TimeoutExpired as exc:
        rec["exit"], tail = "timeout", (str(exc.stderr or "").strip().splitlines() or [""])[-3:]
    rec["cli_s"] = time.perf_counter() - t
    rec["stderr_tail"] = tail
    rec["cli_peak_rss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    report = tmp / "out" / "report.json"
    if report.exists():
        r = json.loads(report.read_text())
        g = r["groups"][0]
        rec.update(lambda_max=g.get("lambda_max"), lambda_min=g.get("lambda_min"), products=g.get("matvecs"),
                   converged=g.get("converged"), trace=g.get("trace"), eigenvalues=len(g.get("eigenvalues") or []),
                   solver=g.get("solver"), notes=r.get("notes"))


TOOLS: dict[str, Callable[..., None]] = {
    "curvscope": _curvscope, "curvscope-top": _curvscope_top, "curvscope-ggn": _curvscope,
    "pyhessian": _pyhessian, "curvlinops": _curvlinops, "curvlinops-ggn": _curvlinops,
    "estimators": _estimators, "cli": _cli, "cli-ggn": _cli,
}
GGN_TOOLS = ("curvscope-ggn", "curvlinops-ggn", "cli-ggn")


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    """Measure one tool on one model: ``cfg`` has ``model``, ``tool``, ``tol``, ``max_iter`` (PyHessian), ``ncv``
    (eigsh), ``cli_timeout``, ``cap`` (bytes of address space beyond the baseline, ``0``: none), ``max_memory``
    (curvscope's eigenvalue tools: the budget in bytes, ``None``: the default)."""
    spec = MODELS[cfg["model"]]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads()))
    model, x, y = build(spec)
    rec: dict[str, Any] = {"model": spec.name, "tool": cfg["tool"], "params": num_params(model), "ok": False,
                           "products": 0, "product_s": 0.0, "threads": torch.get_num_threads()}
    base = proc_status()
    if cfg.get("cap"):
        limit = base["VmSize"] + int(cfg["cap"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rec["baseline_rss"] = base["VmRSS"]
    reset_peak_rss()
    rec["_t0"] = t0 = time.perf_counter()
    try:
        TOOLS[cfg["tool"]](spec, model, x, y, cfg, rec)
        rec["ok"] = not cfg["tool"].startswith("cli") or rec.get("exit") == 0
    except Exception as exc:  # noqa: BLE001  (a peer's failure is a result)
        rec["error"] = ("out of memory under the cap: " if is_oom(exc) else "") + f"{type(exc).__name__}: {exc}"[:300]
    rec["seconds"] = time.perf_counter() - t0
    rec["peak_rss"] = proc_status()["VmHWM"]
    rec.pop("_t0")
    return rec


def main(argv: list[str]) -> None:
    cfg = json.loads(argv[0])
    print(RESULT_MARK + json.dumps(child(cfg), default=float), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
