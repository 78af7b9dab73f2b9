"""``curvscope lr-suggest`` end to end: report, plot, tables, --emit, bad input, and the truth test on the
bundled sample models (the recommended rates must lower the batch loss, checked here independently)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import DIABETES, DIGITS, SAMPLES, assert_clean_error, invoke

import curvscope.cli.lr  # noqa: F401  (registers the command)


def run(*args, out=None):
    extra = ["--out", str(out)] if out is not None else []
    return invoke("lr-suggest", *args, "--device", "cpu", *extra)


def sample_loss_change(checkpoint, data, batch_size, rates):
    """Batch loss before and after one step theta - lr_P g_P, computed with plain torch from the files."""
    from curvscope.io.checkpoints import load_checkpoint
    from curvscope.io.data import load_dataset

    ce = load_checkpoint(checkpoint).loss == "ce"
    model = _sample_model(checkpoint).double().eval()
    ds = load_dataset(data)
    x, y = ds.x[:batch_size].double(), ds.y[:batch_size]
    criterion = torch.nn.CrossEntropyLoss() if ce else torch.nn.MSELoss()
    y = y.long() if ce else y.double().reshape(batch_size, -1)
    before = criterion(model(x), y)
    grads = torch.autograd.grad(before, list(model.parameters()))
    with torch.no_grad():
        for (name, p), g in zip(model.named_parameters(), grads, strict=True):
            p -= rates[name] * g
        after = criterion(model(x), y)
    return float(before.detach()), float(after)


@pytest.mark.parametrize("name", ["mlp-digits", "mlp-diabetes", "cnn-digits", "transformer-digits"])
def test_recommended_rates_decrease_the_batch_loss_on_every_sample_model(name, tmp_path):
    checkpoint, data = SAMPLES / f"{name}.safetensors", (DIABETES if "diabetes" in name else DIGITS)
    result = run(checkpoint, "--data", data, "--batch-size", "16", "--dtype", "float64", "--emit", "json",
                 out=tmp_path)
    assert result.exit_code == 0, result.stderr
    rates = json.loads(result.stdout)  # --emit json: stdout is the mapping alone
    assert rates and all(math.isfinite(r) and r > 0 for r in rates.values())
    before, after = sample_loss_change(checkpoint, data, 16, rates)
    assert after < before, (name, before, after)
    section = json.loads((tmp_path / "report.json").read_text())["lr"]
    assert section["loss_before"] == pytest.approx(before, rel=1e-9)
    assert section["realized_decrease"] == pytest.approx(before - after, rel=1e-6)
    assert (tmp_path / "lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Learning rates per layer group" in result.stderr and "Truth test" in result.stderr


def test_report_section_table_and_plot(tmp_path):
    result = run(SAMPLES / "mlp-digits.safetensors", "--data", DIGITS, "--batch-size", "12", "--batches", "2",
                 "--holdout", "10", "--cubic", "--curvature", "ggn", "--ridge", "0.001", out=tmp_path)
    assert result.exit_code == 0, result.stderr
    for text in ("group", "newton", "stab", "rule [1]:", "Truth test", "holdout 10", "report:"):
        assert text in result.stdout, text
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["command"] == "lr-suggest"
    lr = report["lr"]
    for key in ("partition", "curvature", "direction", "g_hat", "h_bar", "groups", "loss_before",
                "predicted_decrease", "realized_decrease", "realized_decrease_holdout", "steps", "cubic"):
        assert key in lr, key
    assert (lr["partition"], lr["curvature"], lr["direction"], lr["ridge"]) == ("layer", "ggn", "gradient", 0.001)
    assert [g["name"] for g in lr["groups"]] == ["1", "3", "5"]
    assert len(lr["h_bar"]) == 3 and all(len(row) == 3 for row in lr["h_bar"])
    for g, row in zip(lr["groups"], lr["h_bar"], strict=True):
        assert g["parameters"] == [f"{g['name']}.weight", f"{g['name']}.bias"]
        assert g["h_bar_diag"] == pytest.approx(row[lr["groups"].index(g)])
        for key in ("g_hat", "lr_newton", "lr_diag", "lr_stability", "recommended", "rule", "lr_cubic", "d3",
                    "recommended_mean", "recommended_std", "lr_diag_std", "noisy"):
            assert key in g, key
        assert g["recommended"] > 0 and g["lr_stability"] > 0
        assert g["recommended"] <= g["lr_stability"] * (1 + 1e-12)
    assert lr["batches"] == 2 and len(lr["per_batch"]) == 2 and lr["holdout"] == 10
    disjoint = set(lr["per_batch"][0]["batch_indices"]) & set(lr["per_batch"][1]["batch_indices"])
    assert not disjoint
    assert lr["realized_decrease"] > 0
    assert (tmp_path / "lr.png").stat().st_size > 10_000


def test_emit_torch_runs_as_python(tmp_path):
    result = run(SAMPLES / "mlp-diabetes.safetensors", "--data", DIABETES, "--batch-size", "16",
                 "--partition", "tensor", "--emit", "torch", out=tmp_path)
    assert result.exit_code == 0, result.stderr
    section = json.loads((tmp_path / "report.json").read_text())["lr"]
    model = _sample_model(SAMPLES / "mlp-diabetes.safetensors")
    scope = {"model": model}
    exec(result.stdout, scope)  # noqa: S102  (the point of the test)
    optimizer = scope["optimizer"]
    assert isinstance(optimizer, torch.optim.SGD)
    assert len(optimizer.param_groups) == len(section["groups"]) == len(list(model.parameters()))
    for group, row in zip(optimizer.param_groups, section["groups"], strict=True):
        assert group["lr"] == row["recommended"]
        assert all(p is model.get_parameter(n) for p, n in zip(group["params"], row["parameters"], strict=True))


def _sample_model(checkpoint):
    from curvscope.io.checkpoints import apply_state_dict, load_checkpoint
    from curvscope.io.spec import build_model

    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt.model_spec, dict(ckpt.model_kwargs), seed=0)
    apply_state_dict(model, ckpt.state_dict, str(checkpoint))
    return model


def test_run_lr_without_the_cli_merges_into_the_report(tmp_path):
    from curvscope.io.load import load_problem
    from curvscope.report.writer import ReportWriter
    from curvscope.workflows.lr import LrOptions, run_lr, write_lr

    def run_lr_and_write(options):
        writer = ReportWriter(tmp_path, problem)
        write_lr(writer, problem, run_lr(problem, options), options)
        return writer.commit()["lr"]

    problem = load_problem(SAMPLES / "mlp-diabetes.safetensors", DIABETES, batch_size=16, device="cpu")
    section = run_lr_and_write(LrOptions.from_mapping({"partition": "all", "plot": False}))
    assert [g["name"] for g in section["groups"]] == ["all"]
    assert not (tmp_path / "lr.png").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["lr"] == json.loads(json.dumps(section))
    report["extra"] = 1
    (tmp_path / "report.json").write_text(json.dumps(report))
    run_lr_and_write(LrOptions.from_mapping({}))
    merged = json.loads((tmp_path / "report.json").read_text())
    assert merged["extra"] == 1 and merged["lr"]["partition"] == "layer"
    from curvscope.errors import CurvscopeError

    with pytest.raises(CurvscopeError, match="unknown option 'partitions'"):
        run_lr_and_write(LrOptions.from_mapping({"partitions": "all"}))


@pytest.mark.parametrize("args, needle", [
    (["--partition", "module"], "--partition 'module'"),
    (["--curvature", "fisher"], "--curvature 'fisher'"),
    (["--direction", "adam"], "--direction 'adam'"),
    (["--emit", "yaml"], "--emit 'yaml'"),
    (["--ridge", "-1"], "--ridge must be"),
    (["--cubic", "--cubic-weight", "0"], "--cubic-weight must be"),
    (["--batches", "0"], "--batches must be"),
    (["--batches", "40"], "needs 640 samples but the dataset has 442"),
    (["--holdout", "500"], "needs 516 samples"),
])
def test_bad_options_are_one_line_errors_without_output(args, needle, tmp_path):
    result = run(SAMPLES / "mlp-diabetes.safetensors", "--data", DIABETES, "--batch-size", "16", *args,
                 out=tmp_path / "out")
    assert_clean_error(result, needle)
    assert not (tmp_path / "out").exists()


def test_out_is_a_file_is_a_clean_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    result = run(SAMPLES / "mlp-diabetes.safetensors", "--data", DIABETES, "--batch-size", "8", out=target)
    assert_clean_error(result, "exists and is not a directory")


def test_zero_gradient_model_gives_finite_output(tmp_path):
    from conftest import write_data

    from curvscope.io.checkpoints import save_checkpoint
    from curvscope.models import mlp

    torch.manual_seed(0)
    model = mlp(3, [], 2)
    x = torch.randn(10, 3, dtype=torch.float64)
    with torch.no_grad():
        y = model.double()(x)
    ckpt = tmp_path / "fit.safetensors"
    save_checkpoint(ckpt, model, model_spec="curvscope.models:mlp",
                    model_kwargs={"in_features": 3, "hidden": [], "out_features": 2}, loss="mse")
    data = write_data(tmp_path / "fit-data.safetensors", x, y)
    result = run(ckpt, "--data", data, "--dtype", "float64", "--emit", "json", out=tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    rates = json.loads(result.stdout)
    assert all(math.isfinite(r) and r > 0 for r in rates.values())
    assert "zero gradient: fallback" in result.stderr
    lr = json.loads((tmp_path / "out" / "report.json").read_text())["lr"]
    assert lr["realized_decrease"] == 0 and lr["newton_note"] == "no group moves"


def test_help_documents_the_rule():
    result = invoke("lr-suggest", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for words in ("Recommended rule", "joint Newton", "stability", "--emit", "--batches", "--cubic", "Example"):
        assert words in text, words
