"""Regenerate the bundled sample datasets and checkpoints (deterministic; needs the `samples` extra).

    pip install -e ".[samples]"
    python sample_models/make.py            # writes sample_models/*.safetensors and prints the accuracies
    python sample_models/make.py --only charlm-pysource   # just that model and its data (no scikit-learn)

Datasets are stored with the training samples first and the held-out samples last, so that the CLI's
default batch (the first N samples in file order) is a training batch:

- digits.safetensors: scikit-learn's 8x8 digits, x float32 (1797, 64) in [0, 1], y int64 (1797,);
  samples [0, 1437) train, [1437, 1797) held out.
- diabetes.safetensors: scikit-learn's diabetes regression set, x standardized float32 (442, 10),
  y standardized float32 (442, 1); samples [0, 353) train, [353, 442) held out.
- pysource.safetensors: Python source that ships with Python itself (the Zen of Python decoded from
  ``this.py``, then the source of a few standard-library modules read with ``inspect.getsource``), lowercased,
  as character ids in VOCAB; x int64 (N, 16) and y int64 (N, 16) = the same text one character on (next-token
  targets, no shift_labels). The first 90% of the text gives the training sequences (shuffled, stored first),
  the last 10% the held-out ones (stored last, in text order).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import io
import json
import platform
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from curvscope.io.checkpoints import save_checkpoint  # noqa: E402
from curvscope.io.spec import build_model  # noqa: E402

SPLITS = {"digits": 1437, "diabetes": 353}

MODELS = {
    # name: (dataset, spec, kwargs, loss, epochs, lr, weight decay)
    "mlp-digits": ("digits", "curvscope.models:mlp",
                   {"in_features": 64, "hidden": [64, 64], "out_features": 10, "activation": "tanh"},
                   "ce", 12, 2e-3, 1e-4),
    "cnn-digits": ("digits", "curvscope.models:cnn",
                   {"in_channels": 1, "image_size": 8, "channels": [16, 32], "num_classes": 10},
                   "ce", 10, 2e-3, 1e-4),
    "transformer-digits": ("digits", "curvscope.models:transformer",
                           {"seq_len": 8, "token_dim": 8, "dim": 32, "heads": 4, "depth": 1, "mlp_ratio": 2,
                            "num_classes": 10},
                           "ce", 15, 2e-3, 1e-4),
    "mlp-diabetes": ("diabetes", "curvscope.models:mlp",
                     {"in_features": 10, "hidden": [32, 32], "out_features": 1, "activation": "tanh"},
                     "mse", 150, 1e-3, 1e-3),
}


# -- the character-level language model ------------------------------------------------------------------

VOCAB = "\n !\"#%'()*+,-./0123456789:<=>[\\]_abcdefghijklmnopqrstuvwxyz~"
"""60 characters; any other character of the (lowercased) text is stored as the last one, '~'."""
TEXT_MODULES = ("textwrap", "colorsys", "bisect", "fnmatch")
SEQ_LEN = 16
LANGUAGE_MODELS = {
    # name: (dataset, kwargs, epochs, lr, weight decay, batch)
    "charlm-pysource": ("pysource", {"vocab": len(VOCAB), "seq_len": SEQ_LEN, "dim": 32, "heads": 4, "depth": 2,
                                     "mlp_ratio": 2}, 15, 3e-3, 1e-4, 32),
}


# -- a run at the edge of stability (curvscope track) ------------------------------------------------------

EOS_RUN = "eos-run"
EOS_SPEC = "curvscope.models:mlp"
EOS_KWARGS = {"in_features": 10, "hidden": [32, 32], "out_features": 1, "activation": "tanh"}
EOS_BATCH = 256
"""Full-batch gradient descent on the first 256 samples of diabetes.safetensors (``--batch-size 256``)."""
EOS_LR = 0.1
"""SGD's threshold 2/lr = 20: the sharpness starts near 5, rises past 20 by step 600 and then hovers at 20."""
EOS_STEPS = (0, 100, 200, 300, 400, 500, 600, 700, 800, 1000, 1500, 2000)


def make_eos_run() -> None:
    """``eos-run/step_<n>.pt``: training checkpoints (model state, SGD's state dict, step) of full-batch GD on
    diabetes.safetensors' first EOS_BATCH samples with MSE, read from the data file already in this folder."""
    from safetensors.torch import load_file

    data = load_file(str(HERE / "diabetes.safetensors"))
    x, y = data["x"][:EOS_BATCH], data["y"][:EOS_BATCH]
    model = build_model(EOS_SPEC, EOS_KWARGS, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=EOS_LR)
    out = HERE / EOS_RUN
    out.mkdir(exist_ok=True)
    for old in out.glob("step_*.pt"):
        old.unlink()
    losses = {}
    for step in range(EOS_STEPS[-1] + 1):
        loss = torch.nn.functional.mse_loss(model(x), y)
        if step in EOS_STEPS:
            losses[step] = loss.item()
            torch.save({"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                        "optimizer": opt.state_dict(), "step": step,
                        "curvscope.model": EOS_SPEC, "curvscope.model_kwargs": json.dumps(EOS_KWARGS),
                        "curvscope.loss": "mse"}, out / f"step_{step}.pt")
        opt.zero_grad()
        loss.backward()
        opt.step()
    result = {"first_loss": round(losses[EOS_STEPS[0]], 4), "last_loss": round(losses[EOS_STEPS[-1]], 4)}
    print(EOS_RUN, json.dumps(result))  # not in metrics.json, which lists the held-out numbers of the checkpoints


def python_text() -> str:
    """The Zen of Python (``this.py`` stores it rot13-encoded) and the source of TEXT_MODULES, lowercased."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    zen = "".join(this.d.get(c, c) for c in this.s)
    sources = [inspect.getsource(importlib.import_module(name)) for name in TEXT_MODULES]
    return "\n".join([zen, *sources]).lower()


def make_text_dataset() -> tuple[torch.Tensor, torch.Tensor, int, dict[str, str]]:
    """(x, y, n_train, metadata): sequences of SEQ_LEN character ids and their next characters."""
    text = python_text()
    index = {c: i for i, c in enumerate(VOCAB)}
    ids = torch.tensor([index.get(c, len(VOCAB) - 1) for c in text], dtype=torch.int64)
    n = (len(ids) - 1) // SEQ_LEN
    x = ids[:n * SEQ_LEN].reshape(n, SEQ_LEN)
    y = ids[1:n * SEQ_LEN + 1].reshape(n, SEQ_LEN)
    n_train = int(0.9 * n)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(0))
    x = torch.cat([x[perm], x[n_train:]]).contiguous()
    y = torch.cat([y[perm], y[n_train:]]).contiguous()
    meta = {"train": f"0:{n_train}", "test": f"{n_train}:{n}",
            "source": f"Python {platform.python_version()} standard library: this (decoded), "
                      + ", ".join(TEXT_MODULES) + " (inspect.getsource), lowercased",
            "text_sha256": hashlib.sha256(text.encode()).hexdigest(), "vocab": json.dumps(VOCAB),
            "targets": "y[n, t] = x[n, t + 1]: the next character (no shift_labels)"}
    return x, y, n_train, meta


def fit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, opt, n_train: int, batch: int,
        epochs: int, g: torch.Generator) -> None:
    """Minibatch training on the first ``n_train`` samples, reshuffled every epoch from ``g``; eval mode after."""
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n_train, generator=g)
        for i in range(0, n_train, batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def train_language_model(name: str, x: torch.Tensor, y: torch.Tensor, n_train: int
                         ) -> tuple[torch.nn.Module, dict]:
    _dataset, kwargs, epochs, lr, wd, batch = LANGUAGE_MODELS[name]
    model = build_model("curvscope.models:char_lm", kwargs, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    g = torch.Generator().manual_seed(1)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    fit(model, x, y, loss_fn, opt, n_train, batch, epochs, g)
    with torch.no_grad():
        out = model(x)
        correct = (out.argmax(-1) == y).float()
        result = {"train_loss": float(loss_fn(out[:n_train], y[:n_train])),
                  "test_loss": float(loss_fn(out[n_train:], y[n_train:])),
                  "train_accuracy": float(correct[:n_train].mean()),
                  "test_accuracy": float(correct[n_train:].mean())}
    return model, result


def make_language_models(only: set[str] | None) -> dict[str, dict]:
    results = {}
    names = [n for n in LANGUAGE_MODELS if only is None or n in only]
    if not names:
        return results
    x, y, n_train, meta = make_text_dataset()
    save_file({"x": x, "y": y}, str(HERE / "pysource.safetensors"), metadata=meta)
    for name in names:
        model, result = train_language_model(name, x, y, n_train)
        save_checkpoint(HERE / f"{name}.safetensors", model, model_spec="curvscope.models:char_lm",
                        model_kwargs=LANGUAGE_MODELS[name][1], loss="ce",
                        extra_metadata={"curvscope.data": "pysource.safetensors",
                                        "curvscope.test_split": f"{n_train}:{len(x)}", "vocab": meta["vocab"]})
        results[name] = result
        print(name, json.dumps({k: round(v, 4) for k, v in result.items()}))
    return results


def make_datasets() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_diabetes, load_digits

    g = torch.Generator().manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=g)
    out = {"digits": (x[perm].contiguous(), y[perm].contiguous())}

    diabetes = load_diabetes()
    x = torch.tensor(diabetes.data, dtype=torch.float64)
    y = torch.tensor(diabetes.target, dtype=torch.float64).unsqueeze(1)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    n_train = SPLITS["diabetes"]
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0)
    ymu, ysd = y[:n_train].mean(), y[:n_train].std()
    out["diabetes"] = (((x - mu) / sd).float().contiguous(), ((y - ymu) / ysd).float().contiguous())
    return out


def train(name: str, data: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.nn.Module, dict]:
    dataset, spec, kwargs, loss_name, epochs, lr, wd = MODELS[name]
    x, y = data
    n_train = SPLITS[dataset]
    model = build_model(spec, kwargs, seed=0)
    loss_fn = torch.nn.CrossEntropyLoss() if loss_name == "ce" else torch.nn.MSELoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    g = torch.Generator().manual_seed(1)
    fit(model, x, y, loss_fn, opt, n_train, 32, epochs, g)
    with torch.no_grad():
        out = model(x)
        result = {"train_loss": float(loss_fn(out[:n_train], y[:n_train])),
                  "test_loss": float(loss_fn(out[n_train:], y[n_train:]))}
        if loss_name == "ce":
            correct = (out.argmax(1) == y).float()
            result["train_accuracy"] = float(correct[:n_train].mean())
            result["test_accuracy"] = float(correct[n_train:].mean())
    return model, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="regenerate only this checkpoint and its dataset (repeatable); metrics.json keeps "
                             "the other entries")
    args = parser.parse_args(argv)
    only = set(args.only) if args.only else None
    known = set(MODELS) | set(LANGUAGE_MODELS) | {EOS_RUN}
    if only and only - known:
        parser.error(f"unknown sample {sorted(only - known)}: choose from {', '.join(sorted(known))}")
    torch.set_num_threads(1)
    results = {}
    if only is None or only & set(MODELS):
        results.update(make_classic(only))
    results.update(make_language_models(only))
    if only is None or EOS_RUN in only:
        make_eos_run()
    metrics_path = HERE / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if only and metrics_path.exists() else {}
    metrics.update(results)
    metrics_path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def make_classic(only: set[str] | None) -> dict[str, dict]:
    data = make_datasets()
    for name, (x, y) in data.items():
        n = SPLITS[name]
        save_file({"x": x, "y": y}, str(HERE / f"{name}.safetensors"),
                  metadata={"train": f"0:{n}", "test": f"{n}:{len(x)}",
                            "source": f"sklearn.datasets.load_{name}"})
    results = {}
    for name, (dataset, spec, kwargs, loss_name, *_rest) in MODELS.items():
        if only is not None and name not in only:
            continue
        model, result = train(name, data[dataset])
        n = SPLITS[dataset]
        save_checkpoint(HERE / f"{name}.safetensors", model, model_spec=spec, model_kwargs=kwargs,
                        loss=loss_name,
                        extra_metadata={"curvscope.data": f"{dataset}.safetensors",
                                        "curvscope.test_split": f"{n}:{len(data[dataset][0])}"})
        results[name] = result
        print(name, json.dumps({k: round(v, 4) for k, v in result.items()}))
    return results


if __name__ == "__main__":
    main()
