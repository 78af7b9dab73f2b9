"""The spectrum report: fields from a SpectrumResult, tensor files, plots, tables, and run_spectrum's writing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from torch import nn

from curvscope.curvature.gram.newton import newton_step
from curvscope.curvature.gram.spectrum import compute_spectrum
from curvscope.errors import CurvscopeError
from curvscope.io.atomic import write_atomic
from curvscope.io.tensors import safetensors_writer
from curvscope.problem import make_problem
from curvscope.report import plots
from curvscope.report import spectrum_report as sr
from curvscope.report.schema import build_report, to_jsonable
from curvscope.report.tables import facts_table, fmt, spectrum_table
from curvscope.workflows import run_and_write
from curvscope.workflows.spectrum import SpectrumOptions

PNG = b"\x89PNG\r\n\x1a\n"


def run_spectrum(p, out, options: dict):
    """Compute and write a spectrum report through the workflow layer (options as a config table)."""
    table = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    return run_and_write(p, out, {"spectrum": SpectrumOptions.from_mapping(table)})


def problem(n: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return make_problem(model, torch.randn(n, 4, dtype=torch.float64), torch.arange(n) % 3, loss="ce",
                        device="cpu", dtype="float64", info={"checkpoint": "tiny.safetensors", "seed": 0})


@pytest.fixture(scope="module")
def layer_result():
    p = problem()
    return p, compute_spectrum(p, groups="layer", include_total=True, top_k=6)


def test_fields_are_consistent(layer_result):
    p, result = layer_result
    fields = to_jsonable(sr.spectrum_fields(result, p.batch_size))
    json.dumps(fields, allow_nan=False)
    assert fields["approximation"] == {"mc_samples": 0, "subsample": None, "curvature_samples": 8,
                                       "num_columns": 24, "exact": True}
    assert fields["grouping"] == "layer"
    assert [g["name"] for g in fields["groups"]] == ["all", "0", "2"]
    assert fields["groups"][0]["parameters"] == list(p.params)
    for g, spec in zip(fields["groups"], result.groups, strict=True):
        ev = g["eigenvalues"]
        assert ev == sorted(ev, reverse=True) and len(ev) == g["rank"] and g["lambda_max"] == ev[0]
        assert g["stability_lr"] == pytest.approx(2 / ev[0])
        assert g["num_params"] == spec.num_params and g["trace"] == pytest.approx(spec.trace)
        d = g["directions"]
        assert d["top_k"] == 6
        for key in ("lambda", "gamma_abs", "lambda_snr", "gamma_snr", "gradient_overlap"):
            assert len(d[key]) == 6, key
        assert d["lambda"] == ev[:6]
        assert all(x >= 0 for x in d["gamma_abs"])
        snr = spec.directions.gamma_snr
        assert d["snr_gt1_share"] == pytest.approx(float((snr > 1).double().mean()))
        assert d["flat_overlap"] == pytest.approx(1 - sum(d["gradient_overlap"]))
    assert sum(g["trace"] for g in fields["groups"][1:]) == pytest.approx(fields["groups"][0]["trace"])


def test_no_directions_and_approximation_flags():
    p = problem()
    result = compute_spectrum(p, directional=False, subsample=4, mc_samples=2)
    fields = sr.spectrum_fields(result, p.batch_size, directional=False)
    assert fields["groups"][0]["directions"] is None
    assert fields["approximation"]["exact"] is False and fields["approximation"]["num_columns"] == 8
    assert sr.directions_tensors(result) == {}


def test_single_sample_snr_is_null():
    p = problem(n=1)
    result = compute_spectrum(p)
    fields = to_jsonable(sr.spectrum_fields(result, 1))
    d = fields["groups"][0]["directions"]
    assert all(x is None for x in d["gamma_snr"]) and d["snr_gt1_share"] is None
    json.dumps(fields, allow_nan=False)
    assert plots.render_png(plots.directions_figure(fields["groups"][0])).startswith(PNG)


def test_directions_and_eigenvector_tensors(layer_result, tmp_path):
    p, result = layer_result
    ns = newton_step(p, result, 1e-3)
    tensors = sr.directions_tensors(result, ns)
    for name in ("all", "0", "2"):
        assert tensors[f"{name}/gamma"].shape == (8, 6)
        assert tensors[f"{name}/lambda"].shape == (8, 6)
        assert tensors[f"{name}/eigenvalues"].shape == (6,)
    assert tensors["0/newton_damping"].shape == (6,) and "all/newton_damping" not in tensors
    assert torch.equal(tensors["curvature_samples"], torch.arange(8))
    path = tmp_path / "d.safetensors"
    write_atomic(path, safetensors_writer(tensors, {"groups": ["all", "0", "2"]}))
    back = load_file(str(path))
    assert set(back) == set(tensors)
    vec = {"w": torch.randn(2, 3, 4), "b": torch.randn(2, 3)}
    ev = sr.eigenvector_tensors(vec, torch.tensor([2.0, 1.0]))
    assert set(ev) == {"eigenvalues", "0/w", "1/w", "0/b", "1/b"} and torch.equal(ev["1/w"], vec["w"][1])
    fields = sr.newton_fields(ns, "step.safetensors")
    assert fields["damping"] == 1e-3 and fields["blocks"] == ["0", "2"] and fields["file"] == "step.safetensors"


def test_plots_render(layer_result):
    p, result = layer_result
    report = build_report("spectrum", p, sr.spectrum_fields(result, p.batch_size))
    args = (report["problem"], report["approximation"])
    for fig in (plots.spectrum_figure(report["groups"][0], *args),
                plots.directions_figure(report["groups"][0], *args),
                plots.layers_figure(report["groups"][1:], *args),
                plots.spectrum_figure({"name": "all", "eigenvalues": [], "rank": 0, "trace": 0.0}),
                plots.directions_figure({"name": "all", "directions": None}),
                plots.layers_figure([{"name": "a", "lambda_max": 0.0, "trace": 0.0}])):
        assert plots.render_png(fig).startswith(PNG)


def test_tables_render(layer_result):
    p, result = layer_result
    report = build_report("spectrum", p, {**sr.spectrum_fields(result, p.batch_size),
                                          "files": {"spectrum_plot": "out/spectrum.png"}})
    console = Console(record=True, width=200)
    console.print(spectrum_table(report))
    console.print(facts_table(report, "out"))
    text = console.export_text()
    assert "all" in text and "out/spectrum.png" in text and fmt(report["groups"][0]["lambda_max"]) in text
    assert fmt(None) == "-" and fmt(float("inf")) == "inf" and fmt(12345.0) == "1.23e+04" and fmt(3) == "3"


def test_run_spectrum_writes_everything(tmp_path):
    p = problem()
    out = tmp_path / "out"
    report = run_spectrum(p, out, {"groups": "tensor", "newton_step": tmp_path / "step.safetensors",
                                   "damping": "0.01", "eigenvectors": tmp_path / "ev.safetensors"})
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["command"] == "spectrum" and on_disk["groups"] == report["groups"]
    assert set(report["files"]) == {"spectrum_plot", "directions_plot", "layers_plot", "directions",
                                    "eigenvectors", "newton_step"}
    for path in report["files"].values():
        assert Path(path).is_file(), path
    assert report["newton"]["damping"] == 0.01
    step = load_file(str(tmp_path / "step.safetensors"))
    assert {k: v.shape for k, v in step.items()} == {k: v.shape for k, v in p.params.items()}
    # a second run on the same problem replaces the spectrum keys (no stale Newton section or files)
    run_spectrum(p, out, {"plots": False, "directions": False})
    again = json.loads((out / "report.json").read_text())
    assert again["newton"] is None and again["files"] == {} and again["grouping"] == "all"


def test_run_spectrum_options():
    assert SpectrumOptions().groups == "all" and SpectrumOptions().damping == "bootstrap"
    with pytest.raises(CurvscopeError, match="unknown option"):
        run_spectrum(problem(), "unused", {"bogus": 1})


def test_nothing_written_when_the_computation_fails(tmp_path, monkeypatch):
    import curvscope.report.plots as plots_module

    def broken(*_a, **_k):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(plots_module, "directions_figure", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        run_spectrum(problem(), out, {"newton_step": tmp_path / "step.safetensors", "damping": 0.1})
    assert not out.exists() and not (tmp_path / "step.safetensors").exists()
    with pytest.raises(CurvscopeError, match="subsample 9"):
        run_spectrum(problem(), out, {"subsample": 9})
    assert not out.exists()
