"""``curvscope spectrum`` end to end on the bundled sample models (small batches), and its bad-input errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import curvscope.cli.spectrum  # noqa: F401  (registers the command)
from tests.conftest import DIABETES, DIGITS, SAMPLE_CHECKPOINTS, SAMPLES, assert_clean_error, invoke

PNG = b"\x89PNG\r\n\x1a\n"


def check_report(out, batch_size: int, grouping: str = "all", top_k: int | None = None) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert report["command"] == "spectrum" and report["schema_version"]
    assert report["problem"]["batch_size"] == batch_size
    assert report["loss_value"] > 0 and report["gradient_norm"] > 0
    assert report["approximation"]["exact"] is True and report["grouping"] == grouping
    directions = load_file(str(out / "directions.safetensors"))
    for g in report["groups"]:
        ev = g["eigenvalues"]
        assert len(ev) == g["rank"] > 0 and ev == sorted(ev, reverse=True) and g["lambda_max"] == ev[0]
        assert g["trace"] >= sum(ev) * (1 - 1e-5)
        d = g["directions"]
        k = d["top_k"]
        assert k == min(g["rank"], top_k or 1000)
        for key in ("lambda", "gamma_abs", "lambda_snr", "gamma_snr", "gradient_overlap"):
            assert len(d[key]) == k, key
        assert d["lambda_consistency"] < 1e-3
        assert directions[f"{g['name']}/gamma"].shape == (batch_size, k)
        assert directions[f"{g['name']}/lambda"].shape == (batch_size, k)
    for key in ("spectrum_plot", "directions_plot", "directions"):
        assert key in report["files"]
    for name in ("spectrum.png", "directions.png"):
        assert (out / name).read_bytes().startswith(PNG)
    return report


@pytest.mark.parametrize("name", ["cnn-digits", "transformer-digits", "mlp-diabetes"])
def test_every_sample_model(tmp_path, name):
    out = tmp_path / "out"
    result = invoke("spectrum", SAMPLES / f"{name}.safetensors", "--data", SAMPLE_CHECKPOINTS[name],
                    "--batch-size", 32, "--out", out)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    check_report(out, 32)
    assert not (out / "layers.png").exists()
    assert "GGN spectrum" in result.stdout and "report.json" in result.stdout


def test_layer_groups_eigenvectors_and_newton(tmp_path):
    out = tmp_path / "out"
    ev_file, step_file = tmp_path / "ev.safetensors", tmp_path / "step.safetensors"
    result = invoke("spectrum", SAMPLES / "mlp-digits.safetensors", "--data", DIGITS, "--batch-size", 32,
                    "--groups", "layer", "--out", out, "--dtype", "float64", "--eigenvectors", ev_file,
                    "--top-k", 20, "--newton-step", step_file, "--damping", "1e-2")
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    report = check_report(out, 32, "layer", top_k=20)
    groups = report["groups"]
    assert groups[0]["name"] == "all" and len(groups) == 4
    assert groups[0]["parameters"] == [p for g in groups[1:] for p in g["parameters"]]
    assert sum(g["trace"] for g in groups[1:]) == pytest.approx(groups[0]["trace"], rel=1e-10)
    assert all(g["directions"]["top_k"] == 20 for g in groups)
    assert (out / "layers.png").read_bytes().startswith(PNG)

    vectors = load_file(str(ev_file))
    params = groups[0]["parameters"]
    E = torch.stack([torch.cat([vectors[f"{k}/{p}"].reshape(-1) for p in params]) for k in range(20)])
    assert torch.allclose(E @ E.T, torch.eye(20, dtype=E.dtype), atol=1e-8)
    assert torch.allclose(vectors["eigenvalues"], torch.tensor(groups[0]["eigenvalues"][:20], dtype=torch.float64))

    newton = report["newton"]
    assert newton["damping"] == 0.01 and newton["blocks"] == ["1", "3", "5"] and newton["file"] == str(step_file)
    assert newton["num_directions"] == 60 and newton["skipped_directions"] == 0
    assert newton["realized_decrease"] == pytest.approx(newton["loss_before"] - newton["loss_after"])
    step = load_file(str(step_file))
    assert set(step) == set(params)
    assert report["files"]["newton_step"] == str(step_file) and report["files"]["eigenvectors"] == str(ev_file)
    assert "Newton step" in result.stdout


DIABETES_ARGS = (SAMPLES / "mlp-diabetes.safetensors", "--data", DIABETES, "--batch-size", 16)


@pytest.mark.parametrize("args, needle", [
    (("--subsample", 40), "--subsample 40"),
    (("--top-k", 0), "--top-k"),
    (("--damping", "nonsense", "--newton-step", "step.safetensors"), "--damping"),
    (("--groups", "nonsense"), "--groups"),
    (("--mc-samples", -1), "--mc-samples"),
    (("--max-memory", "lots"), "--max-memory"),
    (("--no-directions", "--newton-step", "step.safetensors"), "--no-directions"),
])
def test_bad_input_exits_2_without_a_report(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    result = invoke("spectrum", *DIABETES_ARGS, "--out", out, *args)
    assert_clean_error(result, needle)
    assert not (out / "report.json").exists() and not (tmp_path / "step.safetensors").exists()


def test_out_is_a_file(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("not a directory")
    result = invoke("spectrum", *DIABETES_ARGS, "--out", blocker)
    assert_clean_error(result, "--out")


def test_no_plots_no_directions(tmp_path):
    out = tmp_path / "out"
    result = invoke("spectrum", *DIABETES_ARGS, "--out", out, "--no-plots", "--no-directions", "--no-ghost",
                    "--mc-samples", 1)
    assert result.exit_code == 0, (result.stderr, result.exception)
    report = json.loads((out / "report.json").read_text())
    assert report["groups"][0]["directions"] is None and report["files"] == {} and report["newton"] is None
    assert report["approximation"]["exact"] is False and report["approximation"]["num_columns"] == 16
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]


def test_help_lists_the_options():
    result = invoke("spectrum", "--help")
    assert result.exit_code == 0
    for option in ("--groups", "--mc-samples", "--subsample", "--top-k", "--no-directions", "--eigenvectors",
                   "--newton-step", "--damping", "--max-memory", "--no-ghost", "--out", "--no-plots", "--debug"):
        assert option in result.stdout, option


def test_models_vmap_cannot_trace_run_and_say_which_path(tmp_path):
    import json

    from conftest import write_data

    model = tmp_path / "branchy.py"
    model.write_text(  # a Python branch on a tensor value and an .item() call: vmap cannot trace either
        "import torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.body = nn.Linear(3, 5)\n"
        "        self.head = nn.Linear(5, 4)\n"
        "    def forward(self, x):\n"
        "        h = self.body(x).tanh()\n"
        "        if h.abs().max().item() > 100.0:\n"
        "            h = h / 2\n"
        "        return self.head(h)\n")
    g = torch.Generator().manual_seed(0)
    data = write_data(tmp_path / "d.safetensors", torch.randn(6, 3, generator=g), torch.arange(6) % 4)
    out = tmp_path / "out"
    result = invoke("spectrum", "--model", f"{model}:Net", "--data", data, "-o", out, "--no-plots", "--no-ghost")
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["path"].startswith("autograd"), report["path"]
    assert "per-sample path" in result.stdout and report["groups"][0]["rank"] > 0
