"""``spectrum --curvature hessian`` / ``--method lanczos`` / ``--landscape`` through the CLI and the report,
against dense references (the Hessian by ``torch.autograd.functional.hessian``, the GGN by Gram)."""

from __future__ import annotations

import json

import torch
from conftest import invoke

from curvscope.io.load import load_problem


def _dense_hessian(ckpt, data) -> torch.Tensor:
    problem = load_problem(ckpt, data, dtype="float64")
    names = list(problem.params)
    shapes = [problem.params[n].shape for n in names]
    sizes = [p.numel() for p in problem.params.values()]
    flat = torch.cat([p.reshape(-1) for p in problem.params.values()])

    def loss(theta):
        parts = dict(zip(names, [t.reshape(s) for t, s in zip(theta.split(sizes), shapes, strict=True)],
                         strict=True))
        return problem.loss_value(parts)

    return torch.autograd.functional.hessian(loss, flat)


def test_hessian_report_matches_the_dense_hessian(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    out = tmp_path / "out"
    result = invoke("spectrum", ckpt, "--data", data, "--dtype", "float64", "--curvature", "hessian",
                    "--top-k", "3", "--trace-samples", "200", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "Hessian spectrum" in result.stdout and "GGN vs Hessian" in result.stdout
    report = json.loads((out / "report.json").read_text())
    g = report["groups"][0]
    assert (report["curvature"], report["method"], g["curvature"], g["method"]) == ("hessian", "lanczos") * 2
    dense = torch.linalg.eigvalsh(_dense_hessian(ckpt, data))
    top = torch.tensor(g["eigenvalues"], dtype=torch.float64)
    bottom = torch.tensor(g["eigenvalues_bottom"], dtype=torch.float64)
    assert torch.allclose(top, dense.flip(0)[:3], rtol=1e-6, atol=1e-9), (top, dense[-3:])
    assert torch.allclose(bottom, dense[:3], rtol=1e-6, atol=1e-9), (bottom, dense[:3])
    assert g["converged"] and max(g["residuals"]) <= 1e-6 * abs(dense).max()
    # 200 products >= D = 38 parameters: the trace is exact, with no standard error
    assert abs(g["trace"] - float(dense.sum())) < 1e-9 and g["trace_stderr"] is None
    grid = torch.tensor(g["density"]["grid"], dtype=torch.float64)
    values = torch.tensor(g["density"]["values"], dtype=torch.float64)
    assert abs(float(torch.trapezoid(values, grid)) - 1.0) < 1e-2
    # the share of eigenvalues clearly below zero (under -sigma), from 4 SLQ vectors of 38 parameters
    clearly = float((dense < -g["density"]["sigma"]).to(torch.float64).mean())
    assert 0 <= g["negative_mass"] <= 1 and abs(g["negative_mass"] - clearly) < 0.15
    assert report["comparison"]["negative_mass"] == g["negative_mass"]
    assert g["matvecs"] > 0 and (out / "spectrum.png").is_file()
    comparison = report["comparison"]
    assert comparison["ggn_method"] == "gram" and comparison["hessian_lambda_max"] == g["lambda_max"]
    # check rules read the new fields
    rules = ["-r", f"groups[0].eigenvalues_bottom[0] <= {float(dense[0]) + 1e-6}", "-r", "comparison.trace_ratio > 0",
             "-r", "groups[0].residuals[*] < 1e-6"]
    assert invoke("check", out / "report.json", *rules).exit_code == 0


def test_ggn_by_lanczos_equals_ggn_by_gram(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    gram, lanczos = tmp_path / "gram", tmp_path / "lanczos"
    common = ("--data", data, "--dtype", "float64", "--no-plots", "--groups", "layer")
    assert invoke("spectrum", ckpt, *common, "-o", gram).exit_code == 0
    result = invoke("spectrum", ckpt, *common, "--method", "lanczos", "--top-k", "3", "-o", lanczos)
    assert result.exit_code == 0, result.stderr
    a = json.loads((gram / "report.json").read_text())
    b = json.loads((lanczos / "report.json").read_text())
    assert b["method"] == "lanczos" and b["groups"][0]["eigenvalues_bottom"] is None
    assert [g["name"] for g in a["groups"]] == [g["name"] for g in b["groups"]]
    for ga, gb in zip(a["groups"], b["groups"], strict=True):
        k = min(3, ga["rank"])
        assert torch.allclose(torch.tensor(gb["eigenvalues"][:k], dtype=torch.float64),
                              torch.tensor(ga["eigenvalues"][:k], dtype=torch.float64), rtol=1e-6)


def test_landscape_in_the_report_and_plot(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    out = tmp_path / "out"
    result = invoke("spectrum", ckpt, "--data", data, "--dtype", "float64", "--landscape", "-o", out)
    assert result.exit_code == 0, result.stderr
    land = json.loads((out / "report.json").read_text())["landscape"]
    assert (out / "landscape.png").is_file()
    t = torch.tensor(land["t"])
    mid = len(t) // 2
    assert abs(float(t[mid])) < 1e-12 and abs(land["loss_1d"][mid] - land["loss0"]) < 1e-12
    assert len(land["loss_2d"]) == len(land["grid_s"])


def test_option_conflicts_exit_2(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    for args, needle in ((("--curvature", "hessian", "--method", "gram"), "--method"),
                         (("--curvature", "hessian", "--newton-step", tmp_path / "s.safetensors"), "--newton-step"),
                         (("--method", "lanczos", "--mc-samples", "2"), "--mc-samples"),
                         (("--curvature", "fisher"), "--curvature"), (("--tol", "2"), "--tol")):
        result = invoke("spectrum", ckpt, "--data", data, "-o", tmp_path / "o", *args)
        assert result.exit_code == 2 and needle in result.stderr, (args, result.stderr)
    assert not (tmp_path / "o").exists()


def test_python_api_spectrum_with_curvature_hessian(tiny_files):
    import curvscope

    ckpt, data, _ = tiny_files
    problem = load_problem(ckpt, data, dtype="float64")
    res = curvscope.spectrum(problem, curvature="hessian", top_k=2, trace_matvecs=100)
    dense = torch.linalg.eigvalsh(_dense_hessian(ckpt, data))
    assert torch.allclose(res.groups[0].top, dense.flip(0)[:2], rtol=1e-6, atol=1e-9)
    assert torch.allclose(res.groups[0].bottom, dense[:2], rtol=1e-6, atol=1e-9)
    ggn = curvscope.spectrum(problem, method="lanczos", top_k=2)
    gram = curvscope.spectrum(problem, directional=False)
    assert torch.allclose(ggn.groups[0].top, gram.groups[0].eigenvalues[:2], rtol=1e-6)
