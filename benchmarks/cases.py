"""Benchmark cases: a model, a batch of N samples, and the BackPACK-compatible view the peers get.

Every case builds its model and batch deterministically (seeded) in the requested dtype on the requested
device. curvscope gets the model as is; ViViT/BackPACK get ``peer_model`` on ``peer_x`` (the same function with
its own copy of the parameters: BackPACK's ``extend`` must not touch curvscope's model), which differs only
where BackPACK lacks a module (a leading ``nn.Unflatten`` is applied to the inputs instead).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
NUM_CLASSES = 10


@dataclass
class Workload:
    """One case at one batch size, ready to hand to the tools.

    Attributes:
        model: the network (eval mode, on ``device``/``dtype``); x: ``(N, ...)`` inputs; y: ``(N,)`` labels.
        peer_model, peer_x: what BackPACK-based peers get (``None`` when they cannot run the model).
        peer_note: why ViViT/BackPACK cannot run it, when they cannot.
    """

    case: str
    model: nn.Module
    x: Tensor
    y: Tensor
    peer_model: nn.Module | None
    peer_x: Tensor | None
    peer_note: str = ""

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


@dataclass(frozen=True)
class Case:
    """A named benchmark case. ``build(n, device, dtype)`` returns its :class:`Workload` at batch size n."""

    name: str
    description: str
    batch_size: int
    build: Callable[[int, torch.device, torch.dtype], Workload]
    vivit: bool = True
    note: str = ""


# -- models ---------------------------------------------------------------------------------------------

def wide_mlp(width: int = 1024, depth: int = 2, in_features: int = 784, num_classes: int = NUM_CLASSES
             ) -> nn.Sequential:
    """``in_features - width x depth - num_classes`` with ReLU (the issue's 784-1024-1024-10)."""
    layers: list[nn.Module] = []
    d = in_features
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)


def c3d3(num_classes: int = NUM_CLASSES) -> nn.Sequential:
    """The 3c3d CIFAR-10 network of DeepOBS / ViViT (D = 895,210 for C = 10).

    conv 64 5x5 (valid) - ReLU - maxpool 3/2 - conv 96 3x3 (valid) - ReLU - maxpool 3/2 - conv 128 3x3 (same)
    - ReLU - maxpool 3/2 - dense 1152-512-256-C with ReLU. DeepOBS pads the pools TensorFlow-style ("same");
    here the pools pad 1 on each side, which gives the same shapes (32 -> 28 -> 14 -> 12 -> 6 -> 6 -> 3) and,
    after a ReLU, the same maxima up to where the padding sits.
    """
    return nn.Sequential(
        nn.Conv2d(3, 64, 5), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(64, 96, 3), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(96, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
        nn.Flatten(), nn.Linear(3 * 3 * 128, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def _seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def _random_batch(n: int, shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return x, y


def _peer_view(model: nn.Module, x: Tensor) -> tuple[nn.Module, Tensor]:
    """A copy of ``model`` for BackPACK; a leading ``nn.Unflatten`` (unsupported there) moves into the data."""
    peer = copy.deepcopy(model)
    if isinstance(peer, nn.Sequential) and isinstance(peer[0], nn.Unflatten):
        with torch.no_grad():
            x = peer[0](x)
        peer = nn.Sequential(*list(peer)[1:])
    return peer, x


def _workload(name: str, model: nn.Module, x: Tensor, y: Tensor, device: torch.device, dtype: torch.dtype,
              peers: bool, note: str = "") -> Workload:
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    x, y = x.to(device=device, dtype=dtype), y.to(device)
    peer_model, peer_x = _peer_view(model, x) if peers else (None, None)
    return Workload(name, model, x, y, peer_model, peer_x, "" if peers else note)


def _sample(name: str, peers: bool = True, note: str = "") -> Callable[[int, torch.device, torch.dtype], Workload]:
    def build(n: int, device: torch.device, dtype: torch.dtype) -> Workload:
        from curvscope.io.checkpoints import apply_state_dict, load_checkpoint
        from curvscope.io.data import load_dataset
        from curvscope.io.spec import build_model

        ckpt = load_checkpoint(SAMPLES / f"{name}.safetensors")
        model = build_model(ckpt.model_spec, dict(ckpt.model_kwargs), seed=0)
        apply_state_dict(model, ckpt.state_dict, str(ckpt.path))
        data = load_dataset(SAMPLES / "digits.safetensors")
        if n > len(data):
            raise ValueError(f"{name}: the digits data set has {len(data)} samples, asked for {n}")
        return _workload(name, model, data.x[:n], data.y[:n], device, dtype, peers, note)

    return build


def _wide(width: int, name: str) -> Callable[[int, torch.device, torch.dtype], Workload]:
    def build(n: int, device: torch.device, dtype: torch.dtype) -> Workload:
        x, y = _random_batch(n, (784,), seed=1)
        return _workload(name, _seeded(lambda: wide_mlp(width), 0), x, y, device, dtype, True)

    return build


def _c3d3(name: str) -> Callable[[int, torch.device, torch.dtype], Workload]:
    def build(n: int, device: torch.device, dtype: torch.dtype) -> Workload:
        x, y = _random_batch(n, (3, 32, 32), seed=2)
        return _workload(name, _seeded(c3d3, 0), x, y, device, dtype, True)

    return build


TRANSFORMER_NOTE = ("BackPACK (hence ViViT) has no extension for the custom multi-head attention, LayerNorm, "
                    "the learned position parameter and the residual additions")

CASES: dict[str, Case] = {c.name: c for c in (
    Case("mlp-digits", "sample MLP 64-64-64-10 (tanh), digits", 128, _sample("mlp-digits")),
    Case("cnn-digits", "sample CNN conv16-conv32-linear, digits", 128, _sample("cnn-digits")),
    Case("wide-mlp", "MLP 784-1024-1024-10 (ReLU), random inputs", 128, _wide(1024, "wide-mlp")),
    Case("3c3d-n64", "3c3d CNN (DeepOBS/ViViT), random 3x32x32", 64, _c3d3("3c3d-n64")),
    Case("3c3d-n128", "3c3d CNN (DeepOBS/ViViT), random 3x32x32", 128, _c3d3("3c3d-n128")),
    Case("transformer-digits", "sample transformer (1 block, 4 heads), digits", 128,
         _sample("transformer-digits", peers=False, note=TRANSFORMER_NOTE), vivit=False, note=TRANSFORMER_NOTE),
)}

CNN_CASES = ("cnn-digits", "3c3d-n64", "3c3d-n128")
MLP_CASES = ("mlp-digits", "wide-mlp")


def scaling_n_workload(n: int, device: torch.device, dtype: torch.dtype) -> Workload:
    """The scaling-in-N model: the 3c3d CNN on random CIFAR-shaped inputs."""
    return _c3d3(f"3c3d-n{n}")(n, device, dtype)


def scaling_width_workload(width: int, n: int, device: torch.device, dtype: torch.dtype) -> Workload:
    """The scaling-in-width model: the MLP 784-w-w-10."""
    return _wide(width, f"mlp-w{width}")(n, device, dtype)


def build_workload(name: str, n: int | None, device: torch.device, dtype: torch.dtype) -> Workload:
    """A case by name (``3c3d-nN`` / ``mlp-wW`` for the scaling families) at batch size ``n`` (default its own)."""
    if name in CASES:
        case = CASES[name]
        return case.build(case.batch_size if n is None else n, device, dtype)
    if name.startswith("3c3d-n"):
        return scaling_n_workload(n or int(name[6:]), device, dtype)
    if name.startswith("mlp-w"):
        return scaling_width_workload(int(name[5:]), n or 128, device, dtype)
    raise KeyError(f"unknown case '{name}': choose from {', '.join(CASES)}")
