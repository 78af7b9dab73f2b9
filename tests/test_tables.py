"""Terminal output at 80 columns: names never broken, numbers aligned, no line wider than the terminal."""

from __future__ import annotations

import json

import torch
from conftest import invoke, write_data
from rich.console import Console

from curvscope.report.lr_report import rates_tables
from curvscope.report.tables import spectrum_summary

RESNET = ["all", "layer2.0.downsample.0.weight", "layer4.1.bn2.bias", "blocks.0.attn.query.weight",
          "encoder.layer.11.attention.output.dense.weight", "fc"]


def _render(tables, width: int = 80) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    for t in tables:
        console.print(t)
    return console.export_text()


def _group(name: str) -> dict:
    return {"name": name, "num_params": 2_359_296, "rank": 1234, "lambda_max": 12.3, "trace": 456.7,
            "effective_rank": 12.3, "stability_lr": 0.123, "eigenvalue_floor": 1e-4,
            "directions": {"snr_gt1_share": 0.12, "lambda_snr_gt1_share": 0.5}}


def test_spectrum_summary_keeps_resnet_and_transformer_names_whole():
    report = {"groups": [_group(n) for n in RESNET], "approximation": {"exact": True, "num_columns": 1280}}
    text = _render(spectrum_summary(report, "curvscope-out/a/rather/long/output/directory", 80))
    for name in RESNET:
        assert name in text, name
    assert max(len(line) for line in text.splitlines()) <= 80
    wide = _render(spectrum_summary(report, "out", 200), 200)
    assert "#2" not in wide  # names stay in the table when there is room


def test_lr_table_keeps_names_whole():
    rows = [{"name": n, "parameters": [n], "num_params": 10, "g_hat": 0.1, "h_bar_diag": 0.2, "lr_newton": 0.5,
             "lr_diag": 0.4, "diag_note": "ok", "lambda_max": 1.0, "lr_stability": 2.0, "recommended": 0.4,
             "rule": "diag"} for n in RESNET[1:]]
    section = {"groups": rows, "batches": 1, "partition": "tensor", "curvature": "hessian", "direction": "gradient",
               "newton_eta": [0.5] * len(rows)}
    text = _render(rates_tables(section, 80))
    for name in RESNET[1:]:
        assert name in text, name
    assert max(len(line) for line in text.splitlines()) <= 80


def test_cli_spectrum_at_80_columns(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    model = tmp_path / "net.py"
    model.write_text(
        "import torch.nn as nn\n"
        "class Block(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.downsample_projection = nn.Sequential(nn.Linear(4, 6), nn.Tanh())\n"
        "        self.attention_output_dense = nn.Linear(6, 3)\n"
        "    def forward(self, x):\n"
        "        return self.attention_output_dense(self.downsample_projection(x))\n"
        "def make():\n"
        "    return nn.Sequential(Block())\n")
    g = torch.Generator().manual_seed(0)
    data = write_data(tmp_path / "d.safetensors", torch.randn(8, 4, generator=g), torch.arange(8) % 3)
    out = tmp_path / "out"
    result = invoke("spectrum", "--model", f"{model}:make", "--data", data, "--groups", "tensor", "-o", out,
                    "--no-plots")
    assert result.exit_code == 0, result.stderr
    names = [g["name"] for g in json.loads((out / "report.json").read_text())["groups"]]
    assert "0.downsample_projection.0.weight" in names
    for name in names:
        assert name in result.stdout, (name, result.stdout)
    assert max(len(line) for line in result.stdout.splitlines()) <= 80, result.stdout


def test_a_block_below_the_precision_floor_is_not_shown_as_zero():
    from curvscope.report.plots import layers_figure

    blocks = [dict(_group("layer1.0.bn1"), rank=0, lambda_max=0.0, trace=3.65e-4), _group("fc")]
    report = {"groups": [_group("all"), *blocks], "approximation": {"exact": True, "num_columns": 10}}
    text = _render(spectrum_summary(report, "out", 200), 200)
    row = next(line for line in text.splitlines() if "layer1.0.bn1" in line)
    assert "<floor" in row  # lambda_max: not "0" (the rank column says 0)
    fig = layers_figure(blocks)
    labels = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("precision floor" in t for t in labels), labels
