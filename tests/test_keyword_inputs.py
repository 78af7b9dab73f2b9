"""Keyword inputs (data files without ``x``), targets named ``labels``, and choosing the tensor in a structured
model output (``output=``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from curvscope.cli.common import as_flags
from curvscope.errors import CurvscopeError
from curvscope.io.data import load_dataset
from curvscope.io.inputs import KeywordInputs, call_model, probe_model, select_output
from curvscope.io.load import load_problem
from curvscope.problem import make_problem

VOCAB, T, C = 7, 5, 3


class MaskedBag(nn.Module):
    """Mean of token embeddings over the unmasked positions, then a linear classifier: (N, C)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 4)
        self.head = nn.Linear(4, C)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        m = attention_mask.unsqueeze(-1).to(self.head.weight.dtype)
        return self.head((self.embed(input_ids) * m).sum(1) / m.sum(1))


@dataclass
class Out:
    logits: Tensor
    hidden: Tensor


class Structured(nn.Module):
    """Returns a dataclass with .logits, a dict or a tuple, with a second tensor beside the logits."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(4, C)

    def forward(self, x: Tensor):
        logits, hidden = self.lin(x), torch.tanh(self.lin(x))
        if self.kind == "dataclass":
            return Out(logits=logits, hidden=hidden)
        if self.kind == "dict":
            return {"logits": logits, "hidden": hidden}
        return (hidden, logits)


def write_factory(tmp_path: Path, expression: str) -> None:
    """``tmp_path/nets.py:make`` returning ``expression`` built from this module's classes."""
    here = str(Path(__file__).parent)
    (tmp_path / "nets.py").write_text(f"import sys\nsys.path.insert(0, {here!r})\n"
                                      f"from test_keyword_inputs import MaskedBag, Structured  # noqa: F401\n\n\n"
                                      f"def make():\n    return {expression}\n")


def token_data(n: int = 6) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.int64)
    mask[::2, 3:] = 0  # padding: the masked tokens must not matter
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(n) % C}


def test_keyword_inputs_behave_like_a_batch():
    data = token_data()
    ki = KeywordInputs({k: v for k, v in data.items() if k != "labels"})
    assert len(ki) == ki.shape[0] == 6 and not ki.is_floating_point()
    assert ki[1:3].shape[0] == 2 and ki[torch.tensor([0, 5])]["input_ids"].tolist() == [
        data["input_ids"][0].tolist(), data["input_ids"][5].tolist()]
    assert ki[2]["attention_mask"].shape == (T,) and ki[2].unsqueeze(0)["input_ids"].shape == (1, T)
    assert sorted(dict(ki)) == ["attention_mask", "input_ids"] and "input_ids" in ki
    mixed = KeywordInputs({"ids": data["input_ids"], "pixels": torch.rand(6, 2)}).to("cpu", torch.float64)
    assert mixed["ids"].dtype == torch.int64 and mixed["pixels"].dtype == torch.float64
    assert len(list(ki)) == 6
    with pytest.raises(CurvscopeError, match="different numbers of samples"):
        KeywordInputs({"a": torch.zeros(3), "b": torch.zeros(4)})


def test_vmap_maps_over_keyword_inputs():
    torch.manual_seed(0)
    model = MaskedBag().double()
    state = dict(model.named_parameters())
    data = token_data()
    ki = KeywordInputs({k: v for k, v in data.items() if k != "labels"})
    full = call_model(model, state, ki)
    per_sample = torch.func.vmap(lambda s: call_model(model, state, s.unsqueeze(0))[0])(ki)
    torch.testing.assert_close(per_sample, full)
    torch.testing.assert_close(full, model(**dict(ki)))


def test_keyword_inputs_with_a_mask_and_labels_through_load_problem(tmp_path):
    torch.manual_seed(0)
    model = MaskedBag()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    write_factory(tmp_path, "MaskedBag()")
    data = token_data()
    save_file(data, str(tmp_path / "d.safetensors"))
    dataset = load_dataset(tmp_path / "d.safetensors")
    assert isinstance(dataset.x, KeywordInputs) and dataset.target_name == "labels" and len(dataset) == 6
    problem = load_problem(tmp_path / "m.pt", tmp_path / "d.safetensors", model=f"{tmp_path}/nets.py:make",
                           dtype="float64", batch_size=4)
    assert isinstance(problem.inputs, KeywordInputs) and problem.batch_size == 4
    assert problem.inputs["input_ids"].dtype == torch.int64 and problem.info["targets"] == "labels"
    model = model.double()
    expected = F.cross_entropy(model(data["input_ids"][:4], data["attention_mask"][:4]), data["labels"][:4])
    torch.testing.assert_close(problem.loss_value(), expected)
    # padded tokens do not matter, because the mask is passed
    changed = dict(data, input_ids=torch.where(data["attention_mask"] == 0, 0, data["input_ids"]))
    save_file(changed, str(tmp_path / "d2.safetensors"))
    other = load_problem(tmp_path / "m.pt", tmp_path / "d2.safetensors", model=f"{tmp_path}/nets.py:make",
                         dtype="float64", batch_size=4)
    torch.testing.assert_close(other.loss_value(), expected)
    # more batches from the dataset keep the keywords
    more = problem.batch_from_dataset(torch.tensor([5, 4]))
    torch.testing.assert_close(more.forward(), model(data["input_ids"][[5, 4]], data["attention_mask"][[5, 4]]))
    # per-sample gradients by vmap over the keyword inputs
    grads = torch.func.vmap(torch.func.grad(lambda p, x, y: problem.loss.per_sample(
        problem.forward(p, x.unsqueeze(0)), y.unsqueeze(0)).sum()), in_dims=(None, 0, 0))(
        problem.params, problem.inputs, problem.targets)
    mean = {k: v.mean(0) for k, v in grads.items()}
    for k, g in problem.gradient().items():
        torch.testing.assert_close(mean[k], g)


def test_make_problem_with_keyword_inputs_casts_floats_only():
    class Pixels(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, C)

        def forward(self, pixel_values: Tensor, scale: Tensor) -> Tensor:
            return self.lin(pixel_values) * scale.unsqueeze(-1)

    ki = KeywordInputs({"pixel_values": torch.rand(4, 2), "scale": torch.tensor([1, 2, 3, 4])})
    problem = make_problem(Pixels(), ki, torch.tensor([0, 1, 2, 0]), dtype=torch.float64)
    assert problem.inputs["pixel_values"].dtype == torch.float64 and problem.inputs["scale"].dtype == torch.int64
    assert problem.forward().shape == (4, C)
    bad = KeywordInputs({"pixel_values": torch.tensor([[0.0, float("nan")]] * 4), "scale": torch.ones(4)})
    with pytest.raises(CurvscopeError, match="NaN or Inf"):
        make_problem(Pixels(), bad, torch.tensor([0, 1, 2, 0]))


def test_keywords_the_model_does_not_take_are_named(tmp_path):
    from curvscope.models import mlp

    torch.manual_seed(0)
    torch.save(mlp(4, [5], 3).state_dict(), tmp_path / "m.pt")
    save_file({"inputs": torch.rand(6, 4), "labels": torch.arange(6) % 3}, str(tmp_path / "d.safetensors"))
    with pytest.raises(CurvscopeError) as err:
        load_problem(tmp_path / "m.pt", tmp_path / "d.safetensors", model="mlp",
                     model_kwargs={"in_features": 4, "hidden": [5], "out_features": 3})
    text = str(err.value)
    assert "'x' is missing (found inputs, labels)" in text and "does not accept 'inputs'" in text
    save_file({"x": torch.rand(6, 4), "y": torch.arange(6) % 3, "labels": torch.arange(6) % 3},
              str(tmp_path / "both.safetensors"))
    assert load_dataset(tmp_path / "both.safetensors").target_name == "y"  # with x, the targets are y
    save_file({"a": torch.rand(6, 4), "y": torch.arange(6) % 3, "labels": torch.arange(6) % 3},
              str(tmp_path / "two.safetensors"))
    with pytest.raises(CurvscopeError, match="both 'y' and 'labels'"):
        load_dataset(tmp_path / "two.safetensors")
    save_file({"a": torch.rand(6, 4), "b": torch.rand(5, 4), "y": torch.arange(6) % 3},
              str(tmp_path / "len.safetensors"))
    with pytest.raises(CurvscopeError, match="'b' has 5 samples but 'y' has 6"):
        load_dataset(tmp_path / "len.safetensors")
    save_file({"a": torch.tensor([[float("inf")]] * 6), "y": torch.arange(6) % 3}, str(tmp_path / "inf.safetensors"))
    with pytest.raises(CurvscopeError, match="inputs 'a' contain NaN or Inf"):
        load_dataset(tmp_path / "inf.safetensors")


@pytest.mark.parametrize("kind", ["dataclass", "dict", "tuple"])
def test_output_selection(kind):
    torch.manual_seed(0)
    model = Structured(kind)
    x, y = torch.randn(5, 4), torch.arange(5) % C
    logits = model.lin(x)
    problem = make_problem(model, x, y, dtype=torch.float64)
    chosen = problem.forward()
    expected = torch.tanh(logits) if kind == "tuple" else logits  # a tuple: its first element
    torch.testing.assert_close(chosen, expected.double())
    words = {"dataclass": "logits (attribute of Out)", "dict": "logits (key of dict)", "tuple": "element 0 of tuple"}
    assert problem.info["output"] == words[kind]
    name = "1" if kind == "tuple" else "hidden"
    picked = make_problem(model, x, y, dtype=torch.float64, output=name)
    torch.testing.assert_close(picked.forward(), (logits if kind == "tuple" else torch.tanh(logits)).double())
    assert picked.info["output"].startswith(f"{name} (")
    with pytest.raises(CurvscopeError, match="no attribute or key 'nothing'"):
        make_problem(model, x, y, output="nothing")


def test_select_output_rules():
    t = torch.zeros(2, 3)
    assert select_output(t) is t and probe_model(nn.Identity(), {}, t)[1] == "the output tensor"
    assert select_output({"logits": t, "other": t + 1}) is t
    with pytest.raises(CurvscopeError, match="choose one with output=NAME"):  # Python words
        select_output({"a": t, "b": t})
    with pytest.raises(CurvscopeError, match="choose one with --output NAME"), as_flags():  # the CLI's
        select_output({"a": t, "b": t})
    with pytest.raises(CurvscopeError, match="not a tensor"):
        select_output({"a": 3}, "a")


def test_output_through_load_problem(tmp_path):
    torch.manual_seed(0)
    model = Structured("dict")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    write_factory(tmp_path, "Structured('dict')")
    save_file({"x": torch.randn(6, 4), "y": torch.arange(6) % C}, str(tmp_path / "d.safetensors"))
    problem = load_problem(tmp_path / "m.pt", tmp_path / "d.safetensors", model=f"{tmp_path}/nets.py:make",
                           output="hidden")
    assert problem.info["output"] == "hidden (key of dict)" and problem.info["output_name"] == "hidden"
    assert float(problem.forward().abs().max()) <= 1.0  # tanh
