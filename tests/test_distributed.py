"""The spectrum over torch.distributed (2 CPU processes, gloo on 127.0.0.1) against the single-process run.

The workers are this file run as a script (``python tests/test_distributed.py worker RANK WORLD PORT OUT``): they
join one gloo group, compute every case of :data:`CASES` with ``process_group=`` and save what they got; the
test computes the same cases in one process and compares (float64: eigenvalues to 1e-10 relative). One worker
run covers all engine cases (process start-up dominates on 2 cores); the CLI runs under torchrun.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import cases
import pytest
import torch

import curvscope
from curvscope.curvature.distributed import _fill, _specs, _strip
from curvscope.curvature.gram import compute_gram
from curvscope.curvature.gram.newton import newton_step
from curvscope.curvature.gram.spectrum import compute_spectrum, eigenvectors
from curvscope.curvature.matfree import compute_matfree_spectrum

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
WORLD = 2
TIMEOUT_S = 120  # a hang fails the test instead of blocking CI


# -- the problems (cases.CASES): every rank builds the same one ----------------------------------------------

def _mlp_problem(n: int = 7, loss: str = "ce") -> curvscope.Problem:
    """7 samples: the ranks' slices differ in size."""
    return cases.CASES[f"mlp-tanh-{loss}"](n=n, data_seed=1)


def _cnn_problem() -> curvscope.Problem:
    """Conv (ghost rule) + BatchNorm in eval mode (generic path) + Linear."""
    return cases.CASES["cnn-bn-eval-ce"](data_seed=2)


def _transformer_problem() -> curvscope.Problem:
    return cases.CASES["transformer-ce"](n=5, data_seed=3)


def _vocabulary_problem() -> curvscope.Problem:
    """An embedding of 500 tokens under a Linear, pooled over 5 tokens: the embedding's ghost rule (token ids and
    their masks travel between the ranks with the deltas)."""
    from torch import nn

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(500, 4, padding_idx=0)
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.embed(x)).mean(1))

    torch.manual_seed(0)
    x = torch.randint(0, 500, (8, 5), generator=torch.Generator().manual_seed(1))
    x[2, :2] = 0
    return curvscope.make_problem(Tokens(), x, torch.arange(8) % 3, loss="ce", dtype=torch.float64)


def _fragile_problem(rank: int) -> curvscope.Problem:
    """Rank 1's forward fails on batches of more than 2 samples."""
    return cases.CASES["fragile"](broken=rank == 1)


CASES: dict[str, tuple[Any, dict[str, Any]]] = {
    "mlp-all": (_mlp_problem, {"groups": "all"}),
    "mlp-layer": (_mlp_problem, {"groups": "layer", "include_total": True}),
    "mlp-layer-generic": (_mlp_problem, {"groups": "layer", "include_total": True, "ghost": False}),
    "mlp-mc-subsample": (_mlp_problem, {"groups": "layer", "include_total": True, "mc_samples": 2,
                                        "subsample": 5, "seed": 3}),
    "mlp-mse-mc": (lambda: _mlp_problem(loss="mse"), {"groups": "all", "mc_samples": 3, "seed": 1}),
    "cnn-bn-layer": (_cnn_problem, {"groups": "layer", "include_total": True}),
    "transformer-all": (_transformer_problem, {"groups": "all", "top_k": 6}),
    "embedding-layer": (_vocabulary_problem, {"groups": "layer", "include_total": True}),
    # a tiny budget: several blocks per rank, stripes, factors recomputed
    "mlp-tiny-budget": (_mlp_problem, {"groups": "layer", "include_total": True, "max_memory": 3000}),
}


MATFREE_CASES: dict[str, tuple[Any, dict[str, Any]]] = {
    # both ends of the Hessian per layer, the exact trace (products >= D), the density, the top eigenvectors
    "hessian-layer": (_mlp_problem, {"curvature": "hessian", "groups": "layer", "top_k": 3, "trace_matvecs": 500,
                                     "density_vectors": 2, "density_steps": 12, "eigenvectors": True}),
    # the GGN of a transformer with a Hutch++ trace estimate (random vectors: the same seed on every rank)
    "ggn-transformer": (_transformer_problem, {"curvature": "ggn", "top_k": 2, "trace_matvecs": 30,
                                               "density_vectors": 0, "seed": 5}),
}


def _matfree_summary(res) -> dict[str, Any]:
    out: dict[str, Any] = {"loss_value": res.loss_value, "groups": [], "eigenvectors": res.eigenvectors}
    for g in res.groups:
        out["groups"].append({"name": g.name, "top": g.top.cpu(), "bottom": None if g.bottom is None else
                              g.bottom.cpu(), "trace": g.trace, "steps": g.steps, "converged": g.converged,
                              "density": None if g.density is None else g.density.values.cpu()})
    return out


def _summary(res) -> dict[str, Any]:
    out: dict[str, Any] = {"loss_value": res.loss_value, "gradient_norm": res.gradient_norm,
                           "num_columns": res.num_columns, "groups": []}
    for g in res.groups:
        entry = {"name": g.name, "eigenvalues": g.eigenvalues.cpu(), "rank": g.rank, "trace": g.trace,
                 "top_k": g.top_k, "gradient_norm": g.gradient_norm}
        if g.directions is not None:
            d = g.directions
            entry.update(gamma=d.gamma.cpu(), lambdas=d.lambdas.cpu(), gamma_snr=d.gamma_snr.cpu(),
                         lambda_snr=d.lambda_snr.cpu(), gradient_overlap=d.gradient_overlap.cpu(),
                         flat_overlap=d.flat_overlap)
        out["groups"].append(entry)
    return out


# -- the worker ------------------------------------------------------------------------------------------------

def _worker(rank: int, world: int, port: int, out_dir: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    pg = dist.group.WORLD
    results: dict[str, Any] = {}
    for name, (make, kwargs) in CASES.items():
        results[name] = _summary(compute_spectrum(make(), process_group=pg, **kwargs))

    problem = _mlp_problem()
    # the Python API: a model and the full batch on every rank
    results["api"] = _summary(curvscope.spectrum(problem.model, problem.inputs, problem.targets, loss="ce",
                                                 dtype=torch.float64, groups="layer", include_total=True,
                                                 process_group=pg))
    grams, _, _ = compute_gram(problem, [("all", tuple(problem.params))], with_gradients=True, process_group=pg)
    results["gram"] = {"vv": grams[0].vv, "vg": grams[0].vg, "gg": grams[0].gg}

    res = compute_spectrum(problem, groups="layer", include_total=True, top_k=3, process_group=pg)
    step = newton_step(problem, res, "bootstrap", process_group=pg)
    vecs = eigenvectors(problem, res, group=0, process_group=pg)
    results["newton"] = {"step": step.step, "predicted": step.predicted_decrease,
                         "realized": step.realized_decrease, "loss_before": step.loss_before,
                         "eigenvectors": vecs}

    for name, (make, kwargs) in MATFREE_CASES.items():
        results[name] = _matfree_summary(compute_matfree_spectrum(make(), process_group=pg, **kwargs))

    errors = {}
    for name, make, run in (
            ("fragile", lambda: _fragile_problem(rank), compute_spectrum),
            ("mismatch", lambda: _mlp_problem(n=7 if rank == 0 else 6), compute_spectrum),
            ("fragile-matfree", lambda: _fragile_problem(rank), compute_matfree_spectrum)):
        try:
            run(make(), process_group=pg)
            errors[name] = None
        except Exception as exc:  # noqa: BLE001  (the type and message are what the test checks)
            errors[name] = (type(exc).__name__, str(exc))
    results["errors"] = errors
    # the group still works after an agreed failure
    results["after-errors"] = _summary(compute_spectrum(_mlp_problem(), process_group=pg, directional=False))
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as the CLI does: no interpreter shutdown, where gloo's threads sometimes abort the process


# -- the tests -------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    return env


GLOO_ABORT = "terminate called without an active exception"
"""gloo's rare abort in the interpreter's shutdown (std::terminate in a gloo thread, about 1 torchrun run in 40
on 2 cores under load). The CLI's ranks and these workers now leave with ``os._exit`` once their process group is
destroyed (no abort in 149 runs under the same load); should it still happen, the run is run once more, and any other
failure fails at once."""


def _gloo_aborted(returncode: int, stderr: str) -> bool:
    return returncode != 0 and GLOO_ABORT in (stderr or "")


def _run(args: list[str], cwd: Path = ROOT, attempts: int = 2) -> subprocess.CompletedProcess:
    """Run ``args`` with a timeout: a hang fails the test."""
    for attempt in range(attempts):
        try:
            run = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"timed out after {TIMEOUT_S} s (a hang): {' '.join(args)}\n{exc.stderr}")
        if not _gloo_aborted(run.returncode, run.stderr) or attempt == attempts - 1:
            return run
    return run


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory) -> list[dict[str, Any]]:
    for _attempt in range(2):
        results, aborted = _workers(tmp_path_factory.mktemp("dist"))
        if not aborted:
            return results
    pytest.fail(f"the distributed workers died twice with gloo's teardown abort ({GLOO_ABORT!r})")


def _workers(out: Path) -> tuple[list[dict[str, Any]], bool]:
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(Path(__file__)), "worker", str(r), str(WORLD), str(port), str(out)],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(WORLD)]
    try:
        logs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the distributed workers did not finish in {TIMEOUT_S} s (a hang)")
    if any(_gloo_aborted(p.returncode, stderr) for p, (_, stderr) in zip(procs, logs, strict=True)):
        return [], True
    for p, (stdout, stderr) in zip(procs, logs, strict=True):
        assert p.returncode == 0, stderr[-4000:]
        assert stdout == "", stdout  # the engine prints nothing
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], False


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10, atol: float = 0.0) -> None:
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=rtol, atol=atol, equal_nan=True)


def _compare(got: dict[str, Any], ref: dict[str, Any]) -> None:
    assert got["num_columns"] == ref["num_columns"]
    assert got["loss_value"] == pytest.approx(ref["loss_value"], rel=1e-12)
    assert got["gradient_norm"] == pytest.approx(ref["gradient_norm"], rel=1e-10)
    assert [g["name"] for g in got["groups"]] == [g["name"] for g in ref["groups"]]
    for g, r in zip(got["groups"], ref["groups"], strict=True):
        assert g["rank"] == r["rank"] and g["top_k"] == r["top_k"], g["name"]
        lam_max = float(r["eigenvalues"][0]) if r["rank"] else 0.0
        _close(g["eigenvalues"], r["eigenvalues"], atol=1e-12 * lam_max)
        assert g["trace"] == pytest.approx(r["trace"], rel=1e-10)
        assert g["gradient_norm"] == pytest.approx(r["gradient_norm"], rel=1e-10)
        if "gamma" in r:
            # gamma's sign follows the eigenvector's orientation: compare |gamma| (docs/conventions.md §4)
            _close(g["gamma"].abs(), r["gamma"].abs(), rtol=1e-7, atol=1e-10)
            _close(g["lambdas"], r["lambdas"], rtol=1e-7, atol=1e-10 * lam_max)
            _close(g["gamma_snr"], r["gamma_snr"], rtol=1e-6, atol=1e-10)
            _close(g["lambda_snr"], r["lambda_snr"], rtol=1e-6, atol=1e-10)
            _close(g["gradient_overlap"], r["gradient_overlap"], rtol=1e-7, atol=1e-12)
            assert g["flat_overlap"] == pytest.approx(r["flat_overlap"], abs=1e-9)


@pytest.mark.parametrize("case", list(CASES))
def test_spectrum_matches_single_process(worker_results, case):
    make, kwargs = CASES[case]
    ref = _summary(compute_spectrum(make(), **kwargs))
    for rank, results in enumerate(worker_results):  # every rank returns the same result
        try:
            _compare(results[case], ref)
        except AssertionError as exc:
            raise AssertionError(f"rank {rank}: {exc}") from exc


@pytest.mark.parametrize("case", list(MATFREE_CASES))
def test_matrix_free_spectrum_matches_single_process(worker_results, case):
    """Lanczos, Hutch++ and SLQ with every product split over the ranks' samples: the same iterations and numbers
    as in one process (up to the rounding of the sum)."""
    make, kwargs = MATFREE_CASES[case]
    ref = _matfree_summary(compute_matfree_spectrum(make(), **kwargs))
    for rank, got in enumerate(r[case] for r in worker_results):
        assert got["loss_value"] == pytest.approx(ref["loss_value"], rel=1e-12), rank
        for g, r in zip(got["groups"], ref["groups"], strict=True):
            assert (g["name"], g["steps"], g["converged"]) == (r["name"], r["steps"], r["converged"]), rank
            scale = float(r["top"].abs().max())
            _close(g["top"], r["top"], rtol=1e-9, atol=1e-12 * scale)
            if r["bottom"] is not None:
                _close(g["bottom"], r["bottom"], rtol=1e-9, atol=1e-12 * scale)
            assert g["trace"] == pytest.approx(r["trace"], rel=1e-9, abs=1e-12 * scale), rank
            if r["density"] is not None:
                _close(g["density"], r["density"], rtol=1e-7, atol=1e-9 * float(r["density"].max()))
        if ref["eigenvectors"] is not None:
            for n, v in ref["eigenvectors"].items():  # unit Ritz vectors, up to their signs
                w = got["eigenvectors"][n]
                sign = torch.sign((w * v).flatten(1).sum(1)).reshape(-1, *([1] * (v.dim() - 1)))
                _close(w * torch.where(sign == 0, 1.0, sign), v, rtol=1e-6, atol=1e-9)
    assert all(torch.equal(worker_results[0][case]["groups"][0]["top"], r[case]["groups"][0]["top"])
               for r in worker_results)  # every rank, bit for bit


def test_python_api(worker_results):
    problem = _mlp_problem()
    ref = _summary(curvscope.spectrum(problem.model, problem.inputs, problem.targets, loss="ce", dtype=torch.float64,
                                      groups="layer", include_total=True))
    for results in worker_results:
        _compare(results["api"], ref)


def test_gram_blocks_match(worker_results):
    problem = _mlp_problem()
    grams, _, _ = compute_gram(problem, [("all", tuple(problem.params))], with_gradients=True)
    for results in worker_results:
        for key in ("vv", "vg", "gg"):
            ref = getattr(grams[0], key)
            _close(results["gram"][key], ref, rtol=0, atol=1e-13 * float(ref.abs().max()))


def test_newton_step_and_eigenvectors_match(worker_results):
    problem = _mlp_problem()
    res = compute_spectrum(problem, groups="layer", include_total=True, top_k=3)
    step = newton_step(problem, res, "bootstrap")
    vecs = eigenvectors(problem, res, group=0)
    for results in worker_results:
        got = results["newton"]
        assert got["predicted"] == pytest.approx(step.predicted_decrease, rel=1e-8)
        assert got["realized"] == pytest.approx(step.realized_decrease, rel=1e-6, abs=1e-14)
        assert got["loss_before"] == pytest.approx(step.loss_before, rel=1e-12)
        for n in problem.params:
            _close(got["step"][n], step.step[n], rtol=1e-7, atol=1e-12)
            # eigenvector k up to its sign
            sign = torch.sign((got["eigenvectors"][n] * vecs[n]).flatten(1).sum(1))
            sign = sign.reshape(-1, *([1] * (vecs[n].dim() - 1)))
            _close(got["eigenvectors"][n] * torch.where(sign == 0, 1.0, sign), vecs[n], rtol=1e-7, atol=1e-10)


def test_error_on_one_rank_ends_all_ranks_with_one_message(worker_results):
    """Rank 1's forward fails: both ranks raise rank 1's CurvscopeError (no hang: the workers finished within
    the timeout), and the group keeps working afterwards."""
    for case in ("fragile", "fragile-matfree"):
        fragile = [r["errors"][case] for r in worker_results]
        assert fragile[1] == ("CurvscopeError", "bad input on this rank: sample 3 cannot be read"), case
        assert fragile[0] == ("CurvscopeError", "rank 1: bad input on this rank: sample 3 cannot be read"), case
    mismatch = [r["errors"]["mismatch"] for r in worker_results]
    assert mismatch[0] == mismatch[1] and mismatch[0][0] == "CurvscopeError"
    assert "rank 1's problem differs from rank 0's (6 samples" in mismatch[0][1]
    ref = _summary(compute_spectrum(_mlp_problem(), directional=False))
    for r in worker_results:
        _compare(r["after-errors"], ref)


def test_broadcast_trees_carry_dataclasses():
    """What a broadcast sends (a skeleton and its tensors in order) rebuilds the tree, dataclasses included."""
    problem = _mlp_problem()
    res = compute_spectrum(problem, groups="layer", include_total=True, top_k=2)
    tree = {"groups": res.groups, "pair": (1, torch.ones(2)), "none": None}
    tensors: list[torch.Tensor] = []
    skeleton = _strip(tree, tensors)
    assert [tuple(t.shape) for t in tensors] == [s.shape for s in _specs(skeleton)]
    rebuilt = _fill(skeleton, iter(t.clone() for t in tensors))
    assert rebuilt["none"] is None and rebuilt["pair"][0] == 1 and isinstance(rebuilt["pair"], tuple)
    for got, ref in zip(rebuilt["groups"], res.groups, strict=True):
        assert type(got) is type(ref) and got.param_names == ref.param_names and got.rank == ref.rank
        assert torch.equal(got.eigenvalues, ref.eigenvalues)
        assert torch.equal(got.directions.gamma, ref.directions.gamma)


def _torchrun(port: int, *args: Any) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-addr",
            "127.0.0.1", "--master-port", str(port), "-m", "curvscope", *[str(a) for a in args]]


@pytest.mark.parametrize("extra", [[], ["--dtype", "float64", "--groups", "layer"]], ids=["float32", "float64-layer"])
def test_cli_under_torchrun_matches_single_process(tmp_path, extra):
    common = ["spectrum", SAMPLES / "mlp-digits.safetensors", "--data", SAMPLES / "digits.safetensors",
              "--batch-size", 32, "--no-plots", *extra]
    dist_out, single_out = tmp_path / "dist", tmp_path / "single"
    run = _run(_torchrun(_free_port(), *common, "--out", dist_out))
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("GGN spectrum") == 1, run.stdout  # only rank 0 prints the summary
    assert "report.json" in run.stdout
    single = _run([sys.executable, "-m", "curvscope", *[str(a) for a in common], "--out", str(single_out)])
    assert single.returncode == 0, single.stderr
    got = json.loads((dist_out / "report.json").read_text())
    ref = json.loads((single_out / "report.json").read_text())
    assert got["problem"] == ref["problem"]
    assert sorted(p.name for p in dist_out.iterdir()) == sorted(p.name for p in single_out.iterdir())
    assert [g["name"] for g in got["groups"]] == [g["name"] for g in ref["groups"]]
    float64 = "float64" in extra
    for g, r in zip(got["groups"], ref["groups"], strict=True):
        assert g["rank"] == r["rank"]
        ev, ev_ref = torch.tensor(g["eigenvalues"]), torch.tensor(r["eigenvalues"])
        if float64:
            _close(ev, ev_ref, atol=1e-12 * float(ev_ref[0]))
        else:  # the Gram is built in float32 (accumulated in float64): rounding of float32 products
            _close(ev, ev_ref, rtol=1e-5, atol=1e-6 * float(ev_ref[0]))
        assert g["trace"] == pytest.approx(r["trace"], rel=1e-10 if float64 else 1e-6)
        # directions of the top, well separated eigenvalues (those of nearly equal small eigenvalues are
        # ill-conditioned: rounding of the Gram rotates them)
        for key in ("gamma_snr", "lambda_snr"):
            _close(torch.tensor(g["directions"][key][:20]), torch.tensor(r["directions"][key][:20]),
                   rtol=1e-6 if float64 else 1e-3, atol=1e-10)


def test_cli_hessian_under_torchrun_matches_single_process(tmp_path):
    """``spectrum --curvature hessian`` (Lanczos at both ends, Hutch++, SLQ, the GGN beside it) under torchrun
    writes the same report numbers as one process."""
    common = ["spectrum", SAMPLES / "mlp-digits.safetensors", "--data", SAMPLES / "digits.safetensors",
              "--batch-size", 16, "--dtype", "float64", "--curvature", "hessian", "--top-k", 3, "--no-plots"]
    dist_out, single_out = tmp_path / "dist", tmp_path / "single"
    run = _run(_torchrun(_free_port(), *common, "--out", dist_out))
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("Hessian spectrum") == 1, run.stdout
    single = _run([sys.executable, "-m", "curvscope", *[str(a) for a in common], "--out", str(single_out)])
    assert single.returncode == 0, single.stderr
    got = json.loads((dist_out / "report.json").read_text())
    ref = json.loads((single_out / "report.json").read_text())
    assert got["loss_value"] == pytest.approx(ref["loss_value"], rel=1e-12)
    assert got["gradient_norm"] == pytest.approx(ref["gradient_norm"], rel=1e-10)
    g, r = got["groups"][0], ref["groups"][0]
    scale = abs(r["eigenvalues"][0])
    for key in ("eigenvalues", "eigenvalues_bottom"):
        _close(torch.tensor(g[key]), torch.tensor(r[key]), rtol=1e-8, atol=1e-10 * scale)
    assert g["trace"] == pytest.approx(r["trace"], rel=1e-8)
    _close(torch.tensor(g["density"]["values"]), torch.tensor(r["density"]["values"]), rtol=1e-6,
           atol=1e-8 * max(r["density"]["values"]))
    assert got["comparison"]["ggn_lambda_max"] == pytest.approx(ref["comparison"]["ggn_lambda_max"], rel=1e-8)


def test_cli_bad_input_under_torchrun_one_message(tmp_path):
    run = _run(_torchrun(_free_port(), "spectrum", SAMPLES / "mlp-digits.safetensors", "--data",
                         SAMPLES / "digits.safetensors", "--batch-size", 8, "--subsample", 9, "--out", tmp_path))
    assert run.returncode != 0
    assert run.stderr.count("error: --subsample 9 is larger than the batch (8 samples)") == 1, run.stderr[-4000:]
    assert run.stdout == ""
    assert not (tmp_path / "report.json").exists()


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
