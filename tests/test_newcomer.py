"""A newcomer's day (issue #23): an honest default precision and like-with-like baselines, a warning for unshifted
causal-LM labels, per-layer Newton steps that interact, lr-suggest rates within the stability bound of per-group
rates, and factors on models that are not a chain of nn.Linear; each against a dense or brute-force reference."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import assert_clean_error, invoke
from helpers import dense_any
from safetensors.torch import save_file
from torch import nn

from curvscope import make_problem
from curvscope.curvature.gram.newton import newton_step
from curvscope.curvature.gram.spectrum import compute_spectrum
from curvscope.io.inputs import KeywordInputs

# -- the default precision and baselines ------------------------------------------------------------------------


def test_the_default_dtype_on_the_cpu_is_float64_and_baselines_compare_like_with_like(tiny_files, tmp_path):
    ckpt, data, _ = tiny_files
    for dtype in ("auto", "float32"):
        args = ["--dtype", dtype] if dtype != "auto" else []
        result = invoke("spectrum", ckpt, "--data", data, "--device", "cpu", "--no-plots", *args, "--out",
                        tmp_path / dtype)
        assert result.exit_code == 0, result.stderr
    new = json.loads((tmp_path / "auto" / "report.json").read_text())
    assert new["problem"]["dtype"] == "float64" and new["precision"] == "float64"
    old = tmp_path / "float32" / "report.json"
    # the rank counts eigenvalues above the precision floor: a float32 baseline is refused for it
    result = invoke("check", tmp_path / "auto" / "report.json", "--baseline", old, "--max-decrease",
                    "groups[*].rank=10%")
    assert_clean_error(result, "computed in float32", "float64", "same dtype")
    # a limit the precision does not set is compared, with a warning
    result = invoke("check", tmp_path / "auto" / "report.json", "--baseline", old, "--max-increase",
                    "groups[0].lambda_max=20%")
    assert result.exit_code == 0, result.stderr
    assert "computed in float32" in result.stderr


# -- unshifted causal-LM labels ---------------------------------------------------------------------------------

V = 7


class NextToken(nn.Module):
    """A causal LM that has learnt 'the next token is this one plus 1 (mod V)'."""

    def __init__(self, trained: bool = True) -> None:
        super().__init__()
        self.table = nn.Embedding(V, V)
        with torch.no_grad():
            self.table.weight.copy_(6 * torch.roll(torch.eye(V), 1, dims=1) if trained else 0.01 * torch.randn(V, V))

    def forward(self, input_ids):
        return self.table(input_ids)


def lm_factory(trained: bool = True) -> nn.Module:
    return NextToken(trained)


@pytest.mark.parametrize("trained, shift, warned", [(True, None, True), (True, "--shift-labels", False),
                                                     (False, None, False)])
def test_unshifted_labels_of_a_causal_lm_are_warned_about(tmp_path, trained, shift, warned):
    start = torch.randint(0, V, (8, 1), generator=torch.Generator().manual_seed(0))
    ids = (start + torch.arange(6)) % V
    data = tmp_path / "lm.safetensors"
    save_file({"input_ids": ids, "labels": ids.clone()}, str(data))
    result = invoke("info", "--model", f"{__file__}:lm_factory", "--model-kwargs", json.dumps({"trained": trained}),
                    "--data", data, "--device", "cpu", *([shift] if shift else []))
    assert result.exit_code == 0, result.stderr
    assert ("labels are the input tokens" in result.stderr and "--shift-labels" in result.stderr) == warned


# -- per-layer Newton steps interact ----------------------------------------------------------------------------


class Parallel(nn.Module):
    """Three linear maps summed: each layer's Newton step alone fits the targets; their sum overshoots 3-fold."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(x)


def test_per_layer_newton_steps_that_raise_the_loss_get_the_whole_model_scale():
    torch.manual_seed(0)
    x = torch.randn(8, 2, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0]], dtype=torch.float64)
    problem = make_problem(Parallel(), x, y, loss="mse", dtype=torch.float64)
    result = compute_spectrum(problem, groups="layer", include_total=True)
    step = newton_step(problem, result, damping=0.0)
    assert step.realized_decrease < 0 < step.predicted_decrease_blocks  # each block predicts a decrease
    # dense reference: the quadratic (exact here) model's optimal scale along the summed step d
    dense = dense_any(problem, lambda out: nn.MSELoss()(out, y))
    d = torch.cat([step.step[n].reshape(-1) for n in problem.params])
    g = dense.gn.mean(0)
    t = float(-(g @ d) / (d @ dense.G @ d))
    assert step.scale == pytest.approx(min(1.0, t), rel=1e-8) and abs(t - 1 / 3) < 1e-8
    assert step.scaled_realized_decrease == pytest.approx(step.scaled_predicted_decrease, rel=1e-6)
    assert step.scaled_realized_decrease == pytest.approx(step.loss_before, rel=1e-6)  # the minimum, 0
    from curvscope.report.spectrum_report import newton_warnings

    text = " ".join(newton_warnings(step))
    assert "interact" in text and "0.333" in text


# -- lr-suggest: the stability bound of per-group rates ---------------------------------------------------------


def test_recommended_rates_respect_the_stability_bound_of_per_group_rates(tmp_path):
    from curvscope.workflows.lr import suggest_lr

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.arange(16) % 3
    problem = make_problem(model, x, y, loss="ce", dtype=torch.float64)
    main = suggest_lr(problem).main
    dense = dense_any(problem, lambda out: nn.CrossEntropyLoss()(out, y))
    groups = problem.groups("layer")
    rates = torch.cat([torch.full((p.numel(),), float(main.recommended[[i for i, g in enumerate(groups)
                                                                         if n in g.param_names][0]]),
                                  dtype=torch.float64) for n, p in problem.params.items()])
    root = rates.sqrt()
    joint = float(torch.linalg.eigvalsh(root[:, None] * dense.G * root[None, :]).max())
    assert main.joint_sharpness == pytest.approx(joint, rel=1e-3)
    assert joint <= 2 * (1 + 1e-3)
    # here the rule's rates broke the bound and were scaled to it; one group keeps a rate above the single-rate
    # bound 2/lambda_max(G), which is no warning (it applies to one rate for all)
    assert all("joint stability x" in r for r in main.rules)
    assert float(main.recommended.max()) > main.lr_stability_global
    from curvscope.report.lr_report import lr_section

    assert lr_section(suggest_lr(problem))["warnings"] == []


# -- factors on models that are not a chain of nn.Linear -----------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 2)
        self.norm = nn.BatchNorm2d(3) if norm else nn.Identity()
        self.c2 = nn.Conv2d(3, 2, 2)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(torch.tanh(self.norm(self.c1(x))))).flatten(1))


def _permute(params, chain, perm, signs):
    """The group element on the chain's tensors, written out: hidden label 1 = A's output axis, B's input axis."""
    out = dict(params)
    for t in chain.tensors:
        for ax, label in enumerate(t.labels):
            if label == 1:
                x = out[t.name].index_select(ax, perm)
                shape = [1] * x.dim()
                shape[ax] = -1
                out[t.name] = x * signs.reshape(shape)
    return out


def _brute_force_factors(problem, chain, signed: bool):
    d = chain.widths[1]
    g = problem.gradient()
    g = {n: g[n] for n in chain.param_names}
    mats = []
    for perm in itertools.permutations(range(d)):
        for signs in (itertools.product((-1.0, 1.0), repeat=d) if signed else [(1.0,) * d]):
            moved = _permute(g, chain, torch.tensor(perm), torch.tensor(signs, dtype=torch.float64))
            v = torch.cat([moved[n].reshape(-1) for n in chain.param_names])
            mats.append(torch.outer(v, v))
    return torch.stack(mats).mean(0)


@pytest.mark.parametrize("name", ["conv", "gpt2"])
def test_factors_find_conv_and_conv1d_chains_and_match_the_group_average(name):
    from curvscope.curvature.symmetry import compute_factors
    from curvscope.curvature.symmetry.discover import problem_chain

    torch.manual_seed(0)
    if name == "conv":
        problem = make_problem(ConvNet(), torch.randn(6, 1, 5, 5), torch.arange(6) % 3, dtype=torch.float64)
        expected, symmetry, signed = ("c1", "c2"), "signed-permutation", True
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=10, n_embd=4, n_inner=3, n_layer=1, n_head=2, n_positions=8, attn_pdrop=0.0,
                            resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        ids = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(0))
        problem = make_problem(GPT2LMHeadModel(config).eval(), KeywordInputs({"input_ids": ids}), ids,
                               dtype=torch.float64, shift_labels=True)
        expected, symmetry, signed = ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"), "permutation", False
    chain = problem_chain(problem)
    assert chain.modules == expected and chain.activation_symmetry == symmetry
    result = compute_factors(problem, symmetry=symmetry, source="batch", structure_check=False)
    torch.testing.assert_close(result.factors.dense(), _brute_force_factors(problem, chain, signed), rtol=1e-9,
                               atol=1e-13)


def test_a_model_without_a_chain_is_told_why():
    from curvscope.curvature.symmetry.discover import problem_chain
    from curvscope.errors import OptionError

    problem = make_problem(ConvNet(norm=True).eval(), torch.randn(6, 1, 5, 5), torch.arange(6) % 3,
                           dtype=torch.float64)
    with pytest.raises(OptionError, match="BatchNorm2d 'norm' between them has per-unit parameters"):
        problem_chain(problem)
