"""User strings printed through rich are shown literally: a path or name holding rich markup ('[/x]',
'[bold]') neither crashes a command (MarkupError, exit 3) nor loses its brackets."""

from __future__ import annotations

import json

from conftest import TINY_KWARGS, invoke, tiny_mlp, write_data

from curvscope.io.checkpoints import save_checkpoint


def test_markup_in_paths_and_names_is_printed_literally(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # paths unfolded: the literal text can be searched
    root = tmp_path / "a[/x]b[bold]c"
    root.mkdir(parents=True)
    ckpt = root / "t[bold].safetensors"
    save_checkpoint(ckpt, tiny_mlp(), model_spec="curvscope.models:mlp", model_kwargs=TINY_KWARGS, loss="ce")
    data = write_data(root / "d[bold].safetensors", *tiny_data)
    out = root / "o[/x][bold]"
    runs = [("info", ckpt, "--data", data), ("spectrum", ckpt, "--data", data, "-o", out),
            ("lr-suggest", ckpt, "--data", data, "-o", out), ("factors", ckpt, "--data", data, "-o", out),
            ("show", out), ("check", out, "-r", "loss_value < 9"), ("check", out / "report.json", "-r",
                                                                        "loss_value < 9", "--json")]
    for args in runs:
        result = invoke(*args)
        assert result.exit_code == 0, (args[0], result.stderr)
        text = result.stdout + result.stderr
        assert "[/x]" in text and "[bold]" in text, (args[0], text)
    result = invoke("info", root / "missing[/x].safetensors", "--data", data)
    assert result.exit_code == 2 and "missing[/x].safetensors" in result.stderr
    # names, notes and warnings read from a report are shown literally too
    report = json.loads((out / "report.json").read_text())
    report["groups"][0]["name"] = "[/x]net[bold]"
    report["notes"] = ["[/x] a note [red]"]
    report["lr"]["warnings"] = ["[/warning] quoted input"]
    report["lr"]["groups"][0]["name"] = "[/y]"
    report["factors"]["notes"] = ["[/z]"]
    (out / "report.json").write_text(json.dumps(report))
    result = invoke("show", out, "--no-plots")
    assert result.exit_code == 0, result.stderr
    for needle in ("[/x]net[bold]", "[/x] a note [red]", "[/warning] quoted input", "[/y]", "[/z]"):
        assert needle in result.stdout, needle
