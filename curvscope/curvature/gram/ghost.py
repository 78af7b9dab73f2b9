"""Fast per-layer Gram rules ("ghost" products) for nn.Linear, nn.Conv1d/2d, Hugging Face's Conv1D and
nn.Embedding (``docs/conventions.md`` §3).

A layer ``y = W a + b`` applied at T positions of a sample (T = 1 for a plain Linear, the flattened leading
dims for sequences, the output pixels for a convolution through its unfolded patches) has, for column
``(n, c)`` of V, the weight rows ``v_nc = sum_t delta_nct a_nt^T`` and the bias rows ``sum_t delta_nct``,
where ``a_nt`` ``(d_in,)`` is the layer's input at position t and ``delta_nct`` ``(d_out,)`` the output
gradient backpropagated from seed c of sample n. Hence, without per-sample gradients,

    G~[(n,c),(m,d)] += sum_{t,s} (a_nt . a_ms)(delta_nct . delta_md,s)    (weight, "ghost" mode)
                     + (sum_t delta_nct) . (sum_s delta_mds)              (bias)

or, when T is large, ``v_nc`` is materialized (``(d_out, d_in)`` per column) and contracted ("materialize"
mode); each layer takes the cheaper (:func:`choose_mode`). All deltas of all such layers come from one batched
backward: a zero "probe" is added to every layer's output (a forward hook inside ``functional_call``), the
batched forward is differentiated w.r.t. the probes with ``vjp``, and the pullback is ``vmap``-ed over the
seeds (samples are independent, so the cotangent whose row n is ``seeds[n, c]`` gives ``delta_nc`` for every
n at once); without ``vmap`` (a model it cannot trace) the same products come from plain autograd
(``rows.batched_vjp``). Gradient seeds are just extra columns.

A layer is only taken when the rule is provably its gradient: its parameters are not shared, it is called
exactly once per forward with the batch as its first dimension, and a check on two samples compares the rule
with autograd's per-sample gradient (catches weights used outside the layer, non-batch-first layouts, hooks
that change the output). Anything else is left to the generic path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvscope.curvature.gram.columns import Columns
from curvscope.curvature.gram.layout import GramAccumulator, Layout
from curvscope.curvature.gram.rows import batch_with_partner, batched_vjp, is_fatal
from curvscope.curvature.memory import ColumnBlock, MemoryPlan

MODES = ("ghost", "materialize")


@dataclass
class GhostLayer:
    """A Linear or Conv layer handled by the fast rule.

    Attributes:
        module_name: its name in ``model.named_modules()``; weight, bias: the parameter names handled
            (or None).
        positions: T; d_in: input features per position (``C_in * prod(kernel)`` for a convolution); d_out.
        out_shape: the layer's output shape for one sample (for the probe).
        mode: ``ghost`` (products of inputs and deltas) or ``materialize`` (per-column weight rows).
        transposed: the weight is stored ``(d_in, d_out)`` (Hugging Face's ``Conv1D``, ``y = x W + b``). The
            Gram does not depend on the order of a weight's entries; only the per-sample check transposes.
    """

    module_name: str
    module: nn.Module
    weight: str | None
    bias: str | None
    transposed: bool = False
    positions: int = 0
    d_in: int = 0
    d_out: int = 0
    out_shape: tuple[int, ...] = ()
    mode: str = "materialize"
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.names = tuple(n for n in (self.weight, self.bias) if n is not None)

    @property
    def is_conv(self) -> bool:
        """The layer is a convolution (``nn.Conv1d``/``nn.Conv2d``), not a Linear."""
        return isinstance(self.module, nn.Conv1d | nn.Conv2d)

    @property
    def is_embedding(self) -> bool:
        """The layer is an ``nn.Embedding``: a Linear without bias on one-hot token inputs, ``d_in`` = the
        vocabulary; its input products ``a_nt . a_ms`` are ``[x_nt == x_ms]`` (no one-hot is ever built)."""
        return isinstance(self.module, nn.Embedding)

    @property
    def ghost_width(self) -> int:
        """Numbers per input position the ghost products hold and multiply: ``d_in``, or 1 for an embedding
        (a token id stands for its one-hot row)."""
        return 1 if self.is_embedding else self.d_in

    def tokens_of_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """An embedding's input ``(b, ...)`` -> token ids ``(b, T)`` and the mask of those that get a gradient
        (all but ``padding_idx``)."""
        ids = x.reshape(x.shape[0], -1)
        pad = self.module.padding_idx
        return ids, (ids != pad) if pad is not None else torch.ones_like(ids, dtype=torch.bool)

    def positions_of_input(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Layer input ``(b, ...)`` -> ``a`` ``(b, T, d_in)`` (unfolded patches for a convolution; one-hot rows
        in ``dtype`` for an embedding, for its materialized mode only)."""
        if self.is_embedding:
            ids, valid = self.tokens_of_input(x)
            onehot = F.one_hot(ids, self.module.num_embeddings).to(dtype or torch.get_default_dtype())
            return onehot * valid.unsqueeze(-1).to(onehot.dtype)
        if not self.is_conv:
            return x.reshape(x.shape[0], -1, x.shape[-1])
        m = self.module
        conv1d = isinstance(m, nn.Conv1d)
        if conv1d:
            x = x.unsqueeze(2)
        kernel, stride, dilation = ((1, *m.kernel_size), (1, *m.stride), (1, *m.dilation)) if conv1d else (
            m.kernel_size, m.stride, m.dilation)
        if isinstance(m.padding, str):
            padding = (0, 0)
            if m.padding == "same":  # as ATen: the odd extra element goes to the end
                pads = []
                for k, d in zip(reversed(kernel), reversed(dilation), strict=True):
                    total = d * (k - 1)
                    pads += [total // 2, total - total // 2]
                x = F.pad(x, pads)
        else:
            padding = (0, *m.padding) if conv1d else m.padding
        patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (b, d_in, T)
        return patches.transpose(1, 2)

    def positions_of_output(self, y: Tensor, lead: int) -> Tensor:
        """Output-shaped ``(*lead_dims, ...)`` with ``lead`` leading dims -> ``(*lead_dims, T, d_out)``."""
        if self.is_conv:
            return y.reshape(*y.shape[:lead + 1], -1).transpose(-1, -2)
        return y.reshape(*y.shape[:lead], -1, y.shape[-1])


# -- finding the layers ----------------------------------------------------------------------------------

def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's projections): a Linear whose weight is stored ``(in, out)``. Known by
    name and shape, not imported (transformers is optional); the per-sample check confirms the rule."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1])


def candidate_layers(problem, names: Sequence[str]) -> list[GhostLayer]:
    """Linear / Conv1d / Conv2d (zeros padding, groups 1), Hugging Face ``Conv1D`` and Embedding (no max_norm, no
    scale_grad_by_freq, not sparse) modules owning wanted, unshared parameters."""
    wanted = set(names)
    uses = Counter(id(p) for _n, p in problem.model.named_parameters(remove_duplicate=False))
    layers = []
    for mname, m in problem.model.named_modules():
        transposed = is_hf_conv1d(m)
        if isinstance(m, nn.Conv1d | nn.Conv2d):
            if m.groups != 1 or m.padding_mode != "zeros":
                continue
        elif isinstance(m, nn.Embedding):
            if m.max_norm is not None or m.scale_grad_by_freq or m.sparse:  # weights renormalized in the forward,
                continue  # or gradients that depend on the whole batch: generic path
        elif not isinstance(m, nn.Linear) and not transposed:
            continue
        if any(uses[id(p)] > 1 for p in m.parameters(recurse=False)):
            continue
        prefix = f"{mname}." if mname else ""
        weight, bias = (n if n in wanted and n in problem.params else None
                        for n in (prefix + "weight", prefix + "bias"))
        if weight or bias:
            layers.append(GhostLayer(mname, m, weight, bias, transposed=transposed))
    return layers


def _forward(problem, layers: Sequence[GhostLayer], inputs: Tensor, params: dict[str, Tensor],
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


def _forward_probed(problem, layers: Sequence[GhostLayer], inputs: Tensor, tensors: dict[str, Tensor]
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`_forward` with parameters and probes in one dict (probes named ``PROBE + module name``)."""
    params = {n: t for n, t in tensors.items() if not n.startswith(PROBE)}
    probes = {n[len(PROBE):]: t for n, t in tensors.items() if n.startswith(PROBE)}
    return _forward(problem, layers, inputs, params, probes)


def _structure(problem, layers: list[GhostLayer], inputs: Tensor) -> list[GhostLayer]:
    """Keep the layers called exactly once, batch-first, with a tensor input; fill in T, d_in, d_out."""
    b = inputs.shape[0]
    record: dict[str, list] = {layer.module_name: [] for layer in layers}
    with torch.no_grad():
        _forward(problem, layers, inputs, {}, None, record)
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
        if layer.is_embedding:
            if x.is_floating_point() or x.is_complex() or out.shape != (*x.shape, layer.module.embedding_dim):
                continue
            layer.positions = x[0].numel()
            layer.d_in, layer.d_out = layer.module.num_embeddings, layer.module.embedding_dim
            layer.out_shape = tuple(out.shape[1:])
            kept.append(layer)
            continue
        if not x.is_floating_point():
            continue
        if layer.is_conv and x.dim() != (3 if isinstance(layer.module, nn.Conv1d) else 4):
            continue
        if not layer.is_conv and (x.dim() < 2 or out.shape[:-1] != x.shape[:-1]):
            continue
        a = layer.positions_of_input(x)
        d = layer.positions_of_output(out, 1)
        if a.shape[1] != d.shape[1]:
            continue
        layer.positions, layer.d_in, layer.d_out = a.shape[1], a.shape[2], d.shape[2]
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
    vjps, captured = batched_vjp(problem, lambda pq: _forward_probed(problem, layers, inputs, pq),
                                 {**params, **probes}, cot.to(problem.device), few=True)  # a sample's each
    grads = {n: vjps[n] for n in params}
    deltas = {layer.module_name: vjps[PROBE + layer.module_name] for layer in layers}
    tol = 10 * torch.finfo(problem.dtype).eps ** 0.5
    kept = []
    for layer in layers:
        d = layer.positions_of_output(deltas[layer.module_name], 2).diagonal(dim1=0, dim2=1)
        d = d.movedim(-1, 0)  # (b, T, d_out): sample n's delta from cotangent n
        if layer.is_embedding:  # row x_nt of sample n's gradient gets delta_nt (a scatter, no one-hot)
            ids, valid = layer.tokens_of_input(captured[layer.module_name])
            weight = torch.zeros(b, layer.d_in, layer.d_out, dtype=d.dtype, device=d.device).scatter_add_(
                1, ids.unsqueeze(-1).expand(*ids.shape, layer.d_out), d * valid.unsqueeze(-1).to(d.dtype))
        else:
            a = layer.positions_of_input(captured[layer.module_name].detach())  # (b, T, d_in)
            weight = torch.einsum("bto,bti->bio" if layer.transposed else "bto,bti->boi", d, a)
        rules = {layer.weight: weight, layer.bias: d.sum(1)}
        ok = True
        for name in layer.names:
            true = grads[name].reshape(b, -1)
            err = (rules[name].reshape(b, -1) - true).norm()
            ok = ok and bool(err <= tol * (true.norm() + torch.finfo(problem.dtype).tiny))
        if ok:
            kept.append(layer)
    return kept


# -- cost model -------------------------------------------------------------------------------------------

# Multiply-adds of the T > 1 ghost contractions (one matmul of the inputs, then two batched matmuls) run this many
# times slower than those of the one large matrix product of the materialized mode. Measured on CPU, float32:
# 1.2x to 3.9x on one thread (N = 8..32, T = 2..32, k = 8..20, d = 64..256), about 6.6x on two threads (d = 128,
# T = 16, N = 16, k = 16: 12 against 80 GMAC/s). At 8, `python -m benchmarks.sequence_ghost` keeps the ghost mode
# where it wins (d = 256 or 512, T = 8: 2-3.5x faster than the generic path) and leaves d = 128, T = 16 to the
# generic path (penalty 4 took the ghost mode there: 1.7x slower). The einsum form it replaced needed 20.
GHOST_BMM_PENALTY = 8


def choose_mode(layer: GhostLayer, num_samples: int, num_columns: int, plan: MemoryPlan, element_size: int
                ) -> str:
    """``ghost`` or ``materialize`` for one layer, by multiply-adds and memory (``docs/conventions.md`` §3).

    With N samples, P = total columns, k = P / N columns per sample: materialize costs
    ``P T d_in d_out + P^2 d_in d_out``; ghost ``N^2 d_in + P^2 d_out`` for T = 1, else
    ``N^2 T^2 d_in + N P T^2 d_out + P^2 T d_out`` (``a a^T`` first, then one side's deltas, then the
    other's), weighted by ``GHOST_BMM_PENALTY``: T > 1 takes the ghost mode for wide layers and short
    sequences, as section 3's ``T^2 < d_in d_out / (d_in + d_out)`` says (a transformer's projections). A
    mode whose kept factors do not fit the budget while the other's do yields to the other (wide layers with
    long sequences: ghost). An embedding is a Linear on one-hot inputs (``d_in`` = the vocabulary) whose input
    products are comparisons of token ids: its ghost terms count ``d_in`` as 1, so a large vocabulary takes the
    ghost mode and a small one materializes (then, with the other layers, often the generic path).
    """
    N, P, T, di, do = num_samples, num_columns, layer.positions, layer.d_in, layer.d_out
    gi = layer.ghost_width
    materialize = P * T * di * do + P * P * di * do
    ghost = (N * N * gi + P * P * do if T == 1
             else GHOST_BMM_PENALTY * (N * N * T * T * gi + N * P * T * T * do + P * P * T * do))
    mode = "ghost" if ghost < materialize else "materialize"
    fits = {"materialize": P * di * do * element_size <= plan.limit,
            "ghost": (P * T * do + N * T * gi) * element_size <= plan.limit}
    other = "materialize" if mode == "ghost" else "ghost"
    return other if not fits[mode] and fits[other] else mode


def select_layers(problem, names: Sequence[str], columns: Columns, grad_seeds: Tensor | None,
                  plan: MemoryPlan, force_mode: str | None = None) -> list[GhostLayer]:
    """The layers the fast rule handles for parameters ``names``, each with its mode."""
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
    # the check holds each probe sample's weight gradient twice (autograd's and the rule's): a layer whose copies
    # would not fit the budget (a 250k-token embedding) is left to the generic path, which chunks it
    layers = [layer for layer in layers
              if 2 * inputs.shape[0] * layer.d_in * layer.d_out * elt <= plan.limit]
    for layer in layers:
        layer.mode = force_mode or choose_mode(layer, num_samples, num_columns, plan, elt)
    if force_mode is None and not any(layer.mode == "ghost" for layer in layers) and (
            set(names) - {n for layer in layers for n in layer.names}):
        # every layer would materialize its rows while the generic path backpropagates through the whole model
        # for the parameters left anyway (embeddings, norms): its per-sample rows of these layers cost the same,
        # and this pass would be extra
        return []
    return _per_sample_check(problem, layers, inputs)


# -- the contributions ------------------------------------------------------------------------------------

def _block_factors(problem, layers: Sequence[GhostLayer], block: ColumnBlock) -> dict[str, dict[str, Tensor]]:
    """Per layer, what the contraction needs for the columns of ``block`` (b samples, k seeds each):
    ``bias`` ``(b*k, d_out)``; ``weight`` ``(b*k, d_out*d_in)`` (materialize) or ``a`` ``(b, T, d_in)`` and
    ``delta`` ``(b, k, T, d_out)`` (ghost)."""
    b, k = block.seeds.shape[:2]
    idx = batch_with_partner(problem, block.samples)  # the partner's rows are dropped
    inputs = problem.inputs[idx]
    seeds = block.seeds.transpose(0, 1)  # (k, b, C)
    if idx.numel() > b:
        seeds = torch.cat([seeds, torch.zeros_like(seeds[:, :1])], dim=1)
    probes = {PROBE + layer.module_name: torch.zeros(idx.numel(), *layer.out_shape, dtype=problem.dtype,
                                                     device=problem.device) for layer in layers}
    deltas, captured = batched_vjp(problem, lambda q: _forward_probed(problem, layers, inputs, q), probes, seeds,
                                   few=True)  # autograd's batched backward: no torch.func start-up
    factors = {}
    for layer in layers:
        d = deltas.pop(PROBE + layer.module_name)[:, :b]  # (k, b, *out_shape)
        d = layer.positions_of_output(d, 2).transpose(0, 1)  # (b, k, T, d_out)
        f: dict[str, Tensor] = {}
        if layer.bias:
            f["bias"] = d.sum(2).reshape(b * k, -1)
        if layer.weight:
            x = captured[layer.module_name][:b].detach()
            if layer.mode == "materialize":
                a = layer.positions_of_input(x, d.dtype)  # (b, T, d_in)
                f["weight"] = torch.einsum("bkto,bti->bkoi", d, a).reshape(b * k, -1)
            elif layer.is_embedding:  # token ids (b, T) stand for the one-hot inputs
                (f["a"], f["valid"]), f["delta"] = layer.tokens_of_input(x), d
            else:
                f["a"], f["delta"] = layer.positions_of_input(x), d
        factors[layer.module_name] = f
    return factors


def _input_gram(ai: Tensor, aj: Tensor, vi: Tensor | None, vj: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``a_i a_j^T`` of inputs ``(p, d_in)`` and ``(q, d_in)``; for token ids ``(p,)``, ``(q,)`` (an embedding's
    one-hot inputs) the comparisons ``[x_i == x_j]``, zero where a token gets no gradient (``vi``/``vj``)."""
    if ai.is_floating_point():
        return ai @ aj.T
    same = ai.reshape(-1, 1) == aj.reshape(1, -1)
    return (same & vi.reshape(-1, 1) & vj.reshape(1, -1)).to(dtype)


def _ghost_weight_gram_t1(ai: Tensor, aj: Tensor, delta_gram: Tensor, vi: Tensor | None = None,
                          vj: Tensor | None = None) -> Tensor:
    """One position per sample: ``(a_n . a_m)(delta_nc . delta_md)`` from the inputs ``(b_i, d_in)``,
    ``(b_j, d_in)`` (or token ids ``(b_i,)``, ``(b_j,)`` with their gradient masks) and the delta Gram
    ``(b_i*k_i, b_j*k_j)`` (which is also the bias's Gram)."""
    bi, bj = ai.shape[0], aj.shape[0]
    A = _input_gram(ai, aj, vi, vj, delta_gram.dtype)  # (bi, bj)
    ki, kj = delta_gram.shape[0] // bi, delta_gram.shape[1] // bj
    return (delta_gram.reshape(bi, ki, bj, kj) * A[:, None, :, None]).reshape(bi * ki, bj * kj)


def _ghost_weight_gram(fi: dict[str, Tensor], fj: dict[str, Tensor], plan: MemoryPlan) -> Tensor:
    """``sum_{t,s} (a_nt . a_ms)(delta_nct . delta_mds)`` ``(b_i*k_i, b_j*k_j)`` from the ghost factors.

    In matrix products, per sub-block of p x q samples: the input Gram ``A = a_i a_j^T`` ``(p*T, q*T)`` (one
    matmul), ``R[m] = A[:, m] delta_j[m]`` ``(p*T, k_j*d_out)`` (one bmm over the q samples), then
    ``out[n] = delta_i[n] R[n]^T`` ``(k_i, q*k_j)`` (one bmm over the p samples)."""
    ai, di, aj, dj = fi["a"], fi["delta"], fj["a"], fj["delta"]
    vi, vj = fi.get("valid"), fj.get("valid")  # an embedding's token masks (its "a" are token ids (b, T))
    (bi, ki, T, do), (bj, kj) = di.shape, dj.shape[:2]
    if T == 1:
        return _ghost_weight_gram_t1(ai[:, 0], aj[:, 0], di.reshape(bi * ki, do) @ dj.reshape(bj * kj, do).T,
                                     None if vi is None else vi[:, 0], None if vj is None else vj[:, 0])
    out = torch.empty(bi, ki, bj, kj, dtype=di.dtype, device=di.device)
    s = plan.pair_samples(T * (T + kj * do) * di.element_size())
    for p0 in range(0, bi, s):
        for q0 in range(0, bj, s):
            a_p, a_q, d_p, d_q = ai[p0:p0 + s], aj[q0:q0 + s], di[p0:p0 + s], dj[q0:q0 + s]
            P, Q = a_p.shape[0], a_q.shape[0]
            v_p = None if vi is None else vi[p0:p0 + s]
            v_q = None if vj is None else vj[q0:q0 + s]
            A = _input_gram(a_p.reshape(P * T, -1), a_q.reshape(Q * T, -1), v_p, v_q, di.dtype)  # (P*T, Q*T)
            A = A.reshape(P, T, Q, T).permute(2, 0, 1, 3).reshape(Q, P * T, T)
            right = torch.bmm(A, d_q.permute(0, 2, 1, 3).reshape(Q, T, kj * do))  # (Q, P*T, kj*d_out)
            right = right.reshape(Q, P, T, kj, do).permute(1, 0, 3, 2, 4).reshape(P, Q * kj, T * do)
            left = d_p.reshape(P, ki, T * do)
            out[p0:p0 + P, :, q0:q0 + Q] = torch.bmm(left, right.transpose(1, 2)).reshape(P, ki, Q, kj)
    return out.reshape(bi * ki, bj * kj)


def contribute(problem, names: Sequence[str], columns: Columns, grad_seeds: Tensor | None,
               acc: GramAccumulator, plan: MemoryPlan, layout: Layout, force_mode: str | None = None) -> set[str]:
    """Add the contributions of the parameters with a fast rule to ``acc``; return the names handled.

    Args:
        problem: the :class:`~curvscope.problem.Problem`.
        names: parameters wanted (the others are never touched).
        columns: the columns of V.
        grad_seeds: ``(N, 1, C)`` seeds of the per-sample gradients (the rows of G), or ``None``.
        acc: the accumulator the contracted blocks are added to; parameters it does not want are skipped.
        plan: the memory plan that sizes the column blocks and sample pairs.
        layout: where the columns are (collective for a sharded layout: factors of this rank's columns are
            contracted with every rank's, into ``acc``'s block rows). Layers and modes are chosen from the whole
            batch either way.
        force_mode: ``ghost`` or ``materialize`` for every layer (tests); default: per layer by cost.
    """
    if force_mode is not None and force_mode not in MODES:
        raise ValueError(f"force_mode must be one of {MODES}, got {force_mode!r}")
    names = [n for n in names if acc.wanted(n)]
    with layout.stage():
        try:
            layers = select_layers(problem, names, columns, grad_seeds, plan, force_mode)
        except Exception as exc:  # a model the rules cannot follow: the generic path handles (or refuses) it
            if is_fatal(exc):
                raise
            layers = []
    if not layers:
        return set()
    acc.rules.update({layer.module_name: layer.mode for layer in layers})
    num_g = None if grad_seeds is None else problem.batch_size
    num_samples = columns.num_samples if num_g is None else num_g
    k = (columns.num_columns + (num_g or 0)) / num_samples
    elt = torch.finfo(problem.dtype).bits // 8
    kept = work = 0.0  # bytes per column
    for layer in layers:
        T, do = layer.positions, layer.d_out
        di = layer.d_in if layer.mode == "materialize" else layer.ghost_width  # what this mode holds per input
        kept += do * (layer.bias is not None)
        if layer.weight:
            kept += di * do if layer.mode == "materialize" else T * do + T * di / k
        work += (T * do * k + T * di) * plan.activation_factor / k
    max_columns, held = plan.blocking(layout.held_columns(columns, num_g), kept * elt, work * elt)
    sets = acc.owner_sets([n for layer in layers for n in layer.names])
    set_of = {n: i for i, (_groups, members) in enumerate(sets) for n in members}

    def contract(bi: ColumnBlock, fi: dict, bj: ColumnBlock, fj: dict) -> None:
        # per set of owning groups, a running sum that is added to the groups once its last member is in
        partial: dict[int, Tensor] = {}
        missing = [len(members) for _groups, members in sets]
        for layer in layers:
            li, lj = fi[layer.module_name], fj[layer.module_name]
            # with one position per sample the bias Gram delta.delta is a factor of the weight's ghost product
            shared = (layer.bias and layer.weight and layer.mode == "ghost" and li["delta"].shape[2] == 1)
            bias_gram = li["bias"] @ lj["bias"].T if layer.bias else None
            for name in layer.names:
                if name == layer.bias:
                    gram = bias_gram.clone() if shared else bias_gram
                elif layer.mode == "materialize":
                    gram = li["weight"] @ lj["weight"].T
                elif shared:
                    gram = _ghost_weight_gram_t1(li["a"][:, 0], lj["a"][:, 0], bias_gram)
                else:
                    gram = _ghost_weight_gram(li, lj, plan)
                i = set_of[name]
                partial[i] = partial[i].add_(gram) if i in partial else gram
                missing[i] -= 1
                if not missing[i]:
                    acc.add(sets[i][0], bi, bj, partial.pop(i))

    def compute(blk: ColumnBlock) -> dict[str, dict[str, Tensor]]:
        return _block_factors(problem, layers, blk)

    layout.pairwise(columns, grad_seeds, max_columns, compute, contract, held)
    return {n for layer in layers for n in layer.names}
