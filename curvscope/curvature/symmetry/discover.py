"""Chains a symmetry acts on, found in any model (``docs/conventions.md §7``; ``docs/factors.md``).

A pair of weight layers A -> (elementwise) -> B whose hidden units nothing else reads is a two-layer chain: the
permutation group acts on A's output units (rows of A's weight, A's bias) and on B's input units, and the model
is unchanged. Transformer MLP blocks (``Linear -> GELU -> Linear``, Hugging Face GPT-2's ``Conv1D`` pair) and
convolutions joined by an activation (the channels: ``Conv2d -> ReLU -> Conv2d``) are such pairs; the residual
stream around them is a free axis. A gated MLP (Llama, Mistral, Qwen2: ``down(act(gate(x)) * up(x))``) is a
triple: the permutation acts on the rows of gate and of up and the columns of down at once
(:mod:`curvscope.curvature.symmetry.gated`).

:func:`discover_pairs` runs the model once (two samples) to list its weight layers in call order, takes each
consecutive pair whose widths connect, and *tests* the symmetry numerically: a random permutation of the hidden
units, applied to both layers, must leave the output of every module other than A and those called between A
and B unchanged (to rounding), and the model's outputs too. Comparing every module's output, each against its
own scale, keeps the test sensitive where the model's outputs barely depend on a layer (a freshly initialized
transformer's attention is nearly uniform, so permuting the inputs of k_proj hardly moves its logits). The pairs
that pass are chains; the larger groups are tested the same way (sign flips for odd activations, a random
rotation for linear ones). A pair that fails because B's inputs are multiplied by another layer's outputs is
tested again as a gated triple with the weight layer called just before B. For the pairs that fail, the reason
is kept, so that a model without any chain is told precisely why (a BatchNorm or LayerNorm between the layers,
hidden units also read elsewhere, widths that do not connect).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from curvscope.curvature.symmetry.chain import ChainTensor, LinearChain


@dataclass(frozen=True)
class Pair:
    """Two consecutive weight layers and whether the hidden-unit symmetry holds between them.

    Attributes:
        first, second: module names (A, B); for a gated chain up and down.
        width: the hidden width (A's outputs = B's inputs), or ``None`` when they do not connect.
        between: what was called between them (class names of modules without parameters).
        symmetry: the largest group that passed the test (``permutation``, ``signed-permutation``,
            ``orthogonal``), or ``None``.
        reason: why the pair is not a chain (``None`` when it is).
        gate: a gated chain's gate module (its outputs, through the activation, multiply A's), else ``None``.
        gate_signed: a gated chain's gate sign flips (with B's columns) are a symmetry too.
    """

    first: str
    second: str
    width: int | None
    between: tuple[str, ...]
    symmetry: str | None
    reason: str | None
    gate: str | None = None
    gate_signed: bool = False

    @property
    def spec(self) -> str:
        """``A,B``, or ``gate*up,down``: how ``layers`` names the chain."""
        return f"{self.gate}*{self.first},{self.second}" if self.gate else f"{self.first},{self.second}"


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


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


SAMPLED = 4096
"""Entries of each module output the chain test keeps (at fixed random positions): a broken symmetry changes
a generic output almost everywhere, and a large model's outputs need not all be held."""


class _Probe:
    """The model on (up to) two samples: the order of its module calls, and every module's outputs (at most
    :data:`SAMPLED` entries of each, at fixed random positions).

    Hooked: weight layers, modules with parameters of their own and leaf modules. ``calls`` lists them in the
    order of their first call (a weight layer called more than once is left out: it is no chain layer).
    """

    def __init__(self, problem) -> None:
        from curvscope.curvature.gram.rows import batch_with_partner

        self.problem = problem
        self.x = problem.inputs[batch_with_partner(problem, torch.arange(min(2, problem.batch_size)))]
        self.hooked = {name: m for name, m in problem.model.named_modules()
                       if name and (weight_layer(m) or _has_params(m) or not any(True for _ in m.children()))}
        self.tol = problem.eps ** 0.5
        self._positions: dict[int, Tensor] = {}
        self.records, self.out, order = self._run(dict(problem.params))
        counts: dict[str, int] = {}
        for name in order:
            counts[name] = counts.get(name, 0) + 1
        first = list(dict.fromkeys(order))
        self.calls = [(n, self.hooked[n]) for n in first if counts[n] == 1 or not weight_layer(self.hooked[n])]

    def _run(self, params: dict[str, Tensor]) -> tuple[list[tuple[str, list[Tensor]]], Tensor, list[str]]:
        records: list[tuple[str, list[Tensor]]] = []
        order: list[str] = []
        handles = []
        for name, module in self.hooked.items():
            def enter(_m, _a, name=name) -> None:
                order.append(name)

            def leave(_m, _a, output, name=name) -> None:
                leaves = [self._sample(t.detach()) for t in tree_flatten(output)[0]
                          if isinstance(t, Tensor) and t.is_floating_point()]
                records.append((name, leaves))
            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        try:
            with torch.no_grad():
                out = self.problem.call({**self.problem.buffers, **params}, self.x)
        finally:
            for h in handles:
                h.remove()
        return records, out, order

    def _sample(self, t: Tensor) -> Tensor:
        flat = t.reshape(-1)
        if flat.numel() <= SAMPLED:
            return flat.clone()
        if flat.numel() not in self._positions:
            gen = torch.Generator().manual_seed(flat.numel())
            self._positions[flat.numel()] = torch.randperm(flat.numel(), generator=gen)[:SAMPLED].to(t.device)
        return flat[self._positions[flat.numel()]]

    def _close(self, new: Tensor, old: Tensor) -> bool:
        if new.shape != old.shape or not bool(torch.isfinite(new).all()):
            return False
        if not old.numel():
            return True
        return float((new - old).abs().max()) <= self.tol * float(old.abs().max())

    def changed(self, params: dict[str, Tensor], free: set[str]) -> str | None:
        """The first module (outside ``free``) whose outputs change with ``params``, ``"the model's outputs"``,
        or ``None`` when nothing changes."""
        records, out, _ = self._run(params)
        if len(records) != len(self.records):
            return "the model's outputs"
        for (name, new), (_, old) in zip(records, self.records, strict=True):
            if name in free:
                continue
            if len(new) != len(old) or not all(self._close(a, b) for a, b in zip(new, old, strict=True)):
                return name
        return None if self._close(out, self.out) else "the model's outputs"


def _transform(problem, moves: list[tuple[str, nn.Module, str, Tensor]]) -> dict[str, Tensor]:
    """The parameters with each ``(name, module, side, M)`` applied: side ``out`` maps the layer's output units by
    ``M`` (``W -> M W`` along the output axis, ``b -> M b``), side ``in`` its input units (``W -> W M^T``: the
    inverse for the orthogonal ``M`` used here)."""
    params = dict(problem.params)
    for name, module, side, matrix in moves:
        out_axis, in_axis = _axes(module)
        axis = out_axis if side == "out" else in_axis
        M = matrix.to(problem.dtype).to(problem.device)
        w = f"{name}.weight"
        params[w] = torch.tensordot(M, params[w], dims=([1], [axis])).movedim(0, axis)
        if side == "out" and f"{name}.bias" in params:
            params[f"{name}.bias"] = M @ params[f"{name}.bias"]
    return params


def _elements(d: int) -> tuple[Tensor, Tensor]:
    """A random permutation matrix and a random sign diagonal of size d (fixed seed)."""
    gen = torch.Generator().manual_seed(0)
    perm = torch.eye(d, dtype=torch.float64)[torch.randperm(d, generator=gen)]
    signs = torch.diag(torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64))
    return perm, signs


def _rotation(d: int) -> Tensor:
    """A random rotation of size d (fixed seed)."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    return q


def _test(probe: _Probe, a, b, ma, mb, d: int, free: set[str]) -> tuple[str | None, str | None]:
    """``(group, changed)``: the largest group under which the model is invariant (``None``: not even the
    permutations) and, when none is, the first module that changed."""
    problem = probe.problem
    perm, signs = _elements(d)

    def moved(M: Tensor) -> str | None:
        return probe.changed(_transform(problem, [(a, ma, "out", M), (b, mb, "in", M)]), free)

    changed = moved(perm)
    if changed is not None:
        return None, changed
    if moved(_rotation(d)) is None:
        return "orthogonal", None
    if moved(signs @ perm) is None:
        return "signed-permutation", None
    return "permutation", None


def _test_gated(probe: _Probe, g, u, c, mods: dict[str, nn.Module], d: int, free: set[str]) -> Pair | None:
    """The gated chain ``g*u,c`` when permuting the rows of g and u and the columns of c together leaves the model
    unchanged; the sign tests decide which of g, u is the gate (module docstring of :mod:`.gated`)."""
    problem = probe.problem
    perm, signs = _elements(d)

    def moved(mg: Tensor, mu: Tensor, mc: Tensor) -> bool:
        moves = [(g, mods[g], "out", mg), (u, mods[u], "out", mu), (c, mods[c], "in", mc)]
        return probe.changed(_transform(problem, moves), free) is None

    if not moved(perm, perm, perm):
        return None
    up_signs = moved(perm, signs @ perm, signs @ perm)
    gate_signs = moved(signs @ perm, perm, signs @ perm)
    gate, up = (u, g) if gate_signs and not up_signs else (g, u)
    symmetry = "signed-permutation" if up_signs or gate_signs else "permutation"
    return Pair(up, c, d, (), symmetry, None, gate=gate, gate_signed=up_signs and gate_signs)


MODEL_OUTPUTS = "the model's outputs"


def _failed(d: int, b: str, changed: str) -> str:
    """Why permuting the ``d`` units between A and ``b`` is no symmetry, from the first module that changed."""
    if changed == b:
        return (f"permuting the {d} units between them changes what '{b}' computes: '{b}' does not read them "
                "(only) through elementwise functions")
    where = changed if changed == MODEL_OUTPUTS else f"'{changed}'"
    return (f"permuting the {d} units between them leaves '{b}' unchanged but changes {where}: they are also read "
            "elsewhere (a residual or a gate)")


def _between(calls: list[tuple[str, nn.Module]], start: int, stop: int, skip: int | None = None
             ) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The calls strictly between positions ``start`` and ``stop`` (without ``skip``), and those with parameters
    of their own (``Class 'name'``)."""
    between = [c for k, c in enumerate(calls[start + 1:stop], start=start + 1) if k != skip]
    return between, [f"{type(m).__name__} '{n}'" for n, m in between if _has_params(m)]


def _gated(probe: _Probe, h: int, i: int, j: int) -> Pair | str | None:
    """Weight layers at call positions h, i, j as a gated triple (h, i the branches, j down): the chain, or the
    sentence to add to the failed pair (i, j), or ``None`` when the triple does not fit (sizes, parameters)."""
    calls = probe.calls
    (g, mg), (u, mu), (c, mc) = calls[h], calls[i], calls[j]
    if _sizes(mg) != _sizes(mu):
        return None
    between, with_params = _between(calls, h, j, skip=i)
    if with_params:
        return None
    d = _sizes(mu)[1]
    pair = _test_gated(probe, g, u, c, {g: mg, u: mu, c: mc}, d, {g, u, *(n for n, _ in between)})
    if pair is None:
        return f"; permuting them together with the outputs of '{g}' (a gated MLP) changes the model too"
    acts = tuple(type(m).__name__ for n, m in between if n != pair.gate)
    return Pair(pair.first, pair.second, d, acts, pair.symmetry, None, pair.gate, pair.gate_signed)


def discover_pairs(problem) -> list[Pair]:
    """Every consecutive pair of weight layers (in call order), tested (module docstring); a pair that is the
    up and down of a gated MLP comes back as that gated chain (``gate`` set)."""
    probe = _Probe(problem)
    calls = probe.calls
    pairs: list[Pair] = []
    layers = [i for i, (n, m) in enumerate(calls) if weight_layer(m) and f"{n}.weight" in problem.params]
    for pos, (i, j) in enumerate(zip(layers, layers[1:], strict=False)):
        (a, ma), (b, mb) = calls[i], calls[j]
        between, with_params = _between(calls, i, j)
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
        group, changed = _test(probe, a, b, ma, mb, d, {a, *(n for n, _ in between)})
        if group is not None:
            pairs.append(Pair(a, b, d, names, group, None))
            continue
        reason = _failed(d, b, changed or MODEL_OUTPUTS)
        if pos > 0 and pairs[-1].symmetry is None:
            gated = _gated(probe, layers[pos - 1], i, j)
            if isinstance(gated, Pair):
                pairs.append(gated)
                continue
            reason += gated or ""
        pairs.append(Pair(a, b, d, names, None, reason))
    return pairs


def chain_of_pair(problem, pair: Pair) -> LinearChain:
    """The two-layer chain (``L = 2``, hidden label 1) of a pair that passed the test, or the gated chain
    (modules gate, up, down) of a gated one."""
    modules = dict(problem.model.named_modules())
    roles = [(pair.first, "1", 1, "out"), (pair.second, "2", 2, "in")]
    if pair.gate is not None:
        roles.insert(0, (pair.gate, "1g", 1, "out"))
    tensors = []
    for name, short, layer, side in roles:
        m = modules[name]
        out_axis, in_axis = _axes(m)
        labels: list[int | None] = [None] * m.weight.dim()
        labels[out_axis if side == "out" else in_axis] = 1
        tensors.append(ChainTensor(f"{name}.weight", short, layer, False, tuple(labels), tuple(m.weight.shape)))
        if getattr(m, "bias", None) is not None and f"{name}.bias" in problem.params:
            tensors.append(ChainTensor(f"{name}.bias", f"b{short}", layer, True, (1 if side == "out" else None,),
                                       tuple(m.bias.shape)))
    ma, mb = modules[pair.first], modules[pair.second]
    widths = (_sizes(ma)[0], pair.width, _sizes(mb)[1])
    acts = "+".join(pair.between)
    if pair.gate is not None:
        return LinearChain((pair.gate, pair.first, pair.second), widths, tuple(tensors), pair.symmetry,
                           (f"{acts or 'act'}(gate) * up",), gate=pair.gate, gate_signed=pair.gate_signed)
    return LinearChain((pair.first, pair.second), widths, tuple(tensors), pair.symmetry, (acts or "Identity",))


def describe_failures(pairs: list[Pair], limit: int = 3) -> str:
    """Why no pair is a chain, in one line (the first ``limit`` pairs)."""
    if not pairs:
        return "it has fewer than two weight layers (Linear, Conv, Conv1D) called once each"
    parts = [f"'{p.first}' -> '{p.second}': {p.reason}" for p in pairs[:limit]]
    more = f"; and {len(pairs) - limit} more pair(s)" if len(pairs) > limit else ""
    return "; ".join(parts) + more


def _trainable(problem, spec: str, name: str) -> None:
    from curvscope.errors import OptionError

    if f"{name}.weight" not in problem.params:
        raise OptionError("layers", f"'{spec}': the weight of '{name}' is not a trainable parameter of the model")


def _named(problem, names: list[str]) -> LinearChain | None:
    """A chain named with Conv/Conv1D layers (``a,b``) or a gated one (``gate*up,down``); ``None`` for a chain of
    Linear layers (:func:`~curvscope.curvature.symmetry.chain.find_chain` takes it)."""
    from curvscope.errors import OptionError

    modules = dict(problem.model.named_modules())
    spec = ",".join(names)
    if any("*" in n for n in names):
        parts = names[0].split("*") + names[1:]
        if len(names) != 2 or len(parts) != 3 or "*" in names[1]:
            raise OptionError("layers", f"'{spec}': a gated MLP is named gate*up,down (three weight layers)")
        for n in parts:
            if n not in modules or not weight_layer(modules[n]):
                what = "no module" if n not in modules else f"{type(modules[n]).__name__}, not a weight layer, as"
                raise OptionError("layers", f"'{spec}': the model has {what} '{n}'")
            _trainable(problem, spec, n)
        g, u, c = parts
        if _sizes(modules[g]) != _sizes(modules[u]) or _sizes(modules[u])[1] != _sizes(modules[c])[0]:
            raise OptionError("layers", f"'{spec}': gate and up must have the same inputs and outputs, and down "
                              f"take their outputs (sizes (in, out): {g} {_sizes(modules[g])}, {u} "
                              f"{_sizes(modules[u])}, {c} {_sizes(modules[c])})")
        return chain_of_pair(problem, Pair(u, c, _sizes(modules[u])[1], (), None, None, gate=g))
    if not any(n in modules and weight_layer(modules[n]) and not isinstance(modules[n], nn.Linear) for n in names):
        return None
    if len(names) != 2 or not all(n in modules and weight_layer(modules[n]) for n in names):
        raise OptionError("layers", f"'{spec}': a chain with Conv or Conv1D layers is named by its two layers (A,B: "
                          "the hidden units between them)")
    for n in names:
        _trainable(problem, spec, n)
    (a, ma), (b, mb) = ((n, modules[n]) for n in names)
    d, d_in = _sizes(ma)[1], _sizes(mb)[0]
    if d != d_in:
        raise OptionError("layers", f"'{a},{b}': '{a}' has {d} outputs but '{b}' takes {d_in} inputs")
    return chain_of_pair(problem, Pair(a, b, d, (), None, None))


def problem_chain(problem, layers=None) -> LinearChain:
    """The chain of ``problem``'s model: named by ``layers`` (``a,b,c``; ``gate*up,down`` for a gated MLP), or a
    plain ``nn.Sequential`` MLP's Linear layers (:func:`~curvscope.curvature.symmetry.chain.find_chain`), else the
    first chain :func:`discover_pairs` finds (the others are listed in ``chain.found``). The last chain discovered
    is kept for the next call on the same problem (the same parameter tensors and inputs).

    Raises:
        OptionError: of ``layers``, naming why the model has no chain (each pair of weight layers and what
            breaks the symmetry between them).
    """
    from curvscope.curvature.symmetry.chain import find_chain, parse_layers
    from curvscope.errors import OptionError

    names = parse_layers(layers)
    if names:
        named = _named(problem, names)
        if named is not None:
            return named
    try:
        return find_chain(problem.model, problem.params, names)
    except OptionError:
        if names:
            raise
    key = (tuple(id(t) for t in problem.params.values()), id(problem.inputs))
    if _LAST and _LAST[0]() is problem and _LAST[1] == key:  # the command asks twice (auto symmetry, factors)
        return _LAST[2]
    chain = _discovered(problem)
    _LAST[:] = [weakref.ref(problem), key, chain]
    return chain


_LAST: list = []
"""The last discovered chain: ``[weakref to the problem, (parameter and input ids), chain]``."""


def _discovered(problem) -> LinearChain:
    from curvscope.errors import OptionError

    pairs = discover_pairs(problem)
    chains = [p for p in pairs if p.symmetry is not None]
    if not chains:
        failed = [p for p in pairs if p.reason]
        raise OptionError("layers", f"the model has no chain a symmetry acts on: {describe_failures(failed)} "
                          "(or name the layers yourself, a,b,...)")
    chain = chain_of_pair(problem, chains[0])
    return LinearChain(chain.modules, chain.widths, chain.tensors, chain.activation_symmetry, chain.activations,
                       found=tuple(p.spec for p in chains), gate=chain.gate, gate_signed=chain.gate_signed)
