"""Brute-force references for the curvature engine, independent of its code (float64, tiny models only).

Everything here is built from ``torch.func`` / ``torch.autograd`` and the loss formulas written out again:
the dense Jacobian of all outputs w.r.t. all parameters (``jacrev``), the loss Hessian w.r.t. the outputs
(``jacrev`` twice), per-sample gradients by looping over samples. Parameters are flattened in the order
of the given dict (the problem's ``named_parameters()`` order).
"""

from __future__ import annotations

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
