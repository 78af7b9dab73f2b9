"""The columns of V: which samples, and which loss-Hessian-root vectors s_nc are backpropagated.

``V = [v_nc]`` with ``v_nc = J_n^T s_nc / sqrt(N_V)`` (``docs/conventions.md`` §2), where ``N_V`` is the number
of curvature samples (all N, or K with sub-sampling) and ``s_nc`` runs over the columns of the exact square root
``S_n`` (C columns) or of a Monte-Carlo one (M columns). Which of these a computation uses is one value,
:class:`ColumnSpec` (``mc_samples``, ``subsample``, ``seed``), passed down from the entry points
(``compute_spectrum``, ``compute_gram``) to :func:`make_columns`.

Sequence outputs (``docs/conventions.md`` §8): a column's seed is a whole output vector of its sequence (``T*C``
numbers) that is nonzero at one token only. Such seeds are kept per token (:class:`TokenSeeds`: ``T*C*K_t`` numbers
per sample, ``K_t`` = M Monte-Carlo or C exact columns per token, instead of ``T_v*K_t`` vectors of ``T*C``) and
built densely one block of columns at a time (:meth:`Columns.seed_chunk`), when that block is backpropagated.
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
class TokenSeeds:
    """The seeds of sequence outputs, kept per token: ``(N_V, T_v*K_t, T*C)`` seeds without storing them densely.

    Column ``v*K_t + j`` of sample n is zero except at token ``t = order[n, v]`` (the v-th valid token), where it
    holds ``blocks[n, t, :, j]``: the j-th column of that token's (exact or Monte-Carlo) loss-Hessian root, scaled
    by ``sqrt(token_scale / N_V)``; a sample with fewer valid tokens than T_v has zero columns at the end.

    Attributes:
        blocks: ``(N_V, T, C, K_t)``, zero at the ignored tokens.
        order: ``(N_V, T_v)`` token positions, valid tokens first.
    """

    blocks: Tensor
    order: Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(N_V, K, T*C)`` of the dense seeds, ``K = T_v*K_t``."""
        n, T, C, k = self.blocks.shape
        return n, self.order.shape[1] * k, T * C

    def chunk(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """The dense seeds of samples ``[r0, r1)`` and columns ``[c0, c1)``: ``(r1 - r0, c1 - c0, T*C)``."""
        _n, T, C, k = self.blocks.shape
        device = self.blocks.device
        rows, cols = torch.arange(r0, r1, device=device), torch.arange(c0, c1, device=device)
        tokens = self.order[r0:r1][:, cols // k]  # (b, m): the token of each column
        out = torch.zeros(r1 - r0, c1 - c0, T, C, dtype=self.blocks.dtype, device=device)
        out[rows[:, None] - r0, cols[None, :] - c0, tokens] = self.blocks[rows[:, None], tokens, :, (cols % k)[None, :]]
        return out.reshape(r1 - r0, c1 - c0, T * C)

    def _per_token(self, r0: int, r1: int) -> tuple[Tensor, Tensor]:
        """``(blocks, order)`` of samples ``[r0, r1)``: the blocks of the column tokens ``(b, T_v, C, K_t)``."""
        order = self.order[r0:r1]
        rows = torch.arange(r0, r1, device=order.device)[:, None]
        return self.blocks[rows, order], order

    def combine(self, r0: int, r1: int, coeff: Tensor) -> Tensor:
        """``sum_k seeds[n, k] coeff[n, k, j]`` for samples ``[r0, r1)``, coefficients ``(b, K, J)``:
        ``(J, b, T*C)``, from the per-token blocks (a token's columns add into its slot)."""
        _n, T, C, k = self.blocks.shape
        b, J = r1 - r0, coeff.shape[-1]
        blocks, order = self._per_token(r0, r1)  # (b, T_v, C, k), (b, T_v)
        parts = torch.einsum("bvcm,bvmj->jbvc", blocks, coeff.reshape(b, order.shape[1], k, J))
        out = torch.zeros(J, b, T, C, dtype=parts.dtype, device=parts.device)
        out[:, torch.arange(b, device=order.device)[:, None], order] = parts  # distinct tokens per sample
        return out.reshape(J, b, T * C)

    def project(self, r0: int, r1: int, vectors: Tensor) -> Tensor:
        """``seeds[n, k] . vectors[n]`` for samples ``[r0, r1)`` and output vectors ``(b, T*C)``: ``(b, K)``."""
        _n, T, C, k = self.blocks.shape
        blocks, order = self._per_token(r0, r1)
        rows = torch.arange(r1 - r0, device=order.device)[:, None]
        picked = vectors.reshape(r1 - r0, T, C).to(torch.float64)[rows, order]  # (b, T_v, C)
        return torch.einsum("bvcm,bvc->bvm", blocks.to(torch.float64), picked).reshape(r1 - r0, -1)


@dataclass
class Columns:
    """Backpropagation seeds for the columns of V.

    Attributes:
        samples: indices into the batch of the curvature samples ``(N_V,)``.
        source: the seeds ``(N_V, K, C)``: ``seeds[n, k]`` is ``s_nk / sqrt(N_V)``; backpropagating it through
            sample ``samples[n]`` gives column ``v_nk``. Columns are ordered sample-major: ``index = n * K + k``.
            A tensor, or for sequence outputs :class:`TokenSeeds`: C is ``T*C`` (flattened outputs) and K is
            ``T_v*C`` (``T_v*M`` with MC), the columns of the valid tokens, block-diagonal over tokens
            (``docs/conventions.md`` §8), built a block at a time by :meth:`seed_chunk`.
        spec: the :class:`ColumnSpec` they were built from.
    """

    samples: Tensor
    source: Tensor | TokenSeeds
    spec: ColumnSpec = ColumnSpec()

    @property
    def seeds(self) -> Tensor:
        """All the seeds ``(N_V, K, C)`` as one dense tensor (built whole for sequence outputs: tiny problems
        only; the engine takes them a block at a time with :meth:`seed_chunk`)."""
        if isinstance(self.source, Tensor):
            return self.source
        return self.seed_chunk(0, self.num_samples)

    def seed_chunk(self, r0: int, r1: int, c0: int = 0, c1: int | None = None) -> Tensor:
        """The seeds of samples ``[r0, r1)`` (positions among the N_V) and columns ``[c0, c1)`` of each
        (default: all K): ``(r1 - r0, c1 - c0, C)``, a view of the tensor or built for this chunk."""
        c1 = self.per_sample if c1 is None else c1
        if isinstance(self.source, Tensor):
            return self.source[r0:r1, c0:c1]
        return self.source.chunk(r0, r1, c0, c1)

    def combine(self, r0: int, r1: int, coeff: Tensor) -> Tensor:
        """``sum_k seeds[n, k] coeff[n, k, j]`` for samples ``[r0, r1)`` and coefficients ``(r1 - r0, K, J)``: the
        cotangents ``(J, r1 - r0, C)`` that give ``V c_j`` in one backward pass (no dense seeds built)."""
        if isinstance(self.source, Tensor):
            return torch.einsum("nkc,nkj->jnc", self.source[r0:r1], coeff)
        return self.source.combine(r0, r1, coeff)

    def project(self, r0: int, r1: int, vectors: Tensor) -> Tensor:
        """``seeds[n, k] . vectors[n]`` in float64 for samples ``[r0, r1)`` and output vectors ``(r1 - r0, C)``:
        ``(r1 - r0, K)`` (no dense seeds built)."""
        if isinstance(self.source, Tensor):
            return torch.einsum("nkc,nc->nk", self.source[r0:r1].to(torch.float64), vectors.to(torch.float64))
        return self.source.project(r0, r1, vectors.to(torch.float64))

    @property
    def dtype(self) -> torch.dtype:
        """The seeds' dtype."""
        return self.source.dtype if isinstance(self.source, Tensor) else self.source.blocks.dtype

    @property
    def column_bytes(self) -> int:
        """Bytes a block of columns builds per column when it takes its seeds (:meth:`seed_chunk`): one output
        vector for :class:`TokenSeeds`, 0 for a tensor (its seeds are views)."""
        if isinstance(self.source, Tensor):
            return 0
        return self.source.shape[2] * self.source.blocks.element_size()

    @property
    def mc_samples(self) -> int:
        """M (0 for the exact square root)."""
        return self.spec.mc_samples

    @property
    def num_samples(self) -> int:
        """N_V: the number of curvature samples."""
        return self.source.shape[0]

    @property
    def per_sample(self) -> int:
        """K: columns per sample (C exact, M Monte-Carlo; per valid token for sequence outputs)."""
        return self.source.shape[1]

    @property
    def num_columns(self) -> int:
        """``N_V * K``: the number of columns of V."""
        return self.num_samples * self.per_sample


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
    generator = torch.Generator().manual_seed(spec.seed) if mc_samples else None
    if problem.is_sequence:  # per token: (N_V, T, C, K_t) and the valid tokens' order
        blocks, order = problem.loss.token_blocks(out, targets, mc_samples, generator)
        blocks.div_(math.sqrt(samples.shape[0]))  # the dense seeds' division, in place
        return Columns(samples=samples, source=TokenSeeds(blocks, order), spec=spec)
    if mc_samples:
        S = problem.loss.mc_sqrt(out, targets, mc_samples, generator)  # (N_V, C, M)
    else:
        S = problem.loss.hessian_sqrt(out, targets)  # (N_V, C, C)
    seeds = S.transpose(1, 2) / math.sqrt(samples.shape[0])  # (N_V, K, C)
    return Columns(samples=samples, source=seeds.contiguous(), spec=spec)


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
    """Bytes of the seeds :func:`make_columns` builds: one ``num_outputs`` vector per column; for sequences the
    per-token :class:`TokenSeeds` (``N_V * T * C * K_t`` numbers, ``K_t`` = M or C) and the dense seed of one
    column (``T*C``), the least a block of columns builds (a block of b columns builds b of them, which the memory
    plan counts with the block's work)."""
    element = torch.finfo(problem.dtype).bits // 8
    if problem.is_sequence:
        samples = problem.batch_size if subsample is None else subsample
        return (samples * (mc_samples or problem.classes) + 1) * problem.num_outputs * element
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
