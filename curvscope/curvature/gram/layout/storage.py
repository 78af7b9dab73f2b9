"""Where the Gram blocks live: the rows of every group's extended Gram that this process holds.

The extended Gram ``[V, G]^T [V, G]`` (``docs/conventions.md`` §2, §4) has rows and columns indexed by the
columns of V (``n * K + k``) and then by the per-sample gradients (``N_V * K + m``), see
:class:`~curvscope.curvature.memory.ColumnBlock`. A :class:`GramAccumulator` holds some of its rows per group
(all of them for a local layout, a rank's block rows for a sharded one: :mod:`.strategy`, :mod:`.sharded`) and
adds contracted blocks into them; :class:`GroupGram` is one group's blocks ``vv``, ``vg``, ``gg``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from curvscope.curvature.memory import ColumnBlock


@dataclass
class GroupGram:
    """Gram blocks of one parameter group (float64): ``vv = V_P^T V_P`` ``(N_V*K, N_V*K)``, ``vg = V_P^T G_P``
    ``(N_V*K, N)`` and ``gg = G_P^T G_P`` ``(N, N)``, or some of their rows (a :class:`GramAccumulator`'s)."""

    name: str
    param_names: tuple[str, ...]
    vv: Tensor
    vg: Tensor | None = None
    gg: Tensor | None = None


class GramAccumulator:
    """Rows of every group's extended Gram, and which groups own each parameter.

    Holds the rows ``[v_start, v_start + n_v)`` of ``vv`` and ``vg`` and ``[g_start, g_start + n_g)`` of ``gg``
    against every column (all rows for a local layout). Contributions are added block by block (:meth:`add`).

    Args:
        groups: ``(name, parameter names)`` pairs; num_v: V columns in all (``N_V * K``); num_g: gradient
            columns (N), or ``None`` for ``vv`` only.
        v_rows, g_rows: the ``(start, stop)`` rows held (default: all).
        symmetric: the layout contracts each pair of blocks once (``i <= j``): :meth:`add` also fills the
            mirror image of an off-diagonal block. ``False`` for block rows, which see every pair themselves.

    Attributes:
        rules: module name -> ``"ghost"`` or ``"materialize"`` for the layers a fast rule contributed (the
            other parameters' rows came from the generic path).
    """

    def __init__(self, groups: Sequence[tuple[str, Sequence[str]]], num_v: int, num_g: int | None,
                 device: torch.device, v_rows: tuple[int, int] | None = None,
                 g_rows: tuple[int, int] | None = None, symmetric: bool = True):
        self.num_v, self.symmetric = num_v, symmetric
        self.v_start, v_stop = (0, num_v) if v_rows is None else v_rows
        self.g_start, g_stop = (0, num_g or 0) if g_rows is None else g_rows
        self.groups = [zero_gram(name, names, num_v, num_g, device, v_stop - self.v_start, g_stop - self.g_start)
                       for name, names in groups]
        self.owners: dict[str, list[GroupGram]] = {}
        self.rules: dict[str, str] = {}
        for g in self.groups:
            for n in g.param_names:
                self.owners.setdefault(n, []).append(g)

    def wanted(self, name: str) -> bool:
        """Some group owns the parameter ``name`` (contributions of other parameters are not needed)."""
        return name in self.owners

    def owner_sets(self, names: Sequence[str]) -> list[tuple[list[GroupGram], list[str]]]:
        """``names`` grouped by the groups that own them: contributions within a set are summed before adding."""
        sets: dict[tuple[int, ...], tuple[list[GroupGram], list[str]]] = {}
        for n in names:
            owners = self.owners.get(n, [])
            sets.setdefault(tuple(id(g) for g in owners), (owners, []))[1].append(n)
        return [s for s in sets.values() if s[0]]

    def add(self, groups: Sequence[GroupGram], bi: ColumnBlock, bj: ColumnBlock, block: Tensor) -> None:
        """Add the Gram block ``(bi.num_columns, bj.num_columns)`` of the columns ``bi`` x ``bj`` to ``groups``
        (and its transpose at ``bj`` x ``bi`` when symmetric and ``bi is not bj``).

        Entries with a g row and a v column are the mirror images of ``vg`` entries and are skipped.
        """
        block = block.to(torch.float64)
        pairs = [(bi.index, bj.index, block)]
        if self.symmetric and bi is not bj:
            pairs.append((bj.index, bi.index, block.T))
        num_v = self.num_v
        for rows, cols, b in pairs:
            rv, cv = rows < num_v, cols < num_v
            parts = [("vv", rows[rv] - self.v_start, cols[cv], rv, cv)]
            if groups[0].vg is not None:
                parts += [("vg", rows[rv] - self.v_start, cols[~cv] - num_v, rv, ~cv),
                          ("gg", rows[~rv] - num_v - self.g_start, cols[~cv] - num_v, ~rv, ~cv)]
            for attr, ri, ci, rmask, cmask in parts:
                if not (ri.numel() and ci.numel()):
                    continue
                sub = b[rmask][:, cmask]
                rs, cs = _as_slice(ri), _as_slice(ci)
                for g in groups:
                    target = getattr(g, attr)
                    if rs is not None and cs is not None:
                        target[rs, cs] += sub
                    else:
                        target.index_put_((ri.unsqueeze(1), ci.unsqueeze(0)), sub, accumulate=True)


def zero_gram(name: str, param_names: Sequence[str], num_v: int, num_g: int | None, device: torch.device,
           v_rows: int, g_rows: int | None) -> GroupGram:
    """A zero :class:`GroupGram` with ``v_rows`` rows of ``vv``/``vg`` and ``g_rows`` of ``gg`` (no ``gg`` for
    ``None``; no ``vg``/``gg`` without gradient columns)."""

    def zeros(rows: int, cols: int) -> Tensor:
        return torch.zeros(rows, cols, dtype=torch.float64, device=device)

    return GroupGram(name, tuple(param_names), zeros(v_rows, num_v), None if num_g is None else zeros(v_rows, num_g),
                     None if num_g is None or g_rows is None else zeros(g_rows, num_g))


def _as_slice(index: Tensor) -> slice | None:
    """``index`` ``(r,)`` as a slice when it is a run of consecutive integers (the usual case), else None."""
    first, last = int(index[0]), int(index[-1])
    if last - first + 1 == index.numel() and bool((index.diff() == 1).all()):
        return slice(first, last + 1)
    return None
