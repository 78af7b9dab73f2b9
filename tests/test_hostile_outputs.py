"""Hostile output directories: curvscope removes and overwrites only the files it wrote itself, refuses outputs
that collide, and says when a config writes outside the output directory."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import assert_clean_error, invoke

from curvscope.report.owned import written_by_curvscope


def _list_in_report(out: Path, files: dict[str, str]) -> None:
    report = json.loads((out / "report.json").read_text())
    report["files"].update(files)
    (out / "report.json").write_text(json.dumps(report))


def test_a_rerun_never_removes_files_a_report_lists_that_curvscope_did_not_write(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    out = tmp_path / "out"
    assert invoke("spectrum", ckpt, "--data", data, "-o", out).exit_code == 0
    victims = {"train.py": "print('my training')\n", "notes.txt": "notes\n"}
    for name, text in victims.items():
        (out / name).write_text(text)
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("mine")
    (out / "layers.png").write_text("not a png: a user's file with one of curvscope's names")
    listed = {"spectrum_plot": str(out / "train.py"), "directions_plot": str(out / "notes.txt"),
              "layers_plot": str(out / "layers.png"), "directions": str(outside), "newton_step": str(ckpt)}
    for args in (("--no-plots",), ("-n", "6", "--no-plots")):  # the same problem (merged), another (replaced)
        _list_in_report(out, listed)
        result = invoke("spectrum", ckpt, "--data", data, "-o", out, *args)
        assert result.exit_code == 0, result.stderr
        for name, text in victims.items():
            assert (out / name).read_text() == text, (args, name)
        assert outside.read_text() == "mine" and ckpt.is_file()
        assert (out / "layers.png").read_text().startswith("not a png")


def test_a_file_with_a_curvscope_name_it_did_not_write_is_never_overwritten(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    out = tmp_path / "out"
    out.mkdir()
    (out / "spectrum.png").write_text("my own figure")
    result = invoke("spectrum", ckpt, "--data", data, "-o", out)
    assert_clean_error(result, "spectrum.png", "not written by curvscope")
    assert (out / "spectrum.png").read_text() == "my own figure"
    assert sorted(p.name for p in out.iterdir()) == ["spectrum.png"]
    (out / "spectrum.png").unlink()
    assert invoke("spectrum", ckpt, "--data", data, "-o", out).exit_code == 0
    assert written_by_curvscope(out / "spectrum.png") and written_by_curvscope(out / "directions.safetensors")
    assert written_by_curvscope(out / "report.json")
    (out / "directions.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert not written_by_curvscope(out / "directions.safetensors")
    assert_clean_error(invoke("spectrum", ckpt, "--data", data, "-o", out), "directions.safetensors")
    # show draws into a directory the same way
    (out / "directions.safetensors").unlink()
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "directions.png").write_text("mine")
    assert_clean_error(invoke("show", out, "--out", figures), "not written by curvscope")
    assert [p.name for p in figures.iterdir()] == ["directions.png"]


def test_junit_on_the_report_or_an_input_is_refused(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    out = tmp_path / "out"
    assert invoke("spectrum", ckpt, "--data", data, "-o", out, "--no-plots").exit_code == 0
    before = (out / "report.json").read_bytes()
    rule = ("-r", "loss_value < 100")
    assert_clean_error(invoke("check", out, *rule, "--junit", out / "report.json"), "--junit", "report")
    assert_clean_error(invoke("check", out / "report.json", *rule, "--junit", out / "report.json"), "--junit")
    assert_clean_error(invoke("check", ckpt, "--data", data, "-o", out, *rule, "--junit", out / "report.json"),
                       "--junit")
    assert_clean_error(invoke("check", ckpt, "--data", data, "-o", out, *rule, "--junit", data), "--junit")
    assert_clean_error(invoke("check", ckpt, "--data", data, "-o", out, *rule, "--junit", out / "lr.png"),
                       "--junit")
    assert (out / "report.json").read_bytes() == before
    assert invoke("check", out, *rule, "--junit", tmp_path / "j.xml").exit_code == 0


def test_outputs_on_an_input_or_on_each_other_are_refused(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    out = tmp_path / "out"
    before = ckpt.read_bytes()
    args = ("spectrum", ckpt, "--data", data, "-o", out)
    assert_clean_error(invoke(*args, "--eigenvectors", ckpt), "--eigenvectors", "input")
    assert_clean_error(invoke(*args, "--newton-step", data), "--newton-step", "input")
    assert_clean_error(invoke(*args, "--eigenvectors", out / "spectrum.png"), "--eigenvectors")
    assert ckpt.read_bytes() == before and not out.exists()


def test_a_config_that_writes_outside_out_says_so(tmp_path, tiny_files, monkeypatch):
    ckpt, data, _ = tiny_files
    monkeypatch.chdir(tmp_path)
    (tmp_path / "victim.bin").write_text("precious")
    config = tmp_path / "ci.toml"
    config.write_text('rules = ["loss_value < 100"]\n[spectrum]\neigenvectors = "victim.bin"\nplots = false\n')
    result = invoke("check", ckpt, "--data", data, "--config", config, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert "eigenvectors" in result.stderr and "outside" in result.stderr and "victim.bin" in result.stderr
    config.write_text('rules = ["loss_value < 100"]\n[spectrum]\neigenvectors = "out/ev.safetensors"\n'
                      "plots = false\n")
    result = invoke("check", ckpt, "--data", data, "--config", config, "-o", tmp_path / "out")
    assert result.exit_code == 0 and "outside" not in result.stderr, result.stderr
