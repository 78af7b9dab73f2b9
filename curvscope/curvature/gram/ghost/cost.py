"""The cost model of the fast rules (``docs/conventions.md`` §3): which mode a layer takes, whether the rules take
the layers at all or leave them to the generic path, and the bytes their factors hold per column."""

from __future__ import annotations

from collections.abc import Sequence

from curvscope.curvature.gram.ghost.layer import GhostLayer
from curvscope.curvature.memory import MemoryPlan

MODES = ("ghost", "materialize")

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


def check_fits(layer: GhostLayer, probe_samples: int, plan: MemoryPlan, element_size: int) -> bool:
    """The per-sample check of ``layer`` fits the budget: it holds each probe sample's weight gradient twice
    (autograd's and the rule's). A layer whose copies would not fit (a 250k-token embedding) is left to the generic
    path, which chunks it."""
    return 2 * probe_samples * layer.d_in * layer.d_out * element_size <= plan.limit


def worth_a_pass(layers: Sequence[GhostLayer], names: Sequence[str]) -> bool:
    """The rules' pass over ``layers`` (modes chosen) saves work for the parameters ``names``: not when every layer
    would materialize its rows while the generic path backpropagates through the whole model for the parameters
    left anyway (embeddings, norms): its per-sample rows of these layers cost the same, and this pass would be
    extra."""
    return any(layer.mode == "ghost" for layer in layers) or not (
        set(names) - {n for layer in layers for n in layer.names})


def factor_bytes(layers: Sequence[GhostLayer], per_sample: float, activation_factor: float) -> tuple[float, float]:
    """``(kept, work)``: numbers per column of ``[V, G]`` that the layers' factors hold, and that computing them
    takes (backward intermediates), with ``per_sample`` columns per sample (multiply by the element size for
    bytes: :meth:`~curvscope.curvature.memory.MemoryPlan.blocking`)."""
    k = per_sample
    kept = work = 0.0
    for layer in layers:
        T, do = layer.positions, layer.d_out
        di = layer.d_in if layer.mode == "materialize" else layer.ghost_width  # what this mode holds per input
        kept += do * (layer.bias is not None)
        if layer.weight:
            kept += di * do if layer.mode == "materialize" else T * do + T * di / k
        work += (T * do * k + T * di) * activation_factor / k
    return kept, work
