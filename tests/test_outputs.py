"""All-or-nothing outputs: every file of a run appears, or none does; special files are never replaced;
conflicting and unreadable outputs are refused before any computation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_clean_error, invoke

from curvscope.errors import CurvscopeError
from curvscope.io import atomic
from curvscope.io.atomic import Outputs


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())} if directory.exists() else {}


def test_outputs_commit_all_or_nothing(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("old a")
    outputs = Outputs()
    outputs.add_text(tmp_path / "a.txt", "new a")
    outputs.add_text(tmp_path / "b.txt", "new b")

    def broken(tmp):
        raise OSError(28, "No space left on device")

    outputs.add(tmp_path / "c.bin", broken)
    with pytest.raises(CurvscopeError, match="No space left on device"):
        outputs.commit()
    assert _snapshot(tmp_path) == {"a.txt": b"old a"}  # nothing new, nothing staged left behind

    outputs = Outputs()
    outputs.add_text(tmp_path / "a.txt", "new a")
    outputs.add_text(tmp_path / "b.txt", "new b")
    real_replace = os.replace
    calls = []

    def interrupted_replace(src, dst):  # Ctrl-C after the first file moved into place
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        outputs.commit()
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert _snapshot(tmp_path) == {"a.txt": b"old a"}  # the first file was put back


def test_failure_in_the_write_phase_leaves_earlier_outputs(tmp_path, tiny_files, monkeypatch):
    ckpt, data, _ = tiny_files
    out = tmp_path / "out"
    assert invoke("spectrum", ckpt, "--data", data, "-o", out).exit_code == 0
    before = _snapshot(out)
    import curvscope.report.plots as plots

    monkeypatch.setattr(plots, "directions_figure", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "disk full")))
    result = invoke("spectrum", ckpt, "--data", data, "-o", out, "--eigenvectors", tmp_path / "ev.safetensors")
    assert result.exit_code != 0
    assert _snapshot(out) == before and not (tmp_path / "ev.safetensors").exists()


def test_unwritable_extra_output_fails_before_computing(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    out = tmp_path / "out"
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "x").write_text("")
    assert_clean_error(invoke("spectrum", ckpt, "--data", data, "-o", out, "--eigenvectors",
                              locked / "x" / "ev.safetensors"), "not a directory")
    assert not out.exists()


def test_special_files_are_never_replaced(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in (fifo, Path("/dev/null")):
        result = invoke("spectrum", ckpt, "--data", data, "-o", tmp_path / "o", "--eigenvectors", target)
        assert_clean_error(result, "not a regular file")
    report = tmp_path / "r"
    assert invoke("spectrum", ckpt, "--data", data, "-o", report, "--no-plots").exit_code == 0
    result = invoke("check", report, "-r", "loss_value < 100", "--junit", "/dev/null")
    assert_clean_error(result, "not a regular file")
    assert Path("/dev/null").is_char_device() and fifo.exists() and not fifo.is_file()


def test_conflicting_outputs_are_refused(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    out = tmp_path / "out"
    same = tmp_path / "x.safetensors"
    args = ("spectrum", ckpt, "--data", data, "-o", out)
    assert_clean_error(invoke(*args, "--eigenvectors", same, "--newton-step", same), "same file")
    assert_clean_error(invoke(*args, "--newton-step", out / "directions.safetensors"), "same file")
    assert_clean_error(invoke(*args, "--eigenvectors", out / "report.json"), "same file")
    assert not out.exists()


def test_non_utf8_report_in_out_is_refused_up_front(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_bytes(b"\xff\xfe\x00garbage")
    for command in ("spectrum", "lr-suggest"):
        assert_clean_error(invoke(command, ckpt, "--data", data, "-o", out), "not a curvscope report")
    assert (out / "report.json").read_bytes() == b"\xff\xfe\x00garbage"


def test_bad_config_fails_before_anything_is_written(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    out = tmp_path / "out"
    for table in ('[lr]\nridge = -1\n', '[factors]\nsymmetry = "nope"\n', '[spectrum]\ntop_k = "abc"\n',
                  '[spectrum]\nplots = "no"\n', '[spectrum]\nmax_memory = 5\n'):
        config = tmp_path / "c.toml"
        config.write_text('rules = ["loss_value < 9"]\n' + table)
        result = invoke("check", ckpt, "--data", data, "--config", config, "-o", out)
        assert_clean_error(result)
        assert not out.exists(), table


@pytest.mark.parametrize("args, needle", [
    (("-r", "a" * 40_000 + " < 1"), "characters"),
    (("-r", "loss_value < " + "9" * 5000), ""),
])
def test_bad_rules_are_refused_at_once(tmp_path, tiny_files, args, needle):
    ckpt, data, _ = tiny_files
    assert invoke("spectrum", ckpt, "--data", data, "-o", tmp_path / "o", "--no-plots").exit_code == 0
    started = time.perf_counter()
    result = invoke("check", tmp_path / "o", *args)
    assert time.perf_counter() - started < 2.0
    assert result.exit_code in (1, 2), result.stderr
    if needle:
        assert_clean_error(result, needle)


@pytest.mark.parametrize("args, needle", [
    (("--max-memory", "2MB"), "floor"),
    (("--max-memory", "1e400"), "--max-memory"),
    (("--mc-samples", "99999999"), "--mc-samples"),
    (("--seed", "1" * 23), "seed"),
    (("-n", "9" * 5000), "batch-size"),
])
def test_bad_values_exit_2_quickly(tmp_path, tiny_files, args, needle):
    ckpt, data, _ = tiny_files
    started = time.perf_counter()
    result = invoke("spectrum", ckpt, "--data", data, "-o", tmp_path / "o", *args)
    assert time.perf_counter() - started < 5.0
    assert_clean_error(result, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_ends_the_run_with_one_line_and_no_partial_outputs(tmp_path, sig, code):
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "curvscope", "spectrum", str(root / "sample_models/transformer-digits.safetensors"),
           "--data", str(root / "sample_models/digits.safetensors"), "-o", str(out), "-n", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    if proc.returncode == 0:  # finished before the signal: then everything is there
        assert (out / "report.json").is_file()
        return
    assert proc.returncode == code, (proc.returncode, stderr)
    assert len(stderr.strip().splitlines()) <= 2 and "Traceback" not in stderr, stderr
    leftovers = [p.name for p in out.iterdir()] if out.exists() else []
    assert not [n for n in leftovers if n.endswith(".tmp")], leftovers
    if leftovers:  # all or nothing
        assert "report.json" in leftovers
        assert json.loads((out / "report.json").read_text())["command"] == "spectrum"


def test_a_rerun_replaces_the_previous_runs_outputs(tmp_path, tiny_files, tiny_data):
    ckpt, data, _ = tiny_files
    out = tmp_path / "out"
    assert invoke("spectrum", ckpt, "--data", data, "-o", out, "--groups", "layer").exit_code == 0
    assert {"spectrum.png", "directions.png", "layers.png"} <= set(_snapshot(out))
    assert invoke("spectrum", ckpt, "--data", data, "-o", out, "--no-plots").exit_code == 0
    assert not [n for n in _snapshot(out) if n.endswith(".png")]  # no stale plots beside the new report
    assert invoke("lr-suggest", ckpt, "--data", data, "-o", out).exit_code == 0  # same problem: merged
    report = json.loads((out / "report.json").read_text())
    assert "groups" in report and "lr" in report and (out / "lr.png").is_file()
    # another problem (another batch) in the same directory: replaced, with a warning, and its files removed
    result = invoke("spectrum", ckpt, "--data", data, "-o", out, "-n", "6", "--no-plots")
    assert result.exit_code == 0 and "another problem" in result.stderr, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert "lr" not in report and report["problem"]["batch_size"] == 6
    assert not (out / "lr.png").exists()
