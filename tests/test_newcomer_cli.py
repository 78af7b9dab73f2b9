"""A newcomer's day: the default output directory keeps different problems apart, spectrum --json, check on
a mistyped directory, the docs' rule examples, relative model files in checkpoint metadata."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import assert_clean_error, invoke

ROOT = Path(__file__).resolve().parent.parent


def test_runs_on_different_problems_never_replace_each_other_in_the_default_directory(tmp_path, tiny_files,
                                                                                         monkeypatch):
    ckpt, data, _ = tiny_files
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "curvscope-out"
    assert invoke("spectrum", ckpt, "--data", data).exit_code == 0
    assert invoke("lr-suggest", ckpt, "--data", data).exit_code == 0  # the same problem: merged
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"report.json", "spectrum.png", "lr.png"} <= set(before)
    for command in ("spectrum", "lr-suggest", "factors"):  # another batch: refused, nothing touched
        result = invoke(command, ckpt, "--data", data, "-n", "6")
        assert_clean_error(result, "another problem", "--out")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    result = invoke("check", ckpt, "--data", data, "-n", "6", "-r", "loss_value < 9")
    assert_clean_error(result, "another problem", "--out")
    # another directory keeps both; naming the default explicitly replaces it, with a warning
    assert invoke("spectrum", ckpt, "--data", data, "-n", "6", "-o", tmp_path / "other").exit_code == 0
    result = invoke("spectrum", ckpt, "--data", data, "-n", "6", "-o", "curvscope-out", "--no-plots")
    assert result.exit_code == 0 and "another problem" in result.stderr


def test_spectrum_and_factors_json_print_the_report_on_stdout(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    out = tmp_path / "o"
    for command in ("spectrum", "factors"):
        result = invoke(command, ckpt, "--data", data, "-o", out, "--json")
        assert result.exit_code == 0, result.stderr
        doc = json.loads(result.stdout)  # nothing else on stdout
        assert doc == json.loads((out / "report.json").read_text())
        assert "┏" in result.stderr  # the summary went to stderr
    assert isinstance(doc["groups"][0]["rank"], int) and isinstance(doc["problem"]["num_params"], int)
    result = invoke("check", out, "-r", "groups[0].rank >= 1", "-r", "groups[0].num_params == 43", "--json")
    summary = json.loads(result.stdout)
    values = [c["value"] for r in summary["rules"] for c in r["checks"]]
    assert all(isinstance(v, int) for v in values), values  # integers stay integers


def test_check_on_a_mistyped_report_or_directory_says_not_found(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    out = tmp_path / "out"
    assert invoke("spectrum", ckpt, "--data", data, "-o", out, "--no-plots").exit_code == 0
    for target, needle in ((tmp_path / "otu", "not found"), (tmp_path / "otu" / "report.json", "not found"),
                           (tmp_path, "no report.json")):
        err = assert_clean_error(invoke("check", target, "-r", "loss_value < 9"), str(target), needle)
        assert "--data" not in err
    assert_clean_error(invoke("check", tmp_path / "missing.safetensors", "-r", "loss_value < 9", "--data", data),
                       "not found")


def _ci_rules() -> list[str]:
    text = (ROOT / "docs" / "ci.md").read_text()
    block = text.split("A rule is `PATH OP NUMBER`:", 1)[1].split("```", 2)[1]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def test_every_rule_example_in_docs_ci_works_on_a_real_report(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    rules = _ci_rules()
    assert any(r.startswith("factors.") for r in rules) and len(rules) >= 8
    config = tmp_path / "ci.toml"
    config.write_text("rules = [" + ", ".join(json.dumps(r) for r in rules) + "]\n[spectrum]\ngroups = \"layer\"\n"
                      "[lr]\npartition = \"tensor\"\n[factors]\nensemble = 5\n")
    result = invoke("check", ckpt, "--data", data, "--config", config, "-o", tmp_path / "o", "--json")
    assert result.exit_code in (0, 1), result.stderr  # a verdict (pass or fail), never bad input
    summary = json.loads(result.stdout)
    assert len(summary["rules"]) == len(rules)
    for r in summary["rules"]:
        assert r["checks"], r  # every path selected something


def test_a_relative_model_file_in_checkpoint_metadata_is_next_to_the_checkpoint(tmp_path, tiny_data,
                                                                                monkeypatch):
    from conftest import tiny_mlp, write_data
    from safetensors.torch import save_file

    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "net.py").write_text("from curvscope.models import mlp\n"
                                "def make():\n    return mlp(4, [5], 3, activation='tanh')\n")
    state = {k: v.contiguous() for k, v in tiny_mlp().state_dict().items()}
    save_file(state, str(run / "m.safetensors"), metadata={"curvscope.model": "net.py:make"})
    data = write_data(tmp_path / "d.safetensors", *tiny_data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = invoke("info", run / "m.safetensors", "--data", data, "--trust-model-code")
    assert result.exit_code == 0, result.stderr
    assert str(run / "net.py") in result.stdout.replace("\n", "") or "net.py:make" in result.stdout
