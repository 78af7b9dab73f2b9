"""The chain of Linear layers that a weight-space symmetry group acts on (``docs/conventions.md §7``).

An MLP ``h_l = W_l sigma(h_{l-1}) + b_l``, l = 1..L, has hidden widths d_1..d_{L-1}; a group element
``V_1..V_{L-1}`` maps ``W_l -> V_l W_l V_{l-1}^T`` and ``b_l -> V_l b_l`` (``V_0 = V_L = I``). Each axis of a
chain tensor is therefore either *free* (the input axis of W_1, the output axis of W_L and b_L) or carries a
*hidden label* h in 1..L-1 (the group acts on it with V_h).

:func:`find_chain` finds the chain in an ``nn.Sequential`` of Linear layers and elementwise activations, or
takes it from a list of Linear module names (any model; the user then asserts the symmetry). Errors about the
chain are :class:`~curvscope.workflows.options.OptionError` of the option ``layers`` that names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from curvscope.errors import CurvscopeError, OptionError
from curvscope.reprs import compact_repr

# Elementwise activations, by the largest hidden-unit symmetry group they allow.
LINEAR_ACTIVATIONS = (nn.Identity, nn.Dropout, nn.AlphaDropout)
ODD_ACTIVATIONS = (nn.Tanh, nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink)
OTHER_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Sigmoid,
                     nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Threshold,
                     nn.Hardtanh)
GROUP_ORDER = ("orthogonal", "signed-permutation", "permutation")


@dataclass(frozen=True)
class ChainTensor:
    """One trainable tensor of the chain.

    Attributes:
        name: the parameter name in ``problem.params`` (``"3.weight"``).
        short: ``"l"`` for W_l, ``"bl"`` for b_l (used in factor names).
        layer: l in 1..L.
        is_bias: whether it is b_l.
        labels: per axis, the hidden label h acting on it (1..L-1) or ``None`` for a free axis.
        shape: the tensor's shape: ``(d_l, d_{l-1})`` for W_l, ``(d_l,)`` for b_l.
    """

    __repr__ = compact_repr

    name: str
    short: str
    layer: int
    is_bias: bool
    labels: tuple[int | None, ...]
    shape: tuple[int, ...]

    @property
    def hidden_labels(self) -> frozenset[int]:
        """The hidden labels acting on the tensor's axes (free axes left out)."""
        return frozenset(h for h in self.labels if h is not None)

    @property
    def numel(self) -> int:
        """The number of entries of the tensor."""
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class LinearChain:
    """The Linear layers W_1..W_L (module names in order), widths d_0..d_L and the chain's tensors.

    ``activation_symmetry`` is the largest group the activations between the layers allow (``orthogonal`` for
    linear networks, ``signed-permutation`` for odd activations such as tanh, ``permutation`` otherwise), or
    ``None`` when the layers were named (``layers``) and curvscope cannot tell.

    A *gated* chain (a Llama MLP, ``down(act(gate(x)) * up(x))``) has ``modules = (gate, up, down)``, widths
    ``(d_0, d_1, d_2)`` (L = 2: the gate is a second branch of layer 1) and ``gate`` set: the permutation of the
    hidden units acts on the rows of the gate and of up and on the columns of down together. Its tensors are
    named ``1g``/``b1g`` (gate), ``1``/``b1`` (up), ``2``/``b2`` (down). ``gate_signed``: a sign flip of gate row
    i with down column i is a symmetry too (an odd or linear gate activation); a sign flip of up row i with down
    column i always is (:mod:`curvscope.curvature.symmetry.gated`).
    """

    __repr__ = compact_repr

    modules: tuple[str, ...]
    widths: tuple[int, ...]
    tensors: tuple[ChainTensor, ...]
    activation_symmetry: str | None
    activations: tuple[str, ...] = ()
    found: tuple[str, ...] = ()
    """Every chain found in the model (``a,b`` module names, ``gate*up,down`` for a gated one) when this one was
    discovered among several (:mod:`curvscope.curvature.symmetry.discover`)."""
    gate: str | None = None
    """The gate's module name of a gated chain (``None``: a plain chain)."""
    gate_signed: bool = False
    """Gated chains: the gate's sign flips (with down's columns) are a symmetry too."""

    @property
    def num_layers(self) -> int:
        """L: the number of layers (a gated chain's gate and up are both layer 1)."""
        return len(self.widths) - 1

    @property
    def spec(self) -> str:
        """The chain as ``layers`` names it: ``a,b,c``, or ``gate*up,down`` for a gated chain."""
        if self.gate is not None:
            return f"{self.modules[0]}*{self.modules[1]},{self.modules[2]}"
        return ",".join(self.modules)

    @property
    def hidden_widths(self) -> dict[int, int]:
        """Hidden label h -> width d_h, for h = 1..L-1."""
        return {h: self.widths[h] for h in range(1, len(self.widths) - 1)}

    @property
    def param_names(self) -> tuple[str, ...]:
        """The names of the chain's tensors in ``problem.params``, in chain order."""
        return tuple(t.name for t in self.tensors)

    @property
    def num_params(self) -> int:
        """The number of parameters (scalars) in the chain's tensors."""
        return sum(t.numel for t in self.tensors)


def chain_from_linears(linears: Sequence[tuple[str, nn.Linear]], params: dict, activation_symmetry: str | None,
                       activations: Sequence[str] = ()) -> LinearChain:
    """Build the chain from ``(module name, nn.Linear)`` pairs in order; checks that widths connect and that
    the weights are trainable parameters in ``params``."""
    if not linears:
        raise CurvscopeError("no Linear layers found for the symmetry chain")
    widths = [linears[0][1].in_features]
    for i, (name, lin) in enumerate(linears):
        if lin.in_features != widths[-1]:
            prev = linears[i - 1][0]
            raise OptionError("layers", f"'{','.join(n for n, _ in linears)}': Linear '{name}' takes "
                              f"{lin.in_features} inputs but the previous layer '{prev}' has {widths[-1]} "
                              "outputs: the layers do not form a chain")
        widths.append(lin.out_features)
    L = len(linears)
    tensors = []
    for l, (name, lin) in enumerate(linears, start=1):
        out_label = l if l < L else None
        in_label = l - 1 if l > 1 else None
        wname = f"{name}.weight" if name else "weight"
        if wname not in params:
            raise CurvscopeError(f"Linear '{name}': its weight is not a trainable parameter of the model")
        tensors.append(ChainTensor(wname, str(l), l, False, (out_label, in_label), tuple(lin.weight.shape)))
        bname = f"{name}.bias" if name else "bias"
        if lin.bias is not None and bname in params:
            tensors.append(ChainTensor(bname, f"b{l}", l, True, (out_label,), tuple(lin.bias.shape)))
    return LinearChain(tuple(n for n, _ in linears), tuple(widths), tuple(tensors), activation_symmetry,
                       tuple(activations))


def find_chain(model: nn.Module, params: dict, layers: Sequence[str] | None = None) -> LinearChain:
    """The Linear chain of ``model``: named by ``layers`` (Linear module names, in order), or found in an
    ``nn.Sequential`` of Linear layers and elementwise activations (a leading Flatten is allowed)."""
    modules = dict(model.named_modules())
    if layers:
        linears = []
        for name in layers:
            if name not in modules:
                known = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
                raise OptionError("layers", f"'{','.join(layers)}': the model has no module '{name}' (its "
                                  f"Linear modules: {', '.join(known) or 'none'})")
            if not isinstance(modules[name], nn.Linear):
                raise OptionError("layers", f"'{','.join(layers)}': module '{name}' is "
                                  f"{type(modules[name]).__name__}, not Linear")
            linears.append((name, modules[name]))
        if len(set(layers)) != len(layers):
            raise OptionError("layers", f"'{','.join(layers)}': a module is named twice")
        return chain_from_linears(linears, params, None)
    if not isinstance(model, nn.Sequential):
        raise OptionError("layers", f"must name the chain of Linear layers (e.g. a,b,c): the model is a "
                          f"{type(model).__name__}, not an nn.Sequential MLP")
    linears: list[tuple[str, nn.Linear]] = []
    groups: list[str] = []
    acts: list[list[nn.Module]] = []
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            linears.append((name, child))
            acts.append([])
        elif isinstance(child, nn.Flatten) and not linears:
            continue
        elif isinstance(child, LINEAR_ACTIVATIONS + ODD_ACTIVATIONS + OTHER_ACTIVATIONS) or (
                isinstance(child, nn.PReLU) and child.num_parameters == 1):
            if not linears:
                raise OptionError("layers", f"must name the chain of Linear layers (e.g. a,b,c): module "
                                  f"'{name}' ({type(child).__name__}) comes before the first Linear layer, "
                                  "not a plain MLP")
            acts[-1].append(child)
        else:
            raise OptionError("layers", f"must name the chain of Linear layers (e.g. a,b,c): module '{name}' is "
                              f"{type(child).__name__}, not a Linear layer or an elementwise activation, not a "
                              "plain MLP")
    if not linears:
        raise CurvscopeError("the model has no Linear layers")
    hidden_acts = acts[:-1]
    if acts[-1]:
        raise OptionError("layers", f"must name the chain of Linear layers (e.g. a,b,c): the model ends with "
                          f"{type(acts[-1][0]).__name__} after its last Linear layer, and curvscope expects "
                          "raw outputs (logits)")
    for mods in hidden_acts:
        groups.append(_activation_group(mods))
    symmetry = max(groups, key=GROUP_ORDER.index) if groups else "orthogonal"
    names = ["+".join(type(m).__name__ for m in mods) or "Identity" for mods in hidden_acts]
    return chain_from_linears(linears, params, symmetry, names)


def _is_odd(m: nn.Module) -> bool:
    if isinstance(m, nn.Hardtanh) and not isinstance(m, nn.ReLU6):
        return m.min_val == -m.max_val
    return isinstance(m, LINEAR_ACTIVATIONS + ODD_ACTIVATIONS)


def _activation_group(mods: list[nn.Module]) -> str:
    """The largest group a composition of elementwise activations commutes with."""
    if all(isinstance(m, LINEAR_ACTIVATIONS) for m in mods):
        return "orthogonal"
    if all(_is_odd(m) for m in mods):
        return "signed-permutation"
    return "permutation"


def parse_layers(layers: str | Sequence[str] | None) -> list[str] | None:
    """``"1,3,5"`` or ``["1", "3", "5"]`` -> module names (``None``/empty: find the chain)."""
    if layers is None:
        return None
    if isinstance(layers, str):
        names = [s.strip() for s in layers.split(",")]
        if any(not s for s in names):
            raise OptionError("layers", f"'{layers}': expected module names separated by commas")
        return names or None
    return list(layers) or None
