"""At 80 columns every ``--help`` shows each word of its help texts whole: nothing cut with "…", no word split
across lines (#23), and the lr-suggest table's headers are whole words."""

from __future__ import annotations

import re

import pytest
from conftest import invoke
from rich.console import Console
from rich.text import Text

COMMANDS = ["check", "factors", "info", "lr-suggest", "show", "spectrum", "track"]


def _commands():
    from typer.main import get_command

    from curvscope.cli import app

    return get_command(app).commands


def _lines(text: str) -> list[str]:
    """The rendered lines without the panels' borders."""
    return [line.strip(" │╭╮╰╯─") for line in text.splitlines()]


def _words(help_text: str | None) -> list[str]:
    plain = Text.from_markup(" ".join((help_text or "").split())).plain
    return [w for w in plain.split() if len(w) > 1]


def _split_words(rendered: str, help_texts: list[str | None]) -> list[str]:
    """The words of ``help_texts`` that appear on no rendered line whole (cut or folded)."""
    lines = _lines(rendered)
    return [w for text in help_texts for w in _words(text) if not any(w in line for line in lines)]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_at_80_columns_cuts_and_splits_no_word(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TERMINAL_WIDTH", "80")
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "…" not in out, [line for line in out.splitlines() if "…" in line]
    assert max(len(line) for line in out.splitlines()) <= 80
    cmd = _commands()[command]
    texts = [p.help for p in cmd.params if getattr(p, "help", None)]
    assert _split_words(out, texts) == []
    for param in cmd.params:  # every option's names whole, each on one line
        for opt in (*param.opts, *param.secondary_opts):
            if opt.startswith("--"):
                assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", out), (command, opt)


def test_root_help_at_80_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TERMINAL_WIDTH", "80")
    result = invoke("--help")
    assert result.exit_code == 0 and "…" not in result.stdout
    assert _split_words(result.stdout, [c.get_short_help_str(limit=200) for c in _commands().values()]) == []


def test_the_words_check_finds_a_cut_or_folded_word():
    assert _split_words("│ a data factory 'path/to/file.… │", ["a data factory 'path/to/file.py:factory'"]) == [
        "'path/to/file.py:factory'"]
    assert _split_words("│ 'path/to/fi │\n│ le.py:f' │", ["'path/to/file.py:f'"]) == ["'path/to/file.py:f'"]


def _lr_section(cubic: bool) -> dict:
    def row(name, value):
        r = {"name": name, "parameters": [f"{name}.weight"], "num_params": 4160, "g_hat": 0.00459,
             "h_bar_diag": 4.3e-4, "lr_newton": value, "lr_diag": 10.7, "diag_note": "ok", "lambda_max": 0.114,
             "lr_stability": 17.5, "recommended": 3.75, "rule": "diag x0.352 (joint model)", "noisy": ["lr_newton"]}
        for key in ("lr_newton", "lr_diag", "lr_stability", "recommended", *(("lr_cubic",) if cubic else ())):
            r[f"{key}_std"] = 270.0 if key == "lr_newton" else 0.0095
        if cubic:
            r["lr_cubic"] = 0.0262
        return r

    section = {"partition": "layer", "curvature": "hessian", "direction": "gradient", "batches": 3,
               "newton_eta": [-0.02, 4.84], "groups": [row("1", None), row("3", 4.84)]}
    if cubic:
        section["cubic"] = {"weight": 1.0, "note": "ok", "eta": [0.0262, 2.53]}
    return section


@pytest.mark.parametrize("cubic", [False, True])
def test_the_lr_table_header_keeps_its_words_whole_at_80_columns(cubic):
    from curvscope.report.lr_report import rates_tables

    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    for table in rates_tables(_lr_section(cubic), 80):
        console.print(table)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in "\n".join(lines)
    header = next(line for line in lines if line.startswith("group"))
    words = ["group", "#params", "g-hat", "H-bar_ss", "newton", "diag", "stability", "recommended", "rule"]
    if cubic:  # ±0.0095 in every column: too wide for the whole words, so the long two are abbreviated
        words = [{"stability": "stab.", "recommended": "rec."}.get(w, w) for w in words]
        assert "stab. = stability" in lines[-1] and "rec. = recommended" in lines[-1]
    assert header.split() == words[:7] + (["cubic"] if cubic else []) + words[7:]
    assert "±0.0095" in "\n".join(lines)  # the numbers whole
    assert not any(line.rstrip().endswith(("lr_", "recom-")) for line in lines)
    assert lines[0].rstrip().endswith("direction gradient)")  # the title's second part on its own line
    assert lines[1].startswith("±std over 3 batches")
