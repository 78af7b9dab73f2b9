"""The columns of V: which samples, and which loss-Hessian-root vectors s_nc are backpropagated.

``V = [v_nc]`` with ``v_nc = J_n^T s_nc / sqrt(N_V)`` (``docs/conventions.md`` §2), where ``N_V`` is the number
of curvature samples (all N, or K with sub-sampling) and ``s_nc`` runs over the columns of the exact square root
``S_n`` (C columns) or of a Monte-Carlo one (M columns). Which of these a computation uses is one value,
:class:`ColumnSpec` (``mc_samples``, ``subsample``, ``seed``), passed down from the entry points
(``compute_spectrum``, ``compute_gram``) to :func:`make_columns`.
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


@dataclass(frozen=True)
class ColumnSpec:
    """Which columns of V to build.

    Attributes:
        mc_samples: 0 for the exact loss-Hessian square root (C columns per sample), M > 0 for M Monte-Carlo
            columns per sample (per valid token for sequence outputs).
        subsample: build V from the first ``subsample`` samples of the batch only (default: all N).
        seed: seeds the Monte-Carlo columns (unused when exact).
    """

    mc_samples: int = 0
    subsample: int | None = None
    seed: int = 0

    def check(self, batch_size: int) -> None:
        """Refuse (a :class:`CurvscopeError`) a ``subsample`` below 1 or above ``batch_size``, or a negative
        ``mc_samples``."""
        if self.subsample is not None:
            if self.subsample < 1:
                raise CurvscopeError(f"subsample must be at least 1, got {self.subsample}")
            if self.subsample > batch_size:
                raise CurvscopeError(f"subsample {self.subsample} is larger than the batch ({batch_size} samples)")
        if self.mc_samples < 0:
            raise CurvscopeError(f"mc_samples must be 0 (exact) or positive, got {self.mc_samples}")

    def num_samples(self, batch_size: int) -> int:
        """N_V: the curvature samples of a batch of ``batch_size``."""
        return batch_size if self.subsample is None else self.subsample


@dataclass
class Columns:
    """Backpropagation seeds for the columns of V.

    Attributes:
        samples: indices into the batch of the curvature samples ``(N_V,)``.
        seeds: ``(N_V, K, C)``: ``seeds[n, k]`` is ``s_nk / sqrt(N_V)``; backpropagating it through sample
            ``samples[n]`` gives column ``v_nk``. Columns are ordered sample-major: ``index = n * K + k``.
            Sequence outputs: C is ``T*C`` (flattened outputs) and K is ``T_v*C`` (``T_v*M`` with MC), the
            columns of the valid tokens, block-diagonal over tokens (``docs/conventions.md`` §8).
        spec: the :class:`ColumnSpec` they were built from.
    """

    samples: Tensor
    seeds: Tensor
    spec: ColumnSpec = ColumnSpec()

    @property
    def mc_samples(self) -> int:
        """M (0 for the exact square root)."""
        return self.spec.mc_samples

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


def make_columns(problem, outputs: Tensor | None = None, spec: ColumnSpec | None = None,
                 max_bytes: float | None = None) -> Columns:
    """The columns of V for ``problem`` as ``spec`` says (default :class:`ColumnSpec`: exact, every sample):
    exact or Monte-Carlo, on all samples or on the first ``spec.subsample`` samples of the batch (the batch order is
    already the user's choice of samples).

    ``outputs``: the model's outputs ``(N, C)`` on the batch (default: a forward pass). ``max_bytes``: refuse (a
    :class:`CurvscopeError`, before allocating) seeds larger than this (:func:`seed_bytes`: for sequences every
    column's seed covers all T*C outputs of its sample).
    """
    spec = ColumnSpec() if spec is None else spec
    N = problem.batch_size
    spec.check(N)
    mc_samples = spec.mc_samples
    samples = torch.arange(spec.num_samples(N), device=problem.device)
    if problem.is_sequence and not mc_samples:
        _check_exact_size(problem, samples)
    if max_bytes is not None:
        _check_seed_bytes(problem, mc_samples, spec.subsample, max_bytes)
    if outputs is None:
        with torch.no_grad():
            outputs = problem.forward()
    out = outputs.detach()[samples]
    targets = problem.targets[samples]
    if mc_samples:
        generator = torch.Generator().manual_seed(spec.seed)
        S = problem.loss.mc_sqrt(out, targets, mc_samples, generator)  # (N_V, C, M)
    else:
        S = problem.loss.hessian_sqrt(out, targets)  # (N_V, C, C)
    seeds = S.transpose(1, 2) / math.sqrt(samples.shape[0])  # (N_V, K, C)
    return Columns(samples=samples, seeds=seeds.contiguous(), spec=spec)


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
            f"{problem.classes} classes): use mc_samples=1 (Monte-Carlo per token), or fewer "
            "sequences (subsample)")


def gradient_seeds(problem, outputs: Tensor) -> Tensor:
    """``(N, 1, C)``: ``d l_n / d f_n``; backpropagated through sample n it gives the per-sample gradient g_n."""
    return problem.loss.output_gradient(outputs.detach(), problem.targets).unsqueeze(1)
