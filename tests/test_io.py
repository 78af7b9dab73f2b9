"""Loaders: every checkpoint and data format, model specs, batch selection, default losses, integer inputs."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import TINY_KWARGS, invoke, tiny_mlp, write_data
from safetensors.torch import save_file
from torch import nn

from curvscope.cli.common import as_flags
from curvscope.errors import CurvscopeError
from curvscope.io.atomic import write_atomic, write_text_atomic
from curvscope.io.checkpoints import apply_state_dict, load_checkpoint, save_checkpoint
from curvscope.io.data import load_dataset, select_batch
from curvscope.io.load import load_problem
from curvscope.io.spec import build_model, canonical_spec, parse_model_kwargs

MLP = "curvscope.models:mlp"


def params_equal(problem, model: nn.Module) -> bool:
    ref = dict(model.named_parameters())
    return list(problem.params) == list(ref) and all(
        torch.equal(problem.params[k], ref[k].detach()) for k in ref)


# -- checkpoint formats ---------------------------------------------------------------------------------

def test_self_describing_safetensors_needs_no_model(tiny_files):
    ckpt, data, model = tiny_files
    loaded = load_checkpoint(ckpt)
    assert loaded.model_spec == MLP and loaded.model_kwargs == TINY_KWARGS and loaded.loss == "ce"
    problem = load_problem(ckpt, data, dtype="float32")
    assert params_equal(problem, model)
    assert problem.info["model"] == MLP and problem.info["model_kwargs"] == TINY_KWARGS
    x = load_dataset(data).x
    torch.testing.assert_close(problem.forward(), model(x))


def test_safetensors_without_metadata_needs_model(tmp_path, tiny_data):
    model = tiny_mlp()
    ckpt = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    data = write_data(tmp_path / "d.safetensors", *tiny_data)
    with pytest.raises(CurvscopeError, match="does not say which model.*model=SPEC"):  # Python words
        load_problem(ckpt, data)
    with pytest.raises(CurvscopeError, match="does not say which model.*--model"), as_flags():  # the CLI's
        load_problem(ckpt, data)
    problem = load_problem(ckpt, data, model="mlp", model_kwargs=json.dumps(TINY_KWARGS))
    assert params_equal(problem, model)


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
@pytest.mark.parametrize("wrapped", [False, True])
def test_torch_state_dicts(tmp_path, tiny_data, suffix, wrapped):
    model = tiny_mlp(seed=3)
    state = model.state_dict()
    ckpt = tmp_path / f"model{suffix}"
    torch.save({"state_dict": state, "epoch": torch.tensor(3)} if wrapped else state, ckpt)
    data = write_data(tmp_path / "d.safetensors", *tiny_data)
    problem = load_problem(ckpt, data, model="mlp", model_kwargs=TINY_KWARGS)
    assert params_equal(problem, model)


def test_torch_file_with_a_pickled_module_is_refused(tmp_path, tiny_data):
    ckpt = tmp_path / "full.pt"
    torch.save(tiny_mlp(), ckpt)
    with pytest.raises(CurvscopeError, match=r"full\.pt: holds torch\.nn\.modules\.container\.Sequential, "
                                             r"not a plain state dict"):
        load_checkpoint(ckpt)


def test_checkpoint_metadata_errors(tmp_path):
    model = tiny_mlp()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    cases = {
        "badjson": ({"curvscope.model": MLP, "curvscope.model_kwargs": "{oops"}, "not valid JSON"),
        "notobj": ({"curvscope.model": MLP, "curvscope.model_kwargs": "[1, 2]"}, "must be a JSON object"),
        "badloss": ({"curvscope.model": MLP, "curvscope.loss": "hinge"}, "'curvscope.loss' is 'hinge'"),
    }
    for name, (meta, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path), metadata=meta)
        with pytest.raises(CurvscopeError, match=match) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)


def test_save_checkpoint_round_trip_and_metadata(tmp_path):
    model = tiny_mlp(seed=5)
    path = tmp_path / "sub" / "m.safetensors"
    save_checkpoint(path, model, model_spec=MLP, model_kwargs=TINY_KWARGS, loss="mse",
                    extra_metadata={"note": "x"})
    ck = load_checkpoint(path)
    assert ck.metadata["note"] == "x" and ck.loss == "mse" and ck.model_spec == MLP
    assert all(torch.equal(ck.state_dict[k], v) for k, v in model.state_dict().items())
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no temporary file left


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    write_text_atomic(target, "old")

    def broken(tmp):
        tmp.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, broken)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_apply_state_dict_lists_the_first_mismatches():
    model = tiny_mlp()
    state = dict(model.state_dict())
    state.pop("3.bias")
    state["1.weight"] = torch.zeros(2, 2)
    for i in range(5):
        state[f"extra.{i}"] = torch.zeros(1)
    with pytest.raises(CurvscopeError) as info:
        apply_state_dict(model, state, "ck.pt")
    msg = str(info.value)
    assert msg.startswith("ck.pt: checkpoint does not match the model")
    assert "missing keys 3.bias" in msg and "extra.0, extra.1, extra.2 (and 2 more)" in msg
    assert "1.weight (2, 2) vs model (5, 4)" in msg and "\n" not in msg


# -- data formats ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pt"])
def test_data_formats_give_the_same_batch(tmp_path, tiny_files, tiny_data, suffix):
    ckpt, _, model = tiny_files
    x, y = tiny_data
    data = write_data(tmp_path / f"data{suffix}", x, y)
    problem = load_problem(ckpt, data, batch_size=5, dtype="float64")
    assert problem.inputs.dtype == torch.float64 and problem.targets.dtype == torch.long
    torch.testing.assert_close(problem.inputs, x[:5].double())
    assert torch.equal(problem.targets, y[:5])
    assert problem.info["data"] == str(data)
    ref = nn.CrossEntropyLoss()(model.double()(x[:5].double()), y[:5])
    torch.testing.assert_close(problem.loss_value(), ref)


def test_npz_with_object_arrays_is_refused(tmp_path):
    import numpy as np

    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}] * 3, dtype=object), y=np.arange(3))
    with pytest.raises(CurvscopeError, match="obj.npz"):
        load_dataset(path)


# -- model specs ----------------------------------------------------------------------------------------

USER_MODULE = """
import torch
from torch import nn

def make(width=5):
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))

def not_a_module():
    return 42

class TokenModel(nn.Module):
    def __init__(self, vocab=11, dim=6, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)).mean(dim=1))
"""


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_net.py"
    path.write_text(USER_MODULE)
    return path


def test_file_spec_and_model_kwargs(user_file, tmp_path, tiny_data):
    data = write_data(tmp_path / "d.npz", *tiny_data)
    problem = load_problem(None, data, model=f"{user_file}:make", model_kwargs='{"width": 7}')
    assert problem.num_params == 4 * 7 + 7 + 7 * 3 + 3
    assert problem.info["checkpoint"] is None and problem.info["model_kwargs"] == {"width": 7}


def test_package_module_spec_imports_from_the_current_directory(tmp_path, monkeypatch, tiny_data):
    pkg = tmp_path / "cs_user_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(USER_MODULE)
    data = write_data(tmp_path / "d.safetensors", *tiny_data)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        problem = load_problem(None, data, model="cs_user_pkg.nets:make")
        assert problem.num_params == 4 * 5 + 5 + 5 * 3 + 3
        assert str(tmp_path) not in sys.path  # the current directory was only added for the import
    finally:
        for name in [m for m in sys.modules if m.startswith("cs_user_pkg")]:
            del sys.modules[name]


def test_model_without_checkpoint_is_seeded(user_file, tmp_path, tiny_data):
    data = write_data(tmp_path / "d.safetensors", *tiny_data)
    a = load_problem(None, data, model=f"{user_file}:make", seed=1)
    b = load_problem(None, data, model=f"{user_file}:make", seed=1)
    c = load_problem(None, data, model=f"{user_file}:make", seed=2)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert not torch.equal(a.params["0.weight"], c.params["0.weight"])
    builtin = load_problem(None, data, model="mlp", model_kwargs=TINY_KWARGS, seed=0)
    assert params_equal(builtin, tiny_mlp(seed=0))  # the factory's own init after torch.manual_seed(seed)


def test_model_overrides_checkpoint_metadata(tiny_files, user_file):
    ckpt, data, model = tiny_files
    # --model with the checkpoint's own spec (also as the short built-in name) keeps the checkpoint's kwargs
    for spec in ("mlp", MLP):
        problem = load_problem(ckpt, data, model=spec)
        assert params_equal(problem, model)
        assert isinstance(problem.model[2], nn.Tanh)
    # a different model: the checkpoint's kwargs do not apply, and its keys do not match
    with pytest.raises(CurvscopeError, match="checkpoint does not match the model"):
        load_problem(ckpt, data, model=f"{user_file}:make")
    # --model-kwargs replaces the checkpoint's kwargs: relu instead of tanh changes the outputs
    relu = load_problem(ckpt, data, model_kwargs={**TINY_KWARGS, "activation": "relu"})
    assert isinstance(relu.model[2], nn.ReLU)
    assert not torch.allclose(relu.forward(), load_problem(ckpt, data).forward())


def test_spec_errors(user_file):
    assert canonical_spec("cnn") == "curvscope.models:cnn" and canonical_spec("a.b:c") == "a.b:c"
    cases = [
        ("nonexistent_cs_pkg.mod:f", "cannot import module 'nonexistent_cs_pkg.mod'"),
        (f"{user_file}:missing", "'missing' is not a callable"),
        (f"{user_file}:not_a_module", "returned int, not a torch.nn.Module"),
        (f"{user_file.parent / 'nope.py'}:make", "not found"),
        ("resnet", "expected 'path/to/file.py:factory'"),
        (":make", "expected 'path/to/file.py:factory'"),
    ]
    for spec, match in cases:
        with pytest.raises(CurvscopeError, match=match):
            build_model(spec, {})
    with pytest.raises(CurvscopeError, match="bad keyword arguments"):
        build_model(f"{user_file}:make", {"depth": 3})
    with pytest.raises(CurvscopeError, match="not valid JSON"):
        parse_model_kwargs("{width: 3}")
    with pytest.raises(CurvscopeError, match="expected a JSON object"):
        parse_model_kwargs("[3]")


def test_file_spec_that_fails_to_import(tmp_path):
    bad = tmp_path / "bad_net.py"
    bad.write_text("import nonexistent_cs_dependency\n")
    before = set(sys.modules)
    with pytest.raises(CurvscopeError, match="importing .*bad_net.py failed: ModuleNotFoundError"):
        build_model(f"{bad}:make")
    assert set(sys.modules) == before  # the half-imported module is not left behind


def test_checkpoint_naming_a_model_that_cannot_be_built(tmp_path, tiny_data):
    path = tmp_path / "orphan.safetensors"
    save_checkpoint(path, tiny_mlp(), model_spec="nonexistent_cs_pkg:make")
    data = write_data(tmp_path / "d.safetensors", *tiny_data)
    with pytest.raises(CurvscopeError, match=r"orphan\.safetensors: metadata names a model"):
        load_problem(path, data, trust_model_code=True)


# -- integer inputs -------------------------------------------------------------------------------------

def test_integer_token_inputs(user_file, tmp_path):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (9, 5), generator=g)
    labels = torch.randint(0, 3, (9,), generator=g)
    data = write_data(tmp_path / "tokens.safetensors", tokens, labels)
    problem = load_problem(None, data, model=f"{user_file}:TokenModel", dtype="float64", seed=0)
    assert problem.inputs.dtype == torch.int64 and torch.equal(problem.inputs, tokens)
    assert problem.params["embed.weight"].dtype == torch.float64 and problem.num_outputs == 3
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("cs_token_ref", user_file)
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    ref = module.TokenModel().double()
    torch.testing.assert_close(problem.loss_value(), nn.CrossEntropyLoss()(ref(tokens), labels))
    grads = problem.gradient()
    assert grads["embed.weight"].shape == (11, 6) and torch.isfinite(grads["embed.weight"]).all()
    result = invoke("info", "--model", f"{user_file}:TokenModel", "--data", data)
    assert result.exit_code == 0, result.stderr
    assert "Embedding" in result.stdout


# -- batch selection and default loss -------------------------------------------------------------------

def test_batch_is_the_first_n_in_file_order_and_capped(tiny_files, tiny_data):
    ckpt, data, _ = tiny_files
    x, y = tiny_data
    p = load_problem(ckpt, data, batch_size=4)
    assert p.info["batch_indices"] == [0, 1, 2, 3] and torch.equal(p.inputs, x[:4])
    assert p.info["shuffle"] is False and p.info["dataset_size"] == 12
    big = load_problem(ckpt, data, batch_size=1000)
    assert big.batch_size == 12 and big.info["batch_indices"] == list(range(12))
    assert load_problem(ckpt, data).batch_size == 12  # default 128, capped


def test_shuffle_is_seeded_and_recorded(tiny_files, tiny_data):
    ckpt, data, _ = tiny_files
    x, y = tiny_data
    a = load_problem(ckpt, data, batch_size=5, shuffle=True, seed=7)
    b = load_problem(ckpt, data, batch_size=5, shuffle=True, seed=7)
    c = load_problem(ckpt, data, batch_size=5, shuffle=True, seed=8)
    expected = torch.randperm(12, generator=torch.Generator().manual_seed(7))[:5].tolist()  # documented rule
    assert a.info["batch_indices"] == b.info["batch_indices"] == expected
    assert c.info["batch_indices"] != expected
    assert a.info["shuffle"] is True and a.info["seed"] == 7
    assert torch.equal(a.inputs, x[expected]) and torch.equal(a.targets, y[expected])


def test_select_batch_rules():
    assert select_batch(10, 3).tolist() == [0, 1, 2]
    assert select_batch(10, None).tolist() == list(range(10))
    assert select_batch(10, 4, offset=8).tolist() == [8, 9]
    with pytest.raises(CurvscopeError, match="at least 1"):
        select_batch(10, 0)
    with pytest.raises(CurvscopeError, match="outside"):
        select_batch(10, 2, offset=10)


def test_default_loss(tmp_path, tiny_data):
    x, y = tiny_data
    model = tiny_mlp()
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    ints = write_data(tmp_path / "ints.safetensors", x, y)
    floats = write_data(tmp_path / "floats.safetensors", x, torch.rand(12, 3))
    kw = {"model": "mlp", "model_kwargs": TINY_KWARGS}
    assert load_problem(plain, ints, **kw).loss.name == "ce"
    assert load_problem(plain, floats, **kw).loss.name == "mse"
    assert load_problem(plain, floats, loss="bce", **kw).loss.name == "bce"
    meta = tmp_path / "bce.safetensors"
    save_checkpoint(meta, model, model_spec=MLP, model_kwargs=TINY_KWARGS, loss="bce")
    assert load_problem(meta, floats).loss.name == "bce"  # the checkpoint's loss wins over the default
    assert load_problem(meta, floats, loss="mse").loss.name == "mse"  # and --loss wins over the checkpoint


def test_device_and_dtype(tiny_files):
    ckpt, data, _ = tiny_files
    p = load_problem(ckpt, data, device="auto", dtype="float64")
    assert p.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert all(v.dtype == torch.float64 for v in p.params.values())
    assert load_problem(ckpt, data, device="cpu").dtype == torch.float64  # auto on the CPU
    assert load_problem(ckpt, data, device="cpu", dtype="float32").dtype == torch.float32
