"""Non-finite numbers never pass ``check``: a NaN or infinite value or baseline fails every rule and limit it
reaches (Python callers), and a report file holding one is refused as malformed (the CLI)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import assert_clean_error, invoke

from curvscope.errors import CurvscopeError
from curvscope.report.check import evaluate, parse_limit, parse_rule


def _report(value):
    return {"schema_version": "1.0", "loss_value": value, "groups": [{"name": "all", "lambda_max": value},
                                                                       {"name": "b", "lambda_max": 1.0}]}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400, -(10**400)])
@pytest.mark.parametrize("rule", ["loss_value != 0.5", "loss_value > 1", "loss_value < 0", "loss_value == 0",
                                  "loss_value >= -1e300", "loss_value <= 1e300", "groups[*].lambda_max != 7"])
def test_a_non_finite_value_fails_every_rule(value, rule):
    [result] = evaluate(_report(value), [parse_rule(rule)])
    assert not result.passed, (value, rule)
    assert "not finite" in result.reason
    assert all(c.value is None or math.isfinite(c.value) for c in result.checks)  # JSON-safe


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("limit", ["loss_value=20%", "loss_value=1"])
@pytest.mark.parametrize("direction", ["increase", "decrease"])
def test_a_non_finite_value_or_baseline_fails_every_limit(bad, limit, direction):
    spec = parse_limit(limit, direction)
    for report, baseline in ((_report(bad), _report(1.0)), (_report(1.0), _report(bad))):
        [result] = evaluate(report, [], [spec], baseline)
        assert not result.passed, (bad, limit, direction, report["loss_value"])
        assert "not finite" in result.reason
        json.dumps([c.__dict__ for c in result.checks], allow_nan=False)


@pytest.mark.parametrize("text", ["loss_value < 1e999", "loss_value > -1e400"])
def test_a_non_finite_threshold_is_refused(text):
    with pytest.raises(CurvscopeError, match="not finite"):
        parse_rule(text)
    with pytest.raises(CurvscopeError, match="not finite"):
        parse_limit("loss_value=1e999", "increase")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_report_or_baseline_holding_one_is_refused_by_the_cli(tmp_path, literal):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_report(0.25)))
    bad.write_text(json.dumps(_report(0.25)).replace('"loss_value": 0.25', f'"loss_value": {literal}'))
    for rule in ("loss_value != 0.5", "loss_value > 1", "loss_value < 0"):
        assert_clean_error(invoke("check", bad, "-r", rule), "malformed report", "loss_value", "non-finite")
    assert_clean_error(invoke("check", good, "--baseline", bad, "--max-increase", "loss_value=10%"),
                       "malformed report", "loss_value")
    assert invoke("check", good, "--baseline", good, "--max-increase", "loss_value=10%").exit_code == 0
