"""Sequence outputs (docs/conventions.md §8): per-token losses, causal-LM label shifting, padding, against dense
references from PyTorch's own losses and plain-autograd Jacobians (no vmap)."""

from __future__ import annotations

import pytest
import torch
from helpers import dense_any
from torch import nn

from curvscope import CurvscopeError, make_problem
from curvscope.curvature.gram.columns import ColumnSpec, make_columns
from curvscope.curvature.gram.spectrum import compute_spectrum
from curvscope.curvature.lr import reduced_hessian

V, T, N = 7, 5, 3  # vocabulary (classes), positions, sequences


class TinyLM(nn.Module):
    """Embedding, a causal average over positions, a Linear on (N, T, d), tanh, the output Linear."""

    def __init__(self, vocab: int = V, d: int = 6, out: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, out or vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        t = h.shape[1]
        causal = torch.tril(torch.ones(t, t, dtype=h.dtype)) / torch.arange(1, t + 1, dtype=h.dtype)[:, None]
        return self.head(torch.tanh(self.mix(causal @ h)))


class TinyRegressor(nn.Module):
    """(N, T, d) floats -> (N, T, C) regression outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def lm_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(V, (N, T), generator=g)
    labels = tokens.clone()
    labels[2, 3:] = -100  # padding at the end of the last sequence
    labels[0, 0] = -100  # a prompt token
    return tokens, labels


def lm_problem(shift: bool = True, **kw):
    torch.manual_seed(0)
    tokens, labels = lm_data()
    return make_problem(TinyLM(), tokens, labels, loss="ce", dtype=torch.float64, shift_labels=shift, **kw), labels


def hf_loss(labels: torch.Tensor, shift: bool):
    """Hugging Face's causal-LM loss: logits[:, :-1] against labels[:, 1:] (or no shift), ignore_index -100."""
    ce = nn.CrossEntropyLoss(ignore_index=-100)
    if shift:
        return lambda out: ce(out[:, :-1].reshape(-1, out.shape[-1]), labels[:, 1:].reshape(-1))
    return lambda out: ce(out.reshape(-1, out.shape[-1]), labels.reshape(-1))


def assert_matches_dense(problem, batch_loss, k: int = 8) -> None:
    dense = dense_any(problem, batch_loss)
    ref_evals, _ = dense.eigen()
    result = compute_spectrum(problem)
    g = result.groups[0]
    assert g.rank == ref_evals.numel()
    torch.testing.assert_close(g.eigenvalues, ref_evals, rtol=1e-6, atol=1e-12 * float(ref_evals[0]))
    assert g.trace == pytest.approx(float((dense.factor**2).sum()), rel=1e-8)
    evals, gamma, lambdas = dense.directions(k)
    d = g.directions
    torch.testing.assert_close(d.lambdas[:, :k], lambdas, rtol=1e-6, atol=1e-9 * float(evals[0]))
    torch.testing.assert_close(d.gamma[:, :k].abs(), gamma.abs(), rtol=1e-6, atol=1e-9)
    assert d.lambda_consistency < 1e-8
    assert result.loss_value == pytest.approx(float(batch_loss(problem.forward().reshape(
        problem.batch_size, *problem.output_shape))), rel=1e-12)
    return result


def test_causal_lm_loss_is_hugging_faces():
    problem, labels = lm_problem()
    out = problem.forward().reshape(N, T, V)
    torch.testing.assert_close(problem.loss_value(), hf_loss(labels, True)(out))
    assert problem.is_sequence and (problem.positions, problem.classes, problem.num_outputs) == (T, V, T * V)
    assert problem.num_tokens == int((labels[:, 1:] != -100).sum())
    # per-sample losses: the batch's token count normalizes every chunk
    full = problem.per_sample_loss()
    assert float(full.mean()) == pytest.approx(float(problem.loss_value()), rel=1e-14)
    chunk = problem.loss.per_sample(problem.forward(inputs=problem.inputs[1:2]), problem.targets[1:2])
    torch.testing.assert_close(chunk, full[1:2])
    assert "tokens=" in repr(problem) and "tensor(" not in repr(problem)


def test_causal_lm_spectrum_against_dense():
    problem, labels = lm_problem()
    result = assert_matches_dense(problem, hf_loss(labels, True))
    # padded tokens are left out: the columns are tokens x classes of the longest sequence
    valid = (labels[:, 1:] != -100).sum(1)
    assert result.num_columns == N * int(valid.max()) * V
    assert result.path == "autograd"  # every layer (embedding, Linears) takes a ghost rule


def test_token_classifier_without_shift_against_dense():
    torch.manual_seed(1)
    tokens, labels = lm_data(1)
    model = TinyLM(out=4)
    labels = labels % 4 * (labels >= 0) + -100 * (labels < 0)
    problem = make_problem(model, tokens, labels, loss="ce", dtype=torch.float64)
    assert_matches_dense(problem, hf_loss(labels, False))


def test_mse_on_sequences_against_dense():
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(N, T, 4, generator=g), torch.randn(N, T, 3, generator=g)
    problem = make_problem(TinyRegressor(), x, y, loss="mse", dtype=torch.float64)
    torch.testing.assert_close(problem.loss_value(), nn.MSELoss()(problem.forward().reshape(N, T, 3), y.double()))
    assert_matches_dense(problem, lambda out: nn.MSELoss()(out, y.double()))


def _sequence_cases():
    problem, labels = lm_problem()
    yield "causal-lm", problem, hf_loss(labels, True)
    torch.manual_seed(1)
    tokens, labels = lm_data(1)
    labels = labels % 4 * (labels >= 0) + -100 * (labels < 0)
    yield "token-classifier", make_problem(TinyLM(out=4), tokens, labels, loss="ce", dtype=torch.float64), \
        hf_loss(labels, False)
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(N, T, 4, generator=g), torch.randn(N, T, 3, generator=g)
    yield "mse", make_problem(TinyRegressor(), x, y, loss="mse", dtype=torch.float64), \
        lambda out: nn.MSELoss()(out, y.double())


def test_matrix_free_ggn_of_sequence_models_against_dense():
    """The GGN-vector products of Lanczos (``ggn_operator``) use each token's loss Hessian times N/|T|, the
    ignored tokens' blocks zero: the matrix equals J^T H J from PyTorch's own loss, and Lanczos finds the Gram
    engine's eigenvalues (before, the closed form took a softmax over all T*C outputs of a sequence)."""
    from curvscope.curvature.matfree import compute_matfree_spectrum, ggn_operator

    for name, problem, batch_loss in _sequence_cases():
        G = dense_any(problem, batch_loss).G
        torch.testing.assert_close(ggn_operator(problem).dense(), G, rtol=0, atol=1e-10 * float(G.abs().max()),
                                   msg=name)
        gram = compute_spectrum(problem, top_k=3).groups[0]
        lanczos = compute_matfree_spectrum(problem, curvature="ggn", top_k=3, trace_matvecs=problem.num_params,
                                           density_vectors=0).groups[0]
        torch.testing.assert_close(lanczos.top, gram.eigenvalues[:3], rtol=1e-8, atol=0, msg=name)
        assert lanczos.trace == pytest.approx(gram.trace, rel=1e-10), name


def test_matrix_free_hessian_of_a_causal_lm_against_dense():
    """Lanczos on the Hessian of a causal LM (shifted labels, ignored tokens): both ends and the exact trace
    against ``torch.autograd.functional.hessian`` of Hugging Face's loss on the model's raw outputs."""
    from helpers import flat_params, unflatten_params
    from torch.func import functional_call

    from curvscope.curvature.matfree import compute_matfree_spectrum

    problem, labels = lm_problem()
    batch_loss = hf_loss(labels, True)

    def loss_of(theta):
        params = {**problem.buffers, **unflatten_params(problem, theta)}
        return batch_loss(functional_call(problem.model, params, (problem.inputs,)))

    H = torch.autograd.functional.hessian(loss_of, flat_params(problem))
    evals = torch.linalg.eigvalsh(H)
    g = compute_matfree_spectrum(problem, curvature="hessian", top_k=2, trace_matvecs=problem.num_params,
                                 density_vectors=0).groups[0]
    torch.testing.assert_close(g.top, evals.flip(0)[:2], rtol=1e-8, atol=0)
    torch.testing.assert_close(g.bottom, evals[:2], rtol=1e-8, atol=0)
    assert g.trace == pytest.approx(float(H.trace()), rel=1e-10)


def test_newton_step_of_a_causal_lm_against_dense():
    """The damped Newton step along all nonzero directions of a causal LM's GGN equals the dense formula with
    J^T H J and the gradient of Hugging Face's loss."""
    from helpers import dense_step

    from curvscope.curvature.gram.newton import newton_step

    problem, labels = lm_problem()
    dense = dense_any(problem, hf_loss(labels, True))
    gradient = torch.cat([g.reshape(-1) for g in problem.gradient().values()])
    torch.testing.assert_close(gradient, dense.gn.mean(0), rtol=0, atol=1e-14)
    result = compute_spectrum(problem)
    step = newton_step(problem, result, 0.1)
    mine = torch.cat([step.step[n].reshape(-1) for n in problem.params])
    ref = dense_step(dense.G, gradient, result.groups[0].top_k, 0.1)
    assert result.groups[0].top_k == result.groups[0].rank
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))


def test_lr_ggn_h_bar_of_a_sequence_model():
    problem, labels = lm_problem()
    dense = dense_any(problem, hf_loss(labels, True))
    groups = problem.groups("layer")
    direction = problem.gradient()
    h_bar = reduced_hessian(problem, direction, groups, "ggn")
    flat = torch.cat([direction[n].reshape(-1) for n in problem.params])
    sizes = [problem.params[n].numel() for n in problem.params]
    owner = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    names = list(problem.params)
    U = torch.stack([flat * torch.tensor([names[int(o)] in grp.param_names for o in owner]) for grp in groups])
    torch.testing.assert_close(h_bar, U @ dense.G @ U.T, rtol=1e-8, atol=1e-14)


def test_monte_carlo_per_token_approaches_the_exact_trace():
    problem, _labels = lm_problem()
    exact = compute_spectrum(problem, directional=False).groups[0].trace
    traces = [compute_spectrum(problem, mc_samples=1, seed=s, directional=False) for s in range(60)]
    valid = int(problem.loss.valid_tokens(problem.targets).sum(1).max())
    assert traces[0].num_columns == N * valid  # one column per token
    mean = sum(r.groups[0].trace for r in traces) / len(traces)
    assert mean == pytest.approx(exact, rel=0.1)


def test_extra_batch_uses_its_own_token_count():
    problem, labels = lm_problem()
    tokens = problem.inputs
    other = problem.with_batch(tokens[:2], problem.targets[:2])
    out = other.forward().reshape(2, T, V)
    torch.testing.assert_close(other.loss_value(), hf_loss(labels[:2], True)(out))
    assert other.loss.token_scale == pytest.approx(2 / other.num_tokens)


def test_batch_from_dataset_shifts_labels():
    torch.manual_seed(0)
    tokens, labels = lm_data()
    problem = make_problem(TinyLM(), tokens, labels, loss="ce", dtype=torch.float64, shift_labels=True,
                           dataset=(tokens, labels))
    other = problem.batch_from_dataset(torch.tensor([2, 0]))
    out = other.forward().reshape(2, T, V)
    torch.testing.assert_close(other.loss_value(), hf_loss(labels[[2, 0]], True)(out))


def test_huge_exact_sequence_curvature_is_refused_with_advice():
    torch.manual_seed(0)
    tokens = torch.randint(300, (4, 64))
    problem = make_problem(TinyLM(vocab=300), tokens, tokens, loss="ce", shift_labels=True)
    with pytest.raises(CurvscopeError, match=r"exact curvature needs 75,600 columns \(4 sequences x 63 tokens x "
                                             r"300 classes\): use mc_samples=1"):
        make_columns(problem)
    assert make_columns(problem, spec=ColumnSpec(mc_samples=1)).num_columns == 4 * 63


def test_seeds_over_the_memory_budget_are_refused_before_allocating():
    """Monte-Carlo seeds of a large vocabulary are kept per token (4 sequences x 64 tokens x 2,000 classes x 1
    draw) plus the dense seed of one column (64 x 2,000), in float32: 2.56 MB where one T*C vector per column
    took 129 MB. Over the budget they are still a clean error pointing at lanczos, in the engine and in the
    spectrum workflow's method choice, not an allocation failure."""
    from curvscope.curvature.gram.columns import seed_bytes
    from curvscope.curvature.method import choose_method
    from curvscope.errors import OptionError
    from curvscope.workflows.spectrum import SpectrumOptions

    torch.manual_seed(0)
    tokens = torch.randint(2000, (4, 64))
    problem = make_problem(TinyLM(vocab=2000, d=2), tokens, tokens, loss="ce", shift_labels=True, dtype="float32")
    assert seed_bytes(problem, mc_samples=1) == (4 * 1 + 1) * 64 * 2000 * 4
    with pytest.raises(CurvscopeError, match=r"the seeds of 252 columns of V over 128,000 outputs per sample need "
                                             r"2.44 MiB, more than the memory budget \(2 MiB\).*matrix-free method"):
        make_columns(problem, spec=ColumnSpec(mc_samples=1), max_bytes=2**21)
    with pytest.raises(CurvscopeError, match="the seeds of 252 columns"):
        compute_spectrum(problem, mc_samples=1, max_memory=2**22)  # a third of it for the seeds
    assert make_columns(problem, spec=ColumnSpec(mc_samples=1), max_bytes=2**22).num_columns == 252
    with pytest.raises(OptionError, match=r"the seeds of the 252 columns need 2.44 MiB"):
        choose_method(problem, mc_samples=1, max_memory=2**20)
    plan = SpectrumOptions(mc_samples=1, max_memory="64MiB").plan(problem)  # the dense seeds were refused here
    assert (plan.method, plan.note) == ("gram", None)


@pytest.mark.parametrize(("kw", "match"), [
    (dict(loss="mse", shift_labels=True), "shift_labels needs"),
    (dict(loss="ce", labels=torch.full((N, T), -100)), "no token of the batch carries loss"),
    (dict(loss="ce", labels=torch.full((N, T), V)), r"token labels must lie in \[0, 7\)"),
    (dict(loss="ce", labels=torch.zeros(N, T + 1, dtype=torch.long)), "one label per position"),
])
def test_bad_sequence_targets_are_clean_errors(kw, match):
    tokens, labels = lm_data()
    labels = kw.pop("labels", labels)
    if kw["loss"] == "mse":
        labels = torch.zeros(N, T, V)
    with pytest.raises(CurvscopeError, match=match):
        make_problem(TinyLM(), tokens, labels, **kw)


class Logits(nn.Module):
    """A wrapper mapping token ids to a Hugging Face model's ``.logits``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids).logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_from_transformers_matches_dense(attn):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=16,
                                     bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    lm = transformers.GPT2LMHeadModel(config).eval()
    tokens = torch.randint(20, (2, 4), generator=torch.Generator().manual_seed(0))
    labels = tokens.clone()
    labels[1, 3] = -100
    problem = make_problem(Logits(lm), tokens, labels, loss="ce", dtype=torch.float64, shift_labels=True)
    with torch.no_grad():  # Hugging Face's own loss, which shifts the labels itself (in float32)
        hf = float(lm.double()(input_ids=tokens, labels=labels).loss)
    assert float(problem.loss_value()) == pytest.approx(hf, rel=1e-5)
    assert_matches_dense(problem, hf_loss(labels, True), k=4)


@pytest.mark.parametrize("mode", ["ghost", "materialize", None])
def test_linear_layers_on_token_activations_take_the_ghost_rule(mode):
    """The Linear layers of a (wide) LM see (N, T, d) activations: the rule with T positions handles them (auto:
    the ghost products for the wide projection), the embedding's rule its T tokens, and both agree with the
    generic path, gradients included."""
    from curvscope.curvature.gram import compute_gram, ghost
    from curvscope.curvature.gram.columns import gradient_seeds
    from curvscope.curvature.memory import MemoryPlan

    torch.manual_seed(3)
    tokens, labels = lm_data(3)
    model = TinyLM(d=48)
    problem = make_problem(model, tokens, labels, loss="ce", dtype=torch.float64, shift_labels=True)
    plan = MemoryPlan(budget=2**30)
    columns = make_columns(problem)
    layers = ghost.select_layers(problem, list(problem.params), columns, gradient_seeds(problem, problem.forward()),
                                 plan, force_mode=mode)
    assert {(layer.module_name, layer.positions) for layer in layers} == {("emb", T), ("mix", T), ("head", T)}
    if mode is None:
        assert {layer.module_name: layer.mode for layer in layers}["mix"] == "ghost"
    groups = [(g.name, g.param_names) for g in problem.groups("layer")]
    generic_grams = compute_gram(problem, groups, with_gradients=True, ghost=False, plan=plan)[0]
    layout_grams = _ghost_grams(problem, groups, plan, mode)
    for a, b in zip(generic_grams, layout_grams, strict=True):
        for x, y in ((a.vv, b.vv), (a.vg, b.vg), (a.gg, b.gg)):
            torch.testing.assert_close(y, x, rtol=0, atol=1e-10 * float(x.abs().max()))


def _ghost_grams(problem, groups, plan, mode):
    from curvscope.curvature.gram import ghost
    from curvscope.curvature.gram import rows as generic
    from curvscope.curvature.gram.columns import gradient_seeds
    from curvscope.curvature.gram.layout import make_layout

    layout = make_layout(problem)
    outputs = layout.outputs(problem)
    columns = make_columns(problem, outputs)
    grad_seeds = gradient_seeds(problem, outputs)
    acc = layout.accumulator(groups, columns, problem.batch_size)
    names = [n for n in problem.params if acc.wanted(n)]
    handled = ghost.contribute(problem, names, columns, grad_seeds, acc, plan, layout, force_mode=mode)
    assert handled == {"emb.weight", "mix.weight", "mix.bias", "head.weight", "head.bias"}
    generic.contribute(problem, [n for n in names if n not in handled], columns, grad_seeds, acc, plan, layout)
    return acc.groups


def test_column_count_without_building_the_columns():
    from curvscope.curvature.gram.columns import count_columns, make_columns

    problem, _ = lm_problem()  # padded sequences: the most valid tokens of one sequence sets T_v
    for mc, sub in ((0, None), (2, None), (0, 2), (3, 1)):
        assert count_columns(problem, mc, sub) == make_columns(problem, spec=ColumnSpec(mc, sub)).num_columns
