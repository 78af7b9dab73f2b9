"""Hessian- and GGN-vector products of a Problem's batch loss, as :class:`Operator` objects (§9).

An operator acts on one parameter group: the group's tensors (``names``, in that order) flattened and
concatenated, ``D = sum |theta_p|`` entries in ``problem.dtype`` on ``problem.device``; it is the ``(D, D)``
matrix of :class:`~curvscope.curvature.matfree.operator.Operator` (``shape``, ``@`` on vectors, matrices, dicts
and lists, ``to_scipy()``). Parameters outside the group are held fixed, so the operator is the group's
diagonal block of the whole-model matrix (§2, parameter groups). Parameters of the group that do not influence
the loss give zero rows and columns.

- :func:`hessian_operator`: ``H v`` with ``H = d^2 L / d theta^2`` by double backward (reverse over reverse).
  The first gradient ``dL/dtheta`` is built once with ``create_graph=True``; every product is one backward
  pass through that graph (``retain_graph=True``).
- :func:`ggn_operator`: ``G v = (1/N) sum_n J_n^T H_n (J_n v)`` (§2): ``J v`` by the double-VJP trick
  (``J v = d/du [v . J^T u]``, one backward pass through the graph of ``u -> J^T u``), the loss Hessians
  ``H_n`` of §1 applied sample by sample in closed form, then one VJP ``J^T (.)``. The forward graph and the
  graph of ``J^T u`` are built once and reused. The result equals ``V V^T v`` of the Gram engine.

Only ``torch.autograd.grad`` is used: no forward-mode AD and no ``torch.func.hessian``, which returned a wrong,
non-symmetric Hessian through LayerNorm + GELU in torch 2.14 (§9). The graphs are built under
:func:`~curvscope.curvature.products.twice_differentiable` (attention by PyTorch's math kernel, which has a double
backward), so the products work on ``nn.MultiheadAttention`` and ``scaled_dot_product_attention`` models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from curvscope.curvature.matfree.operator import Operator
from curvscope.curvature.products import twice_differentiable
from curvscope.errors import CurvscopeError
from curvscope.problem import CURVATURES


def _check_names(problem, names: Sequence[str] | None) -> tuple[str, ...]:
    names = tuple(problem.params) if names is None else tuple(names)
    if not names:
        raise CurvscopeError("a curvature operator needs at least one parameter")
    unknown = [n for n in names if n not in problem.params]
    if unknown:
        raise CurvscopeError(f"unknown parameter(s) {', '.join(unknown)}: not among the model's trainable "
                             "parameters")
    if len(set(names)) != len(names):
        raise CurvscopeError("a parameter group lists a parameter twice")
    return names


def _leaves(problem, names: tuple[str, ...]) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Fresh leaves requiring grad for ``names`` (sharing the parameters' memory: no copy of the model), and the
    full parameter dict with them substituted."""
    leaves = [problem.params[n].detach().requires_grad_(True) for n in names]
    params = {**{k: v.detach() for k, v in problem.params.items()}, **dict(zip(names, leaves, strict=True))}
    return leaves, params


def _zero_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like, strict=True)]


def _backward(outputs: Sequence[Tensor], inputs: Sequence[Tensor], seeds: Sequence[Tensor]) -> list[Tensor]:
    """``sum_i seeds_i . d outputs_i / d inputs``, skipping outputs without a graph (constant: they add 0)."""
    pairs = [(o, s) for o, s in zip(outputs, seeds, strict=True) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad([o for o, _ in pairs], list(inputs), grad_outputs=[s for _, s in pairs],
                                retain_graph=True, allow_unused=True)
    return _zero_none(grads, inputs)


def _vjp(outputs: Sequence[Tensor], leaves: Sequence[Tensor], seeds: Sequence[Tensor],
         out: Sequence[Tensor] | None = None) -> list[Tensor]:
    """``sum_i seeds_i . d outputs_i / d leaves``: as new tensors (:func:`_backward`), or added to ``out`` (zeroed
    tensors of the leaves' shapes, returned).

    Into ``out`` the backward pass accumulates in place: each leaf's ``.grad`` is its ``out`` tensor while it runs
    (no gradient graph is built), so nothing is returned, concatenated or copied; leaves the outputs do not reach
    keep their zeros. Outputs without a graph add nothing.
    """
    if out is None:
        return _backward(outputs, leaves, seeds)
    pairs = [(o, s) for o, s in zip(outputs, seeds, strict=True) if o.requires_grad]
    if pairs:
        for leaf, target in zip(leaves, out, strict=True):
            leaf.grad = target
        try:
            torch.autograd.backward([o for o, _ in pairs], grad_tensors=[s for _, s in pairs], retain_graph=True,
                                    inputs=list(leaves))
        finally:
            for leaf in leaves:
                leaf.grad = None
    return list(out)


Product = Callable[[list[Tensor], "list[Tensor] | None"], list[Tensor]]


def _operator(problem, names: tuple[str, ...], kind: str, product: Product) -> Operator:
    shapes = tuple(problem.params[n].shape for n in names)
    return Operator(dim=sum(s.numel() for s in shapes), names=names, kind=kind, shapes=shapes, dtype=problem.dtype,
                    device=problem.device, _product=product)


def _zero_operator(problem, names: tuple[str, ...], kind: str) -> Operator:
    """The part of no samples (a rank with none of the batch): zero."""
    return _operator(problem, names, kind, lambda parts, out: [torch.zeros_like(p) for p in parts] if out is None
                     else out)


def _part_loss(problem, params: dict[str, Tensor], samples: tuple[int, int] | None) -> Tensor:
    """The batch loss L, or with ``samples = (b0, b1)`` its part ``sum_{b0 <= n < b1} l_n / N``."""
    if samples is None:
        return problem.loss_value(params)
    return problem.per_sample_loss(params, samples).sum() / problem.batch_size


def hessian_operator(problem, names: Sequence[str] | None = None, samples: tuple[int, int] | None = None
                     ) -> Operator:
    """The Hessian ``H_PP = d^2 L / d theta_P^2`` ``(D, D)`` of the batch loss w.r.t. the group ``names`` (§9).

    The gradient graph ``g_P(theta)`` is built here, once (one forward and one backward pass with
    ``create_graph=True``); every product is one more backward pass through it:
    ``H v = d (g_P . v) / d theta_P``. It holds the forward and backward graphs in memory while it lives.

    Example::

        H = hessian_operator(problem, names=["0.weight", "0.bias"])   # the first layer's block
        H.shape                                   # (D, D), D = its number of parameters
        H @ v                                     # v (D,) -> (D,); a (D, K) matrix -> (D, K)
        H @ {"0.weight": dw, "0.bias": db}        # -> {"0.weight": ..., "0.bias": ...}

    Args:
        problem: the :class:`~curvscope.problem.Problem`.
        names: the group's parameter names, in the order of the flat vectors (default: every trainable
            parameter, the whole model).
        samples: ``(b0, b1)``: only the batch samples ``b0 <= n < b1``' part of ``H`` (the Hessian of
            ``sum_n l_n / N`` over them); the parts of a partition of the batch sum to ``H``.

    Returns:
        :class:`~curvscope.curvature.matfree.operator.Operator` with ``kind="hessian"`` and ``shape (D, D)``,
        ``D = sum |theta_p|, p in names``: ``@`` on ``(D,)`` vectors, ``(D, K)`` matrices, dicts and lists of
        parameter-shaped tensors; ``to_scipy()``.
    """
    names = _check_names(problem, names)
    if samples is not None and samples[1] <= samples[0]:
        return _zero_operator(problem, names, "hessian")
    return _hessian_on(problem, names, *_gradient_graph(problem, names, samples)[1:])


def hessian_with_gradient(problem) -> tuple[Operator, float, float]:
    """The whole model's :func:`hessian_operator` and the batch loss and gradient norm read off the gradient graph it
    is built on: one forward and backward pass for all three (curvature over training measures them per point)."""
    names = _check_names(problem, None)
    loss, leaves, grads = _gradient_graph(problem, names, None)
    squares = sum(float(g.detach().double().pow(2).sum()) for g in grads)
    norm = math.sqrt(squares) if math.isfinite(squares) else float("nan")
    return _hessian_on(problem, names, leaves, grads), float(loss.detach()), norm


def _gradient_graph(problem, names: tuple[str, ...], samples: tuple[int, int] | None
                    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``(loss, leaves, grads)``: the (part) loss and its gradient w.r.t. the group's leaves with ``create_graph``
    (one forward and one backward pass); zeros when no parameter of the group reaches the loss (``H_PP = 0``)."""
    with torch.enable_grad(), twice_differentiable(problem.model):
        leaves, params = _leaves(problem, names)
        loss = _part_loss(problem, params, samples)
        if loss.requires_grad:
            grads = _zero_none(torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True), leaves)
        else:
            grads = [torch.zeros_like(x) for x in leaves]
    return loss, leaves, grads


def _hessian_on(problem, names: tuple[str, ...], leaves: list[Tensor], grads: list[Tensor]) -> Operator:
    """The Hessian operator whose products are backward passes through the graph of ``grads``:
    ``H v = d (g . v) / d theta``."""

    def product(parts: list[Tensor], out: list[Tensor] | None) -> list[Tensor]:
        return _vjp(grads, leaves, parts, out)

    return _operator(problem, names, "hessian", product)


def loss_hessian_product(loss, outputs: Tensor, targets: Tensor) -> Callable[[Tensor], Tensor]:
    """``w -> (H_n w_n)_n`` for output-space vectors ``w`` ``(N, C)``: the loss Hessians of §1 per sample.

    Closed forms (no ``C x C`` matrices): ``ce``: ``p * w - p (p . w)`` with ``p = softmax(f_n)``; ``mse``:
    ``(2/C) w``; ``bce``: ``s (1 - s) w / C`` with ``s = sigmoid(f_n)``. Any other loss: a Hessian-vector
    product of ``N * loss(outputs, targets)`` w.r.t. the outputs by double backward (for a mean of per-sample
    losses this is the same block-diagonal ``H_n``).

    Sequence outputs ``(N, T*C)`` (``loss.positions > 0``): ``H_n`` is block-diagonal over the tokens, each valid
    token's block the token loss's Hessian times ``token_scale = N/|T|``, the ignored tokens' blocks zero
    (``docs/conventions.md`` §8).

    Args:
        loss: a :class:`~curvscope.losses.Loss`.
        outputs: ``(N, C)`` model outputs (detached here); ``(N, T*C)`` for sequence outputs.
        targets: the batch targets (the valid tokens of a sequence loss; the double-backward product for other
            losses).
    """
    outputs = outputs.detach()
    if hasattr(loss, "hessian_product"):  # a curvscope Loss: closed forms, per token for sequences
        return loss.hessian_product(outputs, targets)
    with torch.enable_grad():
        f = outputs.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(f, targets) * outputs.shape[0], f, create_graph=True)

    def generic(w: Tensor) -> Tensor:
        with torch.enable_grad():
            return _backward([g], [f], [w])[0]

    return generic


def ggn_operator(problem, names: Sequence[str] | None = None, samples: tuple[int, int] | None = None) -> Operator:
    """The GGN ``G_PP = (1/N) sum_n J_nP^T H_n J_nP`` ``(D, D)`` of the batch w.r.t. the group ``names`` (§2, §9).

    Built once: the forward graph of the outputs ``f(theta_P)`` ``(N, C)`` and the graph of ``u -> J^T u``
    (a VJP with a symbolic seed ``u``, ``create_graph=True``). Every product then does
    ``J v = d (v . J^T u) / d u`` (one backward pass), ``w_n = H_n (J v)_n / N`` (:func:`loss_hessian_product`),
    and ``J^T w`` (one backward pass). ``G v`` equals ``V V^T v`` with the exact factor V of the Gram engine.

    Example::

        G = ggn_operator(problem)                 # the whole model: D = problem.num_params
        G @ torch.randn(G.shape[1], 4, dtype=G.dtype)              # (D, 4) -> (D, 4)
        scipy.sparse.linalg.eigsh(G.to_scipy(), k=3)               # the top 3 eigenvalues

    Args:
        problem: the :class:`~curvscope.problem.Problem`.
        names: the group's parameter names, in the order of the flat vectors (default: every trainable
            parameter, the whole model).
        samples: ``(b0, b1)``: only the batch samples ``b0 <= n < b1``' terms of the sum (still over N); the
            parts of a partition of the batch sum to ``G``.

    Returns:
        :class:`~curvscope.curvature.matfree.operator.Operator` with ``kind="ggn"`` and ``shape (D, D)``,
        ``D = sum |theta_p|, p in names``: ``@`` on ``(D,)`` vectors, ``(D, K)`` matrices, dicts and lists of
        parameter-shaped tensors; ``to_scipy()``.
    """
    names = _check_names(problem, names)
    b0, b1 = (0, problem.batch_size) if samples is None else samples
    if b1 <= b0:
        return _zero_operator(problem, names, "ggn")
    inputs = problem.inputs if samples is None else problem.inputs[b0:b1]
    with torch.enable_grad(), twice_differentiable(problem.model):
        leaves, params = _leaves(problem, names)
        outputs = problem.forward(params, inputs)
        hessian = loss_hessian_product(problem.loss, outputs, problem.targets[b0:b1])
        if not outputs.requires_grad:  # no parameter of the group reaches the outputs: G_PP = 0
            transposed = [torch.zeros_like(x) for x in leaves]
            seed = None
        else:
            seed = torch.zeros_like(outputs, requires_grad=True)
            transposed = _zero_none(torch.autograd.grad(outputs, leaves, grad_outputs=seed, create_graph=True,
                                                        allow_unused=True), leaves)
    n = problem.batch_size

    def product(parts: list[Tensor], out: list[Tensor] | None) -> list[Tensor]:
        if seed is None:
            return [torch.zeros_like(x) for x in leaves] if out is None else out
        jv = _backward(transposed, [seed], parts)[0]  # (N, C)
        w = hessian(jv.detach()) / n
        return _vjp([outputs], leaves, [w], out)

    return _operator(problem, names, "ggn", product)


def curvature_operator(problem, names: Sequence[str] | None = None, curvature: str = "hessian",
                       samples: tuple[int, int] | None = None) -> Operator:
    """:func:`hessian_operator` or :func:`ggn_operator`, by ``curvature`` (``"hessian"`` or ``"ggn"``)."""
    if curvature == "hessian":
        return hessian_operator(problem, names, samples)
    if curvature == "ggn":
        return ggn_operator(problem, names, samples)
    raise CurvscopeError(f"unknown curvature '{curvature}': choose one of {', '.join(CURVATURES)}")
