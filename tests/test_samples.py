"""The bundled sample models: they load, reach the held-out numbers documented in sample_models/README.md,
stay small, and ``make.py`` regenerates them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import DIABETES, DIGITS, SAMPLE_CHECKPOINTS, SAMPLES, invoke
from safetensors import safe_open

from curvscope.io.checkpoints import load_checkpoint
from curvscope.io.data import load_dataset
from curvscope.io.load import load_problem

README = SAMPLES / "README.md"
METRICS = json.loads((SAMPLES / "metrics.json").read_text())


def documented() -> dict[str, dict]:
    """The checkpoint table of sample_models/README.md: name -> {params, accuracy (fraction|None), loss}."""
    rows = {}
    for line in README.read_text().splitlines():
        m = re.match(r"\| `([\w-]+)\.safetensors` \| (\w+) \| (\w+) \|.*"
                     r"\| ([\d,]+) \| ([\d.]+%|-) \| ([\d.]+)", line)
        if m:
            name, _data, loss, params, acc, held_out_loss = m.groups()
            rows[name] = {"loss_name": loss, "params": int(params.replace(",", "")),
                          "accuracy": None if acc == "-" else float(acc[:-1]) / 100,
                          "loss": float(held_out_loss)}
    return rows


def split(text: str) -> tuple[int, int]:
    start, stop = text.split(":")
    return int(start), int(stop)


LANGUAGE_MODELS = {"charlm-pysource": SAMPLES / "pysource.safetensors"}  # tested in test_lm_sample.py


def test_readme_documents_every_checkpoint():
    assert set(documented()) == set(SAMPLE_CHECKPOINTS) | set(LANGUAGE_MODELS) == set(METRICS)
    assert {p.stem for p in SAMPLES.glob("*.safetensors")} == (
        set(documented()) | {"digits", "diabetes", "pysource"})


@pytest.mark.parametrize("name", list(SAMPLE_CHECKPOINTS))
def test_sample_reaches_its_documented_held_out_numbers(name):
    ckpt = SAMPLES / f"{name}.safetensors"
    data = SAMPLE_CHECKPOINTS[name]
    doc = documented()[name]
    meta = load_checkpoint(ckpt).metadata
    start, stop = split(meta["curvscope.test_split"])
    assert (start, stop) == split(load_dataset(data).metadata["test"])
    assert meta["curvscope.data"] == data.name

    problem = load_problem(ckpt, data)  # self-describing: no model, no loss given
    assert problem.loss.name == doc["loss_name"] and problem.num_params == doc["params"]
    held_out = problem.batch_from_dataset(torch.arange(start, stop))
    with torch.no_grad():
        outputs = held_out.forward()
        loss = float(held_out.loss(outputs, held_out.targets))
    assert loss <= doc["loss"] * 1.01 + 1e-4, (loss, doc["loss"])
    assert abs(loss - METRICS[name]["test_loss"]) < 1e-3 * max(1.0, loss)
    if doc["accuracy"] is not None:
        accuracy = float((outputs.argmax(dim=1) == held_out.targets).double().mean())
        one_sample = 1 / (stop - start)
        assert accuracy >= doc["accuracy"] - one_sample, (accuracy, doc["accuracy"])
        assert abs(accuracy - METRICS[name]["test_accuracy"]) < one_sample
        assert accuracy > 0.9


@pytest.mark.parametrize("name", list(SAMPLE_CHECKPOINTS))
def test_info_works_on_every_sample(name):
    result = invoke("info", SAMPLES / f"{name}.safetensors", "--data", SAMPLE_CHECKPOINTS[name])
    assert result.exit_code == 0, result.stderr
    assert f"{documented()[name]['params']:,}" in result.stdout
    assert "128 samples: the first 128 in file order" in result.stdout


@pytest.mark.parametrize("name", list(SAMPLE_CHECKPOINTS))
def test_checkpoints_are_small_and_self_describing(name):
    path = SAMPLES / f"{name}.safetensors"
    assert path.stat().st_size < 512 * 1024  # "well under 2 MB"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["curvscope.model"].startswith("curvscope.models:")
    assert isinstance(json.loads(meta["curvscope.model_kwargs"]), dict)
    assert meta["curvscope.loss"] in ("ce", "mse")


def test_datasets_are_as_documented():
    digits = load_dataset(DIGITS)
    assert digits.x.shape == (1797, 64) and digits.x.dtype == torch.float32
    assert float(digits.x.min()) == 0.0 and float(digits.x.max()) == 1.0
    assert digits.y.dtype == torch.int64 and digits.y.unique().tolist() == list(range(10))
    assert digits.metadata["train"] == "0:1437" and digits.metadata["test"] == "1437:1797"
    diabetes = load_dataset(DIABETES)
    assert diabetes.x.shape == (442, 10) and diabetes.y.shape == (442, 1)
    assert diabetes.x.dtype == diabetes.y.dtype == torch.float32
    assert diabetes.metadata["train"] == "0:353" and diabetes.metadata["test"] == "353:442"
    train_x, train_y = diabetes.x[:353].double(), diabetes.y[:353].double()
    torch.testing.assert_close(train_x.mean(0), torch.zeros(10, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(train_x.std(0), torch.ones(10, dtype=torch.float64), atol=1e-5, rtol=0)
    assert abs(float(train_y.mean())) < 1e-6 and abs(float(train_y.std()) - 1) < 1e-5


def test_default_batch_is_training_samples():
    for name, data in SAMPLE_CHECKPOINTS.items():
        problem = load_problem(SAMPLES / f"{name}.safetensors", data)
        start, _ = split(load_checkpoint(SAMPLES / f"{name}.safetensors").metadata["curvscope.test_split"])
        assert problem.info["batch_indices"] == list(range(128)) and 128 <= start


@pytest.mark.slow
def test_make_regenerates_the_samples(tmp_path):
    """make.py, run on a copy (the bundled files stay untouched), reproduces tensors, metadata, metrics."""
    pytest.importorskip("sklearn", reason="regenerating the samples needs the 'samples' extra")
    shutil.copy(SAMPLES / "make.py", tmp_path / "make.py")
    proc = subprocess.run([sys.executable, "make.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == set(METRICS)
    assert all(metrics[k] == METRICS[k] for k in SAMPLE_CHECKPOINTS)
    with safe_open(str(SAMPLES / "pysource.safetensors"), "pt") as old, \
            safe_open(str(tmp_path / "pysource.safetensors"), "pt") as new:
        same_text = old.metadata()["text_sha256"] == new.metadata()["text_sha256"]
    assert metrics == METRICS or not same_text
    for path in sorted(SAMPLES.glob("*.safetensors")):
        if not same_text and path.stem in ("pysource", *LANGUAGE_MODELS):
            continue  # another Python's standard library: other text, other model
        with safe_open(str(path), "pt") as old, safe_open(str(tmp_path / path.name), "pt") as new:
            assert new.metadata() == old.metadata(), path.name
            assert list(new.keys()) == list(old.keys()), path.name
            for key in old.keys():
                assert torch.equal(new.get_tensor(key), old.get_tensor(key)), (path.name, key)
