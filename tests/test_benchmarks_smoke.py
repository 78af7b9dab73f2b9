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
    # lambda_k = mean_n lambda_nk (CURVATURE.md section 4)
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
