"""Gated MLPs (Llama's ``down(act(gate(x)) * up(x))``): the chains ``factors`` finds, and their factors against the
literal group average (every group element enumerated, applied to the parameters by hand) or, where the group is
too large to enumerate (Llama's 32 hidden units), against the exact average over the group's orbits."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from curvscope import make_problem
from curvscope.curvature.symmetry import build_structure, project_dense, single_gradient_factors, symo_direction
from curvscope.curvature.symmetry.discover import discover_pairs, problem_chain
from curvscope.curvature.symmetry.estimate import compute_factors
from curvscope.errors import OptionError
from curvscope.io.inputs import KeywordInputs

F64 = torch.float64


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``; with ``up_first`` the up branch is called first."""

    def __init__(self, act: str = "silu", up_first: bool = False, bias: bool = True) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(2, 3, bias=bias), nn.Linear(2, 3, bias=bias), nn.Linear(3, 2,
                                                                                                           bias=bias)
        self.act = {"silu": nn.SiLU(), "tanh": nn.Tanh()}[act]
        self.up_first = up_first

    def forward(self, x):
        if self.up_first:
            u = self.up(x)
            return self.down(u * self.act(self.gate(x)))
        return self.down(self.act(self.gate(x)) * self.up(x))


def tiny_problem(act="silu", up_first=False, bias=True, seed=0):
    torch.manual_seed(seed)
    model = GatedMLP(act, up_first, bias).to(F64)
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    return make_problem(model, x, torch.arange(7) % 2, loss="ce", dtype=torch.float64)


def apply_element(tensors, names, perm, s_gate, s_up):
    """A group element on a gated MLP's parameters, written out: new unit k is old unit ``perm[k]``; gate rows get
    ``s_gate``, up rows ``s_up``, down columns their product."""
    gate, up, down = names
    out = dict(tensors)
    for name, s in ((gate, s_gate), (up, s_up)):
        out[f"{name}.weight"] = tensors[f"{name}.weight"][..., perm, :] * s[:, None]
        if f"{name}.bias" in tensors:
            out[f"{name}.bias"] = tensors[f"{name}.bias"][..., perm] * s
    out[f"{down}.weight"] = tensors[f"{down}.weight"][..., perm] * (s_gate * s_up)
    return out


def elements(d, gate_signs, up_signs):
    ones = (1.0,) * d
    for perm in itertools.permutations(range(d)):
        for sg in itertools.product((1.0, -1.0), repeat=d) if gate_signs else [ones]:
            for su in itertools.product((1.0, -1.0), repeat=d) if up_signs else [ones]:
                yield torch.tensor(perm), torch.tensor(sg, dtype=F64), torch.tensor(su, dtype=F64)


def group_matrices(names, chain_names, shapes, d, gate_signs, up_signs):
    """Each group element as a D x D matrix on the chain's tensors flattened in ``chain_names`` order."""
    D = sum(torch.Size(shapes[n]).numel() for n in chain_names)
    basis = torch.eye(D, dtype=F64)
    cols, off = {}, 0
    for n in chain_names:
        k = torch.Size(shapes[n]).numel()
        cols[n] = basis[:, off:off + k].reshape(D, *shapes[n])
        off += k
    mats = []
    for perm, sg, su in elements(d, gate_signs, up_signs):
        moved = apply_element(cols, names, perm, sg, su)  # column j: the element applied to basis vector j
        mats.append(torch.cat([moved[n].reshape(D, -1) for n in chain_names], 1).T)
    return torch.stack(mats)


def flat(tensors, names):
    return torch.cat([tensors[n].reshape(-1) for n in names])


@pytest.mark.parametrize("act,up_first,gate_signed", [("silu", False, False), ("silu", True, False),
                                                       ("tanh", False, True)])
def test_a_gated_mlp_is_found_and_its_factors_are_the_group_average(act, up_first, gate_signed):
    problem = tiny_problem(act, up_first)
    chain = problem_chain(problem)
    assert chain.modules == ("gate", "up", "down") and chain.gate == "gate" and chain.spec == "gate*up,down"
    assert chain.activation_symmetry == "signed-permutation" and chain.gate_signed == gate_signed
    assert chain.widths == (2, 3, 2) and chain.num_layers == 2
    names = ("gate", "up", "down")
    params = problem.params
    base = problem.loss_value()
    # the enumerated group really leaves the model unchanged; the gate's sign flips only for an odd activation
    for perm, sg, su in elements(3, gate_signed, True):
        assert torch.allclose(problem.loss_value(apply_element(params, names, perm, sg, su)), base, rtol=1e-12)
    flip = torch.tensor([-1.0, 1.0, 1.0], dtype=F64)
    changed = problem.loss_value(apply_element(params, names, torch.arange(3), flip, torch.ones(3, dtype=F64)))
    assert torch.allclose(changed, base, rtol=1e-12) == gate_signed
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    g = problem.gradient()
    gv = flat(g, chain.param_names)
    sigma = torch.randn(len(gv), len(gv) + 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    sigma = sigma @ sigma.T
    for symmetry, signs in (("signed-permutation", (gate_signed, True)), ("permutation", (False, False))):
        structure = build_structure(chain, symmetry)
        G = group_matrices(names, chain.param_names, shapes, 3, *signs)
        brute = (G @ sigma @ G.transpose(1, 2)).mean(0)
        R = project_dense(structure, sigma).dense()
        torch.testing.assert_close(R, brute, rtol=0, atol=1e-10)
        torch.testing.assert_close(project_dense(structure, R).dense(), R, rtol=0, atol=1e-10)  # idempotent
        torch.testing.assert_close(G @ R @ G.transpose(1, 2), R.expand_as(G), rtol=0, atol=1e-10)  # invariant
        assert (sigma - R).norm() > 1e-3 * sigma.norm()
        # the single-gradient factors of the command, and the SymO direction (R(g g^T) + eps)^(-1/2) g
        single = (G @ torch.outer(gv, gv) @ G.transpose(1, 2)).mean(0)
        result = compute_factors(problem, symmetry=symmetry, structure_check=False)
        torch.testing.assert_close(result.factors.dense(), single, rtol=0, atol=1e-12)
        evals, evecs = torch.linalg.eigh(single)
        dense = evecs @ ((evals.clamp_min(0) + 1e-4).rsqrt() * (evecs.T @ gv))
        u = symo_direction(problem, symmetry=symmetry, eps=1e-4)
        torch.testing.assert_close(flat(u, chain.param_names), dense, rtol=0, atol=1e-8 * float(dense.abs().max()))


def test_gated_factor_names_and_components():
    silu = build_structure(problem_chain(tiny_problem("silu")), "signed-permutation")
    assert [(c.code, c.irrep_dim) for c in silu.components] == [("u", 3), ("1", 1), ("p", 2)]
    names = [b.name for b in silu.blocks()]
    assert names[:6] == ["Phi_1[u]", "phi_b1[u]", "Phi_2[u]", "Psi_1_b1[u]", "Psi_1[u]", "Psi_b1_2[u]"]
    assert "Phi_1g[1]" in names and "Phi_b2[1]" in names and "Psi_1g_b2[1]" in names and "Phi_1g[p]" in names
    assert not any("1g" in n and "[u]" in n for n in names)  # the sign flips of up decouple gate and up
    tanh = build_structure(problem_chain(tiny_problem("tanh")), "signed-permutation")
    assert [c.code for c in tanh.components] == ["u", "g", "gu", "1"]
    perm = build_structure(problem_chain(tiny_problem("silu")), "permutation")
    assert [c.code for c in perm.components] == ["1", "p"] and "Psi_1g_1[p]" in [b.name for b in perm.blocks()]


def test_rotations_are_refused_and_a_gated_chain_can_be_named():
    problem = tiny_problem("silu", bias=False)
    with pytest.raises(OptionError, match="no rotation of the hidden units leaves the gated MLP gate\\*up,down"):
        compute_factors(problem, symmetry="orthogonal")
    chain = problem_chain(problem, "gate*up,down")
    assert chain.gate == "gate" and chain.activation_symmetry is None and chain.param_names == (
        "gate.weight", "up.weight", "down.weight")
    res = compute_factors(problem, symmetry="signed-permutation", structure_check=False)
    assert any("scaling up row i by a > 0" in n and "non-compact" in n for n in res.notes)
    for bad, match in (("gate*up*down", "named gate\\*up,down"), ("gate*up,act", "ReLU|SiLU|not a weight layer"),
                       ("gate*down,up", "same inputs and outputs")):
        with pytest.raises(OptionError, match=match):
            problem_chain(problem, bad)


def llama_problem(intermediate=32, layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                         attn_implementation="eager")
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    return make_problem(LlamaForCausalLM(config).eval(), KeywordInputs({"input_ids": ids}), ids, dtype=torch.float64,
                        shift_labels=True)


def orbit_average(sigma, blocks, d, chars):
    """R(sigma) for the group (signs ⋊ permutations) by averaging over orbits, independently of curvscope: entries
    (unit i, free f) x (unit j, free f') of roles r, r' average over the diagonal (i = j) or the off-diagonal pairs
    of units; the sign flips keep an entry when its sign characters cancel (``chars``: role -> set of sign
    channels; i != j only when both are empty)."""
    R = torch.zeros_like(sigma)
    for r, ir in blocks.items():
        for s, js in blocks.items():
            B = sigma[ir.reshape(-1)[:, None], js.reshape(-1)[None, :]].reshape(d, ir.shape[1], d, js.shape[1])
            diag = torch.einsum("kakb->ab", B) / d
            off = (B.sum((0, 2)) - diag * d) / (d * (d - 1))
            eye = torch.eye(d, dtype=F64)[:, None, :, None]
            block = (chars[r] == chars[s]) * eye * diag[None, :, None, :]
            block = block + (not chars[r] and not chars[s]) * (1 - eye) * off[None, :, None, :]
            R[ir.reshape(-1)[:, None], js.reshape(-1)[None, :]] = block.reshape(d * ir.shape[1], d * js.shape[1])
    return R


def test_llama_gated_mlps_are_found_and_match_the_orbit_average():
    pytest.importorskip("transformers")
    problem = llama_problem()
    pairs = discover_pairs(problem)
    chains = [p.spec for p in pairs if p.symmetry is not None]
    mlp = [f"model.layers.{i}.mlp.{{}}_proj" for i in range(2)]
    assert chains == [f"{m.format('gate')}*{m.format('up')},{m.format('down')}" for m in mlp]
    # q_proj -> k_proj read the same input: a fresh Llama's near-uniform attention hid that from the old test
    qk = next(p for p in pairs if p.first.endswith("0.self_attn.q_proj"))
    assert qk.symmetry is None and "changes what 'model.layers.0.self_attn.k_proj' computes" in qk.reason
    chain = problem_chain(problem)
    assert chain.spec == chains[0] and chain.found == tuple(chains) and chain.widths == (16, 32, 16)
    assert chain.activation_symmetry == "signed-permutation" and not chain.gate_signed
    names = tuple(mlp[0].format(k) for k in ("gate", "up", "down"))
    # a random group element leaves the loss unchanged (to the model's float32 internals)
    gen = torch.Generator().manual_seed(3)
    s = torch.where(torch.rand(32, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    moved = apply_element(problem.params, names, torch.randperm(32, generator=gen), torch.ones(32, dtype=F64), s)
    torch.testing.assert_close(problem.loss_value(moved), problem.loss_value(), rtol=1e-6, atol=0)
    g = problem.gradient()
    gv = flat(g, chain.param_names)
    sigma = torch.outer(gv, gv)
    D, k = len(gv), 16 * 32
    idx = torch.arange(D)
    blocks = {"gate": idx[:k].reshape(32, 16), "up": idx[k:2 * k].reshape(32, 16),
              "down": idx[2 * k:].reshape(16, 32).T}
    for symmetry, chars in (("signed-permutation", {"gate": "", "up": "s", "down": "s"}),
                            ("permutation", {"gate": "", "up": "", "down": ""})):
        named = chain.spec if symmetry == "permutation" else None  # discovered once more, or named
        res = compute_factors(problem, symmetry=symmetry, layers=named, structure_check=False)
        assert res.structure.chain.spec == chain.spec
        ref = orbit_average(sigma, blocks, 32, chars)
        torch.testing.assert_close(res.factors.dense(), ref, rtol=0, atol=1e-12 * float(ref.abs().max()))
    blocks_ = res.factors.blocks()
    assert set(blocks_) == {"Phi_1g[1]", "Phi_1[1]", "Phi_2[1]", "Psi_1g_1[1]", "Psi_1g_2[1]", "Psi_1[1]",
                            "Phi_1g[p]", "Phi_1[p]", "Phi_2[p]", "Psi_1g_1[p]", "Psi_1g_2[p]", "Psi_1[p]"}


def test_llama_factors_are_the_enumerated_group_average():
    """Intermediate size 4: the 4! x 2^4 signed permutations of up/down enumerated on a real Llama's gradients."""
    pytest.importorskip("transformers")
    problem = llama_problem(intermediate=4, layers=1)
    chain = problem_chain(problem)
    names = chain.modules
    assert chain.spec == "model.layers.0.mlp.gate_proj*model.layers.0.mlp.up_proj,model.layers.0.mlp.down_proj"
    g = problem.gradient()
    moved = [flat(apply_element(g, names, *e), chain.param_names) for e in elements(4, False, True)]
    V = torch.stack(moved)
    brute = V.T @ V / len(moved)
    res = compute_factors(problem, symmetry="signed-permutation", source="batch")
    torch.testing.assert_close(res.factors.dense(), brute, rtol=0, atol=1e-12 * float(brute.abs().max()))
    # the single-gradient factors equal the closed forms: Phi_1 = g_up^T g_up / d, Psi_1 = g_up^T g_down^T / d
    f = single_gradient_factors(res.structure, {n: g[n] for n in chain.param_names}).blocks()
    gu, gd = g[f"{names[1]}.weight"], g[f"{names[2]}.weight"]
    torch.testing.assert_close(f["Phi_1[u]"], gu.T @ gu / 4, rtol=1e-12, atol=0)
    torch.testing.assert_close(f["Psi_1[u]"], gu.T @ gd.T / 4, rtol=1e-12, atol=0)
    assert 0 < res.structure_error["per_sample"] < 1


def test_factors_command_on_a_llama(tmp_path):
    """End to end: the gated chain found, the symmetry auto picks, the note on the scalings; orthogonal refused in one
    line without output; a gated chain named with --layers gate*up,down."""
    pytest.importorskip("transformers")
    import json

    import outside_models as om
    from conftest import assert_clean_error, invoke
    from safetensors.torch import save_file

    ids = torch.randint(0, 12, (4, 6), generator=torch.Generator().manual_seed(0))
    data = tmp_path / "lm.safetensors"
    save_file({"input_ids": ids, "labels": ids.clone()}, str(data))
    common = ["--model", f"{om.__file__}:llama", "--data", data, "--shift-labels", "--dtype", "float64", "--device",
              "cpu", "--no-plots"]
    mlp = "model.layers.0.mlp."
    result = invoke("factors", *common, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    sec = json.loads((tmp_path / "out" / "report.json").read_text())["factors"]
    assert sec["layers"] == [f"{mlp}gate_proj", f"{mlp}up_proj", f"{mlp}down_proj"] and sec["widths"] == [8, 12, 8]
    assert sec["symmetry"] == sec["activation_symmetry"] == "signed-permutation"
    assert [c["code"] for c in sec["components"]] == ["u", "1", "p"]
    assert any(n.startswith("gated MLP: the group permutes") and "non-compact" in n for n in sec["notes"])
    assert {b["name"] for b in sec["blocks"]} == {"Phi_1[u]", "Phi_2[u]", "Psi_1[u]", "Phi_1g[1]", "Phi_1g[p]"}
    f32 = [a if a != "float64" else "float32" for a in common]  # no float32-internals warning before the error
    result = invoke("factors", *f32, "--out", tmp_path / "orth", "--symmetry", "orthogonal")
    assert_clean_error(result, "no rotation of the hidden units leaves the gated MLP")
    assert not (tmp_path / "orth").exists()
    result = invoke("factors", *common, "--out", tmp_path / "named", "--layers",
                    f"{mlp}gate_proj*{mlp}up_proj,{mlp}down_proj")
    assert result.exit_code == 0, result.stderr
    sec = json.loads((tmp_path / "named" / "report.json").read_text())["factors"]
    assert sec["symmetry"] == "permutation" and sec["activation_symmetry"] is None
