"""Curvature over training: warm against cold starts, per-point time against PyHessian, the monitor's overhead.

    python -m benchmarks.track                 # a few minutes on 2 CPU cores; results/track.json and track.md
    python -m benchmarks.track --quick         # fewer repeats and training steps (a smoke run)

Three questions, one process, one intra-op thread (``--threads``):

1. **Warm against cold starts** over the bundled run ``sample_models/eos-run`` (12 checkpoints, D = 1,441, the
   first 256 samples of diabetes): ``run_track`` with ``warm_start`` on and off at the default tolerance (1e-4)
   and at 1e-8 (float64), the products and seconds of every point, and the largest relative difference of the
   two runs' λ_max (which must stay within the tolerance).
2. **Per-point time against PyHessian** (``hessian(model, criterion, data=(x, y)).eigenvalues(top_n=1)``, power
   iteration) at the same accuracy, over the same checkpoints: each tool's loosest tolerance whose λ_max is
   within 1e-4 (relative) of a reference from curvscope at 1e-10, then that setting's time per point. PyHessian
   is optional (the ``bench`` extra): when it is not importable this part says so and is skipped. The same
   power iteration written out here (Hessian-vector products by double backward, stopping on the eigenvalue's
   relative change, as PyHessian does) is timed beside it so the part still has a baseline. Both ways of
   counting a point are timed: the eigen-solve alone (PyHessian's ``eigenvalues()``, curvscope's ``sharpness``),
   and a whole point of a loop over checkpoint files (reading the checkpoint, loss, gradient norm, threshold:
   ``run_track``'s points, against ``torch.load`` + ``load_state_dict`` + PyHessian), and ``track``'s whole path
   in one process per point (finding and checking the checkpoints, building the problem, the report after every
   point, the final report, with and without ``track.png``).
3. **The monitor's overhead** on a sample training loop: ``mlp(64, [64, 64], 10)`` (8,970 parameters) on the
   digits' training samples with SGD (lr 0.1, batches of 64, ``--train-steps`` steps), timed without a monitor
   and with ``curvscope.Monitor`` at ``every`` = 10 and 100 on a fixed batch of 256 (the report after every
   point; ``track.png`` at ``close()``, timed apart, or not at all) and, at ``every`` = 100, on a batch of 64 (the
   training batch's size), and where a point's time goes (products, the rest of the eigen-solver, the gradient
   graph, the report, the rest), from a separate instrumented run.

Nothing here is a test; numbers depend on the machine and its load (recorded in the output).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
RUN = SAMPLES / "eos-run"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and training steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--train-steps", type=int, default=1000, help="steps of the sample training loop")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="output directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.train_steps = 1, 200
    return args


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# -- 1. warm against cold ---------------------------------------------------------------------------------

def _problem(dtype: str):
    from curvscope.io.runs import find_checkpoints
    from curvscope.workflows.track import run_problem

    checkpoints = find_checkpoints([RUN])
    problem = run_problem(checkpoints[0], checkpoints[0].load(), data=SAMPLES / "diabetes.safetensors",
                          batch_size=256, device="cpu", dtype=dtype)
    return problem, checkpoints


def warm_cold(repeats: int) -> list[dict[str, Any]]:
    from curvscope.workflows.track import TrackOptions, run_track

    rows = []
    for dtype, tol in (("float32", 1e-4), ("float64", 1e-4), ("float64", 1e-8)):
        problem, checkpoints = _problem(dtype)
        runs: dict[bool, Any] = {}
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(repeats):
            for warm in (True, False):
                started = time.perf_counter()
                runs[warm] = run_track(problem, TrackOptions(tol=tol, warm_start=warm), checkpoints=checkpoints)
                times[warm].append(time.perf_counter() - started)
        diff = max(abs(a.measured.lambda_max - b.measured.lambda_max) / abs(b.measured.lambda_max)
                   for a, b in zip(runs[True].points, runs[False].points, strict=True))
        rows.append({
            "dtype": dtype, "tol": tol, "points": len(checkpoints),
            "warm_products": [p.measured.products for p in runs[True].points],
            "cold_products": [p.measured.products for p in runs[False].points],
            "warm_seconds": statistics.median(times[True]), "cold_seconds": statistics.median(times[False]),
            "max_relative_difference": diff,
        })
    return rows


# -- 2. per point against PyHessian ----------------------------------------------------------------------

def _model_and_batch(state: dict[str, torch.Tensor]):
    from curvscope.io.spec import build_model

    entry = state
    model = build_model("curvscope.models:mlp", json.loads(entry["curvscope.model_kwargs"]), seed=0)
    model.load_state_dict(entry["model"])
    from safetensors.torch import load_file

    data = load_file(str(SAMPLES / "diabetes.safetensors"))
    return model.eval(), data["x"][:256], data["y"][:256]


def power_iteration(model, x, y, tol: float, max_iter: int = 1000, seed: int = 0) -> tuple[float, int]:
    """The top Hessian eigenvalue by power iteration on Hessian-vector products (double backward), stopping when
    the eigenvalue's relative change is below ``tol``: PyHessian's ``eigenvalues(top_n=1)`` method, written
    out here. Returns the eigenvalue and the products used."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = torch.nn.functional.mse_loss(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    norm = math.sqrt(sum(float((u * u).sum()) for u in v))
    v = [u / norm for u in v]
    value, products = None, 0
    for _ in range(max_iter):
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        products += 1
        new = sum(float((a * b).sum()) for a, b in zip(hv, v, strict=True))
        norm = math.sqrt(sum(float((u * u).sum()) for u in hv))
        v = [u.detach() / norm for u in hv]
        if value is not None and abs(new - value) / (abs(value) + 1e-6) < tol:
            return new, products
        value = new
    return value, products


def _pyhessian(model, x, y, tol: float) -> float:
    from pyhessian import hessian  # the bench extra

    engine = hessian(model, torch.nn.MSELoss(), data=(x, y), cuda=False)
    values, _ = engine.eigenvalues(maxIter=1000, tol=tol, top_n=1)
    return float(values[0])


def per_point(repeats: int, target: float = 1e-4) -> dict[str, Any]:
    from curvscope.curvature.sharpness import sharpness
    from curvscope.problem import make_problem

    states = [torch.load(c, weights_only=True) for c in sorted(RUN.glob("*.pt"), key=lambda p: int(p.stem[5:]))]
    try:
        import pyhessian  # noqa: F401
        peers = ["pyhessian", "power"]
        missing = None
    except ImportError:
        peers = ["power"]
        missing = "PyHessian is not importable here (pip install pyhessian, or the bench extra): skipped"
    ladders = {"curvscope": (1e-2, 1e-3, 1e-4, 1e-5, 1e-6), "pyhessian": (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7),
               "power": (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)}
    chosen: dict[str, float | None] = {}
    results: dict[str, Any] = {"target": target, "missing": missing}
    references = []
    for state in states:  # float64, to a residual of 1e-10
        model, x, y = _model_and_batch(state)
        references.append(sharpness(make_problem(model, x, y, loss="mse", device="cpu", dtype="float64"),
                                    tol=1e-10).lambda_max)
    for tool in ["curvscope", *peers]:
        chosen[tool] = None
        for tol in ladders[tool]:
            ok = True
            for state, reference in zip(states, references, strict=True):
                model, x, y = _model_and_batch(state)
                problem = make_problem(model, x, y, loss="mse", device="cpu", dtype="float32")
                value = _run(tool, model, x, y, problem, tol)[0]
                ok &= abs(value - reference) <= target * abs(reference)
            if ok:
                chosen[tool] = tol
                break
    tools = [t for t in ["curvscope", *peers] if chosen[t] is not None]
    results.update({t: {"reached": False} for t in ["curvscope", *peers] if chosen[t] is None})
    seconds: dict[str, list[float]] = {t: [] for t in [*tools, "curvscope-warm", "pyhessian-load", "curvscope-path",
                                                       "curvscope-path-plot"]}
    products: dict[str, list[int]] = {t: [] for t in [*tools, "curvscope-warm"]}
    files = sorted(RUN.glob("*.pt"), key=lambda p: int(p.stem[5:]))
    if chosen["curvscope"] is not None:
        from curvscope.workflows.track import TrackOptions, run_track

        problem, checkpoints = _problem("float32")
    loop_model, loop_x, loop_y = _model_and_batch(states[0])
    values: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        if chosen["curvscope"] is not None:
            _track_path(Path(tmp) / "warm", chosen["curvscope"], True)  # warm-up: matplotlib imported
        # interleaved (every tool on each checkpoint in turn, each repeat of every loop in turn), so that the
        # load of a shared machine falls on all of them alike
        for repeat in range(repeats):
            for state in states:
                model, x, y = _model_and_batch(state)
                problem_at = make_problem(model, x, y, loss="mse", device="cpu", dtype="float32")
                for tool in tools:
                    started = time.perf_counter()
                    _, count = _run(tool, model, x, y, problem_at, chosen[tool])
                    seconds[tool].append(time.perf_counter() - started)
                    products[tool].append(count)
            if chosen["curvscope"] is not None:  # what track spends per point: warm starts from the previous one
                run = run_track(problem, TrackOptions(tol=chosen["curvscope"]), checkpoints=checkpoints)
                seconds["curvscope-warm"] += [p.seconds for p in run.points]
                products["curvscope-warm"] += [p.measured.products for p in run.points]
                values = [p.measured.lambda_max for p in run.points]
            if chosen.get("pyhessian") is not None:  # a loop over the files, as a user writes it
                for path in files:
                    started = time.perf_counter()
                    loop_model.load_state_dict(torch.load(path, weights_only=True)["model"])
                    _pyhessian(loop_model, loop_x, loop_y, chosen["pyhessian"])
                    seconds["pyhessian-load"].append(time.perf_counter() - started)
            if chosen["curvscope"] is not None:
                for plot in (False, True):
                    total = _track_path(Path(tmp) / f"o{repeat}{plot}", chosen["curvscope"], plot)
                    seconds[f"curvscope-path{'-plot' if plot else ''}"].append(total / len(files))
    for tool in tools:
        results[tool] = {"reached": True, "tol": chosen[tool], "median_seconds_per_point": statistics.median(
            seconds[tool]), "median_products_per_point": statistics.median(products[tool])}
    if chosen["curvscope"] is not None:
        within = all(abs(v - r) <= target * abs(r) for v, r in zip(values, references, strict=True))
        warm = {"reached": within, "tol": chosen["curvscope"],
                "median_products_per_point": statistics.median(products["curvscope-warm"])}
        results["curvscope-warm"] = {**warm, "median_seconds_per_point": statistics.median(seconds["curvscope-warm"]),
                                     "note": "run_track's points (reading the checkpoint, loss, gradient norm and "
                                     "threshold included)"}
        for key in ("curvscope-path", "curvscope-path-plot"):
            results[key] = {**warm, "median_seconds_per_point": statistics.median(seconds[key])}
    if chosen.get("pyhessian") is not None:
        results["pyhessian-load"] = {"reached": True, "tol": chosen["pyhessian"], "median_products_per_point": -1,
                                     "median_seconds_per_point": statistics.median(seconds["pyhessian-load"])}
    return results


def _track_path(out: Path, tol: float, plot: bool) -> float:
    """``curvscope track``'s whole path in this process (no console): find and check the checkpoints, build the
    problem from the first, every point with the report after it, the final report (and ``track.png``)."""
    from curvscope.io.runs import find_checkpoints
    from curvscope.report.track_live import TrackWriter
    from curvscope.workflows.track import TrackOptions, run_problem, run_track

    started = time.perf_counter()
    checkpoints = find_checkpoints([RUN])
    first = checkpoints[0].load()
    problem = run_problem(checkpoints[0], first, data=SAMPLES / "diabetes.safetensors", batch_size=256,
                          device="cpu", dtype="float32")
    writer = TrackWriter(out, problem, plot=plot)

    def listener(run, upcoming) -> None:
        if upcoming is None:
            writer.finish(run)
        elif run.points:
            writer.update(run)

    run_track(problem, TrackOptions(tol=tol, plot=plot), checkpoints=checkpoints,
              loaded={checkpoints[0].path: first}, listener=listener)
    return time.perf_counter() - started


def _run(tool: str, model, x, y, problem, tol: float) -> tuple[float, int]:
    from curvscope.curvature.sharpness import sharpness

    if tool == "curvscope":
        r = sharpness(problem, tol=tol)
        return r.lambda_max, r.products
    if tool == "pyhessian":
        return _pyhessian(model, x, y, tol), -1
    return power_iteration(model, x, y, tol)


# -- 3. the monitor's overhead ---------------------------------------------------------------------------

def train_loop(steps: int, every: int | None, plot: bool, out: Path, batch: int = 256) -> dict[str, float]:
    """Seconds of the training loop's own work (``training``), inside ``monitor.step()`` (``monitor``: the points
    and their reports) and in ``monitor.close()`` (``close``: the final report and ``track.png``)."""
    from safetensors.torch import load_file

    import curvscope
    from curvscope.models import mlp

    data = load_file(str(SAMPLES / "digits.safetensors"))
    x, y = data["x"][:1437], data["y"][:1437]
    torch.manual_seed(0)
    model = mlp(64, [64, 64], 10, activation="tanh")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = curvscope.Monitor(model, (x[:batch], y[:batch]), optimizer=opt, every=every, out=out, plot=plot) \
        if every else None
    g = torch.Generator().manual_seed(1)
    watching = 0.0
    started = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if monitor is not None:
            before = time.perf_counter()
            monitor.step(step)
            watching += time.perf_counter() - before
    loop = time.perf_counter() - started
    times = {"training": loop - watching, "monitor": watching, "close": 0.0}
    if monitor is not None:
        started = time.perf_counter()
        monitor.close()
        times["close"] = time.perf_counter() - started
    return times


CONFIGS = ((None, False, 256), (10, False, 256), (100, False, 256), (100, True, 256), (100, False, 64))
"""(every, plot, monitor batch) of the overhead runs: no monitor; every 10 and 100 without the figure; every 100
with it; every 100 on a monitor batch the size of the training batch."""


def overhead(steps: int, repeats: int) -> list[dict[str, Any]]:
    """Each configuration ``repeats`` times, interleaved (the load of a shared machine falls on all alike). The
    overhead is measured within each run, the monitor's time over the loop's own (both under the same load), and
    also as wall time against the runs without a monitor."""
    runs: dict[tuple[int | None, bool, int], list[dict[str, float]]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        train_loop(50, 10, True, Path(tmp) / "warm")  # warm-up: every module imported, one figure drawn
        for i in range(repeats):
            for every, plot, batch in CONFIGS:
                out = Path(tmp) / f"m{every}{plot}{batch}{i}"
                runs[(every, plot, batch)].append(train_loop(steps, every, plot, out, batch))
    base = statistics.median(t["training"] for t in runs[CONFIGS[0]])
    rows = []
    for (every, plot, batch), times in runs.items():
        points = steps // every if every else 0
        training = statistics.median(t["training"] for t in times)
        monitor = statistics.median(t["monitor"] for t in times)
        close = statistics.median(t["close"] for t in times)
        rows.append({"every": every, "plot": plot, "batch": batch, "points": points, "training_seconds": training,
                     "monitor_seconds": monitor, "close_seconds": close, "seconds": training + monitor,
                     "overhead": statistics.median((t["monitor"] + t["close"]) / t["training"] for t in times),
                     "wall_overhead": (training + monitor + close) / base - 1,
                     "seconds_per_point": monitor / points if points else None,
                     "seconds_per_step": training / steps})
    return rows


def breakdown(steps: int) -> dict[str, float]:
    """Where a monitor point's time goes at ``every`` = 100 (seconds per point), from one run with each part
    timed by a wrapper (slightly slower than the timed runs): the curvature products, the rest of the eigen-solver
    (Lanczos steps, tridiagonal eigenproblems, reorthogonalization, the residual check's arithmetic), the gradient
    graph with the loss and gradient norm, the report, and the rest of the point (the optimizer state, the
    parameters, modes and RNG)."""
    import curvscope.curvature.sharpness as sharpness_module
    import curvscope.curvature.track as point_module
    from curvscope.curvature.matfree.operator import Operator
    from curvscope.monitor import Monitor

    spent: dict[str, float] = {}
    originals = []

    def wrap(owner: Any, name: str, label: str) -> None:
        function = getattr(owner, name)
        originals.append((owner, name, function))

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - started

        setattr(owner, name, timed)

    wrap(Operator, "matvec", "products")
    wrap(sharpness_module, "top_eigenpair", "eigen-solver")
    wrap(point_module, "hessian_with_gradient", "gradient graph, loss and gradient norm")
    wrap(Monitor, "_write", "report")
    wrap(Monitor, "measure", "point")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train_loop(steps, 100, False, Path(tmp) / "b")
    finally:
        for owner, name, function in reversed(originals):
            setattr(owner, name, function)
    points = steps // 100
    per = {k: v / points for k, v in spent.items()}
    parts = {"products": per["products"], "eigen-solver, besides the products": per["eigen-solver"] -
             per["products"], "gradient graph, loss and gradient norm": per["gradient graph, loss and gradient norm"],
             "report.json": per["report"]}
    parts["the rest of the point"] = per["point"] - sum(parts.values())  # measure() includes the report
    parts["total"] = per["point"]
    return parts


# -- output -----------------------------------------------------------------------------------------------

def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = ["# Curvature over training: warm starts, per-point time, the monitor's overhead", "",
             f"Command: `{results['command']}`  ",
             f"Machine: {m['nproc']} CPU cores; torch {m['torch']}; {m['threads']} thread(s); load average "
             f"{m['load_start']:.2f} at start, {m['load_end']:.2f} at end.", "",
             "## Warm against cold starts (sample_models/eos-run, 12 points, D = 1,441)", "",
             "| dtype | tol | products warm | products cold | ratio | seconds warm | seconds cold | max rel. diff |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["warm_cold"]:
        w, c = sum(r["warm_products"]), sum(r["cold_products"])
        lines.append(f"| {r['dtype']} | {r['tol']:g} | {w} | {c} | {w / c:.2f} | {r['warm_seconds']:.3f} | "
                     f"{r['cold_seconds']:.3f} | {r['max_relative_difference']:.1e} |")
    p = results["per_point"]
    lines += ["", f"## Per point at a relative accuracy of {p['target']:g} (same 12 checkpoints, float32)", ""]
    if p.get("missing"):
        lines.append(f"PyHessian: {p['missing']}.")
        lines.append("")
    lines += ["| tool | a point is | tolerance | seconds per point | products per point | against PyHessian |",
              "|---|---|---|---|---|---|"]
    rows = [("curvscope", "curvscope sharpness (Lanczos, cold)", "the eigen-solve", "pyhessian"),
            ("pyhessian", "PyHessian eigenvalues(top_n=1)", "the eigen-solve", "pyhessian"),
            ("power", "power iteration (PyHessian's method, written out)", "the eigen-solve", "pyhessian"),
            ("curvscope-warm", "curvscope run_track (warm start)", "reading the checkpoint, loss, gradient norm, "
             "threshold", "pyhessian-load"),
            ("pyhessian-load", "PyHessian in a loop over the files", "torch.load, load_state_dict, the eigen-solve",
             "pyhessian-load"),
            ("curvscope-path", "curvscope track's whole path, --no-plot", "the run's time / 12: finding, checking, "
             "the problem, the points, the reports", "pyhessian-load"),
            ("curvscope-path-plot", "curvscope track's whole path", "the same and track.png", "pyhessian-load")]
    for tool, name, what, against in rows:
        r = p.get(tool)
        if r is None:
            continue
        if not r["reached"]:
            lines.append(f"| {name} | {what} | not reached | - | - | - |")
            continue
        products = "-" if r["median_products_per_point"] < 0 else f"{r['median_products_per_point']:g}"
        other = p.get(against) or {}
        ratio = f"{r['median_seconds_per_point'] / other['median_seconds_per_point']:.2f}" \
            if other.get("reached") and other.get("median_seconds_per_point") else "-"
        lines.append(f"| {name} | {what} | {r['tol']:g} | {r['median_seconds_per_point']:.4f} | {products} | "
                     f"{ratio} |")
    lines += ["", "## The monitor's overhead (mlp 8,970 parameters, SGD, batches of 64)", "",
              "Seconds are medians over the runs; the overhead is the monitor's time (its points, and `close()`) "
              "over the training loop's own time, within each run; the wall overhead compares the whole run with "
              "the runs without a monitor.", "",
              "| every | monitor batch | track.png | points | training s | monitor s | close() s | wall overhead | "
              "overhead | seconds per point | in training steps |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["overhead"]:
        every = "no monitor" if r["every"] is None else str(r["every"])
        per = r.get("seconds_per_point")
        steps = "-" if per is None else f"{per / r['seconds_per_step']:.0f}"
        per = "-" if per is None else f"{per:.3f}"
        monitor = f"{r.get('monitor_seconds', 0.0):.2f}" if r["every"] else "-"
        close = f"{r.get('close_seconds', 0.0):.2f}" if r["every"] else "-"
        wall = f"{r['wall_overhead']:+.0%}" if r.get("wall_overhead") is not None else "-"
        batch = r.get("batch", 256) if r["every"] else "-"
        lines.append(f"| {every} | {batch} | {'at close()' if r['plot'] else 'no'} | {r.get('points', '-')} | "
                     f"{r.get('training_seconds', r['seconds']):.2f} | {monitor} | {close} | {wall} | "
                     f"{r['overhead']:+.0%} | {per} | {steps} |")
    parts = results.get("breakdown")
    if parts:
        total = parts["total"]
        lines += ["", "Where a point's time goes at every = 100 (an instrumented run):", "",
                  "| part | seconds per point | share |", "|---|---|---|"]
        lines += [f"| {name} | {value:.4f} | {value / total:.0%} |" for name, value in parts.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    results: dict[str, Any] = {"command": "python -m benchmarks.track" + (" --quick" if args.quick else ""),
                               "machine": {"nproc": os.cpu_count(), "torch": torch.__version__,
                                           "python": platform.python_version(), "threads": args.threads,
                                           "load_start": _load()}}
    print("warm against cold ...", flush=True)
    results["warm_cold"] = warm_cold(args.repeats)
    print("per point ...", flush=True)
    results["per_point"] = per_point(args.repeats)
    print("monitor overhead ...", flush=True)
    results["overhead"] = overhead(args.train_steps, args.repeats)
    results["breakdown"] = breakdown(args.train_steps)
    results["machine"]["load_end"] = _load()
    results["seconds"] = time.time() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "track.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (args.out / "track.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
