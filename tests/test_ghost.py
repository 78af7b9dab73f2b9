"""The ghost rules (nn.Linear, nn.Conv1d/2d) against the dense Jacobian and against the generic torch.func path,
for every block (vv, vg, gg) of every group; unsupported or unsafe layers fall back; the cost rule."""

from __future__ import annotations

import pytest
from cases import CASES
from helpers import assert_same_grams, dense_grams
from torch import nn

from curvscope.curvature.gram import compute_gram, ghost
from curvscope.curvature.gram import rows as generic
from curvscope.curvature.gram.columns import ColumnSpec, gradient_seeds, make_columns
from curvscope.curvature.gram.layout import make_layout
from curvscope.curvature.memory import MemoryPlan

BIG = MemoryPlan(budget=2**30)
KINDS = ["linear2d", "linear3d", "conv1d", "conv2d"]


def _all_groups(problem) -> list[tuple[str, tuple[str, ...]]]:
    return [(f"{mode}:{g.name}", g.param_names) for mode in ("all", "layer", "tensor")
            for g in problem.groups(mode)]


def _generic(problem, groups, **kw):
    return compute_gram(problem, groups, with_gradients=True, ghost=False, plan=BIG, **kw)[0]


def _ghost(problem, groups, force_mode=None, plan=BIG, mc_samples=0, subsample=None, seed=0,
           with_gradients=True):
    """The ghost rules alone (then the generic path for what they leave), as ``gram.gram_rows`` composes them;
    returns ``(grams, parameters the rules handled, columns)``."""
    layout = make_layout(problem)
    outputs = layout.outputs(problem)
    columns = make_columns(problem, outputs, ColumnSpec(mc_samples, subsample, seed))
    grad_seeds = gradient_seeds(problem, outputs) if with_gradients else None
    acc = layout.accumulator(groups, columns, problem.batch_size if with_gradients else None)
    names = [n for n in problem.params if acc.wanted(n)]
    handled = ghost.contribute(problem, names, columns, grad_seeds, acc, plan, layout, force_mode=force_mode)
    rest = [n for n in names if n not in handled]
    if rest:
        generic.contribute(problem, rest, columns, grad_seeds, acc, plan, layout)
    return acc.groups, handled, columns


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["ghost", "materialize"])
@pytest.mark.parametrize("subsample", [None, 4])
def test_ghost_equals_dense(kind, mode, subsample):
    """Both modes of the rules against ``J_n^T s_nk`` from the dense Jacobian and looped per-sample gradients."""
    problem = CASES[f"rule-{kind}"]()
    groups = _all_groups(problem)
    got, handled, columns = _ghost(problem, groups, force_mode=mode, subsample=subsample)
    assert handled == set(problem.params)
    assert_same_grams(dense_grams(problem, columns, groups), got)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("subsample", [None, 4])
def test_ghost_equals_generic(kind, bias, subsample):
    problem = CASES[f"rule-{kind}"](bias=bias)
    groups = _all_groups(problem)
    ref = _generic(problem, groups, subsample=subsample)
    for mode in ("ghost", "materialize", None):
        got, handled, _ = _ghost(problem, groups, force_mode=mode, subsample=subsample)
        assert handled == set(problem.params), (mode, handled)  # every tensor is a Linear/Conv parameter
        assert_same_grams(ref, got)
    # and through compute_gram's own composition
    assert_same_grams(ref, compute_gram(problem, groups, with_gradients=True, subsample=subsample, plan=BIG)[0])


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_ghost_equals_generic_mc_and_other_losses(loss):
    problem = CASES["rule-conv2d"](loss=loss)
    groups = _all_groups(problem)
    for mc in (0, 2):
        ref = _generic(problem, groups, mc_samples=mc, seed=3)
        got = compute_gram(problem, groups, with_gradients=True, mc_samples=mc, seed=3, plan=BIG)[0]
        assert_same_grams(ref, got)
        for mode in ("ghost", "materialize"):
            assert_same_grams(ref, _ghost(problem, groups, force_mode=mode, mc_samples=mc, seed=3)[0])
    ref = compute_gram(problem, groups, ghost=False, plan=BIG)[0]  # without gradient seeds: vv only
    got, _, _ = _ghost(problem, groups, force_mode="ghost", with_gradients=False)
    assert got[0].vg is None
    assert_same_grams(ref, got)


# -- layers the ghost rules must leave to the generic path --------------------------------------------------

FALLBACKS = {
    "twice-called": {"head.weight", "head.bias"},
    "tied": {"head.weight", "head.bias"},
    "used-outside": set(),
    "time-major": {"head.weight", "head.bias"},
    "hooked-output": set(),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_unsafe_layers_fall_back_to_the_generic_path(case):
    problem = CASES[case]()
    groups = _all_groups(problem)
    got, handled, columns = _ghost(problem, groups)
    assert handled == FALLBACKS[case]
    assert_same_grams(_generic(problem, groups), got)
    assert_same_grams(dense_grams(problem, columns, groups), got)


def test_unsupported_convolutions_are_not_candidates():
    problem = CASES["unsupported-convs"]()
    groups = _all_groups(problem)
    got, handled, _ = _ghost(problem, groups)
    assert handled == {"4.weight", "4.bias"}
    assert_same_grams(_generic(problem, groups), got)


def test_only_wanted_parameters_are_touched():
    problem = CASES["rule-linear2d"]()
    groups = [("first", ("0.weight",))]
    got, handled, _ = _ghost(problem, groups)
    assert handled == {"0.weight"}
    assert_same_grams(_generic(problem, groups), got)


def test_cost_rule_picks_ghost_for_wide_linear_and_materialize_for_many_positions():
    wide = ghost.GhostLayer("l", nn.Linear(64, 64), "l.weight", None, positions=1, d_in=64, d_out=64)
    conv = ghost.GhostLayer("c", nn.Conv2d(1, 16, 3), "c.weight", None, positions=64, d_in=9, d_out=16)
    assert ghost.choose_mode(wide, 128, 128 * 11, BIG, 4) == "ghost"
    assert ghost.choose_mode(conv, 128, 128 * 11, BIG, 4) == "materialize"
    # memory: materialized rows that cannot fit yield to ghost factors that can
    plan = MemoryPlan(budget=3 * 200 * 2**20)  # rows 369 MB, ghost factors 100 MB
    long = ghost.GhostLayer("s", nn.Linear(256, 256), "s.weight", None, positions=64, d_in=256, d_out=256)
    assert ghost.choose_mode(long, 128, 128 * 11, MemoryPlan(budget=2**40), 4) == "materialize"
    assert ghost.choose_mode(long, 128, 128 * 11, plan, 4) == "ghost"


def test_materialize_only_layers_beside_generic_parameters_are_left_to_the_generic_path():
    """When every rule layer would materialize its rows and other parameters (a LayerNorm) need the generic path's
    backward through the whole model anyway, the rules take nothing (their pass would be extra work); without
    such parameters, or with a forced mode, they still take the layers. The Gram is the same either way."""
    import torch

    from curvscope import make_problem

    class Tokens(nn.Module):
        def __init__(self, embed: bool) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(4) if embed else None  # parameters only the generic path takes
            self.embed = nn.Embedding(5, 4) if embed else None
            self.mix = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            h = self.norm(self.embed(x)) if self.embed is not None else x
            return self.out(torch.tanh(self.mix(h))).mean(1)  # (N, 3): one output per sample, T = 32 positions

    torch.manual_seed(0)
    tokens = torch.randint(5, (6, 32))
    for embed in (True, False):
        model = Tokens(embed).double()
        x = tokens if embed else torch.randn(6, 32, 4, dtype=torch.float64)
        problem = make_problem(model, x, torch.randint(3, (6,)), loss="ce", dtype=torch.float64)
        columns = make_columns(problem)
        names = list(problem.params)
        layers = ghost.select_layers(problem, names, columns, None, BIG)
        groups = _all_groups(problem)
        got, handled, _ = _ghost(problem, groups)
        if embed:
            assert layers == [] and handled == set()
        else:
            assert {layer.mode for layer in layers} == {"materialize"}
            assert handled == set(names)
        forced = ghost.select_layers(problem, names, columns, None, BIG, force_mode="materialize")
        assert {layer.module_name for layer in forced} == ({"embed", "mix", "out"} if embed else {"mix", "out"})
        assert_same_grams(_generic(problem, groups), got)


def test_force_mode_is_checked():
    problem = CASES["rule-linear2d"]()
    with pytest.raises(ValueError, match="force_mode"):
        _ghost(problem, _all_groups(problem), force_mode="fast")


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_hugging_face_conv1d_takes_the_rule_and_matches_dense(mode):
    """GPT-2's projections are Hugging Face ``Conv1D`` (weight stored in x out): the rule handles them (the tied
    embedding / LM head stays generic) and the Grams match the generic path's, per tensor and per layer, gradients
    included (``test_sequence.test_gpt2_from_transformers_matches_dense`` checks the whole spectrum, now through
    this rule, against PyTorch's Jacobian and Hessian)."""
    import torch

    transformers = pytest.importorskip("transformers")
    from curvscope import make_problem

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=8,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    lm = transformers.GPT2LMHeadModel(config).eval()

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids).logits

    tokens = torch.randint(11, (3, 4), generator=torch.Generator().manual_seed(1))
    problem = make_problem(Logits(), tokens, tokens, loss="ce", dtype=torch.float64, shift_labels=True)
    conv1d = {n for n in problem.params if any(f".{p}." in n for p in ("c_attn", "c_proj", "c_fc"))}
    assert len(conv1d) == 8  # weight and bias of attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    groups = _all_groups(problem)
    got, handled, _ = _ghost(problem, groups, force_mode=mode)
    assert handled == conv1d
    ref = _generic(problem, groups)
    assert_same_grams(ref, got, floor=float(ref[0].vv.abs().max()))  # key biases: zero but for rounding


class _TokenModel(nn.Module):
    """An embedding (optionally with a padding row) under a Linear, pooled over T positions (or one token per
    sample with ``single``): outputs (N, 4)."""

    def __init__(self, padding_idx=None, single: bool = False, **embedding) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 5, padding_idx=padding_idx, **embedding)
        self.mix = nn.Linear(5, 5)
        self.head = nn.Linear(5, 4)
        self.single = single

    def forward(self, x):
        import torch

        h = torch.tanh(self.mix(self.emb(x)))
        return self.head(h if self.single else h.mean(1))


def _token_problem(padding_idx=None, single: bool = False, **embedding):
    import torch

    from curvscope import make_problem

    torch.manual_seed(0)
    x = torch.randint(1, 9, (6,) if single else (6, 7), generator=torch.Generator().manual_seed(1))
    if padding_idx is not None:  # padding tokens get no gradient
        if single:
            x[0] = padding_idx
        else:
            x[1, :3] = padding_idx
    model = _TokenModel(padding_idx, single, **embedding).double()
    return make_problem(model, x, torch.randint(4, (6,), generator=torch.Generator().manual_seed(2)), loss="ce",
                        dtype=torch.float64)


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("single", [False, True])
@pytest.mark.parametrize("mode", [None, "ghost", "materialize"])
def test_embedding_rule_equals_dense(padding_idx, single, mode):
    """nn.Embedding is a Linear on one-hot tokens: its input products are comparisons of token ids (padding rows
    excluded). Both modes, T positions or one, against the dense Jacobian."""
    problem = _token_problem(padding_idx, single)
    groups = _all_groups(problem)
    got, handled, columns = _ghost(problem, groups, force_mode=mode)
    assert "emb.weight" in handled
    assert_same_grams(dense_grams(problem, columns, groups), got)


def test_embeddings_the_rule_cannot_follow_are_not_candidates():
    """max_norm renormalizes the weights in the forward; scale_grad_by_freq makes a sample's gradient depend on the
    batch; sparse gradients: the generic path takes them (same Grams)."""
    for embedding in ({"max_norm": 1.0}, {"scale_grad_by_freq": True}, {"sparse": True}):
        problem = _token_problem(**embedding)
        assert "emb" not in {layer.module_name for layer in ghost.candidate_layers(problem, list(problem.params))}
    problem = _token_problem(scale_grad_by_freq=True)
    groups = _all_groups(problem)
    got, handled, _ = _ghost(problem, groups)
    assert "emb.weight" not in handled
    assert_same_grams(_generic(problem, groups), got)


def test_cost_rule_takes_the_ghost_mode_for_a_large_vocabulary_only():
    large = ghost.GhostLayer("e", nn.Embedding(50_000, 64), "e.weight", None, positions=16, d_in=50_000, d_out=64)
    small = ghost.GhostLayer("e", nn.Embedding(60, 32), "e.weight", None, positions=16, d_in=60, d_out=32)
    assert ghost.choose_mode(large, 16, 256, BIG, 4) == "ghost"
    assert ghost.choose_mode(small, 8, 128, BIG, 4) == "materialize"


def test_bert_embeddings_take_the_rule_and_match_the_generic_path(tmp_path):
    """A Hugging Face BERT classifier as saved: the word and token-type embeddings take the rule (the position
    embeddings see position ids without a batch dimension and stay generic); the Grams are the generic path's."""
    import torch

    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    from curvscope.io.load import load_problem

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=500, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=8, num_labels=3)
    transformers.BertForSequenceClassification(config).eval().save_pretrained(tmp_path / "bert")
    ids = torch.randint(0, 500, (5, 6), generator=torch.Generator().manual_seed(1))
    save_file({"input_ids": ids, "labels": torch.arange(5) % 3}, str(tmp_path / "d.safetensors"))
    problem = load_problem(tmp_path / "bert", tmp_path / "d.safetensors", dtype="float64")
    groups = _all_groups(problem)
    got, handled, _ = _ghost(problem, groups)
    embeddings = {n for n in handled if "embeddings" in n}
    assert embeddings == {"bert.embeddings.word_embeddings.weight", "bert.embeddings.token_type_embeddings.weight"}
    ref = _generic(problem, groups)
    assert_same_grams(ref, got, floor=float(ref[0].vv.abs().max()))


def test_a_layer_whose_check_would_not_fit_the_budget_is_left_to_the_generic_path():
    """The per-sample check holds two probe samples' weight gradients twice; with a budget too small for the
    embedding's (9 x 5 float64 numbers, 4 copies: 1,440 bytes) it stays generic, with the same Grams."""
    problem = _token_problem()
    columns = make_columns(problem)
    names = list(problem.params)
    tight = MemoryPlan(budget=3 * 1400)  # a third of the budget per stage: 1,400 bytes
    kept = {layer.module_name for layer in ghost.select_layers(problem, names, columns, None, tight)}
    assert "emb" not in kept and {"mix", "head"} <= kept
    assert "emb" in {layer.module_name for layer in ghost.select_layers(problem, names, columns, None, BIG)}
    groups = _all_groups(problem)
    got, handled, _ = _ghost(problem, groups, plan=tight)
    assert "emb.weight" not in handled
    assert_same_grams(_generic(problem, groups), got)
