"""Ensemble ground truth for the symmetry-structured factors (``docs/conventions.md §7.3``, Bernacchia Table 1).

M models (drawn from the initialization, or given, e.g. several training seeds) share the problem's batch. For
each, the full-batch gradient gives single-gradient factors R(g g^T); the ground truth is their average over
the M models, and each model's estimate is scored by the Pearson correlation of its flattened named factor
with the ground truth's (mean and std over models).

Models are batched: their parameters are stacked along a leading dimension and one ``torch.func.vmap`` over
``grad`` of the functional loss computes a chunk of gradients at once (for Linear layers: batched matrix
products), so that a thousand small MLPs take minutes on a CPU.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import grad

from curvscope.curvature.gram.rows import map_stacked
from curvscope.curvature.memory import format_bytes
from curvscope.curvature.symmetry.factors import Factors, single_gradient_factors
from curvscope.curvature.symmetry.groups import Structure
from curvscope.errors import CurvscopeError, OptionError, one_of
from curvscope.progress import Progress, counter
from curvscope.reprs import compact_repr

INITS = ("normal", "default")
CHUNK_BYTES = 256 * 2 ** 20
"""Memory budget for the activations of one vmapped chunk of models."""
FACTOR_BYTES = 4 * 2 ** 30
"""At most this much memory for the per-model factors kept until the ground truth is known."""


@dataclass
class EnsembleResult:
    """Ground truth and per-model correlations.

    Attributes:
        models: M.
        init: ``normal``, ``default`` or ``given`` (checkpoints).
        ground_truth: the average single-gradient factors ``(k_tau, k_tau)`` per component.
        example: model 0's factors (for plots beside the ground truth).
        correlation: named factor -> ``(M,)`` Pearson correlation of each model's factor with the ground truth
            (NaN for factors with fewer than two entries, or constant ones).
        losses: ``(M,)`` each model's batch loss.
    """

    __repr__ = compact_repr

    models: int
    init: str
    ground_truth: Factors
    example: Factors
    correlation: dict[str, Tensor]
    losses: Tensor

    def summary(self) -> dict[str, dict[str, float | None]]:
        """Named factor -> ``{"mean", "std"}`` of the correlation over models (``None`` when undefined)."""
        out = {}
        for name, r in self.correlation.items():
            r = r[torch.isfinite(r)]
            if r.numel() == 0:
                out[name] = {"mean": None, "std": None}
            else:
                std = float(r.std()) if r.numel() > 1 else 0.0
                out[name] = {"mean": float(r.mean()), "std": std}
        return out


def pearson(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of each row of ``x`` ``(M, n)`` with ``y`` ``(n,)``: ``(M,)`` (NaN when undefined)."""
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    if x.shape[-1] < 2:
        return torch.full(x.shape[:-1], math.nan, dtype=torch.float64)
    xc = x - x.mean(-1, keepdim=True)
    yc = y - y.mean()
    denom = xc.norm(dim=-1) * yc.norm()
    r = (xc @ yc) / denom
    return torch.where(denom > 0, r, torch.full_like(r, math.nan))


def member_seed(seed: int, index: int) -> int:
    """The RNG seed of ensemble member ``index`` (independent of chunking)."""
    return (int(seed) * 1_000_003 + int(index) + 1) % (2 ** 63 - 1)


class InitDrawer:
    """Draws ensemble members' parameters from the initialization distribution.

    ``normal``: every ``nn.Linear`` weight N(0, 1/fan_in), bias zero; ``default``: each module's
    ``reset_parameters``. Under ``normal``, other modules with parameters use ``reset_parameters`` too; parameters
    of modules without it keep the problem's values. Member ``i`` is reproducible from ``(seed, i)``.
    """

    def __init__(self, problem, init: str, seed: int = 0):
        one_of("init", init, INITS)
        self.problem, self.init, self.seed = problem, init, seed
        self.names = list(problem.params)
        self.model = copy.deepcopy(problem.model).to(torch.float64)
        self.owners: list[tuple[str, nn.Module]] = [
            (name, m) for name, m in self.model.named_modules() if any(True for _ in m.parameters(recurse=False))]

    def draw(self, index: int) -> dict[str, Tensor]:
        """Parameters of member ``index``, keyed like ``problem.params``."""
        s = member_seed(self.seed, index)
        gen = torch.Generator().manual_seed(s)
        values: dict[str, Tensor] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            for name, m in self.owners:
                prefix = f"{name}." if name else ""
                if self.init == "normal" and isinstance(m, nn.Linear):
                    values[prefix + "weight"] = torch.randn(m.weight.shape, generator=gen, dtype=torch.float64
                                                            ) / math.sqrt(m.in_features)
                    if m.bias is not None:
                        values[prefix + "bias"] = torch.zeros(m.bias.shape, dtype=torch.float64)
                elif hasattr(m, "reset_parameters"):
                    with torch.no_grad():
                        m.reset_parameters()
                    for pn, p in m.named_parameters(recurse=False):
                        values[prefix + pn] = p.detach().clone()
        p = self.problem
        return {n: values.get(n, p.params[n]).to(device=p.device, dtype=p.dtype) for n in self.names}


def stack_members(members: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Parameter dicts -> one dict of stacked tensors ``(M, *shape)``."""
    return {n: torch.stack([m[n] for m in members]) for n in members[0]}


def ensemble_gradients(problem, stacked: dict[str, Tensor], names: Sequence[str]) -> tuple[dict[str, Tensor], Tensor]:
    """Full-batch gradients of a stack of models, for parameters ``names``: name -> ``(K, *shape)``, and the
    ``(K,)`` losses. One ``vmap`` over ``grad`` of the functional loss (a loop over the models where ``vmap``
    cannot trace the model)."""
    chosen = {n: stacked[n] for n in names}
    others = {n: v for n, v in stacked.items() if n not in chosen}

    def loss(p: dict[str, Tensor], o: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        out = problem.call({**problem.buffers, **o, **p}, problem.inputs)
        value = problem.loss(out, problem.targets)
        return value, value.detach()

    grads, values = map_stacked(problem, lambda po: grad(loss, has_aux=True)(*po), (chosen, others))
    return grads, values


def auto_chunk(problem, structure: Structure, models: int) -> int:
    """Models per vmapped chunk: activations of about ``CHUNK_BYTES``, between 1 and 64."""
    width = sum(structure.chain.widths)
    per_model = problem.batch_size * width * (torch.finfo(problem.dtype).bits // 8) * 6
    return int(max(1, min(64, models, CHUNK_BYTES // max(per_model, 1))))


def ensemble_factors(problem, structure: Structure, models: int = 0, init: str = "normal",
                     members: Sequence[dict[str, Tensor]] | None = None, seed: int = 0, chunk: int = 0,
                     progress: Progress | None = None) -> EnsembleResult:
    """Ground truth factors over an ensemble and each member's correlation with it.

    Args:
        problem: the :class:`~curvscope.problem.Problem`: the model, batch and loss every member is evaluated on.
        structure: the chain and symmetry (from :func:`~curvscope.curvature.symmetry.groups.build_structure`).
        models: M models drawn from the initialization ``init``, seeded by ``seed`` (unless ``members`` is given).
        init: ``normal`` (Linear weights N(0, 1/fan_in), biases zero) or ``default`` (each module's
            ``reset_parameters``); see :class:`InitDrawer`.
        members: the members' parameter dicts (keyed like ``problem.params``), e.g. loaded checkpoints, instead of
            drawn models.
        seed: seeds the drawn members (member ``i`` is reproducible from ``(seed, i)``).
        chunk: models per vmapped chunk (0: automatic).
        progress: reports stage ``"ensemble"`` (models done of M).
    """
    if members is not None:
        M, label = len(members), "given"
        if M < 2:
            raise CurvscopeError(f"an ensemble needs at least 2 models, got {M}")
        draw = None
    else:
        M, label = int(models), init
        if M < 2:
            raise OptionError("ensemble", f"needs at least 2 models, got {M}")
        draw = InitDrawer(problem, init, seed)
    itemsize = torch.finfo(problem.dtype).bits // 8
    per_model = sum(c.size ** 2 for c in structure.components) * itemsize
    if per_model * M > FACTOR_BYTES:
        raise OptionError("ensemble", f"{M}: the per-model factors would take {format_bytes(per_model * M)}; "
                          "use fewer models or a smaller chain")
    K = chunk if chunk and chunk > 0 else auto_chunk(problem, structure, M)
    names = structure.chain.param_names
    mats: list[list[Tensor]] = [[] for _ in structure.components]
    losses = []
    advance = counter(progress, "ensemble", M)
    for start in range(0, M, K):
        stop = min(start + K, M)
        batch = [draw.draw(i) for i in range(start, stop)] if draw else list(members[start:stop])
        stacked = stack_members(batch)
        grads, values = ensemble_gradients(problem, stacked, names)
        f = single_gradient_factors(structure, grads)
        for c, C in enumerate(f.matrices):
            mats[c].append(C.detach())
        losses.append(values.detach())
        advance(stop - start)
    all_mats = tuple(torch.cat(m) for m in mats)
    everyone = Factors(structure, all_mats)
    truth = Factors(structure, tuple(C.mean(0) for C in all_mats))
    per_model_blocks = everyone.blocks()
    truth_blocks = truth.blocks()
    correlation = {name: pearson(per_model_blocks[name].reshape(M, -1), truth_blocks[name].reshape(-1))
                   for name in truth_blocks}
    example = Factors(structure, tuple(C[0] for C in all_mats))
    return EnsembleResult(M, label, truth, example, correlation, torch.cat(losses))
