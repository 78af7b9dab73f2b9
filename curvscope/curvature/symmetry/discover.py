"""Chains a symmetry acts on, found in any model (``docs/conventions.md §7``; ``docs/factors.md``).

A pair of weight layers A -> (elementwise) -> B whose hidden units nothing else reads is a two-layer chain: the
permutation group acts on A's output units (rows of A's weight, A's bias) and on B's input units, and the model
is unchanged. Transformer MLP blocks (``Linear -> GELU -> Linear``, Hugging Face GPT-2's ``Conv1D`` pair) and
convolutions joined by an activation (the channels: ``Conv2d -> ReLU -> Conv2d``) are such pairs; the residual
stream around them is a free axis.

:func:`discover_chains` runs the model once (two samples) to list its weight layers in call order, takes each
consecutive pair whose widths connect, and *tests* the symmetry numerically: the model's outputs must not change
when a random permutation of the hidden units is applied to both layers (to rounding). The pairs that pass are
chains; the larger groups are tested the same way (sign flips for odd activations, a random rotation for linear
ones). For the pairs that fail, the reason is kept, so that a model without any chain is told precisely why
(a BatchNorm or LayerNorm between the layers, hidden units also read elsewhere, widths that do not connect).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvscope.curvature.symmetry.chain import ChainTensor, LinearChain


@dataclass(frozen=True)
class Pair:
    """Two consecutive weight layers and whether the hidden-unit symmetry holds between them.

    Attributes:
        first, second: module names (A, B).
        width: the hidden width (A's outputs = B's inputs), or ``None`` when they do not connect.
        between: what was called between them (class names of modules without parameters).
        symmetry: the largest group that passed the test (``permutation``, ``signed-permutation``,
            ``orthogonal``), or ``None``.
        reason: why the pair is not a chain (``None`` when it is).
    """

    first: str
    second: str
    width: int | None
    between: tuple[str, ...]
    symmetry: str | None
    reason: str | None


def _is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` ``(in, out)``; recognised by name and shape."""
    return type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None and m.weight.dim() == 2


def weight_layer(m: nn.Module) -> bool:
    """A layer whose weight's axes are (outputs, inputs, ...) or, for ``Conv1D``, (inputs, outputs)."""
    if isinstance(m, nn.Linear) or _is_hf_conv1d(m):
        return True
    return isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and m.groups == 1


def _axes(m: nn.Module) -> tuple[int, int]:
    """(output axis, input axis) of the layer's weight."""
    return (1, 0) if _is_hf_conv1d(m) else (0, 1)


def _sizes(m: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of the layer."""
    out_axis, in_axis = _axes(m)
    return m.weight.shape[in_axis], m.weight.shape[out_axis]


def _calls(problem, x) -> list[tuple[str, nn.Module]]:
    """Every module with parameters or a weight layer, in the order of its first call (one forward pass)."""
    seen: dict[str, nn.Module] = {}
    counts: dict[str, int] = {}
    handles = []

    def enter(name: str, module: nn.Module):
        def hook(_m, _a) -> None:
            counts[name] = counts.get(name, 0) + 1
            seen.setdefault(name, module)
        return hook

    for name, module in problem.model.named_modules():
        if name and (weight_layer(module) or any(True for _ in module.parameters(recurse=False))
                     or not any(True for _ in module.children())):
            handles.append(module.register_forward_pre_hook(enter(name, module)))
    try:
        with torch.no_grad():
            problem.call({**problem.buffers, **problem.params}, x)
    finally:
        for h in handles:
            h.remove()
    return [(n, m) for n, m in seen.items() if counts[n] == 1 or not weight_layer(m)]


def _transform(problem, a: str, b: str, ma: nn.Module, mb: nn.Module, matrix: Tensor) -> dict[str, Tensor]:
    """The parameters with A's output units mapped by ``matrix`` (d x d) and B's input units by its inverse
    transpose (``W_A -> M W_A``, ``b_A -> M b_A``, ``W_B -> W_B M^-1``; ``M`` orthogonal here)."""
    params = dict(problem.params)
    out_a, _ = _axes(ma)
    _, in_b = _axes(mb)
    M = matrix.to(problem.dtype).to(problem.device)
    wa = f"{a}.weight"
    params[wa] = torch.tensordot(M, params[wa], dims=([1], [out_a])).movedim(0, out_a)
    if f"{a}.bias" in params:
        params[f"{a}.bias"] = M @ params[f"{a}.bias"]
    wb = f"{b}.weight"
    params[wb] = torch.tensordot(M, params[wb], dims=([1], [in_b])).movedim(0, in_b)
    return params


def _invariant(problem, x, base: Tensor, params: dict[str, Tensor]) -> bool:
    with torch.no_grad():
        out = problem.call({**problem.buffers, **params}, x)
    scale = float(base.abs().max()) + 1.0
    return bool(torch.isfinite(out).all()) and float((out - base).abs().max()) <= problem.eps ** 0.5 * scale


def _test(problem, x, base, a, b, ma, mb, d: int) -> str | None:
    """The largest group under which the model is invariant (``None``: not even the permutations)."""
    gen = torch.Generator().manual_seed(0)
    perm = torch.eye(d, dtype=torch.float64)[torch.randperm(d, generator=gen)]
    if not _invariant(problem, x, base, _transform(problem, a, b, ma, mb, perm)):
        return None
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    if _invariant(problem, x, base, _transform(problem, a, b, ma, mb, q)):
        return "orthogonal"
    signs = torch.diag(torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64))
    if _invariant(problem, x, base, _transform(problem, a, b, ma, mb, signs @ perm)):
        return "signed-permutation"
    return "permutation"


def discover_pairs(problem) -> list[Pair]:
    """Every consecutive pair of weight layers (in call order), tested (module docstring)."""
    from curvscope.curvature.gram.rows import batch_with_partner

    x = problem.inputs[batch_with_partner(problem, torch.arange(min(2, problem.batch_size)))]
    calls = _calls(problem, x)
    with torch.no_grad():
        base = problem.call({**problem.buffers, **problem.params}, x)
    pairs = []
    layers = [i for i, (_n, m) in enumerate(calls) if weight_layer(m) and f"{_n}.weight" in problem.params]
    for i, j in zip(layers, layers[1:], strict=False):
        (a, ma), (b, mb) = calls[i], calls[j]
        between = [(n, m) for n, m in calls[i + 1:j]]
        with_params = [f"{type(m).__name__} '{n}'" for n, m in between if any(True for _ in m.parameters(False))]
        names = tuple(type(m).__name__ for _n, m in between)
        d, d_in = _sizes(ma)[1], _sizes(mb)[0]
        if d != d_in:
            pairs.append(Pair(a, b, None, names, None, f"'{a}' has {d} outputs but '{b}' takes {d_in} inputs"))
            continue
        if d < 2:
            pairs.append(Pair(a, b, d, names, None, f"'{a}' has a single output unit"))
            continue
        if with_params:  # even where the test passes (a fresh norm is uniform), training breaks it
            pairs.append(Pair(a, b, d, names, None, f"{', '.join(with_params)} between them has per-unit "
                              "parameters or statistics of its own (permuting the units would have to permute them "
                              "too)"))
            continue
        group = _test(problem, x, base, a, b, ma, mb, d)
        if group is not None:
            pairs.append(Pair(a, b, d, names, group, None))
            continue
        pairs.append(Pair(a, b, d, names, None, f"permuting the {d} units between them changes the model's "
                          "outputs: they are also read elsewhere (a residual or a gate), or what lies between is not "
                          "elementwise"))
    return pairs


def chain_of_pair(problem, pair: Pair) -> LinearChain:
    """The two-layer chain (``L = 2``, hidden label 1) of a pair that passed the test."""
    modules = dict(problem.model.named_modules())
    ma, mb = modules[pair.first], modules[pair.second]
    tensors = []
    for layer, (name, m) in enumerate(((pair.first, ma), (pair.second, mb)), start=1):
        out_axis, in_axis = _axes(m)
        labels: list[int | None] = [None] * m.weight.dim()
        labels[out_axis if layer == 1 else in_axis] = 1
        tensors.append(ChainTensor(f"{name}.weight", str(layer), layer, False, tuple(labels), tuple(m.weight.shape)))
        if getattr(m, "bias", None) is not None and f"{name}.bias" in problem.params:
            tensors.append(ChainTensor(f"{name}.bias", f"b{layer}", layer, True, (1 if layer == 1 else None,),
                                       tuple(m.bias.shape)))
    widths = (_sizes(ma)[0], pair.width, _sizes(mb)[1])
    acts = "+".join(pair.between) or "Identity"
    return LinearChain((pair.first, pair.second), widths, tuple(tensors), pair.symmetry, (acts,))


def describe_failures(pairs: list[Pair], limit: int = 3) -> str:
    """Why no pair is a chain, in one line (the first ``limit`` pairs)."""
    if not pairs:
        return "it has fewer than two weight layers (Linear, Conv, Conv1D) called once each"
    parts = [f"'{p.first}' -> '{p.second}': {p.reason}" for p in pairs[:limit]]
    more = f"; and {len(pairs) - limit} more pair(s)" if len(pairs) > limit else ""
    return "; ".join(parts) + more


def problem_chain(problem, layers=None) -> LinearChain:
    """The chain of ``problem``'s model: named by ``layers``, or a plain ``nn.Sequential`` MLP's Linear layers
    (:func:`~curvscope.curvature.symmetry.chain.find_chain`), else the first chain :func:`discover_pairs`
    finds (the others are listed in ``chain.found``).

    Raises:
        OptionError: of ``layers``, naming why the model has no chain (each pair of weight layers and what
            breaks the symmetry between them).
    """
    from curvscope.curvature.symmetry.chain import find_chain, parse_layers
    from curvscope.errors import OptionError

    names = parse_layers(layers)
    modules = dict(problem.model.named_modules())
    if names and any(n in modules and weight_layer(modules[n]) and not isinstance(modules[n], nn.Linear)
                     for n in names):
        if len(names) != 2 or not all(n in modules and weight_layer(modules[n]) for n in names):
            raise OptionError("layers", f"'{','.join(names)}': a chain with Conv or Conv1D layers is named by its "
                              "two layers (A,B: the hidden units between them)")
        (a, ma), (b, mb) = ((n, modules[n]) for n in names)
        d, d_in = _sizes(ma)[1], _sizes(mb)[0]
        if d != d_in:
            raise OptionError("layers", f"'{a},{b}': '{a}' has {d} outputs but '{b}' takes {d_in} inputs")
        return chain_of_pair(problem, Pair(a, b, d, (), None, None))
    try:
        return find_chain(problem.model, problem.params, names)
    except OptionError:
        if names:
            raise
    pairs = discover_pairs(problem)
    chains = [p for p in pairs if p.symmetry is not None]
    if not chains:
        failed = [p for p in pairs if p.reason]
        raise OptionError("layers", f"the model has no chain a symmetry acts on: {describe_failures(failed)} "
                          "(or name the layers yourself, a,b,...)")
    chain = chain_of_pair(problem, chains[0])
    return LinearChain(chain.modules, chain.widths, chain.tensors, chain.activation_symmetry, chain.activations,
                       found=tuple(f"{p.first},{p.second}" for p in chains))
