"""``spectrum --batches K``: K disjoint batches, each batch's numbers equal to a dense reference on that batch, and
their statistics; ``check`` gates on ``batch_stats``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY_KWARGS, assert_clean_error, invoke, tiny_mlp
from helpers import dense_ggn, nonzero_eigen
from safetensors.torch import save_file

from curvscope.io.checkpoints import save_checkpoint
from curvscope.problem import make_problem

N, BATCH, K = 20, 4, 4


@pytest.fixture
def files(tmp_path):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(N, 4, generator=g), torch.arange(N) % 3
    save_file({"x": x, "y": y}, str(tmp_path / "d.safetensors"))
    model = tiny_mlp(seed=1)
    save_checkpoint(tmp_path / "m.safetensors", model, model_spec="mlp", model_kwargs=TINY_KWARGS, loss="ce")
    return tmp_path / "m.safetensors", tmp_path / "d.safetensors", model, x, y


def dense_lambda_max(model, x, y, rows) -> float:
    problem = make_problem(model, x[rows], y[rows], loss="ce", dtype=torch.float64, device="cpu")
    return float(nonzero_eigen(dense_ggn(problem))[0][0])


def run(tmp_path, ckpt, data, *extra, out="out"):
    result = invoke("spectrum", ckpt, "--data", data, "--batch-size", BATCH, "--dtype", "float64", "--device",
                    "cpu", "--no-plots", "--out", tmp_path / out, *extra)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads((tmp_path / out / "report.json").read_text()), result


@pytest.mark.parametrize("extra", [(), ("--shuffle", "--seed", "5"), ("--method", "lanczos", "--top-k", "2")])
def test_each_batch_equals_the_dense_reference_and_the_stats_are_theirs(tmp_path, files, extra):
    ckpt, data, model, x, y = files
    report, result = run(tmp_path, ckpt, data, "--batches", K, *extra)
    per = report["per_batch"]
    assert len(per) == K
    rows = [b["batch_indices"] for b in per]
    assert rows[0] == report["problem"]["batch_indices"]
    flat = [i for r in rows for i in r]
    assert len(set(flat)) == K * BATCH and all(len(r) == BATCH for r in rows)  # disjoint batches of batch_size
    order = torch.randperm(N, generator=torch.Generator().manual_seed(5)).tolist() if extra[:1] == ("--shuffle",) \
        else list(range(N))
    assert flat == order[:K * BATCH]  # consecutive in the drawing order
    lam = [b["groups"][0]["lambda_max"] for b in per]
    for r, value in zip(rows, lam, strict=True):
        assert value == pytest.approx(dense_lambda_max(model, x, y, r), rel=1e-8)
    assert per[0]["groups"][0]["lambda_max"] == report["groups"][0]["lambda_max"]
    stats = report["batch_stats"]
    assert stats["batches"] == K
    s = stats["groups"][0]["lambda_max"]
    t = torch.tensor(lam, dtype=torch.float64)
    assert s["mean"] == pytest.approx(float(t.mean()), rel=1e-12)
    assert s["std"] == pytest.approx(float(t.std(unbiased=True)), rel=1e-12)
    assert (s["min"], s["max"]) == (min(lam), max(lam))
    losses = [b["loss_value"] for b in per]
    assert stats["loss_value"]["mean"] == pytest.approx(math.fsum(losses) / K, rel=1e-12)
    assert stats["groups"][0]["name"] == "all"
    summary = " ".join(result.stdout.split())
    assert f"λ_max {float(t.mean()):.3g} ± " in summary and f"({K} batches)" in summary


def test_check_gates_on_batch_stats_and_a_rerun_drops_them(tmp_path, files):
    ckpt, data, _, _, _ = files
    report, _ = run(tmp_path, ckpt, data, "--batches", K)
    mean = report["batch_stats"]["groups"][0]["lambda_max"]["mean"]
    path = tmp_path / "out" / "report.json"
    for op, code in (("<=", 0), (">", 1)):
        result = invoke("check", path, "-r", f"batch_stats.groups[0].lambda_max.mean {op} {mean}",
                        "-r", "per_batch[2].groups[0].lambda_max > 0", "-r", "batch_stats.groups[*].trace.std >= 0")
        assert result.exit_code == code, (result.stdout, result.stderr)
    # a checkpoint target computes the batches its config asks for
    config = tmp_path / "ci.toml"
    config.write_text(f"rules = ['batch_stats.groups[0].lambda_max.max <= {mean * 10}']\n[problem]\nbatch_size = "
                      f"{BATCH}\ndtype = 'float64'\n[spectrum]\nbatches = {K}\nplots = false\n")
    result = invoke("check", ckpt, "--data", data, "--config", config, "--out", tmp_path / "ci")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert json.loads((tmp_path / "ci" / "report.json").read_text())["batch_stats"]["batches"] == K
    # the same problem again with one batch: the old per-batch fields do not survive the merge
    report, _ = run(tmp_path, ckpt, data)
    assert report["per_batch"] is None and report["batch_stats"] is None


def test_too_many_batches_is_one_line_and_writes_nothing(tmp_path, files):
    ckpt, data, _, _, _ = files
    out = tmp_path / "none"
    result = invoke("spectrum", ckpt, "--data", data, "--batch-size", BATCH, "--batches", 6, "--out", out,
                    "--no-plots")
    assert_clean_error(result, "--batches 6 with --batch-size 4 needs 24 samples but the dataset has 20")
    assert not out.exists()
    result = invoke("spectrum", ckpt, "--data", data, "--batches", 0, "--out", out)
    assert_clean_error(result, "--batches must be at least 1")
