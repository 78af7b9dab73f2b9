"""Smoke test of the scale benchmark (``benchmarks/scale.py``, run on demand): the hand-written ResNet-18 has
torchvision's layout, one tool runs in its own process, and the analysis and table come out of its rows."""

from __future__ import annotations

import pytest
import torch

from benchmarks import scale
from benchmarks.scale_models import MODELS, ResNet18, build, num_params


def test_resnet18_has_the_standard_layout():
    assert num_params(ResNet18(1000)) == 11_689_512  # torchvision's resnet18
    assert num_params(ResNet18(10)) == 11_181_642
    model, x, y = build(MODELS["resnet-tiny"])
    assert not model.training and x.shape == (8, 3, 32, 32) and y.shape == (8,)
    with torch.no_grad():
        assert model(x).shape == (8, 10)


def test_one_tool_in_its_own_process_and_the_table(tmp_path):
    args = scale.parse_args(["--quick", "--out", str(tmp_path)])
    assert args.models == scale.QUICK_MODELS and args.threads == 1
    row = scale.run_tool("resnet-tiny", "curvscope-ggn", args)
    assert row["ok"], row
    assert row["lambda_max"] > 0 and row["products"] > 0 and row["peak_rss"] >= row["baseline_rss"] > 0
    fake = [dict(row, tool="curvscope", lambda_max=2.0, seconds=3.0, peak_rss=2 * 2**30),
            {"model": "resnet-tiny", "tool": "pyhessian", "ok": True, "lambda_max": 2.0 - 1e-3, "seconds": 10.0,
             "peak_rss": 3 * 2**30, "products": 9, "converged": True,
             "trajectory": [(4.0, 1.0), (8.0, 2.0 - 1e-5), (10.0, 2.0 - 1e-3)]}]
    summary = scale.analyse(fake)["resnet-tiny"]
    goal = summary["goals"][0]
    assert summary["reference_hessian"] == 2.0 and fake[1]["time_to_target"] == 8.0
    assert goal["met"] and goal["pyhessian_reached"] and goal["time_ratio"] == pytest.approx(3 / 8)
    text = scale.markdown({"command": "test", "started": "now", "minutes": 1.0, "load_end": [1.0, 1.0, 1.0],
                           "machine": scale.machine(), "config": vars(args), "rows": fake, "summary":
                           {"resnet-tiny": summary}})
    assert "| curvscope spectrum API (both ends) | 2 |" in text and "within 1e-4 after 2 products, 8 s" in text
    assert "Goal with" in text and "**met**" in text
