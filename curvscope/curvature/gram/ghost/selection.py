"""Which layers take a fast rule: candidates by kind, then by how the forward calls them, then by a check against
autograd's per-sample gradients; each with the mode the cost model picks (:func:`select_layers`).

A layer is only taken when the rule is provably its gradient: its kind has a rule (:func:`~.registry.rule_for`)
that does not refuse it, its parameters are not shared, it is called exactly once per forward with the batch as
its first dimension, and a check on two samples compares the rule with autograd's per-sample gradient (catches
weights used outside the layer, non-batch-first layouts, hooks that change the output). Anything else is left to
the generic path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

from curvscope.curvature.gram.columns import Columns
from curvscope.curvature.gram.ghost.cost import check_fits, choose_mode, worth_a_pass
from curvscope.curvature.gram.ghost.layer import GhostLayer
from curvscope.curvature.gram.ghost.registry import rule_for
from curvscope.curvature.gram.rows import batched_vjp
from curvscope.curvature.memory import MemoryPlan


def candidate_layers(problem, names: Sequence[str]) -> list[GhostLayer]:
    """Modules with a rule that does not refuse them (Linear; Conv1d / Conv2d with zeros padding and one group;
    Hugging Face ``Conv1D``; Embedding without max_norm, scale_grad_by_freq or sparse gradients) owning wanted,
    unshared parameters."""
    wanted = set(names)
    uses = Counter(id(p) for _n, p in problem.model.named_parameters(remove_duplicate=False))
    layers = []
    for mname, m in problem.model.named_modules():
        rule = rule_for(m)
        if rule is None or rule.refusal(m) is not None:
            continue
        if any(uses[id(p)] > 1 for p in m.parameters(recurse=False)):
            continue
        prefix = f"{mname}." if mname else ""
        weight, bias = (n if n in wanted and n in problem.params else None
                        for n in (prefix + "weight", prefix + "bias"))
        if weight or bias:
            layers.append(GhostLayer(mname, m, weight, bias, rule=rule))
    return layers


def forward(problem, layers: Sequence[GhostLayer], inputs: Tensor, params: dict[str, Tensor],
            probes: dict[str, Tensor] | None, record: dict[str, list] | None = None
            ) -> tuple[Tensor, dict[str, Tensor]]:
    """The model on ``inputs`` with ``probes`` added to the layers' outputs; returns the outputs and each
    layer's input of this call. ``record``: collect every call's ``(args, output)`` instead (no probes)."""
    captured: dict[str, Tensor] = {}
    handles = []
    for layer in layers:
        def hook(_module, args, out, name=layer.module_name):
            if record is not None:
                record[name].append((args, out))
                return None
            captured[name] = args[0]
            return out + probes[name]

        handles.append(layer.module.register_forward_hook(hook))
    try:
        out = problem.call({**problem.buffers, **problem.params, **params}, inputs)
    finally:
        for h in handles:
            h.remove()
    return out, captured


PROBE = "probe:"
"""Prefix of the probes' names among the differentiated tensors (module names may equal parameter names)."""


def forward_probed(problem, layers: Sequence[GhostLayer], inputs: Tensor, tensors: dict[str, Tensor]
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`forward` with parameters and probes in one dict (probes named ``PROBE + module name``)."""
    params = {n: t for n, t in tensors.items() if not n.startswith(PROBE)}
    probes = {n[len(PROBE):]: t for n, t in tensors.items() if n.startswith(PROBE)}
    return forward(problem, layers, inputs, params, probes)


def _structure(problem, layers: list[GhostLayer], inputs: Tensor) -> list[GhostLayer]:
    """Keep the layers called exactly once, batch-first, with a tensor input their rule can follow; fill in T,
    d_in, d_out."""
    b = inputs.shape[0]
    record: dict[str, list] = {layer.module_name: [] for layer in layers}
    with torch.no_grad():
        forward(problem, layers, inputs, {}, None, record)
    kept = []
    for layer in layers:
        calls = record[layer.module_name]
        if len(calls) != 1:
            continue  # unused, or weight sharing by calling the module twice: generic path
        args, out = calls[0]
        if not args or not isinstance(args[0], Tensor) or not isinstance(out, Tensor):
            continue
        x = args[0]
        if x.dim() == 0 or x.shape[0] != b or out.shape[0] != b:
            continue
        shapes = layer.rule.shapes(layer.module, x, out)
        if shapes is None:
            continue
        layer.positions, layer.d_in, layer.d_out = shapes
        layer.out_shape = tuple(out.shape[1:])
        kept.append(layer)
    return kept


def _per_sample_check(problem, layers: list[GhostLayer], inputs: Tensor) -> list[GhostLayer]:
    """Keep the layers whose rule reproduces autograd's per-sample gradients on ``inputs`` (a few samples)."""
    if not layers:
        return layers
    b = inputs.shape[0]
    params = {n: problem.params[n] for layer in layers for n in layer.names}
    probes = {PROBE + layer.module_name: torch.zeros(b, *layer.out_shape, dtype=problem.dtype,
                                                     device=problem.device) for layer in layers}
    g = torch.Generator().manual_seed(0)
    cot = torch.zeros(b, b, problem.num_outputs, dtype=problem.dtype)
    for n in range(b):
        cot[n, n] = torch.randn(problem.num_outputs, generator=g, dtype=torch.float64)
    vjps, captured = batched_vjp(problem, lambda pq: forward_probed(problem, layers, inputs, pq),
                                 {**params, **probes}, cot.to(problem.device), few=True)  # a sample's each
    grads = {n: vjps[n] for n in params}
    deltas = {layer.module_name: vjps[PROBE + layer.module_name] for layer in layers}
    tol = 10 * problem.eps ** 0.5  # the model's own precision (a float32 norm inside a float64 run)
    kept = []
    for layer in layers:
        d = layer.rule.outputs(layer.module, deltas[layer.module_name], 2).diagonal(dim1=0, dim2=1)
        d = d.movedim(-1, 0)  # (b, T, d_out): sample n's delta from cotangent n
        weight = layer.rule.sample_weight_gradients(layer.module, captured[layer.module_name], d)
        rules = {layer.weight: weight, layer.bias: d.sum(1)}
        ok = True
        for name in layer.names:
            true = grads[name].reshape(b, -1)
            err = (rules[name].reshape(b, -1) - true).norm()
            ok = ok and bool(err <= tol * (true.norm() + torch.finfo(problem.dtype).tiny))
        if ok:
            kept.append(layer)
    return kept


def select_layers(problem, names: Sequence[str], columns: Columns, grad_seeds: Tensor | None,
                  plan: MemoryPlan, force_mode: str | None = None) -> list[GhostLayer]:
    """The layers the fast rules handle for parameters ``names``, each with its mode."""
    layers = candidate_layers(problem, names)
    if not layers:
        return []
    probe_idx = (torch.arange(min(2, problem.batch_size), device=problem.device) if grad_seeds is not None
                 else columns.samples[:2])
    inputs = problem.inputs[probe_idx]
    layers = _structure(problem, layers, inputs)
    num_samples = problem.batch_size if grad_seeds is not None else columns.num_samples
    num_columns = columns.num_columns + (problem.batch_size if grad_seeds is not None else 0)
    elt = torch.finfo(problem.dtype).bits // 8
    layers = [layer for layer in layers if check_fits(layer, inputs.shape[0], plan, elt)]
    for layer in layers:
        layer.mode = force_mode or choose_mode(layer, num_samples, num_columns, plan, elt)
    if force_mode is None and not worth_a_pass(layers, names):
        return []
    return _per_sample_check(problem, layers, inputs)
