"""The bundled run sample_models/eos-run: make.py regenerates it identically, and it shows the edge of stability
(the sharpness rises from well below SGD's threshold 2/lr to it, and settles there)."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from conftest import SAMPLES

from curvscope.io.runs import find_checkpoints
from curvscope.workflows.track import TrackOptions, run_problem, run_track

RUN = SAMPLES / "eos-run"


def test_make_regenerates_the_run_identically(tmp_path):
    spec = importlib.util.spec_from_file_location("make_samples", SAMPLES / "make.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    shutil.copy(SAMPLES / "diabetes.safetensors", tmp_path / "diabetes.safetensors")
    make.HERE = tmp_path
    make.make_eos_run()
    bundled = sorted(p.name for p in RUN.glob("*.pt"))
    assert sorted(p.name for p in (tmp_path / "eos-run").glob("*.pt")) == bundled and len(bundled) == 12
    assert sum(p.stat().st_size for p in RUN.glob("*.pt")) < 1_000_000
    for name in bundled:
        a = torch.load(RUN / name, weights_only=True)
        b = torch.load(tmp_path / "eos-run" / name, weights_only=True)
        assert a["step"] == b["step"] and a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_the_bundled_run_reaches_the_edge_of_stability():
    checkpoints = find_checkpoints([RUN])
    assert [c.step for c in checkpoints] == [0, 100, 200, 300, 400, 500, 600, 700, 800, 1000, 1500, 2000]
    problem = run_problem(checkpoints[0], checkpoints[0].load(), data=SAMPLES / "diabetes.safetensors",
                          batch_size=256, device="cpu")
    run = run_track(problem, TrackOptions(), checkpoints=checkpoints)
    ratios = [p.measured.sharpness_ratio for p in run.points]
    assert all(p.measured.threshold == pytest.approx(20.0) for p in run.points)
    assert ratios[0] < 0.3 and max(ratios) > 1.1
    assert all(0.97 < r < 1.06 for r in ratios[-3:])  # it settles at the threshold
