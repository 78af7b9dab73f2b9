"""Self-checks instead of silent repair: an asymmetric H-bar fails loudly (exit 3), and numerical_rank refuses
non-finite input instead of calling it flat."""

from __future__ import annotations

import pytest
import torch
from conftest import invoke

from curvscope.curvature.gram.spectrum import numerical_rank
from curvscope.curvature.lr import reduced
from curvscope.curvature.lr.reduced import SelfCheckError, check_symmetric
from curvscope.errors import CurvscopeError


def test_h_bar_asymmetry_beyond_rounding_is_an_internal_error(tmp_path, tiny_files, monkeypatch):
    ok = torch.tensor([[2.0, 1.0], [1.0 + 1e-12, 3.0]], dtype=torch.float64)
    assert check_symmetric(ok, "hessian") < 1e-11
    with pytest.raises(SelfCheckError, match="asymmetric beyond rounding"):
        check_symmetric(torch.tensor([[2.0, 1.0], [1.5, 3.0]], dtype=torch.float64), "hessian")

    real = reduced._pairwise

    def skewed(U, HU):  # a wrong Hessian-vector product: H_bar no longer symmetric
        h = real(U, HU)
        return h + torch.triu(torch.ones_like(h), diagonal=1) * h.abs().max()

    monkeypatch.setattr(reduced, "_pairwise", skewed)
    ckpt, data, _ = tiny_files
    result = invoke("lr-suggest", ckpt, "--data", data, "-o", tmp_path / "o", "--partition", "tensor")
    assert result.exit_code == 3, result.stderr
    assert "self-check failed" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_numerical_rank_refuses_non_finite_values():
    for bad in (float("nan"), float("inf")):  # NaN used to compare false everywhere: rank 0, "flat"
        with pytest.raises(CurvscopeError, match="not finite"):
            numerical_rank(torch.tensor([bad, 1.0, 0.5], dtype=torch.float64), 3, torch.float64)
    assert numerical_rank(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64), 3, torch.float64) == 2
    assert numerical_rank(torch.tensor([0.0, 0.0], dtype=torch.float64), 2, torch.float64) == 0
