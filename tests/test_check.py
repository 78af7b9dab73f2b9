"""Rules, paths, baselines, config files and CI outputs of ``curvscope check`` (no CLI, no models)."""

from __future__ import annotations

import copy
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from curvscope.errors import CurvscopeError
from curvscope.report.check import (
    Index,
    Key,
    Select,
    Wildcard,
    compare,
    evaluate,
    evaluate_limit,
    evaluate_rule,
    format_path,
    nearest_paths,
    parse_limit,
    parse_path,
    parse_rule,
    resolve,
)
from curvscope.report.check_config import engines_needed, load_config
from curvscope.report.check_output import github_annotation, github_annotations, junit_xml, summary

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "docs" / "curvscope.example.toml"


def make_report() -> dict:
    """A hand-written report with the shape of spectrum + lr-suggest + factors output."""
    return {
        "schema_version": "1.0", "command": "lr-suggest", "commands": ["spectrum", "lr-suggest"],
        "curvscope_version": "0.1.0",
        "problem": {"checkpoint": "model.safetensors", "model": "mlp", "data": "d.safetensors", "loss": "ce",
                    "batch_size": 64, "batch_indices": [0, 64]},
        "loss_value": 0.25, "gradient_norm": None,
        "approximation": {"mc_samples": 0, "subsample": None},
        "groups": [
            {"name": "all", "rank": 30, "lambda_max": 40.0, "trace": 90.0, "eigenvalues": [40.0, 20.0, 1.0],
             "directions": {"lambda_snr": [2.0, 0.5], "flat_overlap": 0.1}},
            {"name": "fc1", "rank": 12, "lambda_max": 25.0, "trace": 50.0, "eigenvalues": [25.0, 4.0],
             "directions": {"lambda_snr": [1.0], "flat_overlap": 0.3}},
            {"name": "fc2", "rank": 8, "lambda_max": 15.0, "trace": 40.0, "eigenvalues": [15.0],
             "directions": {"lambda_snr": [3.0], "flat_overlap": None}},
        ],
        "lr": {"partition": "tensor", "groups": [
            {"name": "fc1.weight", "recommended": 0.01, "lr_newton": 0.02},
            {"name": "fc1.bias", "recommended": 0.001, "lr_newton": None},
        ], "predicted_decrease": 0.01},
        "factors": {"symmetry": "orthogonal",
                    "layers": {"fc1.weight": {"phi": 2.0}, "fc2.weight": {"phi": -1.0}}},
        "empty": [],
    }


# -- parsing -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, path, op, threshold", [
    ("groups[0].lambda_max <= 50", (Key("groups"), Index(0), Key("lambda_max")), "<=", 50.0),
    ("groups[*].rank>=10", (Key("groups"), Wildcard(), Key("rank")), ">=", 10.0),
    ("lr.groups[*].recommended > 1e-5", (Key("lr"), Key("groups"), Wildcard(), Key("recommended")), ">",
     1e-5),
    ("  loss_value < .5 ", (Key("loss_value"),), "<", 0.5),
    ("groups[-1].trace == -3.5E2", (Key("groups"), Index(-1), Key("trace")), "==", -350.0),
    ("groups[name=fc1].rank != 4", (Key("groups"), Select("name", "fc1"), Key("rank")), "!=", 4.0),
    ('factors.layers["fc1.weight"].phi < +2', (Key("factors"), Key("layers"), Key("fc1.weight"), Key("phi")),
     "<", 2.0),
    ("groups[ name = 'a b' ].rank > 0", (Key("groups"), Select("name", "a b"), Key("rank")), ">", 0.0),
])
def test_parse_rule(text, path, op, threshold):
    rule = parse_rule(text)
    assert (rule.path, rule.op, rule.threshold) == (path, op, threshold)
    assert parse_rule(rule.text) == rule  # the canonical text parses back to the same rule


@pytest.mark.parametrize("text, needle", [
    ("groups[0].lambda_max =< 50", "expected a comparison"),
    ("groups[0].lambda_max = 50", "expected a comparison"),
    ("groups[0].lambda_max 50", "expected a comparison"),
    ("groups[0].lambda_max <=", "expected a number"),
    ("loss_value < 50%", "expected a number, got '50%'"),
    ("loss_value < abc", "expected a number"),
    ("loss_value < 1 2", "expected a number"),
    ("groups[0.lambda_max < 1", "expected ']'"),
    ("groups[abc].rank < 1", "expected an index"),
    ("groups..rank < 1", "expected a key"),
    ("< 1", "expected a path"),
    ("", "expected a path"),
    ('layers["fc1.weight].phi < 1', "unclosed quote"),
])
def test_malformed_rules(text, needle):
    with pytest.raises(CurvscopeError, match="malformed rule") as err:
        parse_rule(text)
    assert needle in str(err.value)
    assert "column" in str(err.value) and "\n" not in str(err.value)


def test_rule_must_be_a_string():
    with pytest.raises(CurvscopeError, match="a rule is a string"):
        parse_rule(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("op, below, equal, above", [
    ("<", True, False, False), ("<=", True, True, False), (">", False, False, True),
    (">=", False, True, True), ("==", False, True, False), ("!=", True, False, True),
])
def test_every_operator(op, below, equal, above):
    assert (compare(1.0, op, 2.0), compare(2.0, op, 2.0), compare(3.0, op, 2.0)) == (below, equal, above)
    report = {"x": 2.0}
    for value, expected in ((1.0, below), (2.0, equal), (3.0, above)):
        report["x"] = value
        assert evaluate_rule(report, parse_rule(f"x {op} 2")).passed is expected


def test_equality_tolerates_json_roundoff_only():
    assert compare(0.1 + 0.2, "==", 0.3) and not compare(0.3 + 1e-6, "==", 0.3)
    assert compare(0.3 + 1e-6, "!=", 0.3)


def test_format_path_quotes_keys_that_are_not_identifiers():
    path = (Key("factors"), Key("fc1.weight"), Key("0"), Select("name", "a b"), Index(-1), Wildcard())
    assert format_path(path) == 'factors["fc1.weight"]["0"][name="a b"][-1][*]'
    assert parse_path(format_path(path)) == path


# -- resolving and evaluating ------------------------------------------------------------------------------

def test_wildcard_requires_every_element_and_names_the_failures():
    report = make_report()
    result = evaluate_rule(report, parse_rule("groups[*].rank >= 10"))
    assert not result.passed
    assert [c.path for c in result.failures] == ["groups[2].rank"]
    assert "groups[2].rank" in result.reason and "1 of 3" in result.reason
    assert evaluate_rule(report, parse_rule("groups[*].rank >= 8")).passed


def test_wildcards_nest_and_cover_dicts():
    report = make_report()
    result = evaluate_rule(report, parse_rule("groups[*].eigenvalues[*] > 2"))
    assert len(result.checks) == 6
    assert [c.path for c in result.failures] == ["groups[0].eigenvalues[2]"]
    result = evaluate_rule(report, parse_rule("factors.layers[*].phi > 0"))
    assert [c.path for c in result.failures] == ['factors.layers["fc2.weight"].phi']


def test_selectors_and_negative_indices():
    report = make_report()
    assert [m.value for m in resolve(report, parse_path("groups[name=fc2].rank"))] == [8]
    assert [m.path for m in resolve(report, parse_path("groups[-1].rank"))] == ["groups[2].rank"]
    assert [m.value for m in resolve(report, parse_path("groups[rank=12].name"))] == ["fc1"]
    with pytest.raises(CurvscopeError, match="no element of groups has name=fc9; name values: all, fc1, fc2"):
        resolve(report, parse_path("groups[name=fc9].rank"))


def test_null_values_fail_with_a_clear_reason():
    report = make_report()
    result = evaluate_rule(report, parse_rule("gradient_norm < 1"))
    assert not result.passed and result.reason == "value is null (not finite)"
    result = evaluate_rule(report, parse_rule("groups[*].directions.flat_overlap < 1"))
    assert [c.path for c in result.failures] == ["groups[2].directions.flat_overlap"]
    assert "null (not finite)" in result.reason


def test_empty_wildcard_fails_rather_than_passing_vacuously():
    result = evaluate_rule(make_report(), parse_rule("empty[*] > 0"))
    assert not result.passed and "empty list" in result.reason


@pytest.mark.parametrize("rule, needles", [
    ("groups[0].lamda_max < 1", ["groups[0] has no key 'lamda_max'",
                                 "nearest valid paths: groups[0].lambda_max"]),
    ("lr.groups[*].recomended > 0", ["nearest valid paths: lr.groups[*].recommended"]),
    ("los_value < 1", ["nearest valid paths: loss_value"]),
    ("groups[7].rank > 1", ["index 7 is out of range: groups has 3 elements", "groups[*].rank"]),
    ("groups.rank > 1", ["groups is a list of 3", "use [i] or [*]"]),
    ("loss_value[0] > 1", ["loss_value is a number, not a list"]),
])
def test_unknown_paths_list_the_nearest_valid_ones(rule, needles):
    with pytest.raises(CurvscopeError, match="unknown path") as err:
        evaluate_rule(make_report(), parse_rule(rule))
    for needle in needles:
        assert needle in str(err.value)


def test_missing_section_says_which_command_writes_it():
    report = make_report()
    del report["factors"]
    with pytest.raises(CurvscopeError, match="no 'factors' section: run `curvscope factors`"):
        evaluate_rule(report, parse_rule("factors.layers[*].phi > 0"))


@pytest.mark.parametrize("rule, needle", [
    ("groups[0].eigenvalues > 0", "is a list of 3 values, not a number: use 'groups[0].eigenvalues[*]'"),
    ("groups[0].directions > 0", "is an object, not a number"),
    ("groups[0].name > 0", "is a string ('all'), not a number"),
])
def test_paths_that_do_not_end_at_numbers_are_errors(rule, needle):
    with pytest.raises(CurvscopeError, match="not a number") as err:
        evaluate_rule(make_report(), parse_rule(rule))
    assert needle in str(err.value)


def test_nearest_paths_keep_the_users_index_when_it_exists():
    report = make_report()
    assert nearest_paths(report, parse_path("groups[1].lamda_max"))[0] == "groups[1].lambda_max"
    assert nearest_paths(report, parse_path("groups[9].lamda_max"))[0] == "groups[*].lambda_max"


# -- baselines ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, amount, relative", [
    ("groups[0].lambda_max=20%", 0.2, True), ("loss_value=0.05", 0.05, False), ("x = 1e-3 ", 1e-3, False),
    ("groups[name=fc1].rank=5", 5.0, False),
])
def test_parse_limit(spec, amount, relative):
    limit = parse_limit(spec, "increase")
    assert limit.amount == pytest.approx(amount) and limit.relative is relative


@pytest.mark.parametrize("spec, needle", [
    ("loss_value", "expected PATH=AMOUNT"), ("loss_value=-5%", "must not be negative"),
    ("loss_value=lots", "not a number or a percentage"), ("loss value=5", "malformed path"),
])
def test_malformed_limits(spec, needle):
    with pytest.raises(CurvscopeError) as err:
        parse_limit(spec, "decrease")
    assert needle in str(err.value)


def _with(report: dict, **groups0) -> dict:
    new = copy.deepcopy(report)
    new["groups"][0].update(groups0)
    return new


@pytest.mark.parametrize("direction, spec, new_value, passed", [
    ("increase", "groups[0].lambda_max=20%", 48.0, True),    # exactly +20% of 40
    ("increase", "groups[0].lambda_max=20%", 48.5, False),
    ("increase", "groups[0].lambda_max=5", 45.0, True),      # absolute
    ("increase", "groups[0].lambda_max=5", 45.5, False),
    ("increase", "groups[0].lambda_max=0%", 10.0, True),     # decreases never trip an increase limit
    ("decrease", "groups[0].lambda_max=10%", 36.0, True),
    ("decrease", "groups[0].lambda_max=10%", 35.0, False),
    ("decrease", "groups[0].lambda_max=2", 38.0, True),
    ("decrease", "groups[0].lambda_max=2", 37.5, False),
])
def test_baseline_limits(direction, spec, new_value, passed):
    old = make_report()
    result = evaluate_limit(_with(old, lambda_max=new_value), old, parse_limit(spec, direction))
    assert result.passed is passed, result.reason
    assert result.checks[0].baseline == 40.0
    if not passed:
        assert ("rose" if direction == "increase" else "fell") in result.reason


def test_relative_limit_uses_the_magnitude_of_negative_baselines():
    old = make_report()
    old["factors"]["layers"]["fc2.weight"]["phi"] = -10.0
    new = copy.deepcopy(old)
    new["factors"]["layers"]["fc2.weight"]["phi"] = -8.5  # +1.5 on a magnitude of 10: within 20%
    limit = parse_limit('factors.layers["fc2.weight"].phi=20%', "increase")
    assert evaluate_limit(new, old, limit).passed
    new["factors"]["layers"]["fc2.weight"]["phi"] = -7.5
    assert not evaluate_limit(new, old, limit).passed


def test_baseline_wildcards_pair_elements_and_report_structure_changes():
    old = make_report()
    new = _with(old, lambda_max=100.0)
    result = evaluate_limit(new, old, parse_limit("groups[*].lambda_max=20%", "increase"))
    assert [c.path for c in result.failures] == ["groups[0].lambda_max"]
    fewer = copy.deepcopy(new)
    fewer["groups"].pop()
    result = evaluate_limit(fewer, old, parse_limit("groups[*].rank=0", "increase"))
    assert [c.reason for c in result.failures] == ["in the baseline but not in the report"]
    result = evaluate_limit(old, fewer, parse_limit("groups[*].rank=0", "increase"))
    assert [c.reason for c in result.failures] == ["not in the baseline"]


def test_baseline_selectors_pair_by_name_not_position():
    old = make_report()
    new = copy.deepcopy(old)
    new["groups"].reverse()
    limit = parse_limit("groups[name=fc2].lambda_max=0", "increase")
    assert evaluate_limit(new, old, limit).passed
    new["groups"][0]["lambda_max"] = 16.0  # fc2 is now first
    assert not evaluate_limit(new, old, limit).passed


def test_baseline_nulls_and_unknown_paths():
    old = make_report()
    new = copy.deepcopy(old)
    result = evaluate_limit(new, old, parse_limit("lr.groups[*].lr_newton=10%", "increase"))
    assert result.failures[0].reason == "baseline value is null (not finite)"
    old_only = copy.deepcopy(old)
    del old_only["approximation"]
    with pytest.raises(CurvscopeError, match="in the baseline"):
        evaluate_limit(new, old_only, parse_limit("approximation.mc_samples=1", "increase"))


def test_evaluate_needs_a_baseline_for_limits():
    with pytest.raises(CurvscopeError, match="baseline"):
        evaluate(make_report(), [], [parse_limit("loss_value=1", "increase")], None)


# -- config files ------------------------------------------------------------------------------------------

def write(tmp_path: Path, text: str, name: str = "curvscope.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_config_file(tmp_path):
    (tmp_path / "ci").mkdir()
    path = write(tmp_path / "ci", """
rules = ["groups[0].lambda_max <= 50", "lr.groups[*].recommended > 1e-5"]
[problem]
batch_size = 32
model_kwargs = { hidden = [8] }
model = "models/net.py:build"
[spectrum]
mc_samples = 1
[baseline]
report = "old/report.json"
max_increase = { "groups[0].lambda_max" = "20%" }
max_decrease = { "loss_value" = 0.05 }
""")
    config = load_config(path)
    assert [r.text for r in config.rules] == ["groups[0].lambda_max <= 50", "lr.groups[*].recommended > 1e-5"]
    assert config.problem["batch_size"] == 32
    assert json.loads(config.problem["model_kwargs"]) == {"hidden": [8]}
    assert config.problem["model"] == str(tmp_path / "ci" / "models" / "net.py") + ":build"
    assert config.engines == {"spectrum": {"mc_samples": 1}}
    assert config.baseline == tmp_path / "ci" / "old" / "report.json"
    assert [(lim.direction, lim.amount, lim.relative) for lim in config.limits] == [
        ("increase", 0.2, True), ("decrease", 0.05, False)]
    assert engines_needed(config, [r.path for r in config.rules]) == ["spectrum", "lr"]


@pytest.mark.parametrize("text, needle", [
    ("rule = []", "unknown key 'rule' (did you mean 'rules'?)"),
    ('rules = "loss_value < 1"', "'rules' must be a list"),
    ('rules = ["loss_value << 1"]', "rules[0]"),
    ("rules = [1]", "a rule is a string"),
    ("[problem]\nbatch_sise = 3", "unknown key 'batch_sise' in [problem] (did you mean 'batch_size'?)"),
    ('[problem]\nbatch_size = "3"', "[problem] batch_size = '3' has the wrong type"),
    ("[problem]\nbatch_size = true", "wrong type"),
    ("spectrum = 3", "[spectrum] must be a table"),
    ("[baseline]\nreports = 'x'", "did you mean 'report'?"),
    ("[baseline]\nmax_increase = 3", "max_increase must be a table"),
    ("[baseline]\nmax_increase = { loss_value = 'x%' }", "not a number or a percentage"),
    ("[baseline]\nmax_increase = { loss_value = true }", "must be a number or a percentage"),
    ("rules = [", "invalid TOML"),
])
def test_bad_config_files(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(CurvscopeError) as err:
        load_config(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(CurvscopeError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_config_without_a_toml_reader_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tomllib", None)  # import fails, as on Python 3.10 without tomli
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(CurvscopeError, match="Python 3.11.*tomli"):
        load_config(write(tmp_path, "rules = []"))


def test_engines_follow_the_first_path_key_and_the_tables(tmp_path):
    config = load_config(write(tmp_path, "[factors]\n"))
    paths = [parse_path(p) for p in ("lr.groups[0].recommended", "problem.num_params")]
    assert engines_needed(config, paths) == ["spectrum", "factors", "lr"]
    assert engines_needed(load_config(write(tmp_path, "")), [parse_path("lr.loss_before")]) == ["lr"]


def test_example_config_parses():
    config = load_config(EXAMPLE_CONFIG)
    assert config.rules, "the example config gates on at least one rule"
    assert engines_needed(config, [r.path for r in config.rules])[0] == "spectrum"


# -- CI outputs --------------------------------------------------------------------------------------------

def _results():
    report = make_report()
    return evaluate(report, [parse_rule("groups[*].rank >= 10"), parse_rule("loss_value < 1 "),
                             parse_rule("gradient_norm < 1")],
                    [parse_limit("groups[0].lambda_max=10%", "increase")], _with(report, lambda_max=30.0))


def test_junit_xml_parses_with_one_testcase_per_rule():
    results = _results()
    root = ET.fromstring(junit_xml(results, report="r.json", seconds=0.5))
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [r.rule for r in results]
    failures = [c.find("failure") for c in cases]
    assert [f is not None for f in failures] == [True, False, True, True]
    assert suite.get("tests") == "4" and suite.get("failures") == "3" and root.get("failures") == "3"
    assert "groups[2].rank: 8 is not >= 10" in failures[0].get("message")
    assert "groups[2].rank = 8, limit >= 10: FAIL" in failures[0].text
    assert "baseline 30" in failures[3].text and "limit <= 33" in failures[3].text


def test_github_annotations_escape_what_github_would_misread():
    line = github_annotation("a: 50% done\nnext", title="t: x, y")
    assert line == "::error title=t%3A x%2C y::a: 50%25 done%0Anext"
    lines = github_annotations(_results())
    assert len(lines) == 3 and all(a.startswith("::error title=curvscope check") for a in lines)
    assert "groups[*].rank >= 10" in lines[0]


def test_json_summary():
    doc = summary(_results(), report="r.json", baseline="old.json")
    json.dumps(doc, allow_nan=False)
    assert (doc["passed"], doc["exit_code"]) == (False, 1)
    assert doc["counts"] == {"rules": 4, "passed": 1, "failed": 3}
    assert doc["rules"][2]["checks"][0]["value"] is None
    assert doc["rules"][3]["checks"][0]["baseline"] == 30.0
