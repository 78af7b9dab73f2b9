"""A report is validated before show prints or draws it and before check gates on it: a mutated report is
exit 2 with one line naming the field, never a crash (exit 3)."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import TINY_KWARGS, assert_clean_error, invoke, tiny_mlp, write_data

from curvscope.io.checkpoints import save_checkpoint
from curvscope.report.validate import MalformedReport, validate_report


@pytest.fixture(scope="module")
def full_report(tmp_path_factory, ):
    """A report with every section: a layer-grouped Gram spectrum with Newton step and landscape, lr over two
    batches with the cubic model, and factors."""
    import torch

    tmp = tmp_path_factory.mktemp("full")
    ckpt = tmp / "tiny.safetensors"
    save_checkpoint(ckpt, tiny_mlp(), model_spec="curvscope.models:mlp", model_kwargs=TINY_KWARGS, loss="ce")
    g = torch.Generator().manual_seed(0)
    data = write_data(tmp / "data.safetensors", torch.randn(12, 4, generator=g), torch.arange(12) % 3)
    out = tmp / "out"
    args = ("--data", data, "-o", out, "-n", "6")
    assert invoke("spectrum", ckpt, *args, "--groups", "layer", "--newton-step", tmp / "s.safetensors",
                  "--landscape").exit_code == 0
    assert invoke("lr-suggest", ckpt, *args, "--batches", "2", "--cubic").exit_code == 0
    assert invoke("factors", ckpt, *args).exit_code == 0
    report = json.loads((out / "report.json").read_text())
    assert {"groups", "lr", "factors", "newton", "landscape"} <= set(report)
    return out, report


def _set(doc, path, value):
    *head, last = path
    for key in head:
        doc = doc[key]
    if value is _DELETE:
        del doc[last]
    else:
        doc[last] = value


_DELETE = object()
NEST = {"a": 1}
for _ in range(80):
    NEST = {"a": NEST}

MUTATIONS = [  # (path, value, the field the message names)
    (("loss_value",), "0.5", "loss_value"),
    (("gradient_norm",), [1, 2], "gradient_norm"),
    (("groups",), {"name": "all"}, "groups"),
    (("groups", 0), "all", "groups[0]"),
    (("groups", 0, "name"), 3, "groups[0].name"),
    (("groups", 0, "num_params"), "43", "groups[0].num_params"),
    (("groups", 0, "num_params"), _DELETE, "groups[0].num_params"),
    (("groups", 0, "eigenvalues"), "1 2 3", "groups[0].eigenvalues"),
    (("groups", 0, "eigenvalues", 1), "big", "groups[0].eigenvalues[1]"),
    (("groups", 0, "eigenvalues", 0), {"v": 1}, "groups[0].eigenvalues[0]"),
    (("groups", 0, "rank"), 2.5, "groups[0].rank"),
    (("groups", 0, "directions"), [], "groups[0].directions"),
    (("groups", 0, "directions", "lambda_snr"), {"a": 1}, "groups[0].directions.lambda_snr"),
    (("groups", 1, "trace"), "x", "groups[1].trace"),
    (("approximation",), "exact", "approximation"),
    (("approximation", "mc_samples"), "0", "approximation.mc_samples"),
    (("newton", "warnings"), "careful", "newton.warnings"),
    (("newton", "damping"), [0.1], "newton.damping"),
    (("landscape", "t"), None, "landscape.t"),
    (("landscape", "loss_2d"), [1, 2], "landscape.loss_2d[0]"),
    (("notes",), "a note", "notes"),
    (("files",), ["spectrum.png"], "files"),
    (("files", "spectrum_plot"), 7, "files.spectrum_plot"),
    (("problem",), "mlp", "problem"),
    (("problem", "model"), {"x": 1}, "problem.model"),
    (("lr",), [1, 2], "lr"),
    (("lr", "groups"), {"0": {}}, "lr.groups"),
    (("lr", "groups", 0, "recommended"), "fast", "lr.groups[0].recommended"),
    (("lr", "groups", 0, "name"), None, "lr.groups[0].name"),
    (("lr", "steps"), [], "lr.steps"),
    (("lr", "steps", "diag", "realized_decrease"), "1", "lr.steps.diag.realized_decrease"),
    (("lr", "h_bar_correlation"), [[1, "x"]], "lr.h_bar_correlation[0][1]"),
    (("lr", "batches"), "2", "lr.batches"),
    (("lr", "partition"), _DELETE, "lr.partition"),
    (("factors",), "none", "factors"),
    (("factors", "blocks"), {"Phi_1": 1}, "factors.blocks"),
    (("factors", "blocks", 0, "shape"), "4x4", "factors.blocks[0].shape"),
    (("factors", "widths"), [4, "5"], "factors.widths[1]"),
    (("factors", "structure_error"), [0.1], "factors.structure_error"),
    (("factors", "notes"), None, "factors.notes"),
    (("extra",), NEST, "extra.a.a"),
    (("groups", 0, "lambda_max"), float("inf"), "groups[0].lambda_max"),
    (("loss_value",), float("nan"), "loss_value"),
]


@pytest.mark.parametrize("path, value, field", MUTATIONS, ids=[".".join(map(str, m[0])) for m in MUTATIONS])
def test_a_mutated_report_is_refused_naming_the_field(full_report, tmp_path, path, value, field):
    _, report = full_report
    doc = copy.deepcopy(report)
    _set(doc, path, value)
    with pytest.raises(MalformedReport, match="field " + field.replace("[", r"\[").replace("]", r"\]")):
        validate_report(doc)
    bad = tmp_path / "report.json"
    bad.write_text(json.dumps(doc))
    checks = [("show", bad), ("show", bad, "--no-plots")]
    if value is not _DELETE:  # check reads the fields its rules name: a missing one is the rule's error
        checks.append(("check", bad, "-r", "loss_value < 100"))
    for args in checks:
        assert_clean_error(invoke(*args), "malformed report", field)


def test_the_unmutated_report_is_valid_and_shows(full_report):
    out, report = full_report
    validate_report(report)
    result = invoke("show", out, "--no-plots")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("text, needle", [
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ('{"schema_version": "1.0", "loss_value": ' + "9" * 5000 + "}", "digits"),
    ('{"schema_version": "1.0", "loss_value": NaN}', "loss_value"),
    ('{"schema_version": "1.0", "loss_value": 1e400}', "loss_value"),
    ('{"schema_version": ' + "[" * 3000 + "]" * 3000 + "}", "nested too deeply"),
])
def test_absurd_json_is_refused_in_one_line(tmp_path, text, needle):
    bad = tmp_path / "report.json"
    bad.write_text(text)
    for args in (("show", bad), ("check", bad, "-r", "loss_value < 1")):
        assert_clean_error(invoke(*args), needle)


def test_mathtext_and_markup_in_labels_are_drawn_literally(full_report, tmp_path):
    _, report = full_report
    doc = copy.deepcopy(report)
    for group in doc["groups"]:
        group["name"] = r"$\frac{$" + group["name"] + "$"
    doc["lr"]["groups"][0]["name"] = r"$\frac$"
    doc["lr"]["partition"] = "$x^{$"
    doc["problem"]["checkpoint"] = r"$\sqrt{$"
    doc["problem"]["model"] = r"$\sqrt{$"
    doc["factors"]["symmetry"] = "$_$"
    (tmp_path / "report.json").write_text(json.dumps(doc))
    result = invoke("show", tmp_path, "--out", tmp_path / "figs")
    assert result.exit_code == 0, result.stderr
    assert {"spectrum.png", "directions.png", "layers.png", "lr.png"} <= {p.name for p in (tmp_path / "figs").iterdir()}
