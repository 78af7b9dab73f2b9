"""The Python API layer (curvscope.api): honest signatures, one result type that both wings fill, the CLI's rule
for the method and its checks, against dense float64 references."""

from __future__ import annotations

import inspect
import pydoc

import pytest
import torch
from helpers import dense_ggn, flat_params, unflatten_params
from torch import nn

import curvscope
from curvscope.curvature.results import Spectrum, SpectrumGroup
from curvscope.errors import CurvscopeError, OptionError

F64 = torch.float64


def _model(c: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, c)).eval()


def _batch(n: int = 12, c: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randint(0, c, (n,), generator=g)


def _problem(n: int = 12, c: int = 3):
    x, y = _batch(n, c)
    return curvscope.make_problem(_model(c), x, y, loss="ce", dtype=F64)


def _dense_hessian(problem) -> torch.Tensor:
    return torch.autograd.functional.hessian(lambda th: problem.loss_value(unflatten_params(problem, th)),
                                             flat_params(problem))


@pytest.mark.parametrize("verb", ["spectrum", "suggest_lr", "factors", "ggn_operator", "hessian_operator"])
def test_every_verb_has_explicit_documented_keyword_parameters(verb):
    fn = getattr(curvscope, verb)
    params = inspect.signature(fn).parameters
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params.values()), verb
    doc = pydoc.render_doc(fn)
    documented = [n for n in params if n not in ("model_or_problem",)]
    missing = [n for n in documented if f"{n}:" not in inspect.getdoc(fn)]
    assert not missing, f"{verb}: parameters without a line in the docstring: {missing}"
    assert "Returns:" in doc or "Operator" in doc


def test_help_of_suggest_lr_shows_its_parameters():
    text = pydoc.render_doc(curvscope.suggest_lr)
    for name in ("partition", "curvature", "direction", "ridge", "batches", "holdout", "stability"):
        assert name in text


def test_spectrum_auto_is_the_gram_method_when_it_fits_and_equals_the_dense_ggn():
    problem = _problem()
    res = curvscope.spectrum(problem)
    assert isinstance(res, Spectrum) and isinstance(res.groups[0], SpectrumGroup)
    assert (res.method, res.curvature, res.converged) == ("gram", "ggn", True)
    want = torch.linalg.eigvalsh(dense_ggn(problem)).flip(0)
    g = res.groups[0]
    torch.testing.assert_close(g.eigenvalues, want[: g.rank], rtol=1e-9, atol=1e-12)
    assert g.lambda_max == pytest.approx(float(want[0]), rel=1e-10)
    assert g.stability_lr == pytest.approx(2 / float(want[0]), rel=1e-10)


def test_spectrum_auto_falls_back_to_lanczos_when_the_gram_does_not_fit():
    # 300 samples x 10 classes: a 3000 x 3000 float64 Gram (72 MB) is over a 64 MiB budget
    x, y = _batch(300, 10)
    problem = curvscope.make_problem(_model(10), x, y, loss="ce", dtype=F64)
    res = curvscope.spectrum(problem, max_memory="64MiB", top_k=3, density_vectors=0, trace_matvecs=0)
    assert (res.method, res.curvature) == ("lanczos", "ggn")
    want = torch.linalg.eigvalsh(dense_ggn(problem)).flip(0)[:3]
    torch.testing.assert_close(res.groups[0].eigenvalues, want, rtol=1e-6, atol=1e-9)
    with pytest.raises(OptionError, match="more than the memory budget"):  # an explicit Gram is refused
        curvscope.spectrum(problem, method="gram", max_memory="64MiB")


def test_hessian_spectrum_has_the_shared_names_and_both_ends():
    problem = _problem()
    res = curvscope.spectrum(problem, curvature="hessian", top_k=2, trace_matvecs=1000, density_vectors=0)
    assert (res.method, res.curvature) == ("lanczos", "hessian")
    evals = torch.linalg.eigvalsh(_dense_hessian(problem))
    g = res.groups[0]
    torch.testing.assert_close(g.eigenvalues, evals.flip(0)[:2], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g.bottom, evals[:2], rtol=1e-6, atol=1e-9)
    assert g.trace == pytest.approx(float(evals.sum()), rel=1e-9)
    assert res.group("all") is g


@pytest.mark.parametrize("method", ["gram", "lanczos"])
def test_eigenvectors_of_either_method_are_unit_ritz_vectors_of_the_dense_ggn(method):
    problem = _problem()
    res = curvscope.spectrum(problem, method=method, top_k=2, eigenvectors=True, density_vectors=0)
    G = dense_ggn(problem)
    vecs = torch.cat([v.reshape(v.shape[0], -1) for v in res.eigenvectors.values()], dim=1)[:2]
    for k in range(2):
        v = vecs[k]
        assert float(v.norm()) == pytest.approx(1.0, rel=1e-8)
        assert float(v @ G @ v) == pytest.approx(float(res.groups[0].eigenvalues[k]), rel=1e-6)


def test_a_model_with_its_batch_equals_the_problem_path():
    x, y = _batch()
    a = curvscope.spectrum(_model(), x, y, loss="ce", dtype=F64, directional=False)
    b = curvscope.spectrum(_problem(), directional=False)
    torch.testing.assert_close(a.groups[0].eigenvalues, b.groups[0].eigenvalues)


def test_the_cli_checks_run_in_the_api():
    problem = _problem()
    with pytest.raises(CurvscopeError, match="^subsample 99 is larger than the batch"):
        curvscope.spectrum(problem, subsample=99)
    with pytest.raises(OptionError, match="the Hessian has no Gram factor"):
        curvscope.spectrum(problem, curvature="hessian", method="gram")
    with pytest.raises(OptionError, match="^top_k must be at least 1"):
        curvscope.spectrum(problem, top_k=0)
    with pytest.raises(CurvscopeError, match="already has its inputs"):
        curvscope.spectrum(problem, torch.zeros(1, 4), torch.zeros(1))
    with pytest.raises(CurvscopeError, match="inputs and targets are needed"):
        curvscope.suggest_lr(_model())
    model = _model()
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))
    x, y = _batch()
    with pytest.raises(CurvscopeError, match="overflow"):
        curvscope.spectrum(model, x, y, loss="ce")


def test_suggest_lr_and_factors_take_a_model_with_its_batch():
    x, y = _batch()
    rates = curvscope.suggest_lr(_model(), x, y, loss="ce", dtype=F64, curvature="ggn")
    ref = curvscope.suggest_lr(_problem(), curvature="ggn")
    torch.testing.assert_close(rates.main.recommended, ref.main.recommended)
    assert [g.name for g in rates.groups] == ["0", "2"]
    run = curvscope.factors(_model(), x, y, loss="ce", dtype=F64, symo=True)
    assert run.symo is not None and run.result.structure.symmetry


def test_operators_from_the_api_equal_the_dense_curvature():
    problem = _problem()
    G = curvscope.ggn_operator(problem)
    H = curvscope.hessian_operator(problem)
    eye = torch.eye(problem.num_params, dtype=F64)
    torch.testing.assert_close(G @ eye, dense_ggn(problem), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(H @ eye, _dense_hessian(problem), rtol=1e-9, atol=1e-12)
    x, y = _batch()
    names = ["2.weight", "2.bias"]
    block = curvscope.ggn_operator(_model(), x, y, loss="ce", dtype=F64, names=names)
    assert block.shape == (6 * 3 + 3,) * 2
