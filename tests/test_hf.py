"""Hugging Face checkpoint directories (config.json + model.safetensors, or shards): tiny models built from a
config, saved with save_pretrained, loaded by curvscope and compared with the model's own loss."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
from safetensors.torch import save_file

from curvscope.cli.common import as_flags
from curvscope.errors import CurvscopeError
from curvscope.io.hf import load_hf_model
from curvscope.io.load import load_problem

transformers = pytest.importorskip("transformers")
VOCAB, T, N = 23, 6, 5


def gpt2(path, dtype=torch.float32, **save):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=8, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval().to(dtype)
    model.save_pretrained(path, safe_serialization=True, **save)
    return model


def bert(path, num_labels=3):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=8, num_labels=num_labels)
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def token_file(path, labels, mask=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (N, T), generator=g)
    tensors = {"input_ids": ids, "labels": labels(ids).clone()}
    if mask:
        tensors["attention_mask"] = torch.ones(N, T, dtype=torch.int64)
        tensors["attention_mask"][0, -2:] = 0  # left-aligned padding on one sequence
    save_file(tensors, str(path))
    return tensors


def test_gpt2_directory_gives_the_models_own_causal_lm_loss(tmp_path):
    model = gpt2(tmp_path / "gpt2")
    data = token_file(tmp_path / "d.safetensors", lambda ids: ids)
    problem = load_problem(tmp_path / "gpt2", tmp_path / "d.safetensors", dtype="float64")
    info = problem.info
    assert info["architecture"] == "GPT2LMHeadModel" and info["task"] == "causal-lm"
    assert info["shift_labels"] is True and problem.loss.name == "ce" and "causal language model" in info[
        "loss_default"]
    assert info["output"] == "logits (attribute of CausalLMOutputWithCrossAttentions)"
    out = model.double()(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                         labels=data["labels"])
    # Hugging Face computes its loss in float32 (it upcasts the logits with .float()): equal to 1e-6
    torch.testing.assert_close(problem.loss_value(), out.loss.detach().double(), rtol=1e-6, atol=1e-6)
    # and exactly PyTorch's cross-entropy of logits[:, :-1] against labels[:, 1:] in float64
    logits = out.logits.detach()
    exact = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), data["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(problem.loss_value(), exact, rtol=1e-12, atol=1e-12)
    g = problem.gradient()
    out.loss.backward()
    assert set(g) <= {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        if name in g:
            torch.testing.assert_close(g[name], p.grad, rtol=1e-5, atol=1e-6)


def test_shift_labels_can_be_turned_off(tmp_path):
    model = gpt2(tmp_path / "gpt2")
    data = token_file(tmp_path / "d.safetensors", lambda ids: torch.roll(ids, -1, dims=1), mask=False)
    problem = load_problem(tmp_path / "gpt2", tmp_path / "d.safetensors", dtype="float64", shift_labels=False)
    logits = model.double()(input_ids=data["input_ids"]).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), data["labels"].reshape(-1))
    assert problem.info["shift_labels"] is False
    torch.testing.assert_close(problem.loss_value(), expected.detach(), rtol=1e-6, atol=1e-6)


def test_bert_classifier_directory_gives_the_models_own_loss(tmp_path):
    model = bert(tmp_path / "bert")
    data = token_file(tmp_path / "d.safetensors", lambda ids: torch.arange(N) % 3)
    problem = load_problem(tmp_path / "bert", tmp_path / "d.safetensors", dtype="float64")
    assert problem.info["task"] == "sequence-classification" and problem.info["shift_labels"] is False
    assert problem.loss.name == "ce" and problem.num_outputs == 3
    assert problem.info["output"] == "logits (attribute of SequenceClassifierOutput)"
    reference = model.double()(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                               labels=data["labels"]).loss
    assert reference.dtype == torch.float64
    torch.testing.assert_close(problem.loss_value(), reference.detach(), rtol=1e-6, atol=1e-12)


def test_sharded_checkpoint(tmp_path):
    model = gpt2(tmp_path / "gpt2", max_shard_size="4KB")
    assert (tmp_path / "gpt2" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "gpt2" / "model.safetensors").exists()
    loaded = load_hf_model(tmp_path / "gpt2", torch.float64).model
    for (name, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(q, p.double(), rtol=0, atol=0, msg=name)


def test_bfloat16_weights_load_exactly_into_float64(tmp_path):
    model = gpt2(tmp_path / "gpt2", dtype=torch.bfloat16)
    hf = load_hf_model(tmp_path / "gpt2", torch.float64)
    assert hf.info["saved_dtype"] == "BF16"
    for name, p in hf.model.state_dict().items():
        assert p.dtype == torch.float64, name
        torch.testing.assert_close(p, model.state_dict()[name].double(), rtol=0, atol=0)


def test_auto_map_is_refused(tmp_path):
    gpt2(tmp_path / "gpt2")
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(config))
    (tmp_path / "gpt2" / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    token_file(tmp_path / "d.safetensors", lambda ids: ids)
    with pytest.raises(CurvscopeError, match="auto_map.*modeling_evil.EvilModel.*never runs"):
        load_problem(tmp_path / "gpt2", tmp_path / "d.safetensors")


def test_directory_errors(tmp_path):
    gpt2(tmp_path / "gpt2")
    token_file(tmp_path / "d.safetensors", lambda ids: ids)
    with pytest.raises(CurvscopeError, match="; model and model_kwargs cannot be used"):  # Python words
        load_problem(tmp_path / "gpt2", tmp_path / "d.safetensors", model="mlp")
    with pytest.raises(CurvscopeError, match="--model and --model-kwargs cannot be used"), as_flags():  # the CLI's
        load_problem(tmp_path / "gpt2", tmp_path / "d.safetensors", model="mlp")
    (tmp_path / "gpt2" / "model.safetensors").rename(tmp_path / "gpt2" / "pytorch_model.bin")
    with pytest.raises(CurvscopeError, match="needs model.safetensors.*pickled weights"):
        load_problem(tmp_path / "gpt2", tmp_path / "d.safetensors")
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    config["architectures"] = ["os.system"]
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(config))
    (tmp_path / "gpt2" / "pytorch_model.bin").rename(tmp_path / "gpt2" / "model.safetensors")
    with pytest.raises(CurvscopeError, match="'os.system' is not a model class"):
        load_problem(tmp_path / "gpt2", tmp_path / "d.safetensors")


def test_weights_that_do_not_match_the_config(tmp_path):
    gpt2(tmp_path / "gpt2")
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    config["n_layer"] = 3
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CurvscopeError, match="weights do not match GPT2LMHeadModel: missing keys"):
        load_hf_model(tmp_path / "gpt2", torch.float32)


def test_missing_transformers_is_one_line(tmp_path, monkeypatch):
    gpt2(tmp_path / "gpt2")
    token_file(tmp_path / "d.safetensors", lambda ids: ids)
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(CurvscopeError) as err:
        load_problem(tmp_path / "gpt2", tmp_path / "d.safetensors")
    assert str(err.value) == ("loading a Hugging Face checkpoint directory needs the 'transformers' package, "
                              'which is not installed: pip install "curvscope[hf]"')


def test_shift_labels_metadata(tmp_path):
    from safetensors import safe_open

    gpt2(tmp_path / "gpt2")
    path = tmp_path / "gpt2" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={"format": "pt", "curvscope.shift_labels": "false"})
    hf = load_hf_model(tmp_path / "gpt2", torch.float32)
    assert hf.shift_labels is False and "from the metadata" in hf.loss_reason
