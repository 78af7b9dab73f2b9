"""The engine tests' tiny problems and their brute-force references (float64, tiny models only).

- :data:`CASES`: the one catalogue of test problems, name -> builder (keyword arguments: batch size, seeds,
  loss or bias where the case has them); :func:`dense_reference` is the cached dense reference of a case.
- Brute-force references, independent of the engine's code: everything is built from ``torch.func`` /
  ``torch.autograd`` and the loss formulas written out again: the dense Jacobian of all outputs w.r.t. all
  parameters (``jacrev``), the loss Hessian w.r.t. the outputs (``jacrev`` twice), per-sample gradients by
  looping over samples, the damped Newton step and the bootstrap rule of ``docs/conventions.md`` §5 as loops.
  Parameters are flattened in the order of the given dict (the problem's ``named_parameters()`` order).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import curvscope
from curvscope.models import mlp, transformer


def _per_sample_loss(f: Tensor, y: Tensor, loss: str) -> Tensor:
    """l_n for one sample: outputs ``(C,)``, target a class index (``ce``) or ``(C,)`` floats."""
    if loss == "ce":
        return -torch.log_softmax(f, dim=-1)[y]
    if loss == "mse":
        return ((f - y) ** 2).mean()
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(f, y, reduction="mean")
    raise ValueError(loss)


def param_slices(params: dict[str, Tensor]) -> dict[str, slice]:
    """name -> the slice of the flat parameter vector it occupies."""
    out, i = {}, 0
    for n, p in params.items():
        out[n] = slice(i, i + p.numel())
        i += p.numel()
    return out


def group_index(params: dict[str, Tensor], names) -> Tensor:
    """Flat indices of the parameters ``names``, ``(D_P,)``."""
    sl = param_slices(params)
    return torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in names])


def flat_params(problem) -> Tensor:
    """The problem's trainable parameters as one flat vector ``(D,)`` (``named_parameters()`` order)."""
    return torch.cat([p.reshape(-1) for p in problem.params.values()])


def unflatten_params(problem, theta: Tensor) -> dict[str, Tensor]:
    """A flat ``(D,)`` vector back as parameter-shaped tensors by name (differentiable in ``theta``)."""
    return _unflatten(theta, problem.params)


def _unflatten(flat: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: flat[s].reshape(params[n].shape) for n, s in param_slices(params).items()}


def outputs_jacobian(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], inputs: Tensor
                     ) -> Tensor:
    """``J`` ``(N, C, D)``: d f(theta, x_n) / d theta for every sample, by ``jacrev`` on the batch."""
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def f(theta: Tensor) -> Tensor:
        return functional_call(model, {**buffers, **_unflatten(theta, params)}, (inputs,))

    return jacrev(f)(flat)


def loss_hessians(outputs: Tensor, targets: Tensor, loss: str) -> Tensor:
    """``H_n = d^2 l_n / d f_n^2`` ``(N, C, C)`` by double reverse mode (``torch.func.hessian`` is
    forward-over-reverse; its forward-mode decompositions are scripted with a deprecated ``torch.jit``)."""
    return torch.stack([jacrev(jacrev(lambda f, y=y: _per_sample_loss(f, y, loss)))(o)
                        for o, y in zip(outputs, targets, strict=True)])


def per_sample_ggns(problem, samples: int | None = None) -> Tensor:
    """``G_n = J_n^T H_n J_n`` ``(N_V, D, D)`` for the first ``samples`` samples (default all)."""
    n = problem.batch_size if samples is None else samples
    inputs, targets = problem.inputs[:n], problem.targets[:n]
    J = outputs_jacobian(problem.model, problem.params, problem.buffers, inputs)
    with torch.no_grad():
        out = functional_call(problem.model, {**problem.buffers, **problem.params}, (inputs,))
    H = loss_hessians(out, targets, problem.loss.name)
    return torch.einsum("nci,ncd,ndj->nij", J, H, J)


def ggn_factor(problem, samples: int | None = None) -> Tensor:
    """``V`` ``(D, N_V*C)`` with ``V V^T`` = the GGN: columns ``J_n^T S_n / sqrt(N_V)``, ``S_n`` the symmetric
    square root of the autograd loss Hessian (eigen-decomposed; eigenvalues below ``eps * max`` set to 0)."""
    n = problem.batch_size if samples is None else samples
    inputs, targets = problem.inputs[:n], problem.targets[:n]
    J = outputs_jacobian(problem.model, problem.params, problem.buffers, inputs)
    with torch.no_grad():
        out = functional_call(problem.model, {**problem.buffers, **problem.params}, (inputs,))
    w, U = torch.linalg.eigh(loss_hessians(out, targets, problem.loss.name))
    w = torch.where(w > torch.finfo(w.dtype).eps * w.amax(-1, keepdim=True), w, torch.zeros_like(w))
    S = U @ torch.diag_embed(w.sqrt()) @ U.transpose(-1, -2)  # (N, C, C)
    return torch.einsum("ncd,nce->dne", J, S).reshape(J.shape[-1], -1) / n**0.5


def dense_ggn(problem, samples: int | None = None) -> Tensor:
    """The GGN ``(1/N) sum_n J_n^T H_n J_n`` ``(D, D)`` (of the first ``samples`` samples)."""
    return per_sample_ggns(problem, samples).mean(0)


def per_sample_gradients(problem) -> Tensor:
    """``g_n = d l_n / d theta`` ``(N, D)``, one autograd call per sample."""
    rows = []
    for n in range(problem.batch_size):
        params = {k: v.detach().clone().requires_grad_(True) for k, v in problem.params.items()}
        out = functional_call(problem.model, {**problem.buffers, **params}, (problem.inputs[n:n + 1],))[0]
        grads = torch.autograd.grad(_per_sample_loss(out, problem.targets[n], problem.loss.name),
                                    list(params.values()), allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                               for g, p in zip(grads, params.values(), strict=True)]))
    return torch.stack(rows)


def nonzero_eigen(G: Tensor, rel: float = 1e-10) -> tuple[Tensor, Tensor]:
    """Eigenvalues above ``rel * lambda_max`` of a dense symmetric matrix, descending, and their vectors."""
    evals, evecs = torch.linalg.eigh(0.5 * (G + G.T))
    evals, evecs = evals.flip(0), evecs.flip(1)
    keep = evals > rel * evals[0].clamp_min(0)
    return evals[keep], evecs[:, keep]


def snr_ref(x: Tensor) -> Tensor:
    """mean^2 / unbiased variance per column of ``x`` ``(N, K)``, written out."""
    n = x.shape[0]
    mean = x.sum(0) / n
    var = ((x - mean) ** 2).sum(0) / (n - 1)
    return mean**2 / var


@dataclass
class DenseGram:
    """A group's extended Gram blocks from dense references (float64)."""

    name: str
    vv: Tensor
    vg: Tensor | None
    gg: Tensor | None


def dense_grams(problem, columns, groups, with_gradients: bool = True) -> list[DenseGram]:
    """The extended Gram ``(vv, vg, gg)`` of every ``(name, parameter names)`` group from the dense Jacobian:
    the columns ``J_n^T seeds[n, k]`` of the given :class:`~curvscope.curvature.gram.columns.Columns` (sample-major)
    and the looped per-sample gradients."""
    J = outputs_jacobian(problem.model, problem.params, problem.buffers, problem.inputs)  # (N, C, D)
    V = torch.einsum("ncd,nkc->nkd", J[columns.samples], columns.seeds.to(J.dtype)).reshape(-1, J.shape[-1]).T
    G = per_sample_gradients(problem).T if with_gradients else None  # (D, N)
    out = []
    for name, names in groups:
        idx = group_index(problem.params, names)
        Vp = V[idx]
        Gp = None if G is None else G[idx]
        out.append(DenseGram(name, Vp.T @ Vp, None if Gp is None else Vp.T @ Gp, None if Gp is None else Gp.T @ Gp))
    return out


def assert_same_grams(ref, got, rtol: float = 1e-10, floor: float = 0.0) -> None:
    """Two lists of Gram blocks (``name``, ``vv``, ``vg``, ``gg``) agree to ``rtol`` of the largest entry of each
    block (or of ``floor``: a block that is zero but for rounding, like attention key biases', needs the whole
    model's scale)."""
    for a, b in zip(ref, got, strict=True):
        assert a.name == b.name
        scale = max(float(a.vv.abs().max()) + 1e-300, floor)
        for x, y in ((a.vv, b.vv), (a.vg, b.vg), (a.gg, b.gg)):
            if x is None:
                assert y is None
                continue
            torch.testing.assert_close(y, x, rtol=0, atol=rtol * max(scale, float(x.abs().max())))


# -- damped Newton steps (docs/conventions.md section 5), written out ------------------------------------------

def dense_step(G: Tensor, g: Tensor, rank: int, delta: float) -> Tensor:
    """-sum_k gamma_k / (lambda_k + delta) e_k over the top-``rank`` eigenpairs of the dense G."""
    evals, evecs = torch.linalg.eigh(G)
    evals, evecs = evals.flip(0)[:rank], evecs.flip(1)[:, :rank]
    gamma = evecs.T @ g
    return -(evecs @ (gamma / (evals + delta)))


def reference_bootstrap(gamma: Tensor, lambdas: Tensor, grid: Tensor, B: int, seed: int, q: float = 5.0
                        ) -> np.ndarray:
    """A straightforward loop implementation of the bootstrap damping rule."""
    gen = torch.Generator().manual_seed(seed)
    N, NV = gamma.shape[0], lambdas.shape[0]
    idx_g = torch.randint(N, (B, N), generator=gen).numpy()
    idx_l = idx_g if NV == N else torch.randint(NV, (B, NV), generator=gen).numpy()
    gamma, lambdas, grid = gamma.numpy(), lambdas.numpy(), grid.numpy()
    out = []
    for k in range(gamma.shape[1]):
        g_mean, l_mean = gamma[:, k].mean(), lambdas[:, k].mean()
        best, best_delta = -math.inf, math.inf
        for delta in grid:
            s = -g_mean / (l_mean + delta)
            R = [-s * gamma[idx_g[b], k].mean() - 0.5 * s**2 * lambdas[idx_l[b], k].mean() for b in range(B)]
            p = np.percentile(R, q)
            if p > best:
                best, best_delta = p, delta
        out.append(best_delta if best > 0 else math.inf)
    return np.array(out)


# -- the case catalogue ------------------------------------------------------------------------------------------

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


# -- any model, any output shape: dense references without vmap ------------------------------------------------

@dataclass(frozen=True)
class DenseAny:
    """Dense references of a problem built without ``vmap`` (plain autograd): the Jacobian ``J`` ``(N, O, D)`` of
    every sample's O outputs, PyTorch's loss Hessian ``H`` ``(N*O, N*O)`` and gradient ``dL`` ``(N, O)`` with
    respect to the outputs. ``G = J^T H J``; samples are independent, so ``l_n = N L`` restricted to sample n:
    ``g_n = N J_n^T dL/df_n`` and ``G_n = N J_n^T H_nn J_n``."""

    J: Tensor
    H: Tensor
    dL: Tensor

    @property
    def factor(self) -> Tensor:
        """``B`` ``(N*O, D)`` with ``G = B^T B``: the symmetric square root of ``H`` times ``J``."""
        w, U = torch.linalg.eigh(0.5 * (self.H + self.H.T))
        w = torch.where(w > torch.finfo(w.dtype).eps * w.max(), w, torch.zeros_like(w))
        return (U * w.sqrt()) @ U.T @ self.J.reshape(-1, self.J.shape[-1])

    @property
    def G(self) -> Tensor:
        B = self.factor
        return B.T @ B

    @property
    def gn(self) -> Tensor:
        return self.J.shape[0] * torch.einsum("nci,nc->ni", self.J, self.dL)

    def eigen(self, rel: float = 1e-10) -> tuple[Tensor, Tensor]:
        """Nonzero eigenvalues of G, descending, and unit eigenvectors ``(D, R)`` (from ``B B^T``, same nonzero
        eigenvalues)."""
        B = self.factor
        evals, U = nonzero_eigen(B @ B.T, rel)
        return evals, B.T @ U / evals.sqrt()

    def directions(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k eigenvalues ``(k,)``, gamma_nk ``(N, k)`` and lambda_nk ``(N, k)`` of the dense GGN."""
        evals, e = self.eigen()
        e = e[:, :k]
        N, O = self.dL.shape
        Je = torch.einsum("nci,ik->nck", self.J, e)  # (N, O, k)
        Hnn = self.H.reshape(N, O, N, O)
        lambdas = N * torch.stack([torch.einsum("ck,cd,dk->k", Je[n], Hnn[n, :, n], Je[n]) for n in range(N)])
        return evals[:k], self.gn @ e, lambdas


def dense_any(problem, batch_loss: Callable[[Tensor], Tensor]) -> DenseAny:
    """References from PyTorch's own loss: ``batch_loss(raw outputs) -> L`` (e.g. ``nn.CrossEntropyLoss()`` on
    the flattened logits), its Hessian by ``torch.autograd.functional.hessian``, and the Jacobian of the whole
    batch's raw outputs by ``torch.autograd.functional.jacobian`` (a loop of backward passes, no ``vmap``)."""
    params, buffers = problem.params, problem.buffers
    flat = torch.cat([p.reshape(-1) for p in params.values()])

    def outputs(theta: Tensor) -> Tensor:
        return functional_call(problem.model, {**buffers, **_unflatten(theta, params)}, (problem.inputs,))

    with torch.no_grad():
        out = outputs(flat)
    N, O = out.shape[0], out[0].numel()
    J = torch.autograd.functional.jacobian(outputs, flat, vectorize=False).reshape(N, O, flat.numel())
    H = torch.autograd.functional.hessian(batch_loss, out).reshape(N * O, N * O)
    o = out.clone().requires_grad_(True)
    dL = torch.autograd.grad(batch_loss(o), o)[0].reshape(N, O)
    return DenseAny(J, H, dL)
