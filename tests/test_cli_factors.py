"""``curvscope factors`` end to end: report, factors file, SymO file, plots, ensemble modes and clean errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import curvscope.cli.factors  # noqa: F401  (registers the command)
from curvscope.curvature.symmetry.estimate import compute_factors
from curvscope.errors import CurvscopeError
from curvscope.io.load import load_problem
from curvscope.workflows import run_and_write
from curvscope.workflows.factors import FactorsOptions
from tests.conftest import DIGITS, SAMPLES, TINY_KWARGS, assert_clean_error, invoke, tiny_mlp


def run_factors(problem, out, options: dict):
    """Compute and write the factors outputs through the workflow layer (options as a config table); the
    report's ``factors`` section."""
    return run_and_write(problem, out, {"factors": FactorsOptions.from_mapping(options)})["factors"]


def read_file(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_sample_mlp_with_symo_step(tmp_path):
    out, step = tmp_path / "out", tmp_path / "symo.safetensors"
    ckpt = SAMPLES / "mlp-digits.safetensors"
    result = invoke("factors", ckpt, "--data", DIGITS, "--batch-size", 32, "--device", "cpu", "--dtype", "float64",
                    "--symo-step", step, "--out", out)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "Phi_1" in result.stdout and "SymO" in result.stdout
    report = json.loads((out / "report.json").read_text())
    sec = report["factors"]
    assert report["command"] == "factors" and sec["symmetry"] == "signed-permutation" and sec["source"] == "batch"
    assert sec["layers"] == ["1", "3", "5"] and sec["widths"] == [64, 64, 64, 10]
    assert sec["activation_symmetry"] == "signed-permutation"
    names = [b["name"] for b in sec["blocks"]]
    assert names == ["Phi_1", "phi_b1", "Psi_1_b1", "phi_2", "phi_b2", "Phi_3", "Psi_b2_3", "Phi_b3"]
    blocks = {b["name"]: b for b in sec["blocks"]}
    assert blocks["Phi_1"]["shape"] == [64, 64] and blocks["Phi_1"]["kind"] == "matrix"
    assert blocks["phi_2"]["kind"] == "scalar" and blocks["phi_2"]["layers"] == ["3"]
    assert blocks["Psi_b2_3"]["layers"] == ["3", "5"]
    assert 0 <= sec["structure_error"]["per_sample"] <= 1
    # the file holds exactly the engine's factors
    tensors, meta = read_file(out / "factors.safetensors")
    assert set(tensors) == set(names)
    assert meta["symmetry"] == "signed-permutation" and meta["layers"] == "1,3,5" and meta["source"] == "batch"
    problem = load_problem(ckpt, DIGITS, batch_size=32, device="cpu", dtype="float64")
    engine = compute_factors(problem, structure_check=False).factors.blocks()
    for name in names:
        assert torch.allclose(tensors[name], engine[name])
    g = problem.gradient()
    phi1 = g["1.weight"].T @ g["1.weight"] / 64
    assert torch.allclose(tensors["Phi_1"], phi1)
    # SymO: parameter-shaped, a descent direction, and a line search with a realized decrease
    direction, smeta = read_file(step)
    assert set(direction) == set(problem.params) and smeta["format"] == "curvscope.symo_step"
    assert all(direction[n].shape == p.shape for n, p in problem.params.items())
    symo = sec["symo"]
    assert symo["g_dot_direction"] > 0 and symo["best"]["realized_decrease"] > 0
    assert len(symo["line_search"]) == 11
    assert (out / "factors.png").stat().st_size > 10_000
    assert sec["files"]["symo_step"] == str(step)


def test_model_only_ensemble(tmp_path, tiny_files):
    _, data, _ = tiny_files
    out = tmp_path / "out"
    result = invoke("factors", "--model", "mlp", "--model-kwargs", json.dumps(TINY_KWARGS), "--data", data,
                    "--ensemble", 5, "--ensemble-chunk", 2, "--device", "cpu", "--out", out)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    sec = json.loads((out / "report.json").read_text())["factors"]
    ens = sec["ensemble"]
    assert ens["models"] == 5 and ens["init"] == "normal" and ens["checkpoints"] is None
    assert set(ens["correlation"]) == {b["name"] for b in sec["blocks"]}
    assert -1 <= ens["correlation"]["Phi_1"]["mean"] <= 1
    assert ens["correlation"]["phi_b1"] == {"mean": None, "std": None}
    tensors, meta = read_file(out / "factors.safetensors")
    assert tensors["ground_truth/Phi_1"].shape == (4, 4) and tensors["correlation/Phi_1"].shape == (5,)
    assert meta["ensemble_models"] == "5"
    assert "r vs truth" in result.stdout and "±" in result.stdout
    assert (out / "factors.png").is_file()
    # the figure is drawn from what was written: the report section and factors.safetensors
    from curvscope.report.factors_plots import factors_file_plot
    from curvscope.report.render import render_png

    assert tensors["example/Phi_1"].shape == (4, 4)
    assert render_png(factors_file_plot(sec, tensors)) == (out / "factors.png").read_bytes()


def test_ensemble_checkpoints(tmp_path, tiny_files):
    from curvscope.io.checkpoints import save_checkpoint

    ckpt, data, _ = tiny_files
    runs = tmp_path / "runs"
    runs.mkdir()
    for s in range(3):
        save_checkpoint(runs / f"seed{s}.safetensors", tiny_mlp(seed=s), model_spec="curvscope.models:mlp",
                        model_kwargs=TINY_KWARGS, loss="ce")
    out = tmp_path / "out"
    result = invoke("factors", ckpt, "--data", data, "--ensemble-checkpoints", str(runs / "seed*.safetensors"),
                    "--symmetry", "permutation", "--device", "cpu", "--out", out, "--no-plots")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    sec = json.loads((out / "report.json").read_text())["factors"]
    assert sec["ensemble"]["init"] == "given" and len(sec["ensemble"]["checkpoints"]) == 3
    assert "Phi_1[1]" in sec["ensemble"]["correlation"]
    assert "Phi_1[p]" in result.stdout and "phi_b1[p]" in result.stdout  # names are not eaten as rich markup
    assert not (out / "factors.png").exists()


@pytest.mark.parametrize("options", [
    {"source": "per-sample", "symmetry": "permutation"},
    {"source": "ggn", "mc_samples": 2},
    {"symmetry": "none", "structure_check": False},
])
def test_run_factors_api(tmp_path, tiny_files, options):
    ckpt, data, _ = tiny_files
    if options.get("source") == "ggn":
        pytest.importorskip("curvscope.curvature.gram")
    problem = load_problem(ckpt, data, device="cpu", dtype="float64")
    sec = run_factors(problem, tmp_path / "o", options)
    assert sec["source"] == options.get("source", "batch")
    assert sec["symmetry"] == options.get("symmetry", "signed-permutation")  # auto: tanh allows it
    assert (tmp_path / "o" / "factors.safetensors").is_file()
    if options.get("symmetry") == "none":
        assert [b["name"] for b in sec["blocks"]] == ["Sigma"] and sec["structure_error"] == {}
    with pytest.raises(CurvscopeError, match="unknown option"):
        run_factors(problem, tmp_path / "o", {"bogus": 1})


def test_report_merges_with_other_commands(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    out = tmp_path / "out"
    (out).mkdir()
    problem = load_problem(ckpt, data, device="cpu")
    from curvscope.report.schema import REPORT_NAME, build_report

    (out / REPORT_NAME).write_text(json.dumps(build_report("spectrum", problem, {"loss_value": 1.0})))
    run_factors(problem, out, {"plots": False})
    report = json.loads((out / "report.json").read_text())
    assert report["commands"] == ["spectrum", "factors"] and report["loss_value"] == 1.0 and "factors" in report


@pytest.mark.parametrize("args,needles", [
    (["--symmetry", "rotation"], ["--symmetry", "rotation"]),
    (["--source", "hessian"], ["--source"]),
    (["--ensemble", "1"], ["--ensemble"]),
    (["--ensemble", "3", "--source", "per-sample"], ["--source batch"]),
    (["--ensemble", "3", "--ensemble-checkpoints", "x*.pt"], ["not both"]),
    (["--ensemble-checkpoints", "nothing-here-*.pt"], ["no file matches"]),
    (["--mc-samples", "3"], ["--source ggn"]),
    (["--eps", "0"], ["--eps"]),
    (["--init", "xavier", "--ensemble", "2"], ["--init"]),
    (["--layers", "1,nope"], ["no module 'nope'"]),
    (["--layers", "1,,3"], ["--layers"]),
    (["--symmetry", "none"], ["cap"]),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, needles):
    out = tmp_path / "out"
    result = invoke("factors", SAMPLES / "mlp-digits.safetensors", "--data", DIGITS, "--batch-size", 8,
                    "--device", "cpu", "--out", out, *args)
    assert_clean_error(result, *needles)
    assert not out.exists()


def test_a_transformer_s_mlp_block_is_found_or_named(tmp_path):
    """The transformer sample is no MLP: its MLP block (Linear -> GELU -> Linear) is the chain, found by the
    symmetry test (issue #23; it was refused before)."""
    out = tmp_path / "found"
    ckpt = SAMPLES / "transformer-digits.safetensors"
    result = invoke("factors", ckpt, "--data", DIGITS, "--batch-size", 8, "--device", "cpu", "--out", out,
                    "--no-plots")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    sec = json.loads((out / "report.json").read_text())["factors"]
    assert sec["layers"] == ["blocks.0.mlp.0", "blocks.0.mlp.2"] and sec["activation_symmetry"] == "permutation"
    out = tmp_path / "out"
    result = invoke("factors", ckpt, "--data", DIGITS, "--batch-size", 8, "--device", "cpu", "--out", out,
                    "--layers", "blocks.0.mlp.0,blocks.0.mlp.2", "--no-plots")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    sec = json.loads((out / "report.json").read_text())["factors"]
    assert sec["widths"] == [32, 64, 32] and sec["activation_symmetry"] is None


def test_options_speak_the_engines_words_and_the_cli_maps_them_to_flags():
    from curvscope.cli.common import as_flags
    from curvscope.workflows.options import OptionError

    with pytest.raises(OptionError, match="^symmetry 'rotation': choose one of auto, orthogonal"):
        FactorsOptions(symmetry="rotation").validate()
    with pytest.raises(OptionError, match="^mc_samples applies to source ggn only$"):
        FactorsOptions(mc_samples=2).validate()
    with pytest.raises(CurvscopeError, match="^--mc-samples applies to --source ggn only$"), as_flags():
        FactorsOptions(mc_samples=2).validate()
    with pytest.raises(CurvscopeError, match=r"\[factors\] ensemble must be 0 \(off\) or at least 2"):
        FactorsOptions.from_mapping({"ensemble": 1}, section="factors")
    assert FactorsOptions.from_mapping({"layers": "1,3", "eps": 1}).eps == 1.0
