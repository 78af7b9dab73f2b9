"""How a growing run's outputs are written: report.json after every point (compact), track.png when due and at
the end, complete and consistent after close(), an exit without close() and Ctrl-C; and every checkpoint's
optimizer state checked against the model before the first point."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from conftest import assert_clean_error, invoke
from torch import nn
from track_runs import data, make_run, model, write_data

import curvscope
from curvscope.errors import CurvscopeError
from curvscope.report import track_live


@pytest.fixture
def quick_png(monkeypatch):
    """track.png is not drawn (tests/test_track.py and test_monitor.py draw real ones): a PNG header as matplotlib
    writes it, so that curvscope recognises the file as its own; the sections it was drawn from are kept."""
    from curvscope.report import render, track_plots

    drawn = []
    monkeypatch.setattr(track_plots, "track_figure", lambda section, problem=None: drawn.append(section))
    monkeypatch.setattr(render, "render_png", lambda fig, dpi=render.DPI: b"\x89PNG\r\n\x1a\n" +
                        b"Software Matplotlib " * 600)
    return drawn


def _report(out) -> tuple[dict, str]:
    text = (out / "report.json").read_text()
    return json.loads(text), text


def _train_step(net, opt, x, y) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()


def test_the_report_after_every_point_and_the_figure_at_close(tmp_path, monkeypatch, quick_png):
    monkeypatch.setattr(track_live, "WRITE_FLOOR", float("inf"))  # never put off here (a loaded machine)
    net = model(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x, y = data()
    out = tmp_path / "m"
    monitor = curvscope.Monitor(net, (x.double(), y), optimizer=opt, every=1, out=out)
    for step in (1, 2, 3):
        _train_step(net, opt, x.double(), y)
        monitor.step(step)
        report, text = _report(out)
        assert [p["step"] for p in report["track"]["points"]] == list(range(1, step + 1))
        assert "plot" not in report["track"] and "track_plot" not in report["files"]
        assert not (out / "track.png").exists()  # not due yet: drawn at most once a minute
    assert "\n" not in text.strip()  # compact JSON between points
    assert report["track"]["summary"]["points"] == 3 and report["commands"] == ["track"]
    monitor.close()
    report, text = _report(out)
    assert text.startswith("{\n  ")  # the final report: the project's indented format
    assert report["track"]["plot_points"] == 3 and report["files"]["track_plot"].endswith("track.png")
    assert (out / "track.png").stat().st_size > 10_000 and len(quick_png) == 1
    closed = report
    monitor.close()  # nothing new: nothing rewritten
    assert _report(out)[0] == closed
    _train_step(net, opt, x.double(), y)
    monitor.step(4)  # measuring goes on after close(): the figure stays listed, showing 3 of 4 points
    report, _ = _report(out)
    assert len(report["track"]["points"]) == 4 and report["track"]["plot_points"] == 3
    assert (out / "track.png").is_file() and report["files"]["track_plot"]
    monitor.close()
    assert _report(out)[0]["track"]["plot_points"] == 4 and len(quick_png) == 2
    assert [bool(p.measured.vectors) for p in monitor.points] == [False, False, False, True]


def test_the_figure_when_due_and_an_exit_without_close(tmp_path, quick_png):
    net = model(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x, y = data()
    out = tmp_path / "m"
    monitor = curvscope.Monitor(net, (x.double(), y), optimizer=opt, every=2, out=out, plot_interval=0)
    for step in range(1, 5):
        _train_step(net, opt, x.double(), y)
        monitor.step(step)
        if step == 2:
            assert _report(out)[0]["track"]["plot_points"] == 1 and (out / "track.png").is_file()
    assert monitor._finalizer.alive and monitor._finalizer.atexit  # also run at the interpreter's exit
    del monitor  # never closed: the final report when it is collected
    gc.collect()
    report, text = _report(out)
    assert text.startswith("{\n  ") and report["track"]["plot_points"] == 2
    assert len(quick_png) == 3  # at the points of steps 2 and 4 (due at once), and at the end
    with pytest.raises(CurvscopeError, match="plot_interval"):
        curvscope.Monitor(net, (x, y), out=out, plot_interval=-1)


def test_ctrl_c_in_the_loop_leaves_every_point_and_the_figure(tmp_path):
    net = model(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x, y = data()
    out = tmp_path / "m"
    with pytest.raises(KeyboardInterrupt), curvscope.Monitor(net, (x.double(), y), optimizer=opt, every=1,
                                                              out=out, plot=False) as monitor:
        for step in range(1, 10):
            _train_step(net, opt, x.double(), y)
            monitor.step(step)
            if step == 3:
                raise KeyboardInterrupt
    report, text = _report(out)
    assert [p["step"] for p in report["track"]["points"]] == [1, 2, 3] and text.startswith("{\n  ")
    assert "plot" not in report["track"] and not (out / "track.png").exists()


def test_a_costly_rewrite_is_put_off_and_finish_writes_it(tmp_path):
    from curvscope.io.runs import find_checkpoints
    from curvscope.workflows.track import TrackOptions, run_problem, run_track

    run_dir = make_run(tmp_path / "run", "sgd", steps=(1, 2, 3))
    checkpoints = find_checkpoints([run_dir])
    problem = run_problem(checkpoints[0], checkpoints[0].load(), data=write_data(tmp_path / "d.safetensors"),
                          batch_size=None, dtype="float64", device="cpu")
    run = run_track(problem, TrackOptions(plot=False), checkpoints=checkpoints)
    assert [bool(p.measured.vectors) for p in run.points] == [False, False, True]  # one set of vectors held
    writer = track_live.TrackWriter(tmp_path / "o", problem, plot=False)
    first = run_track(problem, TrackOptions(plot=False), checkpoints=checkpoints[:1])
    assert writer.update(first) is not None and writer.pending
    writer._cost = 10.0  # the last rewrite took ten seconds: the next ones wait
    assert writer.update(run) is None
    assert len(_report(tmp_path / "o")[0]["track"]["points"]) == 1  # the report on disk: complete points only
    report = writer.finish(run)
    assert len(report["track"]["points"]) == 3 and _report(tmp_path / "o")[0] == report and not writer.pending


def test_sigterm_like_interruption_of_track_writes_the_final_report(tmp_path, monkeypatch, quick_png):
    """Ctrl-C in the middle of `track`: the report and the figure are written in full with every complete point
    (the SIGTERM test of test_track.py runs the same path in a subprocess)."""
    import curvscope.curvature.track as point_module

    run_dir = make_run(tmp_path / "run", "sgd", steps=(1, 2, 3, 4))
    data_file = write_data(tmp_path / "d.safetensors")
    measure = point_module.measure_point
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return measure(*args, **kwargs)

    monkeypatch.setattr(point_module, "measure_point", interrupted)
    out = tmp_path / "out"
    result = invoke("track", run_dir, "--data", data_file, "--batch-size", "16", "--dtype", "float64", "--device",
                    "cpu", "--out", out)
    assert result.exit_code == 130, result.stderr
    report, text = _report(out)
    section = report["track"]
    assert [p["step"] for p in section["points"]] == [1, 2] and not section["complete"]
    assert text.startswith("{\n  ") and section["plot_points"] == 2 and (out / "track.png").is_file()
    assert "keeps the 2 complete point(s) of 4" in result.stderr


def test_optimizer_state_is_checked_before_the_first_point_without_loading(tmp_path, monkeypatch):
    import curvscope.curvature.track as point_module
    from curvscope.io.runs import RunCheckpoint, find_checkpoints
    from curvscope.workflows.track import TrackOptions, run_problem, run_track

    run_dir = make_run(tmp_path / "run", "momentum", steps=(1, 2, 3))
    entry = torch.load(run_dir / "step_3.pt", weights_only=True)
    state = entry["optimizer"]["state"]  # the first two parameters' momentum swapped: shapes out of order
    entry["optimizer"]["state"] = {0: state[1], 1: state[0], **{k: v for k, v in state.items() if k > 1}}
    torch.save(entry, run_dir / "step_3.pt")
    data_file = write_data(tmp_path / "d.safetensors")
    checkpoints = find_checkpoints([run_dir])
    first = checkpoints[0].load()
    problem = run_problem(checkpoints[0], first, data=data_file, batch_size=None, dtype="float64", device="cpu")
    measured, loaded = [], []
    monkeypatch.setattr(point_module, "measure_point", lambda *a, **k: measured.append(1))
    load = RunCheckpoint.load
    monkeypatch.setattr(RunCheckpoint, "load", lambda self: loaded.append(self.step) or load(self))
    with pytest.raises(CurvscopeError, match=r"step_3\.pt: optimizer state does not match the model"):
        run_track(problem, TrackOptions(), checkpoints=checkpoints, loaded={checkpoints[0].path: first})
    assert measured == [] and loaded == []  # before any point, from the files' outlines
    outline = checkpoints[2].outline()
    assert outline.optimizer_state["state"][0]["momentum_buffer"].device.type == "meta"
    monkeypatch.undo()
    out = tmp_path / "out"
    result = invoke("track", run_dir, "--data", data_file, "--batch-size", "16", "--dtype", "float64", "--device",
                    "cpu", "--out", out)
    assert_clean_error(result, "step_3.pt", "optimizer state does not match", "parameter '1.weight'")
    assert not out.exists()


def test_the_outline_of_a_hugging_face_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from curvscope.io.runs import find_checkpoints

    net = nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.ones(4, 3)).sum().backward()
    opt.step()
    directory = tmp_path / "trainer" / "checkpoint-7"
    directory.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(directory / "model.safetensors"))
    torch.save(opt.state_dict(), directory / "optimizer.pt")
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    (checkpoint,) = find_checkpoints([tmp_path / "trainer"])
    outline = checkpoint.outline()
    assert checkpoint.step == 7 and outline.shapes == {"weight": (2, 3), "bias": (2,)}
    entry = outline.optimizer_state["state"][0]
    assert entry["exp_avg_sq"].shape == (2, 3) and entry["exp_avg_sq"].device.type == "meta"
    assert outline.optimizer_state["param_groups"][0]["lr"] == 1e-3


def test_building_the_problem_never_prints_the_checkpoint_tensors(tmp_path, monkeypatch):
    """run_problem hands load_problem the first checkpoint already read: a message about it names its path (the
    repr of a dataclass holding the whole state dict took longer than a point)."""
    from curvscope.io.runs import find_checkpoints
    from curvscope.workflows.track import run_problem

    run_dir = make_run(tmp_path / "run", "sgd", steps=(1,))
    (checkpoint,) = find_checkpoints([run_dir])
    state = checkpoint.load()

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor was printed")

    monkeypatch.setattr(torch.Tensor, "__repr__", refuse)
    problem = run_problem(checkpoint, state, data=write_data(tmp_path / "d.safetensors"), batch_size=None,
                          dtype="float64", device="cpu")
    assert problem.num_params == 43
