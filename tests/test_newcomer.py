"""A newcomer's day: the default output directory keeps different problems apart, spectrum --json, check on
a mistyped directory, the docs' rule examples, relative model files in checkpoint metadata."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
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
