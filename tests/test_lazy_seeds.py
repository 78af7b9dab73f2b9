"""Sequence seeds kept per token (curvscope.curvature.gram.columns.TokenSeeds), built a block of columns at a time.

References: the block-diagonal square roots of ``Loss.hessian_sqrt`` / ``Loss.mc_sqrt`` (the dense seeds the engine
built before, the same random draws), and the Gram and spectrum computed from those dense seeds.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_sequence import TinyLM, lm_data

from curvscope import make_problem
from curvscope.curvature.gram import compute_gram
from curvscope.curvature.gram.columns import Columns, ColumnSpec, TokenSeeds, count_columns, make_columns, seed_bytes
from curvscope.curvature.gram.spectrum import compute_spectrum
from curvscope.curvature.memory import MemoryPlan, column_blocks
from curvscope.curvature.method import choose_method
from curvscope.errors import OptionError

F64 = torch.float64


def padded_lm(dtype=F64):
    torch.manual_seed(0)
    tokens, labels = lm_data()  # padding and a prompt token: sequences with different numbers of valid tokens
    return make_problem(TinyLM(), tokens, labels, loss="ce", dtype=dtype, shift_labels=True)


def dense_seeds(problem, spec: ColumnSpec) -> torch.Tensor:
    """The seeds as the engine built them before: the block-diagonal root over all T*C outputs, / sqrt(N_V)."""
    n = spec.num_samples(problem.batch_size)
    out = problem.forward().detach()[:n]
    if spec.mc_samples:
        S = problem.loss.mc_sqrt(out, problem.targets[:n], spec.mc_samples, torch.Generator().manual_seed(spec.seed))
    else:
        S = problem.loss.hessian_sqrt(out, problem.targets[:n])
    return S.transpose(1, 2) / math.sqrt(n)


@pytest.mark.parametrize("spec", [ColumnSpec(), ColumnSpec(mc_samples=1, seed=4), ColumnSpec(mc_samples=3, seed=1),
                                  ColumnSpec(mc_samples=2, subsample=2, seed=2)], ids=["exact", "mc1", "mc3", "sub"])
def test_token_seeds_are_the_dense_seeds(spec):
    problem = padded_lm()
    columns = make_columns(problem, spec=spec)
    assert isinstance(columns.source, TokenSeeds)
    dense = dense_seeds(problem, spec)
    assert torch.equal(columns.seeds, dense)  # bitwise: the same draws, the same arithmetic
    assert (columns.num_samples, columns.per_sample) == dense.shape[:2]
    assert columns.num_columns == count_columns(problem, spec.mc_samples, spec.subsample)
    n, K, C = dense.shape
    for r0, r1, c0, c1 in ((0, n, 0, K), (1, n, 2, K - 1), (n - 1, n, K - 1, K), (0, 1, 0, 1)):
        assert torch.equal(columns.seed_chunk(r0, r1, c0, c1), dense[r0:r1, c0:c1])
    coeff = torch.randn(n, K, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(columns.combine(0, n, coeff), torch.einsum("nkc,nkj->jnc", dense, coeff),
                               rtol=1e-14, atol=1e-15)
    vectors = torch.randn(n, C, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(columns.project(0, n, vectors), torch.einsum("nkc,nc->nk", dense, vectors),
                               rtol=1e-14, atol=1e-15)
    assert columns.column_bytes == C * 8


def test_blocks_build_only_their_own_seeds():
    problem = padded_lm()
    columns = make_columns(problem, spec=ColumnSpec(mc_samples=2, seed=3))
    grads = torch.randn(problem.batch_size, 1, problem.num_outputs, dtype=F64)
    joined = torch.cat([columns.seeds, grads[columns.samples]], dim=1)
    for max_columns in (1, 3, 7, 100):
        blocks = column_blocks(columns, grads, max_columns)
        assert all(b.seeds.shape[0] * b.seeds.shape[1] == b.num_columns <= max_columns for b in blocks)
        for b in blocks:
            n = b.samples.numel()
            k = b.num_columns // n
            flat = b.index.reshape(n, k)
            for i in range(n):  # index n*K + c of a V column, N_V*K + m of a gradient column
                for j in range(k):
                    col = int(flat[i, j])
                    sample, c = (col // columns.per_sample, col % columns.per_sample) if col < columns.num_columns \
                        else (col - columns.num_columns, columns.per_sample)
                    assert torch.equal(b.seeds[i, j], joined[sample, c])


def test_large_vocabulary_gram_within_a_budget_the_dense_seeds_exceed(monkeypatch):
    """A 20,000-token vocabulary with one Monte-Carlo column per token: the dense seeds (14 columns x 8 x 20,000
    outputs, 17.9 MB) exceed a third of a 24 MiB budget and were refused; per token they take 3.84 MB, blocks
    build only theirs, and the Gram is the dense seeds' Gram."""
    vocab, budget = 20_000, 24 * 2**20
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(vocab, (2, 8), generator=g)
    torch.manual_seed(0)
    problem = make_problem(TinyLM(vocab=vocab, d=3), tokens, tokens.clone(), loss="ce", dtype=F64,
                           shift_labels=True)
    spec = ColumnSpec(mc_samples=1, seed=7)
    columns_needed = count_columns(problem, 1)
    dense_bytes = columns_needed * problem.num_outputs * 8
    plan = MemoryPlan(budget=budget)
    assert dense_bytes > plan.limit >= seed_bytes(problem, 1) == (2 + 1) * 8 * vocab * 8
    assert choose_method(problem, mc_samples=1, max_memory=budget).method == "gram"
    with pytest.raises(OptionError, match="the seeds of the 14 columns need"):
        choose_method(problem, mc_samples=1, max_memory=3 * seed_bytes(problem, 1) - 1)

    built: list[int] = []
    chunk = TokenSeeds.chunk
    monkeypatch.setattr(TokenSeeds, "chunk", lambda self, *a: built.append(chunk(self, *a).nbytes) or chunk(self, *a))
    result = compute_spectrum(problem, mc_samples=1, seed=7, max_memory=budget)
    assert built and max(built) <= plan.limit and max(built) < dense_bytes

    lazy = make_columns(problem, spec=spec)
    dense = Columns(samples=lazy.samples, source=lazy.seeds.clone(), spec=spec)
    groups = [("all", tuple(problem.params))]
    reference = compute_gram(problem, groups, columns=dense, with_gradients=True, plan=MemoryPlan(budget=2**32))[0]
    same_blocks = compute_gram(problem, groups, columns=lazy, with_gradients=True, plan=MemoryPlan(budget=2**32))[0]
    tight = compute_gram(problem, groups, columns=lazy, with_gradients=True, plan=plan)[0]
    for x, y, z in ((reference[0].vv, same_blocks[0].vv, tight[0].vv), (reference[0].vg, same_blocks[0].vg,
                                                                          tight[0].vg)):
        assert torch.equal(x, y)
        torch.testing.assert_close(z, x, rtol=1e-12, atol=1e-14 * float(x.abs().max()))
    evals = torch.linalg.eigvalsh(reference[0].vv).flip(0)
    evals = evals[evals > 1e-10 * evals[0]]
    torch.testing.assert_close(result.groups[0].eigenvalues, evals, rtol=1e-9, atol=0)
