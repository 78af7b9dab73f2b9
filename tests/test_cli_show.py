"""``curvscope show``: a saved report printed and drawn again, nothing computed."""

from __future__ import annotations

from conftest import assert_clean_error, invoke

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_show_reprints_and_redraws(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    out = tmp_path / "out"
    result = invoke("spectrum", ckpt, "--data", data, "-o", out, "--no-plots", "--groups", "layer")
    assert result.exit_code == 0, result.stderr
    assert not (out / "spectrum.png").exists()
    figs = tmp_path / "figs"
    shown = invoke("show", out / "report.json", "-o", figs)
    assert shown.exit_code == 0, shown.stderr
    assert "GGN spectrum" in shown.stdout and "rank" in shown.stdout
    for name in ("spectrum.png", "directions.png", "layers.png"):
        assert (figs / name).read_bytes().startswith(PNG_MAGIC), name
    again = invoke("show", out, "--no-plots")  # a directory holding report.json; no files written
    assert again.exit_code == 0 and "GGN spectrum" in again.stdout
    assert not (out / "spectrum.png").exists()


def test_show_bad_input(tmp_path):
    assert_clean_error(invoke("show", tmp_path / "missing.json"), "not found")
    bad = tmp_path / "r.json"
    bad.write_bytes(b"\xff\xfe not json")
    assert_clean_error(invoke("show", bad), "not valid JSON")
