"""Data as users have it: data factories (a Dataset with a transform, a DataLoader, an iterable of batches, dicts
for a token model), Hugging Face save_to_disk directories, Parquet and Arrow files. Each gives the report numbers
of the equivalent safetensors file, and those equal a dense float64 GGN."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from conftest import TINY_KWARGS, assert_clean_error, invoke
from safetensors.torch import save_file
from torch.func import functional_call, jacrev

from curvscope.errors import CurvscopeError
from curvscope.io.load import load_problem

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

FACTORIES = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


def samples():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 4, generator=g), torch.arange(12) % 3


class Doubled(Dataset):
    """Stores 2 x in float64; the transform halves it back to the float32 x (exactly)."""

    def __init__(self, transform):
        x, self.y = samples()
        self.raw, self.transform = x.double() * 2, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(self.raw[i]), self.y[i]


def dataset(scale=2.0):
    return Doubled(lambda t: (t / scale).float())


def loader(batch_size=5):
    return DataLoader(TensorDataset(*samples()), batch_size=batch_size, shuffle=True)


def batches():
    x, y = samples()
    return ((x[i:i + 5], y[i:i + 5]) for i in range(0, 12, 5))


def tensors():
    x, y = samples()
    return {"x": x, "y": y}


def raises():
    raise ValueError("no such shard")


def wrong():
    return 42


def bare_items():
    return [torch.zeros(4)] * 3


def ragged_items():
    return [(torch.zeros(4), 0), (torch.zeros(3), 1)]


VOCAB, T, C, N = 7, 5, 3, 10


def token_columns():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (N, T), generator=g)
    mask = (torch.rand(N, T, generator=g) > 0.3).long()
    mask[:, 0] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(N) % C}


def token_dicts():
    cols = token_columns()
    return [{k: v[i] for k, v in cols.items()} for i in range(N)]


def hf_tokens(split=False):
    import datasets

    cols = token_columns()
    ds = datasets.Dataset.from_dict({k: v.tolist() for k, v in cols.items()})
    return datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])}) if split else ds


class MaskedBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 4)
        self.head = nn.Linear(4, C)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).to(self.head.weight.dtype)
        return self.head(torch.tanh(self.embed(input_ids) * m).sum(1) / m.sum(1))


def bag():
    return MaskedBag()
'''


@pytest.fixture
def fac(tmp_path, monkeypatch):
    """The factories file; returns a function ``name -> 'path:name'`` and the loaded module."""
    import importlib.util

    path = tmp_path / "datafac.py"
    path.write_text(textwrap.dedent(FACTORIES))
    spec = importlib.util.spec_from_file_location("datafac_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    return (lambda name: f"{path}:{name}"), module


GRAM = ("--dtype", "float64", "--device", "cpu", "--no-plots", "--method", "gram", "--no-directions")


def report_numbers(out) -> dict:
    report = json.loads((out / "report.json").read_text())
    g = report["groups"][0]
    return {"loss": report["loss_value"], "eigenvalues": g["eigenvalues"], "trace": g["trace"],
            "lambda_max": g["lambda_max"]}


def run_spectrum(tmp_path, tag, data, *extra):
    out = tmp_path / f"out-{tag}"
    result = invoke("spectrum", "--data", data, "--out", out, *GRAM, *extra)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return report_numbers(out), result


def assert_same(a: dict, b: dict) -> None:
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-12)
    torch.testing.assert_close(torch.tensor(a["eigenvalues"], dtype=torch.float64),
                               torch.tensor(b["eigenvalues"], dtype=torch.float64), rtol=1e-10, atol=1e-14)


def dense_ggn_eigenvalues(model, inputs: dict | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Nonzero eigenvalues of (1/N) sum J_n^T H_n J_n for cross-entropy, by jacrev (float64)."""
    model = model.double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    shapes = {k: v.shape for k, v in params.items()}
    flat = torch.cat([v.reshape(-1) for v in params.values()])

    def f(theta):
        out, i = {}, 0
        for k, s in shapes.items():
            out[k] = theta[i:i + s.numel()].reshape(s)
            i += s.numel()
        if isinstance(inputs, dict):
            return functional_call(model, out, (), inputs)
        return functional_call(model, out, (inputs.double(),))

    J = jacrev(f)(flat)
    p = f(flat).softmax(-1).detach()
    H = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    G = torch.einsum("nci,ncd,ndj->ij", J, H, J) / y.shape[0]
    ev = torch.linalg.eigvalsh(G).flip(0)
    return ev[ev > 1e-10 * ev[0]]


# -- factories: the same samples, the same numbers -----------------------------------------------------------------

def test_factories_give_the_numbers_of_the_safetensors_file(tmp_path, fac):
    spec, module = fac
    x, y = module.samples()
    save_file({"x": x, "y": y}, str(tmp_path / "d.safetensors"))
    model = ("--model", "mlp", "--model-kwargs", json.dumps(TINY_KWARGS), "--batch-size", "8")
    ref, _ = run_spectrum(tmp_path, "file", tmp_path / "d.safetensors", *model)
    from curvscope.io.spec import build_model

    dense = dense_ggn_eigenvalues(build_model("mlp", TINY_KWARGS, seed=0), x[:8], y[:8])
    torch.testing.assert_close(torch.tensor(ref["eigenvalues"], dtype=torch.float64), dense, rtol=1e-9, atol=1e-14)
    for name in ("dataset", "loader", "batches", "tensors"):
        got, result = run_spectrum(tmp_path, name, spec(name), *model)
        assert_same(got, ref)
        if name == "loader":  # its own batching and shuffling are reported, not silently replaced
            assert "its own batch_size 5, sampler RandomSampler (shuffled) are not used" in " ".join(
                result.stdout.split())
    got, _ = run_spectrum(tmp_path, "kwargs", spec("dataset"), *model, "--data-kwargs", '{"scale": 2.0}')
    assert_same(got, ref)
    # shuffled: the same rows as from the file
    a = load_problem(data=tmp_path / "d.safetensors", model="mlp", model_kwargs=TINY_KWARGS, batch_size=5,
                     shuffle=True, seed=4)
    b = load_problem(data=spec("dataset"), model="mlp", model_kwargs=TINY_KWARGS, batch_size=5, shuffle=True,
                     seed=4)
    assert a.info["batch_indices"] == b.info["batch_indices"]
    torch.testing.assert_close(a.inputs, b.inputs, rtol=0, atol=0)
    with pytest.raises(CurvscopeError, match="read in order"):
        load_problem(data=spec("batches"), model="mlp", model_kwargs=TINY_KWARGS, shuffle=True)


def test_objects_from_python(fac):
    from torch.utils.data import DataLoader, TensorDataset

    _, module = fac
    x, y = module.samples()
    for data in (module.dataset(), DataLoader(TensorDataset(x, y), batch_size=3), module.tensors(), (x, y)):
        problem = load_problem(data=data, model="mlp", model_kwargs=TINY_KWARGS, batch_size=6, dtype="float64")
        torch.testing.assert_close(problem.inputs, x[:6].double(), rtol=0, atol=0)
        assert problem.targets.tolist() == y[:6].tolist()
    # further batches are read when used
    more = problem.batch_from_dataset(torch.tensor([10, 7]))
    torch.testing.assert_close(more.inputs, x[[10, 7]].double(), rtol=0, atol=0)


def token_model_args(spec):
    return ("--model", spec("bag"), "--batch-size", "6", "--shuffle", "--seed", "3")


def test_token_data_in_every_form(tmp_path, fac):
    """Dicts from a factory, a saved Hugging Face dataset, a DatasetDict split, a Parquet and an Arrow file."""
    datasets = pytest.importorskip("datasets")
    spec, module = fac
    cols = module.token_columns()
    save_file(cols, str(tmp_path / "tok.safetensors"))
    ref, _ = run_spectrum(tmp_path, "tok", tmp_path / "tok.safetensors", *token_model_args(spec))
    problem = load_problem(data=tmp_path / "tok.safetensors", model=spec("bag"), batch_size=6, shuffle=True,
                           seed=3, dtype="float64")
    idx = problem.info["batch_indices"]
    from curvscope.io.spec import build_model

    inputs = {k: v[idx] for k, v in cols.items() if k != "labels"}
    dense = dense_ggn_eigenvalues(build_model(spec("bag"), {}, seed=3), inputs, cols["labels"][idx])
    torch.testing.assert_close(torch.tensor(ref["eigenvalues"], dtype=torch.float64), dense, rtol=1e-9, atol=1e-14)

    lists = {k: v.tolist() for k, v in cols.items()}
    hf = datasets.Dataset.from_dict({**lists, "text": [f"s{i}" for i in range(10)]})
    hf.save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": hf, "test": hf.select([0])}).save_to_disk(str(tmp_path / "hfdict"))
    table = pa.table({**lists, "text": [f"s{i}" for i in range(10)]})
    pq.write_table(table, tmp_path / "tok.parquet", row_group_size=4)
    with pa.OSFile(str(tmp_path / "tok.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    forms = {"dicts": (spec("token_dicts"),), "hf": (tmp_path / "hf",),
             "hfdict": (tmp_path / "hfdict", "--split", "train"), "parquet": (tmp_path / "tok.parquet",),
             "arrow": (tmp_path / "tok.arrow",), "hfobject": (spec("hf_tokens"),),
             "hfobjectdict": (spec("hf_tokens"), "--data-kwargs", '{"split": true}', "--split", "train")}
    for tag, (data, *extra) in forms.items():
        got, result = run_spectrum(tmp_path, tag, data, *token_model_args(spec), *extra)
        assert_same(got, ref)
    info = invoke("info", "--data", tmp_path / "tok.parquet", "--model", spec("bag"))
    assert info.exit_code == 0, info.stderr
    assert "column 'text' (string) is not numeric: left out" in " ".join(info.stdout.split())


def test_columns_and_padding(tmp_path, fac):
    spec, module = fac
    cols = module.token_columns()
    lists = {k: v.tolist() for k, v in cols.items()}
    # other names, mapped with --columns
    pq.write_table(pa.table({"tokens": lists["input_ids"], "attention_mask": lists["attention_mask"],
                             "target": lists["labels"]}), tmp_path / "renamed.parquet")
    a = load_problem(data=tmp_path / "renamed.parquet", model=spec("bag"), columns="input_ids=tokens,labels=target",
                     batch_size=10)
    assert a.inputs["input_ids"].tolist() == lists["input_ids"] and a.targets.tolist() == lists["labels"]
    # ragged lists: an error naming the column, or padded with pad_token (masks with 0)
    ragged = {"input_ids": [row[:m] for row, m in zip(lists["input_ids"], [5, 3, 4, 5, 2, 5, 1, 5, 4, 3],
                                                       strict=True)],
              "labels": lists["labels"]}
    ragged["attention_mask"] = [[1] * len(r) for r in ragged["input_ids"]]
    pq.write_table(pa.table(ragged), tmp_path / "ragged.parquet", row_group_size=3)
    with pytest.raises(CurvscopeError, match="column .input_ids. holds lists of different lengths .* pad_token=ID"):
        load_problem(data=tmp_path / "ragged.parquet", model=spec("bag"))
    b = load_problem(data=tmp_path / "ragged.parquet", model=spec("bag"), pad_token=0, batch_size=10)
    assert b.inputs["input_ids"].shape == (10, 5)
    assert b.inputs["input_ids"][6].tolist() == [lists["input_ids"][6][0], 0, 0, 0, 0]
    assert b.inputs["attention_mask"][6].tolist() == [1, 0, 0, 0, 0]
    assert "ragged lists padded to the longest row" in " ".join(b.info["data_notes"])


@pytest.mark.parametrize(("name", "needle"), [
    ("raises", "the factory raised ValueError: no such shard"),
    ("wrong", "got int; expected a Dataset, a DataLoader"),
    ("bare_items", "item 0 is a Tensor; expected an (x, y) pair"),
    ("ragged_items", "items cannot be collated: [0] has shape (4,) in item 0 but shape (3,) in item 1"),
    ("missing", "'missing' is not a callable"),
])
def test_bad_factories_are_one_line(tmp_path, fac, name, needle):
    spec, _ = fac
    out = tmp_path / "out"
    result = invoke("spectrum", "--data", spec(name), "--model", "mlp", "--model-kwargs", json.dumps(TINY_KWARGS),
                    "--out", out, "--no-plots")
    assert_clean_error(result, needle)
    assert not out.exists()


def test_bad_tables_are_one_line(tmp_path, fac):
    spec, module = fac
    lists = {k: v.tolist() for k, v in module.token_columns().items()}
    pq.write_table(pa.table(lists), tmp_path / "t.parquet")
    pq.write_table(pa.table({"input_ids": [[1, 2], [3]], "attention_mask": [[1, 1], [1]], "labels": [0, 1]}),
                   tmp_path / "ragged.parquet")
    cases = [(("--data", tmp_path / "t.parquet", "--columns", "labels=score"), "column 'score' not found"),
             (("--data", tmp_path / "ragged.parquet"), "column 'input_ids' holds lists of different lengths"),
             (("--data", tmp_path / "t.parquet", "--columns", "oops"), "--columns 'oops' is not NAME=COLUMN"),
             (("--data", tmp_path / "t.parquet", "--split", "train"), "--split applies to a Hugging Face"),
             (("--data", tmp_path / "t.parquet", "--data-kwargs", "{}"), "--data-kwargs is for a data factory")]
    for args, needle in cases:
        out = tmp_path / "out"
        result = invoke("spectrum", *args, "--model", spec("bag"), "--out", out, "--no-plots")
        assert_clean_error(result, needle)
        assert not out.exists()


def test_a_data_spec_in_checkpoint_metadata_is_never_run(tmp_path, fac):
    """Only the user names data code: a checkpoint's curvscope.data metadata is information, never imported."""
    from curvscope.io.checkpoints import save_checkpoint
    from curvscope.io.spec import build_model

    spec, module = fac
    marker = tmp_path / "ran"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\ndef make():\n    return None\n")
    save_checkpoint(tmp_path / "m.safetensors", build_model("mlp", TINY_KWARGS, seed=0), model_spec="mlp",
                    model_kwargs=TINY_KWARGS, loss="ce", extra_metadata={"curvscope.data": f"{tmp_path}/evil.py:make"})
    result = invoke("info", tmp_path / "m.safetensors")
    assert_clean_error(result, "no data")
    x, y = module.samples()
    save_file({"x": x, "y": y}, str(tmp_path / "d.safetensors"))
    assert invoke("info", tmp_path / "m.safetensors", "--data", tmp_path / "d.safetensors").exit_code == 0
    assert not marker.exists()


def test_without_pyarrow_tables_say_what_to_install(tmp_path, fac, monkeypatch):
    spec, module = fac
    pq.write_table(pa.table({k: v.tolist() for k, v in module.token_columns().items()}), tmp_path / "t.parquet")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    result = invoke("info", "--data", tmp_path / "t.parquet", "--model", spec("bag"))
    assert_clean_error(result, "needs the 'pyarrow' package", 'pip install "curvscope[parquet]"')


def test_further_batches_from_an_iterable(tmp_path, fac):
    """lr-suggest and spectrum --batches read an iterable on; too few samples: one line, nothing written."""
    spec, module = fac
    x, _ = module.samples()
    model = ("--model", "mlp", "--model-kwargs", json.dumps(TINY_KWARGS), "--batch-size", "5")
    result = invoke("spectrum", "--data", spec("batches"), *model, "--batches", "2", "--out", tmp_path / "s",
                    "--dtype", "float64", "--no-plots")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert [b["batch_indices"] for b in report["per_batch"]] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    result = invoke("lr-suggest", "--data", spec("batches"), *model, "--batches", "3", "--out", tmp_path / "lr",
                    "--no-plot")
    assert_clean_error(result, "--batches 3 with --batch-size 5 needs 15 samples but the data yields only 12")
    assert not (tmp_path / "lr").exists()
    assert invoke("lr-suggest", "--data", spec("loader"), *model, "--batches", "2", "--no-plot", "--out",
                  tmp_path / "lr").exit_code == 0
