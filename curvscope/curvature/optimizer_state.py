"""What a ``torch.optim`` state dict says about the optimizer (``docs/conventions.md`` §10).

:func:`optimizer_info` reads the kind (SGD, Adam, AdamW), the hyperparameters of every param group (the ``lr``
in force, which holds any scheduler's effect) and which optimizer entry belongs to which of the model's
parameters. A state dict names parameters by integer ids, numbered through the param groups in order; they are
matched to the model's parameter names in ``named_parameters()`` order and checked against the shapes of the
per-parameter state (``momentum_buffer``, ``exp_avg``, ...). When several param groups list the parameters in
another order (Hugging Face's ``Trainer`` puts every decayed parameter first, then the rest), the one matching
that keeps each group's own order and agrees with every known shape is used; none, or more than one, is an
error naming the first parameter whose shape does not match.

Pure functions on dicts of tensors: no files, no printing. Thresholds and the preconditioner are in
:mod:`curvscope.curvature.edge`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvscope.errors import CurvscopeError, OptionError

OPTIMIZER_KINDS = ("sgd", "adam", "adamw")
ADAM_KINDS = ("adam", "adamw")
STATE_TENSORS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
"""Per-parameter state entries that have the parameter's shape (used to check the matching)."""
MATCH_BUDGET = 200_000
"""Partial matchings explored before a reordered matching is given up (the error of the plain one is raised)."""
_SHARED = ("momentum", "dampening", "nesterov", "betas", "eps", "amsgrad", "maximize", "weight_decay")


@dataclass(frozen=True)
class OptimizerGroup:
    """One param group: its hyperparameters and the model parameters it holds.

    Attributes:
        lr: the learning rate in force (a scheduler writes it here).
        momentum, dampening, nesterov: SGD's (0, 0, False for Adam).
        weight_decay: the group's ``weight_decay``.
        decoupled: the decay is decoupled (AdamW's), not added to the gradient.
        betas, eps, amsgrad: Adam's (``None``, ``None``, False for SGD).
        maximize: the optimizer ascends.
        params: the names of the model parameters in the group, in the group's order.
    """

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    decoupled: bool = False
    betas: tuple[float, float] | None = None
    eps: float | None = None
    amsgrad: bool = False
    maximize: bool = False
    params: tuple[str, ...] = ()


@dataclass(frozen=True)
class OptimizerInfo:
    """The optimizer of a checkpoint (or as given by hand), as far as the stability threshold needs it.

    Build it with :func:`optimizer_info` from a state dict, or directly (``OptimizerInfo("sgd", lr=0.1,
    momentum=0.9)``) where there is none: then every parameter is in one group with these values.

    Attributes:
        kind: ``"sgd"``, ``"adam"``, ``"adamw"``, or ``None`` (not recognized: no threshold).
        lr: the learning rate: that of every group, the largest one when the groups differ (the reference
            rate of §10's multi-group convention, see :func:`curvscope.curvature.edge.threshold`).
        momentum, dampening, nesterov, weight_decay, betas, eps, amsgrad, maximize: the groups' common values
            (where groups differ: the first group's, the largest ``weight_decay``; the field is in
            ``differing``).
        group_lrs: every group's ``lr``, in group order, when they differ; else ``None``.
        groups: the param groups (empty when built by hand).
        param_ids: model parameter name -> the optimizer's integer id (its key in ``state``).
        differing: the fields whose value differs between groups.
        notes: what the reading assumed or could not tell.
    """

    kind: str | None
    lr: float | None
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] | None = None
    eps: float | None = None
    amsgrad: bool = False
    maximize: bool = False
    group_lrs: tuple[float, ...] | None = None
    groups: tuple[OptimizerGroup, ...] = ()
    param_ids: Mapping[str, int] = field(default_factory=dict)
    differing: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in OPTIMIZER_KINDS:
            raise OptionError("kind", f"'{self.kind}': choose one of {', '.join(OPTIMIZER_KINDS)}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr >= 0):
            raise OptionError("lr", f"must be a finite number >= 0, got {self.lr}")
        if not (math.isfinite(self.momentum) and self.momentum >= 0):
            raise OptionError("momentum", f"must be a finite number >= 0, got {self.momentum}")
        if not 0 <= self.dampening <= 1:
            raise OptionError("dampening", f"must be in [0, 1], got {self.dampening}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise OptionError("weight_decay", f"must be a finite number >= 0, got {self.weight_decay}")
        if self.betas is not None and (len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas)):
            raise OptionError("betas", f"must be two numbers in [0, 1), got {self.betas}")
        if self.kind in ADAM_KINDS and self.betas is None:
            raise OptionError("betas", f"are needed for {self.kind}")

    def all_groups(self) -> tuple[OptimizerGroup, ...]:
        """The param groups; built by hand: one group of the top-level values (holding every parameter)."""
        if self.groups:
            return self.groups
        return (OptimizerGroup(lr=0.0 if self.lr is None else self.lr, momentum=self.momentum,
                               dampening=self.dampening, nesterov=self.nesterov, weight_decay=self.weight_decay,
                               decoupled=self.kind == "adamw", betas=self.betas, eps=self.eps,
                               amsgrad=self.amsgrad, maximize=self.maximize),)

    def group_of(self, name: str) -> OptimizerGroup:
        """The group that holds parameter ``name`` (built by hand: the one group)."""
        groups = self.all_groups()
        if not self.groups:
            return groups[0]
        for group in groups:
            if name in group.params:
                return group
        raise CurvscopeError(f"parameter '{name}' is in none of the optimizer's param groups")


def optimizer_info(optimizer_state: Mapping[str, Any], param_names: Sequence[str],
                   param_shapes: Mapping[str, torch.Size | Sequence[int]], kind_hint: str | None = None
                   ) -> OptimizerInfo:
    """Read a ``torch.optim`` ``state_dict()``: kind, each group's hyperparameters, parameter matching.

    Args:
        optimizer_state: ``{"state": {id: {...}}, "param_groups": [{"lr": ..., "params": [ids]}, ...]}``.
        param_names: the model's trainable parameters in ``named_parameters()`` order.
        param_shapes: the shape of each of them.
        kind_hint: ``"sgd"``, ``"adam"`` or ``"adamw"`` when known (tells Adam from AdamW in a state without
            ``decoupled_weight_decay``); it must agree with what the state shows.

    Returns:
        :class:`OptimizerInfo`.

    Raises:
        CurvscopeError: not an optimizer state dict; the hint contradicts it; the parameters do not match the
            model (count, or a shape: the message names the parameter and both shapes).
    """
    if kind_hint is not None and kind_hint not in OPTIMIZER_KINDS:
        raise OptionError("kind_hint", f"'{kind_hint}': choose one of {', '.join(OPTIMIZER_KINDS)}")
    raw_groups, state = _parts(optimizer_state)
    kind, notes = _kind(raw_groups, kind_hint)
    ids = [[_int_id(i) for i in g["params"]] for g in raw_groups]
    shapes = {n: tuple(param_shapes[n]) for n in param_names}
    mapping, note = match_parameters(ids, state, list(param_names), shapes)
    if note:
        notes.append(note)
    name_of = {i: n for n, i in mapping.items()}
    groups = tuple(_group(g, kind, tuple(name_of[i] for i in group_ids))
                   for g, group_ids in zip(raw_groups, ids, strict=True))
    used = [g for g in groups if g.params] or list(groups)
    differing = tuple(f for f in ("lr", *_SHARED) if len({getattr(g, f) for g in used}) > 1)
    lrs = tuple(g.lr for g in groups)
    first = used[0]
    if kind == "adam" and any(g.decoupled for g in used):
        notes.append("param groups mix coupled and decoupled weight decay: each group's own is used")
    return OptimizerInfo(
        kind=kind, lr=max(g.lr for g in used), momentum=first.momentum, dampening=first.dampening,
        nesterov=first.nesterov, weight_decay=max(g.weight_decay for g in used), betas=first.betas,
        eps=first.eps, amsgrad=first.amsgrad, maximize=first.maximize,
        group_lrs=lrs if "lr" in differing else None, groups=groups, param_ids=mapping, differing=differing,
        notes=tuple(notes))


def optimizer_tensors(optimizer_state: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """The per-parameter ``state`` of an optimizer state dict, keyed by integer id."""
    return _parts(optimizer_state)[1]


def _parts(optimizer_state: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    if not isinstance(optimizer_state, Mapping) or "param_groups" not in optimizer_state:
        raise CurvscopeError("optimizer state is not a torch.optim state_dict() (no 'param_groups')")
    groups = optimizer_state["param_groups"]
    if not isinstance(groups, Sequence) or not groups or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), Sequence) for g in groups):
        raise CurvscopeError("optimizer state: 'param_groups' must be a non-empty list of groups with 'params'")
    for g in groups:
        if "lr" not in g:
            raise CurvscopeError("optimizer state: a param group has no 'lr'")
    state = optimizer_state.get("state") or {}
    if not isinstance(state, Mapping):
        raise CurvscopeError("optimizer state: 'state' must be a dict keyed by parameter id")
    out = {}
    for key, entry in state.items():
        if not isinstance(entry, Mapping):
            raise CurvscopeError(f"optimizer state: the state of parameter {key} is not a dict")
        out[_int_id(key)] = dict(entry)
    return [dict(g) for g in groups], out


def _int_id(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CurvscopeError(f"optimizer state: parameter id {value!r} is not an integer") from None


def _number(group: Mapping[str, Any], key: str, default: float) -> float:
    value = group.get(key, default)
    if isinstance(value, Tensor):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CurvscopeError(f"optimizer state: param group '{key}' is {value!r}, not a finite number")
    return float(value)


def _group(g: Mapping[str, Any], kind: str | None, names: tuple[str, ...]) -> OptimizerGroup:
    betas = g.get("betas")
    if betas is not None:
        if not isinstance(betas, Sequence) or len(betas) != 2:
            raise CurvscopeError(f"optimizer state: param group 'betas' is {betas!r}, not two numbers")
        betas = (_number({"b": betas[0]}, "b", 0), _number({"b": betas[1]}, "b", 0))
    decoupled = bool(g.get("decoupled_weight_decay", kind == "adamw"))
    return OptimizerGroup(
        lr=_number(g, "lr", 0.0), momentum=_number(g, "momentum", 0.0), dampening=_number(g, "dampening", 0.0),
        nesterov=bool(g.get("nesterov", False)), weight_decay=_number(g, "weight_decay", 0.0),
        decoupled=decoupled and kind in ADAM_KINDS, betas=betas,
        eps=_number(g, "eps", 0.0) if "eps" in g else None, amsgrad=bool(g.get("amsgrad", False)),
        maximize=bool(g.get("maximize", False)), params=names)


def _kind(groups: list[dict[str, Any]], hint: str | None) -> tuple[str | None, list[str]]:
    """SGD's groups have momentum, dampening and nesterov; Adam's and AdamW's have betas and amsgrad (NAdam,
    RAdam, Adamax and RMSprop have neither set and are not recognized)."""
    keys = set().union(*(g.keys() for g in groups)) - {"params"}
    family = "adam" if {"betas", "amsgrad"} <= keys else "sgd" if {"momentum", "dampening", "nesterov"} <= keys \
        else None
    notes: list[str] = []
    if family is None:
        if hint is None:
            return None, [f"optimizer not recognized from its param groups ({', '.join(sorted(keys))}): "
                          "thresholds are defined for SGD, Adam and AdamW only"]
        family = "adam" if hint in ADAM_KINDS else "sgd"
        if family == "adam" and "betas" not in keys:
            raise CurvscopeError(f"optimizer state has no 'betas', so it cannot be {hint}'s")
        notes.append(f"optimizer taken as {hint}, as told; its param groups are not torch.optim's")
    elif hint is not None and (hint in ADAM_KINDS) != (family == "adam"):
        raise CurvscopeError(f"optimizer state is {'Adam' if family == 'adam' else 'SGD'}'s (param groups with "
                             f"{'betas' if family == 'adam' else 'momentum'}), not {hint}'s")
    if family == "sgd":
        return "sgd", notes
    flags = {bool(g["decoupled_weight_decay"]) for g in groups if "decoupled_weight_decay" in g}
    if flags:
        kind = "adamw" if flags == {True} else "adam"
        if hint is not None and hint != kind and len(flags) == 1:
            raise CurvscopeError(f"optimizer state has decoupled_weight_decay={str(flags == {True})}, so it is "
                                 f"{kind}'s, not {hint}'s")
        return kind, notes
    if hint is None and any(_number(g, "weight_decay", 0.0) > 0 for g in groups):
        notes.append("Adam and AdamW cannot be told apart in this state (no decoupled_weight_decay): taken as "
                     "Adam, whose weight decay is coupled")
    return hint or "adam", notes


def state_shape(entry: Mapping[str, Any] | None) -> tuple[int, ...] | None:
    """The parameter's shape as its optimizer state shows it, or ``None`` (no state tensor yet)."""
    for key in STATE_TENSORS:
        value = (entry or {}).get(key)
        if isinstance(value, Tensor):
            return tuple(value.shape)
    return None


def match_parameters(ids: list[list[int]], state: Mapping[int, Mapping[str, Any]], names: list[str],
                     shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, int], str | None]:
    """Model parameter name -> optimizer id, and a note when the groups list them out of order.

    First the ids in group order against ``names`` in order; when a known shape disagrees and there are
    several groups, the unique order-keeping interleaving of the groups that agrees with every known shape.

    Raises:
        CurvscopeError: the counts differ, an id repeats, or no unique matching agrees with the shapes.
    """
    flat = [i for group in ids for i in group]
    if len(flat) != len(names):
        raise CurvscopeError(f"optimizer state does not match the model: it holds {len(flat)} parameters, the "
                             f"model has {len(names)} trainable parameters")
    if len(set(flat)) != len(flat):
        raise CurvscopeError("optimizer state lists a parameter id twice in its param groups")
    known = {i: state_shape(state.get(i)) for i in flat}
    mismatch = next(((k, n, i) for k, (n, i) in enumerate(zip(names, flat, strict=True))
                     if known[i] is not None and known[i] != tuple(shapes[n])), None)
    if mismatch is None:
        return dict(zip(names, flat, strict=True)), None
    reordered, why = _interleave(ids, known, names, shapes) if len(ids) > 1 else (None, "")
    if reordered is not None:
        return reordered, ("the param groups list the parameters out of named_parameters() order: matched by "
                           "shape, keeping each group's order")
    k, name, i = mismatch
    raise CurvscopeError(f"optimizer state does not match the model: parameter '{name}' has shape "
                         f"{tuple(shapes[name])}, but the optimizer's parameter {k} (id {i}) has state of shape "
                         f"{known[i]}{why}")


def _interleave(ids: list[list[int]], known: Mapping[int, tuple[int, ...] | None], names: list[str],
                shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, int] | None, str]:
    """The unique assignment of ``names`` (in order) to the groups, each group taking its ids in order, that
    agrees with every known shape; ``(None, why)`` when there is none or several."""
    start = (0,) * len(ids)
    layers: list[dict[tuple[int, ...], tuple[int, tuple[int, ...], int]]] = []
    layer = {start: (1, start, -1)}
    explored = 0
    for name in names:
        want = tuple(shapes[name])
        nxt: dict[tuple[int, ...], tuple[int, tuple[int, ...], int]] = {}
        for pointers, (count, _, _) in layer.items():
            for g, p in enumerate(pointers):
                if p == len(ids[g]) or known[ids[g][p]] not in (None, want):
                    continue
                new = pointers[:g] + (p + 1,) + pointers[g + 1:]
                old = nxt.get(new)
                nxt[new] = (count, pointers, g) if old is None else (min(2, old[0] + count), old[1], old[2])
                explored += 1
        if not nxt or explored > MATCH_BUDGET:
            return None, ""
        layers.append(nxt)
        layer = nxt
    end = tuple(len(group) for group in ids)
    if end not in layer:
        return None, ""
    if layer[end][0] > 1:
        return None, " (reordering the param groups by shape is ambiguous)"
    mapping, pointers = {}, end
    for k in range(len(names) - 1, -1, -1):
        _, previous, g = layers[k][pointers]
        mapping[names[k]] = ids[g][previous[g]]
        pointers = previous
    return mapping, ""
