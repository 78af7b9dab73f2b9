"""The Gram wing's structure: the ghost rules behind one table (every rule class in it, lookup by module kind, an
unknown module left to the generic path, a new kind plugged in by one entry), the ColumnSpec that chooses the
columns of V, and the sharded layout holding its communicator."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import pytest
import torch
from cases import CASES, make
from helpers import assert_same_grams, dense_grams
from torch import nn

from curvscope.curvature.distributed import Comm
from curvscope.curvature.gram import ColumnSpec, compute_gram, compute_spectrum, ghost, make_columns
from curvscope.curvature.gram.ghost import registry
from curvscope.curvature.gram.ghost.linear import LinearRule
from curvscope.curvature.gram.layout import ShardedLayout, make_layout
from curvscope.curvature.memory import MemoryPlan
from curvscope.errors import CurvscopeError

BIG = MemoryPlan(budget=2**30)


def _rule_classes() -> set[type]:
    """Every concrete GhostRule subclass defined in the ghost package."""
    found = set()
    for info in pkgutil.iter_modules(ghost.__path__):
        module = importlib.import_module(f"{ghost.__name__}.{info.name}")
        found |= {obj for _name, obj in inspect.getmembers(module, inspect.isclass)
                  if issubclass(obj, ghost.GhostRule) and not inspect.isabstract(obj)}
    return found


def test_every_rule_class_is_in_the_one_table_once():
    in_table = [type(rule) for rule in registry.RULES]
    assert len(in_table) == len(set(in_table))
    assert set(in_table) == _rule_classes() == {ghost.LinearRule, ghost.ConvRule, ghost.HFConv1DRule,
                                                 ghost.EmbeddingRule}
    assert ghost.RULES is registry.RULES


class Conv1D(nn.Module):
    """Hugging Face's ``Conv1D`` as transformers defines it (weight ``(nx, nf)``, ``y = x W + b``), without it."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


@pytest.mark.parametrize(("module", "rule"), [
    (nn.Linear(3, 2), ghost.LinearRule),
    (nn.modules.linear.NonDynamicallyQuantizableLinear(3, 2), ghost.LinearRule),  # a subclass (attention's out_proj)
    (nn.Conv1d(2, 3, 3), ghost.ConvRule),
    (nn.Conv2d(2, 3, 3), ghost.ConvRule),
    (nn.Embedding(5, 3), ghost.EmbeddingRule),
    (Conv1D(4, 3), ghost.HFConv1DRule),
])
def test_lookup_by_module_kind(module, rule):
    assert type(ghost.rule_for(module)) is rule
    assert ghost.GhostLayer("m", module, "m.weight", None).rule is ghost.rule_for(module)


@pytest.mark.parametrize("module", [nn.LayerNorm(3), nn.Conv3d(1, 1, 2), nn.ConvTranspose2d(1, 1, 2), nn.Tanh(),
                                    nn.Bilinear(2, 2, 2), nn.Sequential(nn.Linear(2, 2))])
def test_an_unknown_module_has_no_rule(module):
    assert ghost.rule_for(module) is None
    with pytest.raises(ValueError, match="no ghost rule"):
        ghost.GhostLayer("m", module, "m.weight", None)


def test_an_unknown_module_falls_back_to_the_generic_path():
    """A LayerNorm between two Linears: the rules take the Linears; the norm's rows come from the generic path and
    the report's rules field says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    problem = make(model, torch.randn(6, 4))
    names = list(problem.params)
    layers = ghost.select_layers(problem, names, make_columns(problem), None, BIG, force_mode="ghost")
    assert [layer.module_name for layer in layers] == ["0", "3"]
    assert compute_spectrum(problem, groups="layer").rules == {"0": "ghost", "1": "generic", "3": "ghost"}


@pytest.mark.parametrize(("module", "reason"), [
    (nn.Conv2d(2, 2, 3, groups=2), "groups"),
    (nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect"), "padding_mode"),
    (nn.Embedding(5, 3, max_norm=1.0), "max_norm"),
    (nn.Embedding(5, 3, scale_grad_by_freq=True), "scale_grad_by_freq"),
    (nn.Embedding(5, 3, sparse=True), "sparse"),
])
def test_refusals_name_their_reason(module, reason):
    rule = ghost.rule_for(module)
    assert reason in rule.refusal(module)
    assert rule.refusal(type(module)(*_plain_args(module))) is None


def _plain_args(module: nn.Module) -> tuple:
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return module.in_channels, module.out_channels, module.kernel_size


class Dense(nn.Module):
    """A layer kind the package does not know: ``y = x W + b`` with ``W`` stored ``(d_in, d_out)``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) * 0.5)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x):
        return x @ self.weight + self.bias


class DenseRule(LinearRule):
    """Its rule: a Linear with a transposed weight (what a new file would hold)."""

    kind = "Dense"
    transposed = True

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, Dense)


class UntransposedDenseRule(DenseRule):
    """A wrong rule for it: its per-sample weight gradients have the entries in the wrong order."""

    transposed = False


def _rules_alone(problem, groups, mode):
    """The rules, then the generic path for what they leave: ``(grams, handled, rules field, columns)``."""
    from curvscope.curvature.gram import rows
    from curvscope.curvature.gram.columns import gradient_seeds

    layout = make_layout(problem)
    outputs = layout.outputs(problem)
    columns = make_columns(problem, outputs)
    seeds = gradient_seeds(problem, outputs)
    acc = layout.accumulator(groups, columns, problem.batch_size)
    handled = ghost.contribute(problem, list(problem.params), columns, seeds, acc, BIG, layout, force_mode=mode)
    rest = [n for n in problem.params if n not in handled]
    if rest:
        rows.contribute(problem, rest, columns, seeds, acc, BIG, layout)
    return acc.groups, handled, acc.rules, columns


@pytest.mark.parametrize("mode", ["ghost", "materialize"])
def test_a_new_layer_kind_is_one_rule_and_one_table_entry(monkeypatch, mode):
    """Unknown, the layer goes to the generic path; with its rule in the table the rules take it, with the generic
    path's and the dense Jacobian's Gram. A wrong rule in the table is refused by the per-sample check."""
    torch.manual_seed(0)
    problem = make(nn.Sequential(Dense(4, 5), nn.Tanh(), nn.Linear(5, 3)), torch.randn(6, 4))
    groups = [("all", tuple(problem.params))] + [(g.name, g.param_names) for g in problem.groups("layer")]
    ref = compute_gram(problem, groups, with_gradients=True, ghost=False, plan=BIG)[0]
    _grams, handled, rules, _ = _rules_alone(problem, groups, mode)
    assert handled == {"2.weight", "2.bias"} and rules == {"2": mode}
    monkeypatch.setattr(registry, "RULES", (UntransposedDenseRule(), *registry.RULES))
    _grams, handled, rules, _ = _rules_alone(problem, groups, mode)
    assert handled == {"2.weight", "2.bias"} and rules == {"2": mode}
    monkeypatch.setattr(registry, "RULES", (DenseRule(), *registry.RULES[1:]))
    grams, handled, rules, columns = _rules_alone(problem, groups, mode)
    assert handled == set(problem.params) and rules == {"0": mode, "2": mode}
    assert_same_grams(ref, grams)
    assert_same_grams(dense_grams(problem, columns, groups), grams)
    assert compute_spectrum(problem, groups="layer").rules["0"] in ("ghost", "materialize")


def test_column_spec_is_one_frozen_value():
    spec = ColumnSpec(mc_samples=2, subsample=3, seed=5)
    assert (spec.mc_samples, spec.subsample, spec.seed) == (2, 3, 5)
    assert ColumnSpec() == ColumnSpec(0, None, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1  # type: ignore[misc]
    assert spec.num_samples(6) == 3 and ColumnSpec().num_samples(6) == 6
    for bad, message in ((ColumnSpec(subsample=0), "subsample must be at least 1"),
                         (ColumnSpec(subsample=7), "subsample 7 is larger than the batch"),
                         (ColumnSpec(mc_samples=-1), "mc_samples must be 0")):
        with pytest.raises(CurvscopeError, match=message):
            bad.check(6)
        with pytest.raises(CurvscopeError, match=message):
            make_columns(CASES["small-mlp-ce"](), spec=bad)


def test_columns_and_results_remember_their_spec():
    """``compute_spectrum``'s keywords build the ColumnSpec; the columns carry it, the result names its parts, and
    the same spec given to make_columns builds the same columns."""
    problem = CASES["small-mlp-ce"]()
    result = compute_spectrum(problem, mc_samples=2, subsample=3, seed=5, directional=False)
    spec = ColumnSpec(mc_samples=2, subsample=3, seed=5)
    assert result.columns.spec == spec
    assert (result.mc_samples, result.subsample, result.columns.mc_samples) == (2, 3, 2)
    again = make_columns(problem, spec=spec)
    assert torch.equal(again.seeds, result.columns.seeds) and torch.equal(again.samples, result.columns.samples)
    assert make_columns(problem).spec == ColumnSpec()


def test_the_sharded_layout_holds_its_communicator():
    """Composition, not inheritance: the layout delegates rank, world and device to its Comm."""
    assert not issubclass(ShardedLayout, Comm)
    assert [f.name for f in dataclasses.fields(ShardedLayout)] == ["comm", "num_samples", "batch_bounds"]
    cpu = torch.device("cpu")
    layout = ShardedLayout(Comm(None, 1, 3, cpu, cpu), 7, [0, 2, 4, 7])
    assert (layout.rank, layout.world, layout.device) == (1, 3, cpu)
    assert layout.batch_range() == (2, 4) and layout.batch_range(2) == (4, 7)


def test_the_refusal_of_huge_exact_sequence_curvature_names_python_parameters(monkeypatch):
    from curvscope import make_problem
    from curvscope.curvature.gram import columns

    torch.manual_seed(0)
    tokens = torch.randint(7, (2, 5), generator=torch.Generator().manual_seed(1))
    problem = make_problem(nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7)), tokens, tokens, loss="ce",
                           shift_labels=True)
    monkeypatch.setattr(columns, "MAX_EXACT_SEQUENCE_COLUMNS", 1)
    with pytest.raises(CurvscopeError) as info:
        make_columns(problem)
    assert "use mc_samples=1 (Monte-Carlo per token), or fewer sequences (subsample)" in str(info.value)
    assert "--" not in str(info.value)
    assert make_columns(problem, spec=ColumnSpec(mc_samples=1)).num_columns == 2 * 4
