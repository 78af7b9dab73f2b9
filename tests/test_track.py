"""``curvscope track``: every point against a dense float64 Hessian (SGD, momentum, Adam), the preconditioned
sharpness, thresholds, warm starts equal to cold ones, numeric order, the CLI's report, show and check, resume,
and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, invoke
from track_runs import adam_p, dense_reference, make_run, write_data

from curvscope.io.runs import find_checkpoints
from curvscope.workflows.track import TrackOptions, run_problem, run_track

TOL = 1e-10


def _track(run_dir: Path, data: Path, **options):
    checkpoints = find_checkpoints([run_dir])
    first = checkpoints[0].load()
    problem = run_problem(checkpoints[0], first, data=data, batch_size=None, dtype="float64", device="cpu")
    return run_track(problem, TrackOptions(tol=TOL, **options), checkpoints=checkpoints), checkpoints


def test_dense_reference_hessian_matches_finite_differences(tmp_path):
    run = make_run(tmp_path / "run", "sgd", steps=(3,))
    state = torch.load(run / "step_3.pt", weights_only=True)["model"]
    from track_runs import flat_loss

    loss, theta, _ = flat_loss(state)
    reference = dense_reference(state)["hessian"]
    h = 1e-5
    for i in (0, 7, len(theta) - 1):
        e = torch.zeros_like(theta)
        e[i] = h
        column = (torch.autograd.functional.jacobian(loss, theta + e) -
                  torch.autograd.functional.jacobian(loss, theta - e)) / (2 * h)
        torch.testing.assert_close(column, reference[:, i], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
def test_every_point_against_the_dense_hessian(tmp_path, kind):
    run_dir = make_run(tmp_path / "run", kind, steps=(1, 4, 9))
    data = write_data(tmp_path / "data.safetensors")
    result, checkpoints = _track(run_dir, data)
    assert [p.step for p in result.points] == [1, 4, 9]
    for point, ckpt in zip(result.points, checkpoints, strict=True):
        saved = torch.load(ckpt.path, weights_only=True)
        ref = dense_reference(saved["model"])
        m = point.measured
        lam = float(torch.linalg.eigvalsh(ref["hessian"])[-1])
        assert m.loss == pytest.approx(ref["loss"], rel=1e-12)
        assert m.gradient_norm == pytest.approx(ref["gradient_norm"], rel=1e-10)
        assert m.lambda_max == pytest.approx(lam, rel=1e-8)
        group = saved["optimizer"]["param_groups"][0]
        lr = group["lr"]
        if kind == "sgd":
            assert m.threshold == pytest.approx(2 / lr)
            assert m.compared_sharpness == pytest.approx(lam, rel=1e-8)
            assert m.preconditioned_lambda_max is None
        elif kind == "momentum":
            assert m.threshold == pytest.approx((2 + 2 * 0.9) / lr)
            assert m.compared_sharpness == pytest.approx(lam + 1e-3, rel=1e-8)  # coupled decay adds w
        else:
            assert m.threshold == pytest.approx(38 / lr)
            p = adam_p(saved["optimizer"], ref["names"], saved["model"])
            root = p.rsqrt()
            w = group["weight_decay"]
            compared = root[:, None] * (ref["hessian"] + w * torch.eye(len(p), dtype=p.dtype)) * root[None, :]
            expected = float(torch.linalg.eigvalsh(compared)[-1])
            assert m.preconditioned_lambda_max == pytest.approx(expected, rel=1e-8)
            assert m.compared_sharpness == pytest.approx(expected, rel=1e-8)
        assert m.sharpness_ratio == pytest.approx(m.compared_sharpness / m.threshold, rel=1e-12)


def test_layer_blocks_and_measures_against_the_dense_hessian(tmp_path):
    run_dir = make_run(tmp_path / "run", "sgd", steps=(2, 5))
    data = write_data(tmp_path / "data.safetensors")
    result, checkpoints = _track(run_dir, data, groups="layer", measure="bottom,trace,ggn", trace_samples=200)
    for point, ckpt in zip(result.points, checkpoints, strict=True):
        ref = dense_reference(torch.load(ckpt.path, weights_only=True)["model"])
        H = ref["hessian"]
        m = point.measured
        assert m.lambda_min == pytest.approx(float(torch.linalg.eigvalsh(H)[0]), rel=1e-8)
        assert m.trace == pytest.approx(float(H.trace()), rel=1e-10)  # budget >= D: the exact trace
        assert m.ggn_lambda_max is not None and 0 < m.ggn_lambda_max
        sizes = {"1.weight": 20, "1.bias": 5, "3.weight": 15, "3.bias": 3}
        start = 0
        blocks = {}
        for name in ref["names"]:
            blocks.setdefault(name.rsplit(".", 1)[0], []).append(slice(start, start + sizes[name]))
            start += sizes[name]
        for layer, slices in blocks.items():
            index = torch.cat([torch.arange(s.start, s.stop) for s in slices])
            block = H[index][:, index]
            assert m.groups[layer] == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=1e-8)


def test_warm_starts_equal_cold_starts_with_fewer_products(tmp_path):
    run_dir = make_run(tmp_path / "run", "sgd", steps=tuple(range(10, 30, 2)))
    data = write_data(tmp_path / "data.safetensors")
    checkpoints = find_checkpoints([run_dir])
    problem = run_problem(checkpoints[0], checkpoints[0].load(), data=data, batch_size=None, dtype="float64",
                          device="cpu")
    tol = 1e-6
    warm = run_track(problem, TrackOptions(tol=tol), checkpoints=checkpoints)
    cold = run_track(problem, TrackOptions(tol=tol, warm_start=False), checkpoints=checkpoints)
    for a, b in zip(warm.points, cold.points, strict=True):
        assert abs(a.measured.lambda_max - b.measured.lambda_max) <= 2 * tol * abs(b.measured.lambda_max)
    assert [p.measured.warm for p in warm.points] == [False] + [True] * (len(checkpoints) - 1)
    assert not any(p.measured.warm for p in cold.points)
    assert sum(p.measured.products for p in warm.points) < sum(p.measured.products for p in cold.points)


def test_numeric_step_order_and_steps_from_names(tmp_path):
    run_dir = tmp_path / "run"
    make_run(run_dir, "sgd", steps=(2, 10, 100), name="ckpt_{}.pt")
    for f in run_dir.iterdir():  # drop the saved step: the step comes from the name
        entry = torch.load(f, weights_only=True)
        entry.pop("step")
        torch.save(entry, f)
    result, _ = _track(run_dir, write_data(tmp_path / "data.safetensors"))
    assert [p.step for p in result.points] == [2, 10, 100]


def _cli(run_dir, data, out, *extra):
    return invoke("track", run_dir, "--data", data, "--batch-size", "16", "--dtype", "float64", "--device", "cpu",
                  "--out", out, *extra)


def test_cli_report_table_plot_show_and_check(tmp_path):
    run_dir = make_run(tmp_path / "run", "momentum", steps=(1, 5, 20))
    data = write_data(tmp_path / "data.safetensors")
    out = tmp_path / "out"
    result = _cli(run_dir, data, out, "--groups", "layer")
    assert result.exit_code == 0, result.stderr
    assert "Sharpness over training" in result.stdout and "threshold" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines() if not line.startswith("report:")) <= 80
    report = json.loads((out / "report.json").read_text())
    section = report["track"]
    assert section["complete"] and section["checkpoints"] == 3 and report["commands"] == ["track"]
    assert (out / "track.png").stat().st_size > 10_000 and report["files"]["track_plot"].endswith("track.png")
    for point in section["points"]:
        assert point["threshold"] == pytest.approx(3.8 / 0.1)
        assert point["optimizer"] == "sgd" and point["lr"] == 0.1 and point["momentum"] == 0.9
        assert point["reused"] is False and point["products"] > 0 and point["seconds"] >= 0
        assert set(point["groups"]) == {"1", "3"} and point["fingerprint"]["size"] > 0
        assert point["sharpness_ratio"] == pytest.approx(point["compared_sharpness"] / point["threshold"])
    shown = invoke("show", out, "--out", tmp_path / "shown")
    assert shown.exit_code == 0 and "Sharpness over training" in shown.stdout
    assert (tmp_path / "shown" / "track.png").is_file()
    gate = invoke("check", out, "--rule", "track.points[*].sharpness_ratio <= 1.1",
                  "--rule", "track.points[-1].lambda_max < 50")
    assert gate.exit_code == 0, gate.stdout
    failing = invoke("check", out, "--rule", "track.points[-1].lambda_max < 1e-9")
    assert failing.exit_code == 1


def test_thresholds_without_optimizer_state_come_from_the_options(tmp_path):
    run_dir = make_run(tmp_path / "run", "sgd", steps=(1, 3))
    for f in run_dir.iterdir():
        entry = torch.load(f, weights_only=True)
        entry.pop("optimizer")
        torch.save(entry, f)
    data = write_data(tmp_path / "data.safetensors")
    assert _cli(run_dir, data, tmp_path / "a").exit_code == 0
    points = json.loads((tmp_path / "a" / "report.json").read_text())["track"]["points"]
    assert all(p["threshold"] is None and p["sharpness_ratio"] is None for p in points)
    assert _cli(run_dir, data, tmp_path / "b", "--lr", "0.2", "--momentum", "0.5").exit_code == 0
    points = json.loads((tmp_path / "b" / "report.json").read_text())["track"]["points"]
    assert all(p["threshold"] == pytest.approx(3.0 / 0.2) for p in points)
    result = _cli(run_dir, data, tmp_path / "c", "--lr", "0.01", "--optimizer", "adam")
    assert result.exit_code == 0
    points = json.loads((tmp_path / "c" / "report.json").read_text())["track"]["points"]
    assert all(p["threshold"] == pytest.approx(38 / 0.01) and p["sharpness_ratio"] is None for p in points)
    assert any("needs the state" in note for note in points[0]["notes"])


def test_resume_reuses_unchanged_points_and_computes_only_new_ones(tmp_path):
    run_dir = make_run(tmp_path / "run", "sgd", steps=(1, 2, 3))
    data = write_data(tmp_path / "data.safetensors")
    out = tmp_path / "out"
    assert _cli(run_dir, data, out, "--no-plot").exit_code == 0
    first = json.loads((out / "report.json").read_text())["track"]["points"]
    make_run(tmp_path / "more", "sgd", steps=(1, 2, 3, 4, 6))  # the same training, run further
    for step in (4, 6):
        (tmp_path / "more" / f"step_{step}.pt").rename(run_dir / f"step_{step}.pt")
    result = _cli(run_dir, data, out, "--no-plot")
    assert result.exit_code == 0 and "3 point(s) reused" in result.stdout
    points = json.loads((out / "report.json").read_text())["track"]["points"]
    assert [p["step"] for p in points] == [1, 2, 3, 4, 6]
    assert [p["reused"] for p in points] == [True, True, True, False, False]
    assert [p["lambda_max"] for p in points[:3]] == [p["lambda_max"] for p in first]
    make_run(tmp_path / "changed", "sgd", steps=(2,), seed=5)  # another checkpoint under an old name
    (tmp_path / "changed" / "step_2.pt").replace(run_dir / "step_2.pt")
    assert _cli(run_dir, data, out, "--no-plot").exit_code == 0
    points = json.loads((out / "report.json").read_text())["track"]["points"]
    assert [p["reused"] for p in points] == [True, False, True, True, True]
    assert _cli(run_dir, data, out, "--no-plot", "--tol", "1e-9").exit_code == 0  # other options: nothing reused
    assert not any(p["reused"] for p in json.loads((out / "report.json").read_text())["track"]["points"])
    assert _cli(run_dir, data, out, "--no-plot", "--tol", "1e-9", "--fresh").exit_code == 0
    assert not any(p["reused"] for p in json.loads((out / "report.json").read_text())["track"]["points"])


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    data = write_data(tmp_path / "data.safetensors")
    (tmp_path / "empty").mkdir()
    assert_clean_error(_cli(tmp_path / "empty", data, tmp_path / "o"), "no checkpoint found")

    mixed = make_run(tmp_path / "mixed", "sgd", steps=(1, 2))
    from track_runs import checkpoint, model

    other = {"in_features": 4, "hidden": [7], "out_features": 3, "activation": "tanh"}
    checkpoint(mixed / "step_3.pt", model(0, other), None, 3, kwargs=other)
    assert_clean_error(_cli(mixed, data, tmp_path / "o"), "step_3.pt", "different models")

    nameless = make_run(tmp_path / "nameless", "sgd", steps=(1,))
    entry = torch.load(nameless / "step_1.pt", weights_only=True)
    entry.pop("step")
    torch.save(entry, nameless / "final.pt")
    assert_clean_error(_cli(nameless, data, tmp_path / "o"), "no step for", "final.pt")

    twice = make_run(tmp_path / "twice", "sgd", steps=(1,))
    torch.save(torch.load(twice / "step_1.pt", weights_only=True), twice / "copy_of_1.pt")
    assert_clean_error(_cli(twice, data, tmp_path / "o"), "two checkpoints with step 1")

    wrong = make_run(tmp_path / "wrong", "momentum", steps=(2,))
    entry = torch.load(wrong / "step_2.pt", weights_only=True)
    entry["optimizer"]["state"] = {0: entry["optimizer"]["state"][1], 1: entry["optimizer"]["state"][0],
                                   **{k: v for k, v in entry["optimizer"]["state"].items() if k > 1}}
    torch.save(entry, wrong / "step_2.pt")
    assert_clean_error(_cli(wrong, data, tmp_path / "o"), "step_2.pt", "optimizer state does not match")

    run_dir = make_run(tmp_path / "run", "sgd", steps=(1,))
    assert_clean_error(_cli(run_dir, data, tmp_path / "o", "--optimizer", "rmsprop"), "--optimizer")
    assert_clean_error(_cli(run_dir, data, tmp_path / "o", "--betas", "0.9"), "--betas")
    assert not (tmp_path / "o" / "report.json").exists()


def test_single_checkpoint_through_check(tmp_path):
    run_dir = make_run(tmp_path / "run", "sgd", steps=(4,))
    data = write_data(tmp_path / "data.safetensors")
    entry = torch.load(run_dir / "step_4.pt", weights_only=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in entry["model"].items()}, str(tmp_path / "one.safetensors"),
              metadata={"curvscope.model": "curvscope.models:mlp", "curvscope.loss": "ce",
                        "curvscope.model_kwargs": entry["curvscope.model_kwargs"]})
    result = invoke("check", tmp_path / "one.safetensors", "--data", data, "--batch-size", "16", "--dtype",
                    "float64", "--device", "cpu", "--out", tmp_path / "out", "--rule",
                    "track.points[-1].lambda_max < 1000")
    assert result.exit_code == 0, result.stdout + result.stderr
    point = json.loads((tmp_path / "out" / "report.json").read_text())["track"]["points"][0]
    ref = dense_reference(entry["model"])
    assert math.isclose(point["lambda_max"], float(torch.linalg.eigvalsh(ref["hessian"])[-1]), rel_tol=1e-4)


def test_sigterm_in_the_middle_keeps_complete_points_and_a_rerun_finishes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    run_dir = make_run(tmp_path / "run", "sgd", steps=tuple(range(0, 40, 2)))
    data = write_data(tmp_path / "data.safetensors")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "curvscope", "track", str(run_dir), "--data", str(data), "--batch-size", "16",
               "--dtype", "float64", "--device", "cpu", "--out", str(out), "--no-warm-start", "--tol", "1e-12"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # one thread, as conftest.py sets
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    report = out / "report.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if report.is_file() and len(json.loads(report.read_text())["track"]["points"]) >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, (process.returncode, stderr)
    assert "terminated (SIGTERM)" in stderr and "complete point" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    section = json.loads(report.read_text())["track"]
    kept = len(section["points"])
    assert 2 <= kept < 20 and not section["complete"] and section["checkpoints"] == 20
    assert all(p["lambda_max"] is not None and p["reused"] is False for p in section["points"])
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # no staged file left behind
    assert section["plot_points"] == kept and (out / "track.png").is_file()  # written in full at the signal
    assert report.read_text().startswith("{\n  ")
    again = subprocess.run([*command, "--no-plot"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    section = json.loads(report.read_text())["track"]
    assert section["complete"] and [p["reused"] for p in section["points"]] == [True] * kept + [False] * (20 - kept)


def test_the_summary_table_elides_long_series_and_fits_80_columns():
    from rich.console import Console

    from curvscope.report.track_report import SHOWN_ROWS, track_table

    points = [{"step": 1000 * i, "loss": 1.0 / (i + 1), "gradient_norm": 0.5, "lambda_max": 1234.5 + i,
               "preconditioned_lambda_max": 3.9e4, "threshold": 3.8e4, "sharpness_ratio": 1.02,
               "optimizer": "adamw", "reused": i % 2 == 0} for i in range(40)]
    console = Console(width=80, record=True)
    console.print(track_table({"points": points, "checkpoints": 40, "curvature": "hessian"}))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "..." in text and "39,000" in text and "8,000" not in text.replace("38,000", "")
    assert "λ(P⁻¹H)" in text and "edge" in text
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert len(rows) == SHOWN_ROWS + 1
