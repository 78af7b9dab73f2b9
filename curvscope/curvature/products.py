"""Second-order products every command shares, by forward-mode AD where the model supports it, else by double
backward (``docs/conventions.md`` §9).

- :func:`twice_differentiable`: the context every second-order computation runs in. Scaled-dot-product attention
  takes PyTorch's math backend (its fused CPU/GPU kernels have no double backward and no forward-mode AD), and
  ``nn.MultiheadAttention``'s inference fast path (``_native_multi_head_attention``, no forward AD) is off.
- :func:`hessian_vector_products`: ``H u_s`` for S stacked tangents (forward over reverse, batched with ``vmap``;
  fallback: reverse over reverse, one backward pass per tangent through the gradient's graph).
- :func:`output_jvps`: ``J u_s`` of the model's outputs (forward mode; fallback: the double-VJP trick
  ``J u = d (u . J^T w) / d w``).
- :func:`third_derivatives`: ``D^3 L[u_s, u_s, u_s]`` (three nested forward-mode derivatives; fallback: three
  nested reverse passes).

Forward-mode AD is missing for some kernels (PyTorch's CPU LSTM/GRU, ``pack_padded_sequence``, fused attention).
:func:`forward_ad_usable` probes it once per problem (one Jacobian-vector product of the outputs of two samples);
a failure there or in a product is recorded on the problem (``problem.forward_ad_error``; ``problem.path`` says
which path ran) and every later product of that problem takes the double-backward path. The numbers are the
same to rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.func import grad, jvp

from curvscope.curvature.gram.rows import is_fatal, map_stacked, not_differentiable


@contextlib.contextmanager
def twice_differentiable(model: torch.nn.Module | None = None) -> Iterator[None]:
    """Inside the block, attention is computed by ops that have every derivative: the math backend of
    ``scaled_dot_product_attention`` and ``nn.MultiheadAttention`` without its fused inference path; for a
    ``model`` with recurrent layers cuDNN is off too (its RNN kernels have no double backward on a GPU). The
    values are the same to rounding; fused kernels are only faster."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mha = getattr(torch.backends, "mha", None)
    fast = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    recurrent = model is not None and any(isinstance(m, torch.nn.RNNBase) for m in model.modules())
    try:
        with sdpa_kernel(SDPBackend.MATH), torch.backends.cudnn.flags(enabled=not recurrent):
            yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(fast)


def note_forward_ad_failure(problem, exc: BaseException | str) -> None:
    """Record that forward-mode AD failed on ``problem`` (later products use double backward)."""
    from curvscope.problem import one_line

    if problem.forward_ad_error is None:
        problem.forward_ad_error = exc if isinstance(exc, str) else one_line(exc)


def forward_ad_usable(problem) -> bool:
    """Whether forward-mode AD may run on ``problem``. The first call probes one Jacobian-vector product of the
    outputs of (up to) two samples; a failure is recorded on the problem."""
    if problem.forward_ad_error is not None:
        return False
    if not problem.forward_ad_checked:
        problem.forward_ad_checked = True
        from curvscope.curvature.gram.rows import batch_with_partner

        idx = batch_with_partner(problem, torch.arange(min(2, problem.batch_size), device=problem.device))
        inputs = problem.inputs[idx]
        tangent = {n: torch.ones_like(p) for n, p in problem.params.items()}
        try:
            with twice_differentiable(problem.model), torch.no_grad():
                jvp(lambda p: problem.call({**problem.buffers, **p}, inputs), (dict(problem.params),), (tangent,))
        except Exception as exc:
            if is_fatal(exc):
                raise
            note_forward_ad_failure(problem, exc)
    return problem.forward_ad_error is None


def _forward_or_fallback(problem, forward: Callable[[], Tensor | dict], fallback: Callable[[], Tensor | dict]):
    """``forward()`` when forward AD is usable and succeeds, else ``fallback()`` (the failure recorded)."""
    with twice_differentiable(problem.model):
        if forward_ad_usable(problem):
            try:
                return forward()
            except Exception as exc:
                if is_fatal(exc):
                    raise
                note_forward_ad_failure(problem, exc)
        try:
            return fallback()
        except Exception as exc:
            if is_fatal(exc):
                raise
            raise not_differentiable(exc) from exc


def _rows(stacked: dict[str, Tensor]) -> list[dict[str, Tensor]]:
    count = next(iter(stacked.values())).shape[0]
    return [{n: t[s] for n, t in stacked.items()} for s in range(count)]


def _leaves(problem) -> dict[str, Tensor]:
    return {n: p.detach().requires_grad_(True) for n, p in problem.params.items()}


def _grad(outputs: list[Tensor], inputs: list[Tensor], seeds: list[Tensor] | None = None, create: bool = False
          ) -> list[Tensor]:
    """``sum_i seeds_i . d outputs_i / d inputs`` (zeros where an input is unused); outputs without a graph add 0."""
    pairs = [(o, s) for o, s in zip(outputs, seeds or [None] * len(outputs), strict=True) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad([o for o, _ in pairs], inputs, grad_outputs=[s for _, s in pairs] if seeds else None,
                                retain_graph=True, create_graph=create, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def hessian_vector_products(problem, tangents: dict[str, Tensor]) -> dict[str, Tensor]:
    """``H u_s`` of the batch loss for S stacked tangents (name -> ``(S, *shape)``), stacked the same way."""
    def forward() -> dict[str, Tensor]:
        gradient_fn = grad(problem.loss_value)
        return map_stacked(problem, lambda u: jvp(gradient_fn, (problem.params,), (u,))[1], tangents)

    def fallback() -> dict[str, Tensor]:
        names = list(problem.params)
        with torch.enable_grad():
            leaves = _leaves(problem)
            inputs = [leaves[n] for n in names]
            g = _grad([problem.loss_value(leaves)], inputs, create=True)
            rows = [_grad(g, inputs, [u[n].to(g[0].dtype) for n in names]) for u in _rows(tangents)]
        return {n: torch.stack([r[i].detach() for r in rows]) for i, n in enumerate(names)}

    return _forward_or_fallback(problem, forward, fallback)


def output_jvps(problem, tangents: dict[str, Tensor], inputs: Tensor | None = None) -> Tensor:
    """``J u_s`` ``(S, n, C)``: the outputs' directional derivatives on ``inputs`` (default: the batch) along S
    stacked tangents (name -> ``(S, *shape)``)."""
    inputs = problem.inputs if inputs is None else inputs

    def f(p: dict[str, Tensor]) -> Tensor:
        return problem.call({**problem.buffers, **p}, inputs)

    def forward() -> Tensor:
        return map_stacked(problem, lambda u: jvp(f, (problem.params,), (u,))[1], tangents)

    def fallback() -> Tensor:
        names = list(problem.params)
        with torch.enable_grad():
            leaves = _leaves(problem)
            out = f(leaves)
            w = torch.zeros_like(out, requires_grad=True)
            vjps = _grad([out], [leaves[n] for n in names], [w], create=True)
            rows = [_grad(vjps, [w], [u[n].to(out.dtype) for n in names])[0] for u in _rows(tangents)]
        return torch.stack([r.detach() for r in rows])

    return _forward_or_fallback(problem, forward, fallback)


def third_derivatives(problem, tangents: dict[str, Tensor]) -> Tensor:
    """``D^3 L[u_s, u_s, u_s]`` ``(S,)`` of the batch loss for S stacked tangents."""
    def forward() -> Tensor:
        def third(u: dict[str, Tensor]) -> Tensor:
            def d1(p: dict[str, Tensor]) -> Tensor:
                return jvp(problem.loss_value, (p,), (u,))[1]

            def d2(p: dict[str, Tensor]) -> Tensor:
                return jvp(d1, (p,), (u,))[1]

            return jvp(d2, (problem.params,), (u,))[1]

        return map_stacked(problem, third, tangents)

    def fallback() -> Tensor:
        names = list(problem.params)
        values = []
        with torch.enable_grad():
            leaves = _leaves(problem)
            inputs = [leaves[n] for n in names]
            g = _grad([problem.loss_value(leaves)], inputs, create=True)
            for u in _rows(tangents):
                us = [u[n].to(g[0].dtype) for n in names]
                hu = _grad([_dot(g, us)], inputs, create=True)
                t = _grad([_dot(hu, us)], inputs)
                values.append(_dot(t, us).detach())
        return torch.stack(values)

    return _forward_or_fallback(problem, forward, fallback)
