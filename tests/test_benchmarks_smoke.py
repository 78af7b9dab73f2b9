"""Smoke test of the benchmark harness (``benchmarks/``): imports, one curvscope-only case at N = 8, the
fresh-process measurement, the table and the exponent fit. Parts that need the peers (ViViT/BackPACK,
curvlinops) are skipped where they are not installed (they come with the ``bench`` extra)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from benchmarks import run as bench_run
from benchmarks.cases import CASES, build_workload
from benchmarks.memory import measure
from benchmarks.peers import agreement, peer_missing, prepare

CPU = torch.device("cpu")


def test_curvscope_case_in_process():
    w = build_workload("mlp-digits", 8, CPU, torch.float64)
    assert w.batch_size == 8 and w.num_params == 8970
    out = prepare("curvscope", "dd", w)()
    ev = out.eigenvalues
    assert 0 < ev.numel() <= 8 * 9 and bool((ev[:-1] >= ev[1:]).all()) and bool((ev > 0).all())
    assert out.gamma.shape == (8, ev.numel()) and out.lambdas.shape == (8, ev.numel())
    # lambda_k = mean_n lambda_nk (docs/conventions.md §4)
    assert torch.allclose(out.lambdas.mean(0), ev, rtol=1e-8)


def test_every_case_builds_at_n4():
    for name in CASES:
        w = build_workload(name, 4, CPU, torch.float64)
        with torch.no_grad():
            assert w.model(w.x).shape == (4, 10)
            if w.peer_model is not None:
                torch.testing.assert_close(w.peer_model(w.peer_x), w.model(w.x))


def test_fresh_process_measurement():
    res = measure({"case": "cnn-digits", "n": 8, "tool": "curvscope", "task": "eig", "device": "cpu",
                   "dtype": "float64", "threads": 1, "warmup_n": 4}, timeout=300)
    assert res["ok"], res
    assert res["peak_bytes"] >= 0 and len(res["top10"]) == 10 and res["seconds"][0] > 0


def test_compare_curvscope_only(tmp_path):
    args = bench_run.parse_args(["--quick", "--repeats", "1", "--n", "8", "--out", str(tmp_path)])
    row = bench_run.compare(args, "transformer-digits", "eig", log=lambda _m: None)
    assert row["peer"] == "vivit" and "curvscope" in row and "vivit" not in row
    assert row["curvscope"]["median_s"] > 0 and row["notes"]
    results = {"command": "python -m benchmarks.run --quick", "started": "now", "machine":
               bench_run.machine_info(args), "config": vars(args), "rows": [row]}
    text = bench_run.markdown(results)
    assert "transformer-digits" in text and "cannot run" in text


def test_fit_exponent():
    pts = [{"x": x, "y": 3.0 * x**2} for x in (2, 4, 8, 16)]
    assert math.isclose(bench_run.fit_exponent(pts, "y"), 2.0)


@pytest.mark.skipif(peer_missing("vivit") is not None, reason="ViViT/BackPACK not installed (bench extra)")
def test_vivit_agrees_at_n8():
    w = build_workload("cnn-digits", 8, CPU, torch.float64)
    for task in ("eig", "dd"):
        assert agreement(prepare("curvscope", task, w)(), prepare("vivit", task, w)()) < 1e-8


@pytest.mark.skipif(importlib.util.find_spec("curvlinops") is None or peer_missing("curvlinops") is not None,
                    reason="curvlinops/scipy not installed (bench extra)")
def test_curvlinops_agrees_at_n8():
    w = build_workload("mlp-digits", 8, CPU, torch.float64)
    assert agreement(prepare("curvscope", "eig", w)(), prepare("curvlinops", "top10", w)()) < 1e-8


# -- the Hessian / matrix-free suite (benchmarks/hessian.py) ---------------------------------------------------


def test_hessian_suite_curvscope_only(tmp_path):
    """The suite end to end on a tiny case without the peers: reference, ladders, trace rows, both files."""
    from benchmarks import hessian as hb

    _args, cfg = hb.parse_args(["--quick", "--peers", "", "--no-both", "--out", str(tmp_path)])
    cfg.eig = [hb.EigCase("mlp-digits", 4, ("hessian",))]
    cfg.trace = [hb.TraceCase("mlp-digits", 4, (6,), 2)]
    cfg.targets = (1e-4,)
    cfg.ladders = {"curvscope": (1e-2, 1e-4)}
    cfg.exact_limit = 10_000
    res = hb.run(cfg, "python -m benchmarks.hessian --quick", log=lambda _m: None, out=tmp_path)
    (g,) = res["eig"]
    assert g["tools"] == ["curvscope"] and g["reference"]["converged"]
    row = g["rows"][0]
    assert row["curvscope"]["reached"] and row["curvscope"]["rel_err"] <= 1e-4
    (t,) = res["trace"]
    tr = t["rows"][0]
    assert tr["matvecs"]["hutchpp"] == [6] and tr["matvecs"]["hutchinson"] == [6]
    assert len(tr["estimates"]["hutchpp"]) == 2 and tr["rms_hutchpp"] >= 0
    text = (tmp_path / "hessian.md").read_text()
    assert "Trace error" in text and "mlp-digits" in text and (tmp_path / "hessian.json").exists()


def test_ggn_trace_identity_for_piecewise_linear_models():
    """The 3c3d reference: tr(H) = tr(G) for a ReLU/max-pool network (exact Hessian trace, tiny CNN), and the
    per-sample tr(G) matches curvscope's GGN operator."""
    from benchmarks import hessian as hb
    from curvscope.curvature.matfree import exact_trace, ggn_operator, hessian_operator
    from curvscope.problem import make_problem

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2, padding=1),
                                torch.nn.Flatten(), torch.nn.Linear(3 * 3 * 3, 6), torch.nn.ReLU(),
                                torch.nn.Linear(6, 4)).double()
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (5,))
    problem = make_problem(model, x, y, loss="ce", dtype=torch.float64, device="cpu")
    h, g = hessian_operator(problem), ggn_operator(problem)
    tr_h = exact_trace(h.matvec, h.dim).trace
    tr_g = exact_trace(g.matvec, g.dim).trace
    ref = hb.ggn_trace(model, x, y)
    assert math.isclose(ref, tr_g, rel_tol=1e-10) and math.isclose(tr_h, ref, rel_tol=1e-10)
    assert hb.diag_check(problem, 4)["max_rel_diff"] < 1e-10


@pytest.mark.skipif(peer_missing("curvlinops") is not None, reason="curvlinops/scipy not installed (bench extra)")
def test_hessian_suite_curvlinops_agrees():
    from benchmarks import hessian as hb

    w = build_workload("mlp-digits", 8, CPU, torch.float64)
    problem = hb._problem(w)
    ref = hb.eig_curvscope(problem, "hessian", 1e-10)[0].value
    assert hb.rel_err(hb.eig_curvlinops(w, "hessian", 1e-10).value, ref) < 1e-8
    assert hb.curvlinops_operator_check(w, problem, "ggn")["rel_diff"] < 1e-10


@pytest.mark.skipif(importlib.util.find_spec("pyhessian") is None,
                    reason="PyHessian not installed (bench extra)")
def test_hessian_suite_pyhessian_runs():
    """PyHessian in float64 through the harness: its power iteration and its Hutchinson trace (counted)."""
    from benchmarks import hessian as hb

    w = build_workload("mlp-digits", 8, CPU, torch.float64)
    ref = hb.eig_curvscope(hb._problem(w), "hessian", 1e-10)[0].value
    stock = hb.eig_pyhessian(w, 1e-9)
    patched = hb.eig_pyhessian(w, 1e-9, noeps=True)
    # the +1e-6 in PyHessian's normalization: a relative floor of 2e-6, gone with the patch
    assert 1e-6 < hb.rel_err(stock.value, ref) < 1e-5 and hb.rel_err(patched.value, ref) < 1e-7
    assert stock.matvecs > 0 and torch.get_default_dtype() == torch.float32


@pytest.mark.skipif(importlib.util.find_spec("pyhessian") is None, reason="PyHessian not installed (bench extra)")
def test_pyhessian_trace_is_curvscope_hutchinson_with_the_same_seed():
    """Why the suite offsets PyHessian's seeds: with the same seed both draw the same Rademacher vectors."""
    import copy

    from pyhessian import hessian as PyHessian

    from benchmarks import hessian as hb
    from curvscope.curvature.matfree import hessian_operator, hutchinson

    w = build_workload("mlp-digits", 8, CPU, torch.float64)
    op = hessian_operator(hb._problem(w))
    ours = hutchinson(op.matvec, op.dim, 5, generator=torch.Generator().manual_seed(3)).trace
    with hb.default_dtype(torch.float64):
        ph = PyHessian(copy.deepcopy(w.model), torch.nn.CrossEntropyLoss(), data=(w.x, w.y), cuda=False)
        torch.manual_seed(3)
        samples = ph.trace(maxIter=5, tol=-math.inf)
    assert len(samples) == 5 and math.isclose(sum(samples) / 5, ours, rel_tol=1e-10)
