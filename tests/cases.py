"""The one catalogue of the engine tests' tiny problems (float64): :data:`CASES`, name -> builder (keyword arguments:
batch size, seeds, loss or bias where the case has them), and :func:`dense_reference`, the cached dense reference
of a case (from the brute-force references of ``helpers.py``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from helpers import ggn_factor, per_sample_ggns, per_sample_gradients
from torch import Tensor, nn

import curvscope
from curvscope.models import mlp, transformer

# -- the cases ---------------------------------------------------------------------------------------------------

N = 6  # the default batch size of a case
C = 3  # outputs of every case


def targets(loss: str, n: int = N, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    if loss == "ce":
        return torch.arange(n) % C
    if loss == "mse":
        return torch.randn(n, C, generator=g)
    return torch.rand(n, C, generator=g)


def make(model: nn.Module, x: Tensor, loss: str = "ce") -> curvscope.Problem:
    """The float64 problem of ``model`` (in eval mode) on ``x`` with :func:`targets`."""
    model.eval()
    return curvscope.make_problem(model, x, targets(loss, x.shape[0]), loss=loss, dtype=torch.float64)


def _x(*shape: int, n: int = N, seed: int = 0) -> Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _mlp(activation: str, bias: bool, loss: str, n: int = N, data_seed: int = 0) -> curvscope.Problem:
    torch.manual_seed(0)
    return make(mlp(4, [5, 4], C, activation=activation, bias=bias), _x(4, n=n, seed=data_seed), loss)


def _cnn(n: int = N, data_seed: int = 0) -> curvscope.Problem:
    """Conv (ghost rule) + BatchNorm in eval mode with non-trivial statistics (generic path) + pools + Linear."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(2, 3, 3, padding=1, stride=1), nn.AvgPool2d(2), nn.Tanh(), nn.Flatten(),
                        nn.Linear(12, C))
    bn = net[1]
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.3, -0.2]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0]))
        bn.weight.copy_(torch.tensor([1.5, 0.7]))
        bn.bias.copy_(torch.tensor([0.1, -0.3]))
    return make(net, _x(1, 8, 8, n=n, seed=data_seed))


def _conv1d() -> curvscope.Problem:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Conv1d(3, 2, 2, dilation=2),
                        nn.Flatten(), nn.Linear(4, C))
    return make(net, _x(2, 7), "mse")


def _transformer(n: int = N, data_seed: int = 0) -> curvscope.Problem:
    torch.manual_seed(0)
    net = transformer(seq_len=3, token_dim=2, dim=4, heads=2, depth=1, mlp_ratio=2, num_classes=C)
    return make(net, _x(6, n=n, seed=data_seed))


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(7, 4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, C)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.proj(self.embed(tokens))).mean(1))


def _embedding() -> curvscope.Problem:
    return make(Embedder(), torch.randint(0, 7, (N, 5), generator=torch.Generator().manual_seed(0)), "bce")


# layers with a ghost rule: Linear on 2d and on (N, 2, 3, d) inputs, Conv1d/Conv2d with strides, dilations and
# 'same' padding with even kernels (asymmetric padding)

class SeqModel(nn.Module):
    """Linear layers on (N, 2, 3, d) inputs (several leading dims), mean-pooled."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5, bias=bias)
        self.out = nn.Linear(5, C, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.inp(x.reshape(x.shape[0], 2, 3, 4)))).mean(dim=(1, 2))


def _rule(kind: str, bias: bool = True, loss: str = "ce", n: int = N) -> curvscope.Problem:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "linear2d":
        net, x = nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, C, bias=bias)), \
            torch.randn(n, 5, generator=g)
    elif kind == "linear3d":
        net, x = SeqModel(bias), torch.randn(n, 24, generator=g)
    elif kind == "conv1d":
        net = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2, bias=bias), nn.Tanh(),
                            nn.Conv1d(3, 2, 4, padding="same", bias=bias), nn.Flatten(), nn.Linear(10, C, bias=bias))
        x = torch.randn(n, 2, 9, generator=g)
    else:
        net = nn.Sequential(nn.Conv2d(2, 3, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2), bias=bias),
                            nn.ReLU(), nn.Conv2d(3, 2, (2, 3), padding="same", bias=bias), nn.Tanh(),
                            nn.Conv2d(2, 2, 2, padding="valid", bias=bias), nn.Flatten(),
                            nn.Linear(2 * 3 * 4, C, bias=bias))
        x = torch.randn(n, 2, 7, 5, generator=g)
    return make(net, x, loss)


# layers the ghost rules must leave to the generic path

class TwiceCalled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, C)

    def forward(self, x):
        return self.head(self.shared(torch.tanh(self.shared(x))))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, C)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class UsedOutside(nn.Module):
    """The layer's weight also enters the output outside the layer's own call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, C)

    def forward(self, x):
        return self.lin(x) + x[:, :C] @ self.lin.weight[:, :C].T


class TimeMajor(nn.Module):
    """A Linear applied to a (T, N, d) layout: its first dimension is not the sample."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 3)
        self.head = nn.Linear(3, C)

    def forward(self, x):
        h = torch.tanh(self.lin(x.reshape(x.shape[0], 2, 2).transpose(0, 1)))  # (T=2, N, 3)
        return self.head(h.mean(0))


class ScaledOutput(nn.Module):
    """A forward hook rescales a Linear's output: the rule's delta would be w.r.t. the wrong tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, C)
        self.lin.register_forward_hook(lambda _m, _a, out: 2.0 * out)

    def forward(self, x):
        return self.lin(x)


def _fallback(cls: type[nn.Module]) -> curvscope.Problem:
    torch.manual_seed(0)
    return make(cls(), torch.randn(N, 4, generator=torch.Generator().manual_seed(1)))


def _unsupported_convs() -> curvscope.Problem:
    """A grouped convolution and one with reflect padding (no ghost rule), then a Linear (one)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Tanh(),
                        nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(18, C))
    return make(net, torch.randn(N, 2, 5, 5, generator=torch.Generator().manual_seed(1)))


# small models whose data come from the global generator (the Newton tests)

def _small_mlp(seed: int = 0, n: int = N) -> curvscope.Problem:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, C)).double()
    x = torch.randn(n, 3, dtype=torch.float64)
    return curvscope.make_problem(model, x, torch.arange(n) % C, loss="ce", device="cpu", dtype=torch.float64)


def _linear_mse(seed: int = 0, n: int = 8) -> curvscope.Problem:
    """A linear model under mse: the loss is exactly quadratic and the GGN is its Hessian."""
    torch.manual_seed(seed)
    model = nn.Linear(5, 2).double()
    x = torch.randn(n, 5, dtype=torch.float64)
    y = torch.randn(n, 2, dtype=torch.float64)
    return curvscope.make_problem(model, x, y, loss="mse", device="cpu", dtype=torch.float64)


class Fragile(nn.Module):
    """An MLP whose forward fails on batches of more than 2 samples when ``broken``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp(4, [5], C, activation="tanh")
        self.broken = False

    def forward(self, x: Tensor) -> Tensor:
        if self.broken and x.shape[0] > 2:
            raise curvscope.CurvscopeError("bad input on this rank: sample 3 cannot be read")
        return self.net(x)


def _fragile(broken: bool = False) -> curvscope.Problem:
    model = Fragile()
    problem = make(model, torch.randn(8, 4, generator=torch.Generator().manual_seed(4)))
    model.broken = broken
    return problem


CASES: dict[str, Callable[..., curvscope.Problem]] = {
    # architectures against the dense GGN
    "mlp-tanh-ce": functools.partial(_mlp, "tanh", True, "ce"),
    "mlp-tanh-mse": functools.partial(_mlp, "tanh", True, "mse"),
    "mlp-tanh-bce": functools.partial(_mlp, "tanh", True, "bce"),
    "mlp-relu-mse-nobias": functools.partial(_mlp, "relu", False, "mse"),
    "mlp-sigmoid-bce": functools.partial(_mlp, "sigmoid", True, "bce"),
    "cnn-bn-eval-ce": _cnn,
    "conv1d-mse": _conv1d,
    "transformer-ce": _transformer,
    "embedding-bce": _embedding,
    # every layer has a ghost rule (keywords: bias, loss, n)
    **{f"rule-{kind}": functools.partial(_rule, kind) for kind in ("linear2d", "linear3d", "conv1d", "conv2d")},
    # layers the ghost rules must leave (wholly or partly) to the generic path
    "twice-called": functools.partial(_fallback, TwiceCalled),
    "tied": functools.partial(_fallback, Tied),
    "used-outside": functools.partial(_fallback, UsedOutside),
    "time-major": functools.partial(_fallback, TimeMajor),
    "hooked-output": functools.partial(_fallback, ScaledOutput),
    "unsupported-convs": _unsupported_convs,
    # small models (keywords: seed, n)
    "small-mlp-ce": _small_mlp,
    "linear-mse": _linear_mse,
    # fails on batches of more than 2 samples where broken=True (one rank's bad input)
    "fragile": _fragile,
}
"""The test problems: name -> builder; ``CASES[name](**kw)`` builds a fresh problem."""

DENSE_CASES = ["mlp-tanh-ce", "mlp-relu-mse-nobias", "mlp-sigmoid-bce", "cnn-bn-eval-ce", "conv1d-mse",
               "transformer-ce", "embedding-bce"]
"""The architectures every spectrum test runs against the dense GGN."""


@dataclass(frozen=True)
class Dense:
    """A case's problem and its dense references: per-sample GGNs ``Gn`` ``(N, D, D)``, the GGN factor ``V``
    ``(D, N*C)`` and per-sample gradients ``gn`` ``(N, D)``."""

    problem: curvscope.Problem
    Gn: Tensor
    V: Tensor
    gn: Tensor

    @property
    def G(self) -> Tensor:
        """The GGN ``(D, D)``."""
        return self.Gn.mean(0)

    @property
    def g(self) -> Tensor:
        """The batch gradient ``(D,)``."""
        return self.gn.mean(0)


@functools.cache
def dense_reference(case: str, **kw) -> Dense:
    """The problem of ``CASES[case](**kw)`` and its dense references (computed once per session: do not modify
    the problem)."""
    problem = CASES[case](**kw)
    return Dense(problem, per_sample_ggns(problem), ggn_factor(problem), per_sample_gradients(problem))
