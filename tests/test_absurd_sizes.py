"""Absurd counts and sizes are refused up front with one line (each has a documented maximum), never run for
hours."""

from __future__ import annotations

import time

import pytest
from conftest import assert_clean_error, invoke


@pytest.mark.parametrize("command, flag, value, maximum", [
    ("spectrum", "--density-vectors", "1000000", "100"),
    ("spectrum", "--trace-samples", "10000000", "10,000"),
    ("spectrum", "--top-k", "100000000", "10,000"),
    ("spectrum", "--mc-samples", "5000", "1,000"),
    ("lr-suggest", "--batches", "100000", "1,000"),
    ("factors", "--ensemble", "1000000", "10,000"),
    ("factors", "--ensemble-chunk", "1000000", "10,000"),
])
def test_absurd_counts_are_refused_before_loading(tmp_path, tiny_files, command, flag, value, maximum):
    ckpt, data, _ = tiny_files
    started = time.perf_counter()
    result = invoke(command, ckpt, "--data", data, "-o", tmp_path / "o", flag, value)
    assert_clean_error(result, flag, f"at most {maximum}")
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "o").exists()


def test_an_absurd_count_in_a_check_config_is_refused(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    config = tmp_path / "ci.toml"
    config.write_text('rules = ["loss_value < 9"]\n[spectrum]\nmethod = "lanczos"\ndensity_vectors = 1000000\n')
    assert_clean_error(invoke("check", ckpt, "--data", data, "--config", config, "-o", tmp_path / "o"),
                       "density_vectors", "at most 100")


@pytest.mark.parametrize("path", [".".join(["a"] * 10_000), ".".join(["groups[0]"] * 3000),
                                  ".".join(["groups[0]"] * 40) + ".rank"])
def test_a_huge_baseline_path_is_refused_at_once(tmp_path, tiny_files, path):
    ckpt, data, _ = tiny_files
    out = tmp_path / "o"
    assert invoke("spectrum", ckpt, "--data", data, "-o", out, "--no-plots").exit_code == 0
    started = time.perf_counter()
    result = invoke("check", out, "--baseline", out / "report.json", "--max-increase", f"{path}=5%")
    assert_clean_error(result, "malformed path")
    result = invoke("check", out, "-r", f"{path[:990]} < 1")
    assert_clean_error(result, "malformed")
    assert time.perf_counter() - started < 2.0
