"""A run's checkpoints (curvscope.io.runs): discovery of each layout, the step, numeric order, errors, fingerprints
and safe loading."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from curvscope.errors import CurvscopeError
from curvscope.io.runs import RunCheckpoint, TrainingState, find_checkpoints


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _model(seed).state_dict().items()}


def _optimizer_state(model: nn.Module, steps: int = 2) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
    return opt.state_dict()


def _safetensors(path: Path, seed: int = 0, **metadata: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_state(seed), str(path), metadata=metadata or None)
    return path


def _hf_checkpoint(directory: Path, step: int | None, seed: int = 0, optimizer: bool = True) -> Path:
    """A Trainer checkpoint-<n>/: weights, optimizer, trainer state, and the files that are not checkpoints."""
    directory.mkdir(parents=True)
    model = _model(seed)
    save_file(_state(seed), str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"architectures": ["Nothing"]}))
    if optimizer:
        torch.save(_optimizer_state(model), directory / "optimizer.pt")
    torch.save({"last_epoch": 1}, directory / "scheduler.pt")
    (directory / "rng_state.pth").write_bytes(b"not a torch file: never read")
    (directory / "training_args.bin").write_bytes(b"pickled TrainingArguments: never read")
    if step is not None:
        (directory / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return directory


def _steps(checkpoints: list[RunCheckpoint]) -> list[int]:
    return [c.step for c in checkpoints]


# -- discovery, one layout at a time ----------------------------------------------------------------------

def test_safetensors_directory_is_ordered_numerically_by_the_integer_in_the_name(tmp_path):
    for step in (100, 20, 5):
        _safetensors(tmp_path / "run" / f"step_{step}.safetensors", seed=step)
    (tmp_path / "run" / "notes.txt").write_text("not a checkpoint")
    found = find_checkpoints([tmp_path / "run"])
    assert _steps(found) == [5, 20, 100]
    assert [c.path.name for c in found] == ["step_5.safetensors", "step_20.safetensors", "step_100.safetensors"]
    assert {c.kind for c in found} == {"safetensors"} and {c.step_source for c in found} == {"name"}
    loaded = found[1].load()
    assert isinstance(loaded, TrainingState) and loaded.step == 20 and loaded.optimizer_state is None
    for k, v in _state(20).items():
        assert torch.equal(loaded.state_dict[k], v)


def test_the_step_in_the_metadata_comes_before_the_name(tmp_path):
    _safetensors(tmp_path / "a_999.safetensors", step="7")
    _safetensors(tmp_path / "final.safetensors", global_step="30", step="3")
    _safetensors(tmp_path / "ckpt-12.safetensors")
    found = find_checkpoints([tmp_path])
    assert _steps(found) == [7, 12, 30]
    assert [c.step_source for c in found] == ["metadata", "name", "metadata"]
    assert found[2].load().metadata["global_step"] == "30"


def test_pt_training_checkpoints_carry_model_optimizer_and_step(tmp_path):
    model = _model(1)
    opt = _optimizer_state(model)
    torch.save({"model": model.state_dict(), "optimizer": opt, "step": torch.tensor(40), "epoch": 2,
                "lr": 0.1}, tmp_path / "ckpt_1.pt")
    torch.save({"model_state_dict": _state(2), "optimizer_state_dict": opt, "global_step": 50},
               tmp_path / "ckpt_2.pth")
    torch.save({"state_dict": _state(3), "optimizer_states": [opt], "global_step": 60, "epoch": 3},
               tmp_path / "lightning.pt")  # Lightning's layout
    torch.save(_state(4), tmp_path / "weights_70.pt")  # a plain state dict: the step from the name
    found = find_checkpoints([tmp_path])
    assert _steps(found) == [40, 50, 60, 70]
    assert [c.kind for c in found] == ["torch"] * 4
    assert [c.step_source for c in found] == ["metadata", "metadata", "metadata", "name"]
    first = found[0].load()
    assert first.step == 40 and first.metadata == {"step": 40, "epoch": 2, "lr": 0.1}
    assert set(first.state_dict) == set(model.state_dict())
    assert first.optimizer_state["param_groups"][0]["momentum"] == 0.9
    assert torch.equal(first.optimizer_state["state"][0]["momentum_buffer"], opt["state"][0]["momentum_buffer"])
    assert found[2].load().optimizer_state["param_groups"][0]["lr"] == 0.1
    plain = found[3].load()
    assert plain.optimizer_state is None and plain.metadata == {}
    assert all(torch.equal(plain.state_dict[k], v) for k, v in _state(4).items())


def test_hugging_face_trainer_output(tmp_path):
    out = tmp_path / "out"
    _hf_checkpoint(out / "checkpoint-500", 500, seed=5)
    _hf_checkpoint(out / "checkpoint-40", 40, seed=4)
    _hf_checkpoint(out / "checkpoint-1000", None, seed=6, optimizer=False)  # no trainer_state: the name
    save_file(_state(9), str(out / "model.safetensors"))  # save_model()'s final weights: the end again
    (out / "config.json").write_text("{}")
    found = find_checkpoints([out])
    assert _steps(found) == [40, 500, 1000]
    assert [c.kind for c in found] == ["hf"] * 3
    assert [c.step_source for c in found] == ["metadata", "metadata", "name"]
    assert [f.name for f in found[0].files] == ["model.safetensors", "optimizer.pt", "trainer_state.json"]
    state = found[1].load()
    assert all(torch.equal(state.state_dict[k], v) for k, v in _state(5).items())
    assert state.optimizer_state["param_groups"][0]["lr"] == 0.1
    assert state.metadata["trainer_state"]["global_step"] == 500 and state.metadata["format"] == "pt"
    assert found[2].load().optimizer_state is None
    # one checkpoint directory on its own, and a glob of them
    assert _steps(find_checkpoints([out / "checkpoint-500"])) == [500]
    assert _steps(find_checkpoints([str(out / "checkpoint-*")])) == [40, 500, 1000]


def test_trainer_state_global_step_comes_before_the_directory_name(tmp_path):
    _hf_checkpoint(tmp_path / "checkpoint-10", 12)
    assert _steps(find_checkpoints([tmp_path])) == [12]


def test_sharded_hugging_face_weights_are_merged(tmp_path):
    d = tmp_path / "checkpoint-3"
    d.mkdir()
    state = _state(3)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(d / file))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    (found,) = find_checkpoints([d])
    assert found.step == 3 and found.kind == "hf"
    assert [f.name for f in found.files] == ["model.safetensors.index.json", *shards]
    loaded = found.load().state_dict
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)


def test_globs_files_and_duplicates_of_the_same_file(tmp_path):
    for step in (1, 2, 10):
        torch.save(_state(step), tmp_path / f"step_{step}.pt")
    _safetensors(tmp_path / "other_3.safetensors")
    found = find_checkpoints([str(tmp_path / "step_*.pt"), tmp_path / "step_2.pt"])
    assert _steps(found) == [1, 2, 10]
    mixed = find_checkpoints([tmp_path])
    assert _steps(mixed) == [1, 2, 3, 10] and [c.kind for c in mixed] == ["torch", "torch", "safetensors", "torch"]


# -- errors -----------------------------------------------------------------------------------------------

def _error(paths, *needles: str) -> str:
    with pytest.raises(CurvscopeError) as info:
        find_checkpoints(paths)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_empty_directory_missing_path_and_unmatched_glob(tmp_path):
    (tmp_path / "empty").mkdir()
    _error([tmp_path / "empty"], str(tmp_path / "empty"), "no checkpoint found")
    _error([tmp_path / "nope"], str(tmp_path / "nope"), "not found")
    _error([str(tmp_path / "empty" / "*.pt")], "no checkpoint matches")
    (tmp_path / "x.bin").write_bytes(b"")
    _error([tmp_path / "x.bin"], "x.bin", "unknown checkpoint file type")


def test_checkpoints_without_a_step_are_named(tmp_path):
    _safetensors(tmp_path / "final.safetensors")
    torch.save(_state(), tmp_path / "best.pt")
    _safetensors(tmp_path / "step_3.safetensors")
    message = _error([tmp_path], "no step for", "final.safetensors", "best.pt")
    assert "step_3" not in message


def test_two_checkpoints_with_the_same_step_are_named(tmp_path):
    _safetensors(tmp_path / "step_10.safetensors")
    torch.save({"model": _state(), "step": 10}, tmp_path / "ckpt_a.pt")
    _safetensors(tmp_path / "step_11.safetensors")
    _error([tmp_path], "two checkpoints with step 10", "step_10.safetensors", "ckpt_a.pt")


def test_a_pt_file_that_needs_unpickling_code_is_refused(tmp_path):
    torch.save({"model": _state(), "args": argparse.Namespace(lr=0.1), "step": 1}, tmp_path / "step_1.pt")
    _error([tmp_path], "step_1.pt", "argparse.Namespace", "weights_only")
    torch.save({"model": _state(), "step": 1}, tmp_path / "step_1.pt")
    (found,) = find_checkpoints([tmp_path])
    # replaced after discovery by a file that needs code: load refuses it as well
    torch.save({"model": _state(), "args": argparse.Namespace(lr=0.1), "step": 1}, tmp_path / "step_1.pt")
    with pytest.raises(CurvscopeError, match="argparse.Namespace"):
        found.load()


def test_bad_steps_and_bad_entries(tmp_path):
    torch.save({"model": _state(), "step": 2.5}, tmp_path / "a.pt")
    _error([tmp_path / "a.pt"], "a.pt", "'step' is 2.5")
    torch.save({"model": {"w": torch.zeros(2), "note": "x"}, "step": 1}, tmp_path / "a.pt")
    (found,) = find_checkpoints([tmp_path / "a.pt"])
    with pytest.raises(CurvscopeError, match="'note' is a str"):
        found.load()
    (tmp_path / "b_4.safetensors").write_bytes(b"garbage")
    _error([tmp_path / "b_4.safetensors"], "b_4.safetensors", "not a valid safetensors file")


# -- fingerprints -----------------------------------------------------------------------------------------

def test_fingerprints_follow_the_content(tmp_path):
    path = _safetensors(tmp_path / "step_1.safetensors", seed=1)
    (found,) = find_checkpoints([path])
    first = found.fingerprint()
    assert first["path"] == str(path) and first["size"] == path.stat().st_size
    assert first["files"] == ["step_1.safetensors"] and len(first["sha256"]) == 64
    assert found.fingerprint() == first
    _safetensors(path, seed=2)  # same size, other numbers
    second = found.fingerprint()
    assert second["size"] == first["size"] and second["sha256"] != first["sha256"]

    d = _hf_checkpoint(tmp_path / "checkpoint-2", 2)
    (hf,) = find_checkpoints([d])
    before = hf.fingerprint()
    assert before["files"] == ["model.safetensors", "optimizer.pt", "trainer_state.json"]
    assert before["size"] == sum((d / f).stat().st_size for f in before["files"])
    (d / "rng_state.pth").write_bytes(b"changed, but not part of the checkpoint")
    assert hf.fingerprint() == before
    torch.save(_optimizer_state(_model(), steps=3), d / "optimizer.pt")
    assert hf.fingerprint()["sha256"] != before["sha256"]
