"""``Operator.matvec(v, out=...)``: the product accumulated by the backward pass straight into a caller's buffer
(issue #20) equals the dense references and, bitwise, the product returned as a new tensor."""

from __future__ import annotations

import pytest
import torch
from helpers import dense_ggn
from test_operators import PROBLEMS, WithUnused, dense_hessian, rel

from curvscope.curvature.matfree import curvature_operator, ggn_operator, hessian_operator
from curvscope.errors import CurvscopeError
from curvscope.problem import make_problem

F64 = torch.float64


@pytest.mark.parametrize("name", ["layernorm-gelu-ce", "tanh-bce"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_out_equals_the_new_tensor_and_the_dense_matrix(name, kind):
    problem = PROBLEMS[name]()
    dense = dense_hessian(problem) if kind == "hessian" else dense_ggn(problem)
    op = curvature_operator(problem, None, kind)
    basis = torch.randn(3, op.dim, generator=torch.Generator().manual_seed(1), dtype=F64)
    rows = torch.full((3, op.dim), float("nan"), dtype=F64)  # stale contents are overwritten, not added to
    for j in range(3):
        assert op.matvec(basis[j], out=rows[j]).data_ptr() == rows[j].data_ptr()
        torch.testing.assert_close(rows[j], op.matvec(basis[j]), rtol=0, atol=0)
    assert rel(rows.T, dense @ basis.T) < 1e-10
    assert op.count == 6


def test_out_in_a_group_with_unused_and_outside_parameters():
    torch.manual_seed(6)
    problem = make_problem(WithUnused(), torch.randn(6, 3), torch.randint(0, 3, (6,)), loss="ce", dtype=F64)
    for kind in ("hessian", "ggn"):
        op = curvature_operator(problem, ["unused", "body.2.weight"], kind)
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(2), dtype=F64)
        out = torch.ones(op.dim, dtype=F64)
        op.matvec(v, out=out)
        torch.testing.assert_close(out, op.matvec(v), rtol=0, atol=0)
        assert float(out[:5].abs().max()) == 0.0 and float(out[5:].abs().max()) > 0
        unused = curvature_operator(problem, ["unused"], kind)  # reaches no loss: the zero operator
        out = torch.ones(5, dtype=F64)
        assert float(unused.matvec(torch.ones(5, dtype=F64), out=out).abs().max()) == 0.0


def test_accumulate_adds_the_product_to_what_out_holds():
    """out += A v, for the Hessian and the GGN, a group with an unused parameter (its zeros add nothing) and the
    streamed operator (its chunks add into out)."""
    from curvscope.curvature.matfree.stream import streamed_operator

    torch.manual_seed(7)
    problem = make_problem(WithUnused(), torch.randn(6, 3), torch.randint(0, 3, (6,)), loss="ce", dtype=F64)
    ops = [curvature_operator(problem, ["unused", "body.2.weight"], kind) for kind in ("hessian", "ggn")]
    ops.append(streamed_operator(problem, curvature="hessian", chunk=4))
    for op in ops:
        g = torch.Generator().manual_seed(4)
        v, held = torch.randn(op.dim, generator=g, dtype=F64), torch.randn(op.dim, generator=g, dtype=F64)
        out = held.clone()
        assert op.matvec(v, out=out, accumulate=True).data_ptr() == out.data_ptr()
        torch.testing.assert_close(out, held + op.matvec(v), rtol=1e-13, atol=1e-15)
    with pytest.raises(CurvscopeError, match="pass out"):
        ops[-1].matvec(v, accumulate=True)


def test_out_leaves_no_gradient_behind_and_the_graph_reusable():
    problem = PROBLEMS["tanh-ce"]()
    op = hessian_operator(problem)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(3), dtype=F64)
    first = op.matvec(v, out=torch.empty(op.dim, dtype=F64))
    again = op.matvec(v, out=torch.empty(op.dim, dtype=F64))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert all(p.grad is None for p in problem.params.values())


def test_bad_out_is_refused():
    problem = PROBLEMS["tanh-ce"]()
    op = ggn_operator(problem)
    v = torch.zeros(op.dim, dtype=F64)
    for bad in (torch.zeros(op.dim + 1, dtype=F64), torch.zeros(op.dim), torch.zeros(2 * op.dim, dtype=F64)[::2],
                torch.zeros(op.dim, dtype=F64, requires_grad=True)):
        with pytest.raises(CurvscopeError, match="out must be a contiguous"):
            op.matvec(v, out=bad)
    both = torch.zeros(2 * op.dim, dtype=F64)
    with pytest.raises(CurvscopeError, match="overlap"):
        op.matvec(both[:op.dim], out=both[op.dim // 2:op.dim // 2 + op.dim])
    op.matvec(both[:op.dim], out=both[op.dim:])  # adjacent, not overlapping
