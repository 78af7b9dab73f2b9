"""A user's own loss: ``--loss path/to/file.py:fn`` (or a function passed to the Python API).

The contract (``docs/conventions.md`` §1): ``fn(outputs, targets)`` takes the model's outputs ``(N, C)`` (for
sequence outputs ``(N, T, C)``, more position dims flattened into T) and the targets as the data file holds them
(floats in the run's dtype), and returns the per-sample losses ``(N,)``; their mean is the batch loss. Each
``l_n`` may depend on sample n's outputs only. Everything curvscope needs follows by autograd:

- the gradient ``d l_n / d f_n`` (one backward pass of ``sum_n l_n``);
- the loss Hessian ``H_n = d^2 l_n / d f_n^2`` (``C x C`` per sample; ``T*C x T*C`` for sequences): C more
  backward passes through the gradient's graph, the samples at once (they are independent);
- a square root ``S_n`` by the eigen-decomposition of ``H_n``: the GGN needs ``H_n`` positive semi-definite
  (a convex loss in the outputs), so eigenvalues down to ``-sqrt(eps) max|eigenvalue|`` are rounding and become
  0, and a clearly negative one is refused (the Hessian itself, ``curvature hessian``, needs none of this);
- the products ``H_n w`` by double backward.

Loading follows the trust rule of model code (:mod:`curvscope.io.spec`): a loss named on the command line or in
Python is imported (you named it); one named by a checkpoint's metadata or a config file only with
``trust_model_code``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from curvscope.errors import CurvscopeError, Metavar, OptionError


def user_function(spec: str | Callable[[Tensor, Tensor], Tensor]) -> tuple[str, Callable[[Tensor, Tensor], Tensor]]:
    """The name and function of a user loss: a function itself (``python:<qualname>``), or the function a spec
    names (imported)."""
    if callable(spec):
        name = getattr(spec, "__qualname__", None) or getattr(spec, "__name__", None) or type(spec).__name__
        return f"python:{name}", spec
    from curvscope.io.spec import resolve_factory

    return spec, resolve_factory(spec, kind="loss")


def check_trusted_loss(spec: str, source: str, trusted: bool) -> None:
    """Refuse a user loss that a file names (checkpoint metadata, a config) unless the user allowed code
    (``trust_model_code``): importing it would run that file's code.

    Raises:
        OptionError: of ``trust_model_code``.
    """
    if trusted or ":" not in spec:
        return
    raise OptionError("trust_model_code", lambda name: f"{source} asks to import and run the loss '{spec}', code "
                      f"outside curvscope; nothing was imported. If you trust it, pass "
                      f"{name('trust_model_code', True)}, or name the loss yourself with "
                      f"{name('loss', Metavar('FILE.py:FN'))}")


def _shaped(loss, outputs: Tensor) -> Tensor:
    return outputs.reshape(outputs.shape[0], loss.positions, loss.classes) if loss.positions else outputs


def user_values(loss, outputs: Tensor, targets: Tensor) -> Tensor:
    """``fn(outputs, targets)``, checked: per-sample losses ``(N,)`` of the outputs' dtype."""
    try:
        values = loss.user(_shaped(loss, outputs), targets)
    except CurvscopeError:
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        raise CurvscopeError(f"loss '{loss.name}' raised {type(exc).__name__}: {lines[0] if lines else ''}") \
            from exc
    n = outputs.shape[0]
    if not isinstance(values, Tensor) or values.shape != (n,) or not values.is_floating_point():
        got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise CurvscopeError(f"loss '{loss.name}' must return the per-sample losses, a float tensor of shape "
                             f"({n},) for {n} samples, got {got}")
    return values


def user_gradient(loss, outputs: Tensor, targets: Tensor) -> Tensor:
    """``d l_n / d f_n`` ``(N, C)`` by autograd."""
    with torch.enable_grad():
        f = outputs.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(user_values(loss, f, targets).sum(), f, allow_unused=True)
    return torch.zeros_like(f) if g is None else g


def user_hessian(loss, outputs: Tensor, targets: Tensor) -> Tensor:
    """``H_n`` ``(N, C, C)``: C backward passes through the graph of the gradient (all samples at once)."""
    n, C = outputs.shape
    with torch.enable_grad():
        f = outputs.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(user_values(loss, f, targets).sum(), f, create_graph=True, allow_unused=True)
        if g is None or not g.requires_grad:  # linear (or constant) in the outputs
            return torch.zeros(n, C, C, dtype=outputs.dtype, device=outputs.device)
        rows = [torch.autograd.grad(g[:, c].sum(), f, retain_graph=True, allow_unused=True)[0] for c in range(C)]
    H = torch.stack([torch.zeros_like(f) if r is None else r for r in rows], dim=1)  # (N, C, C): [n, c, :]
    return (H + H.transpose(1, 2)).detach() / 2


def user_hessian_sqrt(loss, outputs: Tensor, targets: Tensor) -> Tensor:
    """``S_n`` ``(N, C, C)`` with ``S_n S_n^T = H_n``, from the eigen-decomposition of each ``H_n``.

    Raises:
        CurvscopeError: some ``H_n`` has a clearly negative eigenvalue (the loss is not convex in the outputs
            there, and the GGN is not defined).
    """
    H = user_hessian(loss, outputs, targets)
    evals, vecs = torch.linalg.eigh(H.to(torch.float64))
    scale = evals.abs().amax(dim=-1, keepdim=True)
    tol = math.sqrt(torch.finfo(outputs.dtype).eps) * scale
    bad = evals < -tol
    if bool(bad.any()):
        n = int(bad.any(dim=-1).nonzero()[0])
        raise CurvscopeError(f"loss '{loss.name}' is not convex in the outputs at sample {n} (its Hessian has the "
                             f"eigenvalue {float(evals[n].min()):.3g}): the GGN needs a positive semi-definite loss "
                             "Hessian; use curvature 'hessian' for this loss")
    S = vecs * evals.clamp(min=0).sqrt().unsqueeze(-2)
    return S.to(outputs.dtype)


def user_hessian_product(loss, outputs: Tensor, targets: Tensor) -> Callable[[Tensor], Tensor]:
    """``w -> (H_n w_n)_n`` by double backward (one backward pass per product)."""
    with torch.enable_grad():
        f = outputs.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(user_values(loss, f, targets).sum(), f, create_graph=True, allow_unused=True)

    def product(w: Tensor) -> Tensor:
        if g is None or not g.requires_grad:
            return torch.zeros_like(w)
        with torch.enable_grad():
            (hw,) = torch.autograd.grad(g, f, grad_outputs=w.to(g.dtype), retain_graph=True, allow_unused=True)
        return torch.zeros_like(w) if hw is None else hw

    return product


def check_per_sample(loss, outputs: Tensor, targets: Tensor) -> None:
    """The losses of a batch of two must be those of each sample alone (``l_n`` depends on sample n only).

    Raises:
        CurvscopeError: they differ, or the function cannot run on the probe.
    """
    if outputs.shape[0] < 2:
        return
    both = user_values(loss, outputs[:2], targets[:2])
    first = user_values(loss, outputs[:1], targets[:1])
    if not torch.isfinite(both).all():
        raise CurvscopeError(f"loss '{loss.name}' returned NaN or Inf on the first samples")
    if not torch.allclose(both[:1], first, rtol=1e-5, atol=1e-7 * (1 + float(both.abs().max()))):
        raise CurvscopeError(f"loss '{loss.name}': sample 0's loss changes with the other samples of the batch "
                             f"({float(both[0]):.6g} with sample 1, {float(first[0]):.6g} alone); a user loss must "
                             "return per-sample losses whose mean is the batch loss")
