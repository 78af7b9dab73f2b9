"""At 80 columns: option names whole in --help, long warnings wrapped on a terminal, layer names shortened by
eliding their common prefix (never #N for a GPT-2's blocks), the check baseline table within the width."""

from __future__ import annotations

import json

import pytest
from conftest import invoke
from rich.console import Console

from curvscope.report.tables import short_names, spectrum_summary

GPT2 = ["all", "transformer.wte", "transformer.wpe",
        *[f"transformer.h.{i}.{m}" for i in range(12)
          for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")],
        "transformer.ln_f"]


def _render(tables, width: int = 80) -> str:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    for t in tables:
        console.print(t)
    return console.export_text()


@pytest.mark.parametrize("command", ["spectrum", "lr-suggest", "factors", "check", "show", "info"])
def test_help_never_truncates_an_option_name(command, monkeypatch):
    from typer.main import get_command

    from curvscope.cli import app

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TERMINAL_WIDTH", "80")
    result = invoke(command, "--help")
    assert result.exit_code == 0
    params = get_command(app).commands[command].params
    for param in params:
        for opt in (*param.opts, *param.secondary_opts):
            if opt.startswith("--"):
                assert opt in result.stdout, (command, opt)


def test_gpt2_layer_names_are_shortened_by_their_common_prefix_not_numbered():
    def group(name):
        return {"name": name, "num_params": 2_359_296, "rank": 1234, "lambda_max": 12.3, "trace": 456.7,
                "effective_rank": 12.3, "stability_lr": 0.123, "directions": {"snr_gt1_share": 0.12}}

    report = {"groups": [group(n) for n in GPT2], "approximation": {"exact": True, "num_columns": 1280}}
    text = _render(spectrum_summary(report, "out", 80))
    assert "#" not in text
    assert "…h.11.attn.c_proj" in text and "…h.0.mlp.c_fc" in text and "transformer." in text
    assert max(len(line) for line in text.splitlines()) <= 80
    labels, prefix = short_names(GPT2, 17)
    assert prefix == "transformer." and len(set(labels)) == len(labels)
    assert short_names(GPT2, 17) == (labels, prefix)  # the same labels in every command (a function of the names)


def test_a_long_warning_wraps_on_a_terminal(monkeypatch, capsys):
    from curvscope.cli import common

    monkeypatch.setattr(common.console, "_force_terminal", True)
    monkeypatch.setattr(common.console, "_width", 80)
    common.warn("word " * 60)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 3 and max(len(line) for line in lines) <= 80
    assert lines[0].startswith("warning:") and lines[1].startswith(" " * len("warning:"))


def test_the_check_baseline_table_fits_80_columns(tmp_path, tiny_files, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    ckpt, data, _ = tiny_files
    out = tmp_path / "o"
    assert invoke("spectrum", ckpt, "--data", data, "-o", out, "--no-plots", "--groups", "tensor").exit_code == 0
    report = json.loads((out / "report.json").read_text())
    base = tmp_path / "base.json"
    for g in report["groups"]:
        g["lambda_max"] *= 0.5
    base.write_text(json.dumps(report))
    result = invoke("check", out, "--baseline", base, "--max-increase", "groups[*].lambda_max=20%",
                    "--max-decrease", "groups[*].trace=1%", "-r", "groups[*].rank >= 1")
    assert result.exit_code == 1, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, result.stdout
    assert "groups[*].lambda_max" in result.stdout  # a rule's path is never cut
    assert "FAIL [1]" in result.stdout and any(line.startswith("[1] groups[*].lambda_max") for line in lines)
    assert sum("groups[" in line and ": rose by" in line for line in lines) == len(report["groups"])
