"""``check --config``: the data comes from the config's ``[problem]`` table (data, data_kwargs, split, columns,
pad_token, batches, batch_size, shuffle, seed), paths relative to the config, and a data factory named there runs
only with ``--trust-model-code``."""

from __future__ import annotations

import json

import pytest
from conftest import assert_clean_error, invoke

from curvscope.errors import CurvscopeError
from curvscope.report.check_config import load_config

FACTORY = """
import torch
open({marker!r}, "a").write("ran\\n")

def make(n=12, offset=0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 4, generator=g)
    return [{{"features": x[i], "target": int(i % 3)}} for i in range(offset, offset + n)]
"""


def report(path):
    return json.loads((path / "report.json").read_text())


def test_data_keys_of_problem_are_read_relative_to_the_config(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "ci.toml"
    config.write_text('rules = ["loss_value < 9"]\n[problem]\ndata = "../data.safetensors"\nbatch_size = 4\n'
                      'shuffle = true\nseed = 3\nbatches = 2\n[spectrum]\ndirections = false\n')
    loaded = load_config(config)
    assert loaded.problem["data"] == str(tmp_path / "conf" / "../data.safetensors")
    result = invoke("check", ckpt, "--config", config, "-o", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.stderr
    got = report(tmp_path / "o")
    flags = report_of(tmp_path, ckpt, data, "--batch-size", 4, "--shuffle", "--seed", 3, "--batches", 2,
                      "--no-directions")
    assert got["problem"]["batch_indices"] == flags["problem"]["batch_indices"]
    assert [b["batch_indices"] for b in got["per_batch"]] == [b["batch_indices"] for b in flags["per_batch"]]
    assert got["groups"][0]["lambda_max"] == pytest.approx(flags["groups"][0]["lambda_max"], rel=1e-12)
    # the command line wins over the config
    result = invoke("check", ckpt, "--config", config, "--batch-size", 6, "-o", tmp_path / "o6")
    assert result.exit_code == 0, result.stderr
    assert report(tmp_path / "o6")["problem"]["batch_size"] == 6


def report_of(tmp_path, ckpt, data, *flags):
    out = tmp_path / "flags"
    result = invoke("spectrum", ckpt, "--data", data, "--no-plots", "-o", out, *flags)
    assert result.exit_code == 0, result.stderr
    return report(out)


def test_a_data_factory_in_a_config_runs_only_with_trust_model_code(tmp_path, tiny_files):
    ckpt, _, _ = tiny_files
    marker = tmp_path / "marker"
    (tmp_path / "items.py").write_text(FACTORY.format(marker=str(marker)))
    config = tmp_path / "ci.toml"
    config.write_text('rules = ["loss_value < 9"]\n[problem]\ndata = "items.py:make"\n'
                      'data_kwargs = { n = 10, offset = 1 }\ncolumns = { x = "features", y = "target" }\n')
    result = invoke("check", ckpt, "--config", config, "-o", tmp_path / "o")
    err = assert_clean_error(result, "[problem] data", "asks to import and run", "items.py:make",
                             "--trust-model-code")
    assert "--data" in err and not marker.exists() and not (tmp_path / "o").exists()
    result = invoke("check", ckpt, "--config", config, "-o", tmp_path / "o", "--trust-model-code")
    assert result.exit_code == 0, result.stderr
    assert marker.read_text() == "ran\n"
    problem = report(tmp_path / "o")["problem"]
    assert problem["batch_indices"] == list(range(10))
    assert "items.py:make" in problem["data"] and '"offset": 1' in problem["data"]
    # a module spec is code too; a data file named on the command line replaces the config's factory unasked
    config.write_text('rules = ["loss_value < 9"]\n[problem]\ndata = "json:loads"\n')
    assert_clean_error(invoke("check", ckpt, "--config", config, "-o", tmp_path / "p"), "json:loads",
                       "--trust-model-code")
    result = invoke("check", ckpt, "--config", config, "--data", tiny_files[1], "-o", tmp_path / "p")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("line, needle", [
    ("pad_token = true", "pad_token = True has the wrong type"),
    ("batches = 2.5", "batches = 2.5 has the wrong type"),
    ("data = 3", "data = 3 has the wrong type"),
    ("split = [1]", "split = [1] has the wrong type"),
    ("dataset = 'x'", "unknown key 'dataset' in [problem]"),
])
def test_bad_data_keys_are_one_line(tmp_path, line, needle):
    config = tmp_path / "ci.toml"
    config.write_text(f'rules = ["loss_value < 9"]\n[problem]\n{line}\n')
    with pytest.raises(CurvscopeError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_config(config)


def test_problem_batches_is_the_default_of_the_computations_that_take_it(tmp_path, tiny_files):
    ckpt, data, _ = tiny_files
    config = tmp_path / "ci.toml"
    config.write_text('rules = ["loss_value < 9"]\n[problem]\nbatches = 5\nbatch_size = 4\n')
    result = invoke("check", ckpt, "--data", data, "--config", config, "-o", tmp_path / "o")
    assert_clean_error(result, "--batches 5", "needs 20 samples", "has 12")
    config.write_text('rules = ["loss_value < 9"]\n[problem]\nbatches = 3\nbatch_size = 4\n'
                      '[spectrum]\nbatches = 1\ndirections = false\n')
    result = invoke("check", ckpt, "--data", data, "--config", config, "-o", tmp_path / "o")
    assert result.exit_code == 0, result.stderr
    assert report(tmp_path / "o").get("per_batch") is None  # the [spectrum] table wins
    config.write_text('rules = ["batch_stats.groups[0].lambda_max.std < 1e9"]\n[problem]\nbatches = 3\n'
                      'batch_size = 4\n[spectrum]\ndirections = false\n')
    result = invoke("check", ckpt, "--data", data, "--config", config, "-o", tmp_path / "b")
    assert result.exit_code == 0, result.stderr
    assert len(report(tmp_path / "b")["per_batch"]) == 3


def test_the_toml_examples_of_docs_ci_are_valid_configs(tmp_path):
    from conftest import ROOT

    blocks = [b.split("```", 1)[0] for b in (ROOT / "docs" / "ci.md").read_text().split("```toml")[1:]]
    assert any("data_kwargs" in b for b in blocks)
    for i, block in enumerate(blocks):
        (tmp_path / f"{i}.toml").write_text(block)
        load_config(tmp_path / f"{i}.toml")
