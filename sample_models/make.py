"""Regenerate the bundled sample datasets and checkpoints (deterministic; needs the `samples` extra).

    pip install -e ".[samples]"
    python sample_models/make.py            # writes sample_models/*.safetensors and prints the accuracies

Datasets are stored with the training samples first and the held-out samples last, so that the CLI's
default batch (the first N samples in file order) is a training batch:

- digits.safetensors: scikit-learn's 8x8 digits, x float32 (1797, 64) in [0, 1], y int64 (1797,);
  samples [0, 1437) train, [1437, 1797) held out.
- diabetes.safetensors: scikit-learn's diabetes regression set, x standardized float32 (442, 10),
  y standardized float32 (442, 1); samples [0, 353) train, [353, 442) held out.
"""

from __future__ import annotations

import json
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
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n_train, generator=g)
        for i in range(0, n_train, 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        out = model(x)
        result = {"train_loss": float(loss_fn(out[:n_train], y[:n_train])),
                  "test_loss": float(loss_fn(out[n_train:], y[n_train:]))}
        if loss_name == "ce":
            correct = (out.argmax(1) == y).float()
            result["train_accuracy"] = float(correct[:n_train].mean())
            result["test_accuracy"] = float(correct[n_train:].mean())
    return model, result


def main() -> None:
    torch.set_num_threads(1)
    data = make_datasets()
    for name, (x, y) in data.items():
        n = SPLITS[name]
        save_file({"x": x, "y": y}, str(HERE / f"{name}.safetensors"),
                  metadata={"train": f"0:{n}", "test": f"{n}:{len(x)}",
                            "source": f"sklearn.datasets.load_{name}"})
    results = {}
    for name, (dataset, spec, kwargs, loss_name, *_rest) in MODELS.items():
        model, result = train(name, data[dataset])
        n = SPLITS[dataset]
        save_checkpoint(HERE / f"{name}.safetensors", model, model_spec=spec, model_kwargs=kwargs,
                        loss=loss_name,
                        extra_metadata={"curvscope.data": f"{dataset}.safetensors",
                                        "curvscope.test_split": f"{n}:{len(data[dataset][0])}"})
        results[name] = result
        print(name, json.dumps({k: round(v, 4) for k, v in result.items()}))
    (HERE / "metrics.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
