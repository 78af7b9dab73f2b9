"""The columns of V: which samples, and which loss-Hessian-root vectors s_nc are backpropagated.

``V = [v_nc]`` with ``v_nc = J_n^T s_nc / sqrt(N_V)`` (``docs/conventions.md`` §2), where ``N_V`` is the number
of curvature samples (all N, or K with sub-sampling) and ``s_nc`` runs over the columns of the exact square root
``S_n`` (C columns) or of a Monte-Carlo one (M columns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from curvscope.curvature.memory import format_bytes
from curvscope.errors import CurvscopeError

MAX_EXACT_SEQUENCE_COLUMNS = 2**16
"""Exact curvature of sequence outputs is refused above this many columns (``|tokens| * C``; its Gram alone would
need 32 GiB): Monte-Carlo columns per token (``mc_samples``) are the tractable choice."""


@dataclass
class Columns:
    """Backpropagation seeds for the columns of V.

    Attributes:
        samples: indices into the batch of the curvature samples ``(N_V,)``.
        seeds: ``(N_V, K, C)``: ``seeds[n, k]`` is ``s_nk / sqrt(N_V)``; backpropagating it through sample
            ``samples[n]`` gives column ``v_nk``. Columns are ordered sample-major: ``index = n * K + k``.
            Sequence outputs: C is ``T*C`` (flattened outputs) and K is ``T_v*C`` (``T_v*M`` with MC), the
            columns of the valid tokens, block-diagonal over tokens (``docs/conventions.md`` §8).
        mc_samples: M (0 for the exact square root).
    """

    samples: Tensor
    seeds: Tensor
    mc_samples: int = 0

    @property
    def num_samples(self) -> int:
        """N_V: the number of curvature samples."""
        return self.seeds.shape[0]

    @property
    def per_sample(self) -> int:
        """K: columns per sample (C exact, M Monte-Carlo; per valid token for sequence outputs)."""
        return self.seeds.shape[1]

    @property
    def num_columns(self) -> int:
        """``N_V * K``: the number of columns of V."""
        return self.seeds.shape[0] * self.seeds.shape[1]


def make_columns(problem, outputs: Tensor | None = None, mc_samples: int = 0, subsample: int | None = None,
                 seed: int = 0, max_bytes: float | None = None) -> Columns:
    """The columns of V for ``problem``: exact (``mc_samples=0``) or Monte-Carlo, on all samples or on the first
    ``subsample`` samples of the batch (the batch order is already the user's choice of samples).

    ``max_bytes``: refuse (a :class:`CurvscopeError`, before allocating) seeds larger than this
    (:func:`seed_bytes`: for sequences every column's seed covers all T*C outputs of its sample).
    """
    N = problem.batch_size
    if subsample is not None:
        if subsample < 1:
            raise CurvscopeError(f"subsample must be at least 1, got {subsample}")
        if subsample > N:
            raise CurvscopeError(f"subsample {subsample} is larger than the batch ({N} samples)")
    if mc_samples < 0:
        raise CurvscopeError(f"mc_samples must be 0 (exact) or positive, got {mc_samples}")
    samples = torch.arange(N if subsample is None else subsample, device=problem.device)
    if problem.is_sequence and not mc_samples:
        _check_exact_size(problem, samples)
    if max_bytes is not None:
        _check_seed_bytes(problem, mc_samples, subsample, max_bytes)
    if outputs is None:
        with torch.no_grad():
            outputs = problem.forward()
    out = outputs.detach()[samples]
    targets = problem.targets[samples]
    if mc_samples:
        generator = torch.Generator().manual_seed(seed)
        S = problem.loss.mc_sqrt(out, targets, mc_samples, generator)  # (N_V, C, M)
    else:
        S = problem.loss.hessian_sqrt(out, targets)  # (N_V, C, C)
    seeds = S.transpose(1, 2) / math.sqrt(samples.shape[0])  # (N_V, K, C)
    return Columns(samples=samples, seeds=seeds.contiguous(), mc_samples=mc_samples)


def columns_per_token_block(problem, samples: int) -> int:
    """T_v: the most valid tokens of one of the first ``samples`` sequences (at least 1; 1 without positions):
    every sequence gets that many column blocks, the loss Hessian's root being block-diagonal over tokens."""
    if not problem.is_sequence or samples == 0:
        return 1
    valid = problem.loss.valid_tokens(problem.targets[:samples])
    return max(int(valid.sum(1).max()), 1)


def count_columns(problem, mc_samples: int = 0, subsample: int | None = None) -> int:
    """The number of columns of V :func:`make_columns` builds: N·C exact, N·M Monte-Carlo, and for sequences
    N·T_v·C / N·T_v·M (``docs/conventions.md`` §2, §8), without building them."""
    samples = problem.batch_size if subsample is None else subsample
    per_token = mc_samples or (problem.classes if problem.is_sequence else problem.num_outputs)
    return samples * columns_per_token_block(problem, samples) * per_token


def seed_bytes(problem, mc_samples: int = 0, subsample: int | None = None) -> int:
    """Bytes of the seeds :func:`make_columns` builds: one ``num_outputs`` vector per column (``T*C`` for
    sequences, nonzero at one token: the columns x T x C numbers that make a large vocabulary expensive)."""
    element = torch.finfo(problem.dtype).bits // 8
    return count_columns(problem, mc_samples, subsample) * problem.num_outputs * element


def _check_seed_bytes(problem, mc_samples: int, subsample: int | None, max_bytes: float) -> None:
    size = seed_bytes(problem, mc_samples, subsample)
    if size > max_bytes:
        count = count_columns(problem, mc_samples, subsample)
        raise CurvscopeError(
            f"the seeds of {count:,} columns of V over {problem.num_outputs:,} outputs per sample need "
            f"{format_bytes(size)}, more than the memory budget ({format_bytes(max_bytes)}): use fewer or "
            "shorter sequences, or the matrix-free method (lanczos), which needs no columns")


def _check_exact_size(problem, samples: Tensor) -> None:
    """Refuse exact sequence curvature whose columns (tokens x classes) would be huge."""
    tokens = columns_per_token_block(problem, samples.numel())
    count = count_columns(problem, subsample=samples.numel())
    if count > MAX_EXACT_SEQUENCE_COLUMNS:
        raise CurvscopeError(
            f"exact curvature needs {count:,} columns ({samples.numel()} sequences x {tokens} tokens x "
            f"{problem.classes} classes): use mc_samples=1 (Monte-Carlo per token, --mc-samples 1), or fewer "
            "sequences (subsample)")


def gradient_seeds(problem, outputs: Tensor) -> Tensor:
    """``(N, 1, C)``: ``d l_n / d f_n``; backpropagated through sample n it gives the per-sample gradient g_n."""
    return problem.loss.output_gradient(outputs.detach(), problem.targets).unsqueeze(1)
