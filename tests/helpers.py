"""The engine tests' brute-force references (float64, tiny models only); the test problems themselves are in
``cases.py``.

- Brute-force references, independent of the engine's code: everything is built from ``torch.func`` /
  ``torch.autograd`` and the loss formulas written out again: the dense Jacobian of all outputs w.r.t. all
  parameters (``jacrev``), the loss Hessian w.r.t. the outputs (``jacrev`` twice), per-sample gradients by
  looping over samples, the damped Newton step and the bootstrap rule of ``docs/conventions.md`` §5 as loops.
  Parameters are flattened in the order of the given dict (the problem's ``named_parameters()`` order).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev


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
