"""Tiny training runs for the tests of ``curvscope track`` and the monitor, and their dense float64 references."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from curvscope.models import mlp

KWARGS = {"in_features": 4, "hidden": [5], "out_features": 3, "activation": "tanh"}
SPEC = "curvscope.models:mlp"
N = 16
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.5),
    "momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=1e-2),
}


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)


def write_data(path: Path, seed: int = 0) -> Path:
    x, y = data(seed)
    save_file({"x": x, "y": y}, str(path))
    return path


def model(seed: int = 0, kwargs: dict | None = None) -> nn.Module:
    torch.manual_seed(seed)
    return mlp(**(kwargs or KWARGS)).double()


def checkpoint(path: Path, net: nn.Module, opt: torch.optim.Optimizer | None, step: int | None,
               kwargs: dict | None = None) -> Path:
    entry = {"model": {k: v.detach().clone() for k, v in net.state_dict().items()},
             "curvscope.model": SPEC, "curvscope.model_kwargs": json.dumps(kwargs or KWARGS),
             "curvscope.loss": "ce"}
    if opt is not None:
        entry["optimizer"] = opt.state_dict()
    if step is not None:
        entry["step"] = step
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(entry, path)
    return path


def make_run(directory: Path, kind: str = "sgd", steps: tuple[int, ...] = (0, 2, 10), seed: int = 0,
             name: str = "step_{}.pt") -> Path:
    """A run of full-batch training on :func:`data`, a .pt training checkpoint (float64) at each of ``steps``."""
    net = model(seed)
    opt = OPTIMIZERS[kind](net.parameters())
    x, y = data()
    x = x.double()
    for step in range(max(steps) + 1):
        if step in steps:
            checkpoint(directory / name.format(step), net, opt, step)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return directory


def flat_loss(state: dict[str, torch.Tensor], kwargs: dict | None = None):
    """The batch loss as a function of the flat trainable parameters, and those parameters (float64)."""
    net = model(0, kwargs)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    theta = torch.cat([state[n].double().reshape(-1) for n in names])
    x, y = data()

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for n, shape in zip(names, shapes, strict=True):
            size = shape.numel()
            params[n] = flat[offset:offset + size].reshape(shape)
            offset += size
        out = torch.func.functional_call(net, params, (x.double(),))
        return nn.functional.cross_entropy(out, y)

    return loss, theta, names


def dense_reference(state: dict[str, torch.Tensor]) -> dict[str, object]:
    """Loss, gradient norm and the dense Hessian (``torch.autograd.functional.hessian``) at a checkpoint."""
    loss, theta, names = flat_loss(state)
    value = loss(theta)
    grad = torch.autograd.functional.jacobian(loss, theta)
    hessian = torch.autograd.functional.hessian(loss, theta)
    return {"loss": float(value), "gradient_norm": float(grad.norm()), "hessian": hessian, "names": names}


def adam_p(opt_state: dict, names: list[str], state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Adam's P = (1 - b1^t)(sqrt(v / (1 - b2^t)) + eps), flat, written out here independently of curvscope."""
    group = opt_state["param_groups"][0]
    b1, b2 = group["betas"]
    parts = []
    for i, name in enumerate(names):
        entry = opt_state["state"][i]
        t = float(entry["step"])
        v = entry["exp_avg_sq"].double()
        parts.append(((1 - b1 ** t) * ((v / (1 - b2 ** t)).sqrt() + group["eps"])).reshape(-1))
        assert v.shape == state[name].shape
    return torch.cat(parts)
