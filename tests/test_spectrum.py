"""compute_spectrum against dense brute force (float64, tiny models): eigenvalues, traces, ranks,
eigenvectors, directional quantities, sub-sampling, Monte-Carlo, every group mode, every loss, many
architectures."""

from __future__ import annotations

import pytest
import torch
from cases import CASES, DENSE_CASES, dense_reference
from helpers import dense_ggn, ggn_factor, group_index, nonzero_eigen, snr_ref

import curvscope
from curvscope.curvature.gram import compute_gram
from curvscope.curvature.gram.spectrum import compute_spectrum, eigenvectors
from curvscope.errors import CurvscopeError

N = 6


def _assert_block_spectrum(g, G_block: torch.Tensor, V_block: torch.Tensor, scale: float) -> None:
    """Eigenvalues, rank, trace of a group against the dense GGN block ``(D_P, D_P)`` and its factor
    ``(D_P, NC)``: the dense eigenvalues above 1e-9 lambda_max to 1e-8 relative; all of them (and the rank,
    by the lambda_max * NC * eps rule) against the squared singular values of the factor.
    A block that is zero up to rounding (``scale``: the whole model's lambda_max) must come out negligible."""
    sv2 = torch.linalg.svdvals(V_block) ** 2
    if sv2[0] < 1e-20 * scale:  # e.g. attention key biases: softmax ignores them
        assert g.rank == 0 and g.eigenvalues.numel() == 0 and g.lambda_max == 0.0
        assert g.trace < 1e-19 * scale
        return
    # the rank threshold of a block is relative to the larger of its own and the whole model's lambda_max
    rank = int((sv2 > max(float(sv2[0]), scale) * V_block.shape[1] * torch.finfo(torch.float64).eps).sum())
    assert g.rank == rank, (g.name, g.rank, rank)
    torch.testing.assert_close(g.eigenvalues, sv2[:rank], rtol=1e-8, atol=1e-13 * float(sv2[0]))
    ref, _ = nonzero_eigen(G_block, rel=1e-9)
    torch.testing.assert_close(g.eigenvalues[:ref.numel()], ref, rtol=1e-8, atol=1e-12 * float(ref[0]))
    assert g.trace == pytest.approx(float(torch.trace(G_block)), rel=1e-10)
    assert g.lambda_max == pytest.approx(float(ref[0]), rel=1e-10)


@pytest.mark.parametrize("case", DENSE_CASES)
@pytest.mark.parametrize("groups", ["all", "layer", "tensor"])
def test_eigenvalues_match_dense_ggn(case, groups):
    ref = dense_reference(case)
    problem, G, V = ref.problem, ref.G, ref.V
    torch.testing.assert_close(V @ V.T, G, rtol=0, atol=1e-13 * float(G.abs().max()))
    res = compute_spectrum(problem, groups=groups, include_total=True, directional=False)
    expected = ["all"] if groups == "all" else ["all", *(g.name for g in problem.groups(groups))]
    assert [g.name for g in res.groups] == expected
    for g in res.groups:
        idx = group_index(problem.params, g.param_names)
        _assert_block_spectrum(g, G[idx][:, idx], V[idx], res.groups[0].lambda_max)
        if problem.loss.name == "ce":
            assert g.rank <= N * (problem.num_outputs - 1)
    # the whole model's trace is the sum of its tensors' traces
    if groups == "tensor":
        assert res.groups[0].trace == pytest.approx(sum(g.trace for g in res.groups[1:]), rel=1e-12)


@pytest.mark.parametrize("ghost", [True, False])
def test_subsampling_is_the_ggn_of_the_first_samples(ghost):
    problem = CASES["mlp-tanh-ce"]()
    K = 4
    G, V = dense_ggn(problem, samples=K), ggn_factor(problem, samples=K)
    res = compute_spectrum(problem, groups="layer", include_total=True, subsample=K, directional=True,
                           ghost=ghost)
    for g in res.groups:
        idx = group_index(problem.params, g.param_names)
        _assert_block_spectrum(g, G[idx][:, idx], V[idx], res.groups[0].lambda_max)
        assert g.directions.gamma.shape == (N, g.top_k)  # gradients: all samples
        assert g.directions.lambdas.shape == (K, g.top_k)  # curvature: the K samples
        assert g.directions.lambda_consistency < 1e-10


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_mc_trace_is_unbiased(loss):
    problem = CASES[f"mlp-tanh-{loss}"]()
    exact = float(torch.trace(dense_ggn(problem)))
    names = tuple(problem.params)
    M, seeds = 2, 150
    traces = torch.tensor([float(torch.trace(compute_gram(problem, [("all", names)], mc_samples=M,
                                                          seed=s)[0][0].vv)) for s in range(seeds)],
                          dtype=torch.float64)
    stderr = float(traces.std() / seeds**0.5)
    assert stderr < 0.1 * exact  # precise enough that a wrong scale (2x, 1/M) cannot pass
    assert abs(float(traces.mean()) - exact) < 4 * stderr, (float(traces.mean()), exact, stderr)
    res = compute_spectrum(problem, mc_samples=M, seed=0, directional=False)
    assert res.num_columns == N * M and res.groups[0].rank <= N * M


@pytest.mark.parametrize("case", ["mlp-tanh-ce", "cnn-bn-eval-ce", "transformer-ce"])
def test_eigenvectors_are_orthonormal_eigenvectors(case):
    ref = dense_reference(case)
    problem, G = ref.problem, ref.G
    res = compute_spectrum(problem, groups="layer", include_total=True, top_k=4, directional=False,
                           eigenvectors=True)
    for gi, g in enumerate(res.groups):
        vecs = eigenvectors(problem, res, gi)
        E = torch.cat([vecs[n].reshape(g.top_k, -1) for n in problem.params], dim=1)  # (k, D)
        idx = group_index(problem.params, g.param_names)
        outside = torch.ones(E.shape[1], dtype=torch.bool)
        outside[idx] = False
        assert E[:, outside].abs().max() == 0 if outside.any() else True
        Ep = E[:, idx]
        lam = g.eigenvalues[:g.top_k]
        torch.testing.assert_close(Ep @ G[idx][:, idx], lam[:, None] * Ep, rtol=0, atol=1e-10 * float(lam[0]))
        torch.testing.assert_close(Ep @ Ep.T, torch.eye(g.top_k, dtype=torch.float64), rtol=0, atol=1e-8)


def _clusters(evals: torch.Tensor, k: int, rel: float = 1e-6) -> list[list[int]]:
    """The top-k directions split into runs of (numerically) equal eigenvalues; a run cut by k is dropped."""
    runs: list[list[int]] = [[0]]
    for i in range(1, evals.numel()):
        if evals[i - 1] - evals[i] <= rel * evals[i - 1]:
            runs[-1].append(i)
        else:
            runs.append([i])
    return [r for r in runs if r[-1] < k]


@pytest.mark.parametrize("case", ["mlp-tanh-ce", "mlp-relu-mse-nobias", "cnn-bn-eval-ce", "transformer-ce",
                                  "embedding-bce"])
@pytest.mark.parametrize("subsample", [None, 4])
def test_directional_quantities_match_brute_force(case, subsample):
    """gamma_nk, lambda_nk, SNRs, overlaps against dense eigenvectors and looped per-sample gradients.

    Directions inside a degenerate eigenspace (e.g. the last layer under mse: G = (2/C) I x A) are not
    unique: there, only basis-free sums over the eigenspace are compared."""
    ref = dense_reference(case)
    problem, gn = ref.problem, ref.gn
    Nv = subsample or N
    Gn = ref.Gn[:Nv]
    G = Gn.mean(0)
    top = 4
    res = compute_spectrum(problem, groups="layer", include_total=True, top_k=top, subsample=subsample)
    for g in res.groups:
        idx = group_index(problem.params, g.param_names)
        evals, evecs = nonzero_eigen(G[idx][:, idx])
        k = min(top, evals.numel())
        e = evecs[:, :k]  # (D_P, k)
        gamma = gn[:, idx] @ e  # (N, k)
        lambdas = torch.einsum("dk,nde,ek->nk", e, Gn[:, idx][:, :, idx], e)  # (N_V, k)
        grad = gn[:, idx].mean(0)
        overlap = (grad @ e) ** 2 / (grad @ grad)
        d = g.directions
        assert g.top_k == k
        torch.testing.assert_close(d.lambda_mean, evals[:k], rtol=1e-8, atol=0)
        assert d.lambda_consistency < 1e-10
        assert g.gradient_norm == pytest.approx(float(grad.norm()), rel=1e-10)
        for run in _clusters(evals, k):
            if len(run) == 1:
                torch.testing.assert_close(d.gamma[:, run].abs(), gamma[:, run].abs(), rtol=1e-6, atol=1e-9)
                torch.testing.assert_close(d.lambdas[:, run], lambdas[:, run], rtol=1e-6,
                                           atol=1e-9 * float(evals[0]))
                torch.testing.assert_close(d.gamma_mean[run].abs(), (grad @ e[:, run]).abs(), rtol=1e-6,
                                           atol=1e-9)
                torch.testing.assert_close(d.gamma_snr[run], snr_ref(gamma[:, run]), rtol=1e-5, atol=1e-9)
                torch.testing.assert_close(d.lambda_snr[run], snr_ref(lambdas[:, run]), rtol=1e-5, atol=1e-9)
            torch.testing.assert_close((d.gamma[:, run] ** 2).sum(1), (gamma[:, run] ** 2).sum(1), rtol=1e-6,
                                       atol=1e-12)
            torch.testing.assert_close(d.lambdas[:, run].sum(1), lambdas[:, run].sum(1), rtol=1e-6,
                                       atol=1e-9 * float(evals[0]))
            torch.testing.assert_close(d.gradient_overlap[run].sum(), overlap[run].sum(), rtol=1e-6,
                                       atol=1e-10)
        if sum(len(r) for r in _clusters(evals, k)) == k:  # no eigenspace cut by the top-k
            assert d.flat_overlap == pytest.approx(1 - float(overlap.sum()), abs=1e-8)


def test_batchnorm_in_train_mode_is_refused():
    model = CASES["cnn-bn-eval-ce"]().model.train()
    x = torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(CurvscopeError, match="BatchNorm in train mode"):
        curvscope.make_problem(model, x, torch.arange(N) % 3, loss="ce", dtype=torch.float64)


def test_progress_protocol_and_argument_errors():
    """One progress protocol: ``progress(stage, done, total)``, "gram" in parameter tensors, "eigen" in groups;
    bad arguments are named in the engine's words."""
    problem = CASES["mlp-tanh-ce"]()
    calls = []
    compute_spectrum(problem, groups="layer", include_total=True, directional=False,
                     progress=lambda *a: calls.append(a))
    assert {c[0] for c in calls} == {"gram", "eigen"}
    D, groups = len(problem.params), 1 + len(problem.groups("layer"))
    gram = [c for c in calls if c[0] == "gram"]
    assert gram[0] == ("gram", 0, D) and gram[-1] == ("gram", D, D)
    assert calls[-1] == ("eigen", groups, groups)
    for stage in ("gram", "eigen"):
        done = [c[1] for c in calls if c[0] == stage]
        assert done == sorted(done)
    with pytest.raises(CurvscopeError, match="^top_k must be at least 1, got 0$"):
        compute_spectrum(problem, top_k=0)
    with pytest.raises(CurvscopeError, match="^groups 'module': choose one of"):
        compute_spectrum(problem, groups="module")
    with pytest.raises(CurvscopeError, match="^subsample 7 is larger than the batch"):
        compute_spectrum(problem, subsample=7)
    with pytest.raises(CurvscopeError, match="^mc_samples must be 0"):
        compute_spectrum(problem, mc_samples=-1)


def test_the_result_says_how_each_modules_rows_were_formed():
    """``rules`` names every module with parameters: a fast rule's mode, or generic (no rule, or ghost=False);
    the report lists them by kind."""
    import cases

    from curvscope.report.spectrum_report import spectrum_fields

    problem = cases.CASES["transformer-ce"]()
    modules = [g.name for g in problem.groups("layer")]
    fast = compute_spectrum(problem, directional=False)
    assert list(fast.rules) == modules and set(fast.rules.values()) <= {"ghost", "materialize", "generic"}
    linear = {name for name, m in problem.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {name for name, how in fast.rules.items() if how != "generic"} <= linear
    assert any(how != "generic" for how in fast.rules.values())
    generic = compute_spectrum(problem, directional=False, ghost=False)
    assert set(generic.rules.values()) == {"generic"}
    fields = spectrum_fields(fast, problem.batch_size, directional=False)
    assert sorted(sum(fields["rules"].values(), [])) == sorted(modules)
    assert fields["rules"]["generic"] == [m for m in modules if fast.rules[m] == "generic"]
