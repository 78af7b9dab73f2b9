"""``curvscope check`` on the command line: exit codes, table, --json, --junit, GitHub annotations, baselines,
config files, and the one-command config mode end to end."""

from __future__ import annotations

import json
import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

import curvscope.cli.check as check_cli  # noqa: F401  (registers the command)
from curvscope.cli import app

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"


@pytest.fixture(autouse=True)
def _not_in_github_actions(monkeypatch):
    """These tests may themselves run under GitHub Actions: annotations only where a test asks for them."""
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)


def run(*args):
    return CliRunner().invoke(app, ["check", *[str(a) for a in args]])


def text(output: str) -> str:
    """Output with rich's line wrapping undone (for substring checks)."""
    return " ".join(output.split())


def assert_error(result, *needles: str) -> str:
    """Exit 2, one line on stderr, no traceback, nothing on stdout."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert result.stdout == "" and "Traceback" not in result.stderr
    for needle in needles:
        assert needle in err, (needle, err)
    return err


REPORT = {
    "schema_version": "1.0", "command": "spectrum", "commands": ["spectrum", "lr-suggest"],
    "curvscope_version": "0.1.0",
    "problem": {"checkpoint": "m.safetensors", "model": "mlp", "data": "d.safetensors", "loss": "ce",
                "batch_size": 64, "batch_indices": [0, 64]},
    "loss_value": 0.25, "gradient_norm": None,
    "groups": [{"name": "all", "rank": 30, "lambda_max": 40.0},
               {"name": "fc1", "rank": 8, "lambda_max": 20.0}],
    "lr": {"groups": [{"name": "fc1.weight", "recommended": 0.01}]},
}


@pytest.fixture
def report(tmp_path) -> Path:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    return path


def _variant(tmp_path: Path, name: str, **changes) -> Path:
    data = json.loads(json.dumps(REPORT))
    for key, value in changes.items():
        data["groups"][0][key] = value
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# -- exit codes --------------------------------------------------------------------------------------------

def test_exit_0_when_every_rule_passes(report):
    result = run(report, "-r", "groups[0].lambda_max <= 50", "--rule", "lr.groups[*].recommended > 1e-5",
                 "-r", "loss_value<0.5")
    assert result.exit_code == 0, result.stderr
    assert "3 of 3 passed" in text(result.stdout) and "FAIL" not in result.stdout


def test_exit_1_when_a_rule_fails(report):
    result = run(report, "-r", "groups[*].rank >= 10", "-r", "loss_value < 0.5")
    assert result.exit_code == 1, result.stderr
    assert "1 of 2 passed" in text(result.stdout) and "FAIL" in result.stdout
    assert "groups[1].rank" in result.stdout  # the failing index is named
    assert result.stderr == ""


def test_null_value_fails_the_rule(report):
    result = run(report, "-r", "gradient_norm < 1", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["rules"][0]["reason"] == "value is null (not finite)"


@pytest.mark.parametrize("args, needles", [
    (["-r", "groups[0].lambda_max =< 50"], ["malformed rule", "expected a comparison"]),
    (["-r", "groups[0].lamda_max < 50"], ["unknown path", "nearest valid paths: groups[0].lambda_max"]),
    (["-r", "factors.layers[*].phi < 1"], ["no 'factors' section", "curvscope factors"]),
    (["-r", "groups[0] < 1"], ["is an object, not a number"]),
    ([], ["nothing to check"]),
    (["--max-increase", "loss_value=5%"], ["need a baseline"]),
    (["-r", "loss_value < 1", "--baseline", "{report}"], ["--baseline needs limits"]),
    (["-r", "loss_value < 1", "--data", "x.safetensors"], ["--data: only used when TARGET is a checkpoint"]),
    (["-r", "loss_value < 1", "--batch-size", "3", "-o", "x"], ["--batch-size, --out: only used"]),
    (["-r", "loss_value < 1", "--config", "missing.toml"], ["config file not found"]),
])
def test_exit_2_on_bad_input(report, tmp_path, args, needles):
    args = [a.replace("{report}", str(report)) for a in args]
    junit = tmp_path / "junit.xml"
    assert_error(run(report, *args, "--junit", junit), *needles)
    assert not junit.exists()  # no output file on bad input


def test_exit_2_on_unreadable_reports(tmp_path):
    assert_error(run(tmp_path / "nope.json", "-r", "loss_value < 1"), "report file not found")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert_error(run(broken, "-r", "loss_value < 1"), "not valid JSON")
    other = tmp_path / "other.json"
    other.write_text("{}")
    assert_error(run(other, "-r", "loss_value < 1"), "not a curvscope report")


def test_help_documents_exit_codes():
    result = CliRunner().invoke(app, ["check", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    help_text = text(result.stdout)
    assert "0 every rule passes; 1 at least one rule fails; 2 bad input" in help_text
    assert "docs/ci.md" in help_text


# -- outputs -----------------------------------------------------------------------------------------------

def test_json_summary_is_the_only_stdout(report):
    result = run(report, "-r", "groups[*].rank >= 10", "-r", "loss_value < 0.5", "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["passed"] is False and doc["exit_code"] == 1
    assert doc["counts"] == {"rules": 2, "passed": 1, "failed": 1}
    failing = [c for c in doc["rules"][0]["checks"] if not c["passed"]]
    assert [(c["path"], c["value"], c["threshold"]) for c in failing] == [("groups[1].rank", 8, 10)]
    assert "curvscope check" in result.stderr  # the table went to stderr


def test_junit_file_has_one_testcase_per_rule(report, tmp_path):
    junit = tmp_path / "ci" / "junit.xml"
    result = run(report, "-r", "groups[*].rank >= 10", "-r", "loss_value < 0.5", "-r", "gradient_norm > 0",
                 "--junit", junit)
    assert result.exit_code == 1
    suite = ET.parse(junit).getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert (suite.get("tests"), suite.get("failures")) == ("3", "2")
    assert [c.get("name") for c in cases] == ["groups[*].rank >= 10", "loss_value < 0.5", "gradient_norm > 0"]
    assert [c.find("failure") is not None for c in cases] == [True, False, True]
    assert "groups[1].rank = 8, limit >= 10" in cases[0].find("failure").text
    assert list(junit.parent.glob(".*.tmp")) == []  # written atomically: no temporary file left


def test_junit_into_a_directory_is_bad_input(report, tmp_path):
    assert_error(run(report, "-r", "loss_value < 1", "--junit", tmp_path), "is a directory")


def test_github_annotations(report, monkeypatch):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    result = run(report, "-r", "groups[*].rank >= 10", "-r", "loss_value < 0.5")
    assert result.exit_code == 1
    errors = [line for line in result.stdout.splitlines() if line.startswith("::error")]
    assert len(errors) == 1
    assert errors[0].startswith("::error title=curvscope check%3A rule failed::groups[*].rank >= 10: ")
    # under --json the annotations go to stderr: stdout stays parseable
    result = run(report, "-r", "groups[*].rank >= 10", "--json")
    json.loads(result.stdout)
    assert "::error title=curvscope check%3A rule failed::" in result.stderr
    # bad input is annotated too
    result = run(report, "-r", "groups[0].lamda_max < 1")
    assert result.exit_code == 2
    assert result.stdout.startswith("::error title=curvscope check%3A bad input::unknown path")


def test_no_annotations_outside_github_actions(report):
    result = run(report, "-r", "groups[*].rank >= 10")
    assert result.exit_code == 1 and "::error" not in result.stdout + result.stderr


# -- baselines ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, spec, new_value, code", [
    ("--max-increase", "groups[0].lambda_max=20%", 48.0, 0),
    ("--max-increase", "groups[0].lambda_max=20%", 49.0, 1),
    ("--max-increase", "groups[0].lambda_max=5", 45.0, 0),
    ("--max-increase", "groups[0].lambda_max=5", 45.1, 1),
    ("--max-decrease", "groups[0].lambda_max=25%", 30.0, 0),
    ("--max-decrease", "groups[0].lambda_max=25%", 29.0, 1),
    ("--max-decrease", "groups[0].lambda_max=1", 39.0, 0),
    ("--max-decrease", "groups[0].lambda_max=1", 38.9, 1),
])
def test_baseline_limits(report, tmp_path, option, spec, new_value, code):
    new = _variant(tmp_path, "new.json", lambda_max=new_value)
    result = run(new, "--baseline", report, option, spec, "--json")
    assert result.exit_code == code, result.stdout + result.stderr
    check = json.loads(result.stdout)["rules"][0]["checks"][0]
    assert (check["value"], check["baseline"]) == (new_value, 40.0)


def test_baseline_limits_combine_with_rules_and_wildcards(report, tmp_path):
    new = _variant(tmp_path, "new.json", lambda_max=60.0, rank=31)
    args = [new, "-r", "loss_value < 1", "--baseline", report, "--max-increase", "groups[*].lambda_max=20%",
            "--max-decrease", "groups[name=all].rank=0"]
    result = run(*args)
    assert result.exit_code == 1
    assert "2 of 3 passed" in text(result.stdout)
    doc = json.loads(run(*args, "--json").stdout)
    assert [r["passed"] for r in doc["rules"]] == [True, False, True]
    assert doc["rules"][1]["reason"] == ("1 of 2 fail: groups[0].lambda_max: rose by 20 (50.0%) from 40 to "
                                         "60; max increase 20%")


def test_baseline_of_another_problem_warns(report, tmp_path):
    other = json.loads(report.read_text())
    other["problem"]["batch_size"] = 32
    old = tmp_path / "old.json"
    old.write_text(json.dumps(other))
    result = run(report, "--baseline", old, "--max-increase", "loss_value=1")
    assert result.exit_code == 0 and "different problem (batch_size differ)" in text(result.stderr)


def test_unknown_baseline_path_is_bad_input(report, tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**REPORT, "lr": {}}))
    assert_error(run(report, "--baseline", old, "--max-increase", "lr.groups[0].recommended=5%"),
                 "in the baseline")


# -- config files ------------------------------------------------------------------------------------------

def test_config_rules_and_baseline_on_a_report(report, tmp_path):
    (tmp_path / "ci").mkdir()
    _variant(tmp_path / "ci", "old.json", lambda_max=30.0)
    config = tmp_path / "ci" / "curvscope.toml"
    config.write_text('rules = ["loss_value < 0.5"]\n[spectrum]\nmc_samples = 1\n'
                      '[baseline]\nreport = "old.json"\nmax_increase = { "groups[0].lambda_max" = "50%" }\n')
    result = run(report, "--config", config, "-r", "groups[0].rank > 1", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert [r["rule"] for r in doc["rules"]] == ["loss_value < 0.5", "groups[0].rank > 1",
                                                 "groups[0].lambda_max increase <= 50% vs baseline"]
    assert doc["computed"] == []  # a report is checked as it is: [spectrum] does not recompute it
    # --baseline overrides the config's baseline report
    result = run(report, "--config", config, "--baseline", _variant(tmp_path, "old2.json", lambda_max=20.0))
    assert result.exit_code == 1


def test_bad_config_is_bad_input(report, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("rules = [\n")
    assert_error(run(report, "--config", config), "invalid TOML")
    config.write_text('rule = ["loss_value < 1"]\n')
    assert_error(run(report, "--config", config), "did you mean 'rules'?")


# -- config mode: compute, then check ----------------------------------------------------------------------

def _fake_engines(monkeypatch, calls: list):
    """Replace the workflows by ones that record their call (the options that differ from the defaults) and
    add a small report section of the problem."""
    import dataclasses

    import curvscope.workflows as workflows

    real_get = workflows.get

    def fake_get(name):
        real = real_get(name)

        def run(problem, options, progress=None):
            defaults = type(options)()
            changed = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
                       if getattr(options, f.name) != getattr(defaults, f.name)}
            calls.append((name, changed, problem.batch_size, problem.info.get("seed")))
            return problem

        def write(writer, problem, _result, _options):
            fields = {"lr": {"groups": [{"name": "w", "recommended": 0.1}]}} if name == "lr" else \
                {"loss_value": float(problem.loss_value()), "groups": [{"name": "all", "rank": 3}]}
            writer.section(name, fields)

        return dataclasses.replace(real, run=run, write=write, claim=None)

    monkeypatch.setattr(workflows, "get", fake_get)


def test_config_mode_runs_what_the_rules_need(tiny_files, tmp_path, monkeypatch):
    ckpt, data, _ = tiny_files
    calls: list = []
    _fake_engines(monkeypatch, calls)
    config = tmp_path / "c.toml"
    config.write_text('rules = ["lr.groups[*].recommended > 0"]\n[problem]\nbatch_size = 6\nseed = 3\n')
    out = tmp_path / "out"
    result = run(ckpt, "--data", data, "--config", config, "-o", out, "--seed", "4")
    assert result.exit_code == 0, result.stderr
    assert calls == [("lr", {}, 6, 4)]  # only lr; [problem] batch_size used, --seed overrides the config
    assert json.loads((out / "report.json").read_text())["problem"]["batch_size"] == 6
    calls.clear()
    result = run(ckpt, "--data", data, "--config", config, "-o", out, "-r", "groups[0].rank >= 5",
                 "--batch-size", "12")
    assert result.exit_code == 1
    assert [(c[0], c[2]) for c in calls] == [("spectrum", 12), ("lr", 12)]


def test_config_mode_checks_engine_options_before_computing(tiny_files, tmp_path, monkeypatch):
    ckpt, data, _ = tiny_files
    calls: list = []
    _fake_engines(monkeypatch, calls)
    config = tmp_path / "c.toml"
    config.write_text('rules = ["loss_value < 9"]\n[spectrum]\nmc_sample = 1\n')
    assert_error(run(ckpt, "--data", data, "--config", config, "-o", tmp_path / "o"),
                 "unknown option 'mc_sample' in [spectrum] (did you mean 'mc_samples'?)")
    config.write_text('rules = ["loss_value < 9"]\n[lr]\npartitin = "layer"\n')
    assert_error(run(ckpt, "--data", data, "--config", config),
                 "unknown option 'partitin' in [lr] (did you mean 'partition'?)", "curvscope lr-suggest")
    config.write_text('rules = ["loss_value < 9"]\n[spectrum]\nbatch_size = 1\n')
    assert_error(run(ckpt, "--data", data, "--config", config), "put it under [problem]")
    config.write_text('rules = ["loss_value < 9"]\n[spectrum]\nmc_samples = 2\n')
    assert run(ckpt, "--data", data, "--config", config, "-o", tmp_path / "o").exit_code == 0
    assert calls == [("spectrum", {"mc_samples": 2}, 12, 0)]


def test_config_mode_bad_inputs(tiny_files, tmp_path):
    ckpt, data, _ = tiny_files
    assert_error(run(ckpt, "-r", "loss_value < 1", "-o", tmp_path / "o"), "no data")
    assert_error(run(tmp_path / "missing.safetensors", "--data", data, "-r", "loss_value < 1"))
    (tmp_path / "file").write_text("")
    assert_error(run(ckpt, "--data", data, "-r", "loss_value < 1", "-o", tmp_path / "file"),
                 "not a directory")


def test_config_mode_with_the_real_engines(tiny_files, tmp_path):
    ckpt, data, _ = tiny_files
    out = tmp_path / "out"
    config = tmp_path / "c.toml"
    config.write_text("[spectrum]\nplots = false\ndirections = false\n[lr]\nplot = false\n")
    rules = ["-r", "groups[0].rank >= 1", "-r", "loss_value < 100", "-r", "lr.groups[*].recommended > 0",
             "-r", "factors.blocks[*].frobenius >= 0"]
    result = run(ckpt, "--data", data, "-o", out, *rules, "--config", config, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["computed"] == ["spectrum", "factors", "lr"] and doc["report"] == str(out / "report.json")
    assert (out / "factors.png").exists() and not (out / "spectrum.png").exists()  # options reached engines
    result = run(ckpt, "--data", data, "-o", out, "-r", "groups[0].lambda_max < 0", "--config", config)
    assert result.exit_code == 1
    assert run(out, "-r", "groups[0].lambda_max >= 0").exit_code == 0  # a directory holding report.json


# -- the documented workflow, verbatim ---------------------------------------------------------------------

def workflow_check_command() -> list[str]:
    """The `curvscope check ...` line of the GitHub Actions workflow in docs/ci.md, as argv."""
    text = (ROOT / "docs" / "ci.md").read_text()
    workflow = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    joined = workflow.replace("\\\n", " ")
    line = next(ln.strip() for ln in joined.splitlines() if ln.strip().startswith("curvscope check "))
    return shlex.split(line)[1:]


def test_documented_workflow_passes_on_the_sample_model(tmp_path, monkeypatch):
    argv = workflow_check_command()
    assert argv[:2] == ["check", "sample_models/mlp-digits.safetensors"]
    assert "docs/curvscope.example.toml" in argv
    (tmp_path / "sample_models").symlink_to(SAMPLES)
    (tmp_path / "docs").symlink_to(ROOT / "docs")
    monkeypatch.chdir(tmp_path)  # outputs land in tmp_path, exactly where the workflow puts them
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    junit = [argv[i + 1] for i, a in enumerate(argv) if a == "--junit"]
    if junit:
        suite = ET.parse(tmp_path / junit[0]).getroot().find("testsuite")
        assert suite.get("failures") == "0" and int(suite.get("tests")) >= 4
