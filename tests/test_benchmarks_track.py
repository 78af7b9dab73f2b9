"""Smoke test of benchmarks/track.py: its power-iteration baseline against the dense Hessian, and the table."""

from __future__ import annotations

import torch

from benchmarks import track as bench


def test_power_iteration_baseline_finds_the_top_eigenvalue():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    value, products = bench.power_iteration(model, x, y, tol=1e-12, max_iter=5000)
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss(theta):
        out, offset = {}, 0
        for (name, p) in model.named_parameters():
            out[name] = theta[offset:offset + p.numel()].reshape(p.shape)
            offset += p.numel()
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, out, (x,)), y)

    H = torch.autograd.functional.hessian(loss, flat)
    eig = torch.linalg.eigvalsh(H)
    dominant = eig[eig.abs().argmax()]  # power iteration finds the largest |eigenvalue|
    assert abs(value - float(dominant)) < 1e-6 * abs(float(dominant)) and products > 1


def test_markdown_of_a_result():
    results = {"command": "python -m benchmarks.track --quick",
               "machine": {"nproc": 2, "torch": "x", "threads": 1, "load_start": 1.0, "load_end": 2.0},
               "warm_cold": [{"dtype": "float32", "tol": 1e-4, "points": 2, "warm_products": [5, 3],
                              "cold_products": [5, 5], "warm_seconds": 0.1, "cold_seconds": 0.2,
                              "max_relative_difference": 1e-7}],
               "per_point": {"target": 1e-4, "missing": "PyHessian is not importable here",
                             "curvscope": {"reached": True, "tol": 1e-3, "median_seconds_per_point": 0.01,
                                           "median_products_per_point": 8},
                             "power": {"reached": False}},
               "overhead": [{"every": None, "plot": False, "seconds": 1.0, "overhead": 0.0, "points": 0,
                             "seconds_per_point": None, "seconds_per_step": 0.001},
                            {"every": 100, "plot": False, "seconds": 1.1, "overhead": 0.1, "points": 10,
                             "seconds_per_point": 0.01, "seconds_per_step": 0.001}]}
    text = bench.markdown(results)
    assert "| float32 | 0.0001 | 8 | 10 | 0.80 |" in text and "not importable" in text
    assert "| +10% | 0.010 | 10 |" in text
