"""Losses against PyTorch's own losses and autograd (docs/conventions.md §1), on tiny float64 batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvscope.cli.common import as_flags
from curvscope.errors import CurvscopeError
from curvscope.losses import default_loss_name, get_loss

N, C = 5, 4
LOSS_NAMES = ("ce", "mse", "bce")  # the other losses and the options: test_loss_options.py
TORCH_MEAN = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}


def batch(name: str, dtype=torch.float64, n: int = N, c: int = C, seed: int = 0):
    """Random outputs (n, c) and targets of the right kind for ``name``."""
    g = torch.Generator().manual_seed(seed)
    outputs = 2 * torch.randn(n, c, generator=g, dtype=dtype)
    if name == "ce":
        targets = torch.randint(0, c, (n,), generator=g)
    elif name == "mse":
        targets = torch.randn(n, c, generator=g, dtype=dtype)
    else:
        targets = torch.rand(n, c, generator=g, dtype=dtype)
    return outputs, targets


def torch_sample_loss(name: str, f, y):
    """The torch ``reduction='mean'`` loss of ONE sample (f: (C,)); for mse/bce a mean over the C entries."""
    return TORCH_MEAN[name]()(f.unsqueeze(0), y.unsqueeze(0))


def autograd_hessians(name, outputs, targets):
    return torch.stack([torch.func.hessian(lambda f, y=y: torch_sample_loss(name, f, y))(f)
                        for f, y in zip(outputs, targets, strict=True)])


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_equal_torch_mean_losses(name, dtype):
    outputs, targets = batch(name, dtype)
    loss = get_loss(name)
    per_sample = loss.per_sample(outputs, targets)
    assert per_sample.shape == (N,)
    expected = torch.stack([torch_sample_loss(name, f, y) for f, y in zip(outputs, targets, strict=True)])
    torch.testing.assert_close(per_sample, expected)
    torch.testing.assert_close(loss(outputs, targets), TORCH_MEAN[name]()(outputs, targets))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_output_gradient_equals_autograd(name):
    outputs, targets = batch(name)
    expected = torch.stack([torch.func.grad(lambda f, y=y: torch_sample_loss(name, f, y))(f)
                            for f, y in zip(outputs, targets, strict=True)])
    torch.testing.assert_close(get_loss(name).output_gradient(outputs, targets), expected)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_hessian_and_its_square_root_equal_autograd(name):
    outputs, targets = batch(name)
    loss = get_loss(name)
    H = autograd_hessians(name, outputs, targets)
    S = loss.hessian_sqrt(outputs, targets)
    assert S.shape == (N, C, C)
    torch.testing.assert_close(S @ S.transpose(1, 2), H, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.hessian(outputs, targets), H, rtol=1e-10, atol=1e-12)


def test_hessians_match_curvature_md_closed_forms():
    """The table of docs/conventions.md §1, written out independently."""
    outputs, _ = batch("ce")
    p = outputs.softmax(-1)
    s = torch.sigmoid(outputs)
    dummy = {"ce": torch.zeros(N, dtype=torch.long), "mse": torch.zeros(N, C, dtype=torch.float64),
             "bce": torch.zeros(N, C, dtype=torch.float64)}
    expected = {
        "ce": torch.stack([torch.diag(pn) - torch.outer(pn, pn) for pn in p]),
        "mse": (2.0 / C) * torch.eye(C, dtype=torch.float64).expand(N, C, C),
        "bce": torch.stack([torch.diag(sn * (1 - sn)) / C for sn in s]),
    }
    for name in LOSS_NAMES:
        torch.testing.assert_close(get_loss(name).hessian(outputs, dummy[name]), expected[name])


def test_ce_square_root_has_rank_c_minus_one():
    outputs, targets = batch("ce", n=6, c=7)
    S = get_loss("ce").hessian_sqrt(outputs, targets)
    ones = torch.ones(7, dtype=torch.float64)
    for Sn in S:
        assert int(torch.linalg.matrix_rank(Sn)) == 6
        torch.testing.assert_close(ones @ Sn, torch.zeros(7, dtype=torch.float64))  # softmax shift invariance
    assert get_loss("ce").hessian_rank_per_sample(7) == 6
    for name in ("mse", "bce"):
        o, t = batch(name, n=3, c=7)
        assert all(int(torch.linalg.matrix_rank(Sn)) == 7 for Sn in get_loss(name).hessian_sqrt(o, t))
        assert get_loss(name).hessian_rank_per_sample(7) == 7


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_mc_square_root_averages_to_the_hessian(name):
    """Sum_m s_m s_m^T over M = 20000 columns is within a few standard errors of H_n.

    The tolerance is checked to be smaller than the error of the usual mistakes (a missing 1/C, a missing
    square root, a sign or a missing p), so the test cannot pass with a wrong convention.
    """
    M = 20000
    outputs, targets = batch(name, n=3, c=C)
    loss = get_loss(name)
    H = loss.hessian(outputs, targets)
    S = loss.mc_sqrt(outputs, targets, M, generator=torch.Generator().manual_seed(0))
    assert S.shape == (3, C, M) and S.dtype == outputs.dtype
    estimate = S @ S.transpose(1, 2)
    scale = H.abs().amax()
    tol = 0.06 * scale
    assert (estimate - H).abs().max() < tol
    wrong = {"x C (a missing 1/C)": H * C, "/ C (1/C twice)": H / C, "/ M (1/M instead of 1/sqrt(M))": H / M,
             "x 2": 2 * H, "/ 2": H / 2}
    if name == "ce":
        wrong["diag(p) (no -p p^T)"] = torch.diag_embed(outputs.softmax(-1))
    for label, other in wrong.items():
        assert (other - H).abs().max() > 3 * tol, label
    # the columns are centered: sum_m s_m = sqrt(M) * (sample mean) ~ N(0, H_n), a few sqrt(H_ii) at most
    spread = torch.diagonal(H, dim1=1, dim2=2).sqrt()
    assert (S.sum(dim=-1).abs() <= 5 * spread + 1e-12).all()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_mc_square_root_is_seeded_and_checks_its_argument(name):
    outputs, targets = batch(name, dtype=torch.float32)
    a = get_loss(name).mc_sqrt(outputs, targets, 7, generator=torch.Generator().manual_seed(3))
    b = get_loss(name).mc_sqrt(outputs, targets, 7, generator=torch.Generator().manual_seed(3))
    c = get_loss(name).mc_sqrt(outputs, targets, 7, generator=torch.Generator().manual_seed(4))
    assert a.shape == (N, C, 7) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(CurvscopeError, match="^mc_samples must be at least 1"):  # Python words
        get_loss(name).mc_sqrt(outputs, targets, 0)
    with pytest.raises(CurvscopeError, match="mc-samples"), as_flags():  # the CLI's
        get_loss(name).mc_sqrt(outputs, targets, 0)


def test_mse_mc_square_root_distribution():
    """mse: s_m = sqrt(2/C) z_m / sqrt(M): the entries times sqrt(M C / 2) are standard normal."""
    M = 20000
    outputs, targets = batch("mse", n=2, c=C)
    S = get_loss("mse").mc_sqrt(outputs, targets, M, generator=torch.Generator().manual_seed(1))
    z = S * math.sqrt(M * C / 2)
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02


def test_prepare_targets_accepts_the_usual_shapes():
    ce, mse, bce = get_loss("ce"), get_loss("mse"), get_loss("bce")
    labels = torch.tensor([[0], [2], [1]])
    assert ce.prepare_targets(labels, 3, torch.float64).shape == (3,)
    assert ce.prepare_targets(labels.int(), 3, torch.float64).dtype == torch.long
    y = mse.prepare_targets(torch.tensor([1.0, 2.0, 3.0]), 1, torch.float64)
    assert y.shape == (3, 1) and y.dtype == torch.float64
    yb = bce.prepare_targets(torch.tensor([[True, False], [False, True]]), 2, torch.float32)
    assert yb.dtype == torch.float32 and yb.tolist() == [[1.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize(("name", "targets", "C", "match"), [
    ("ce", torch.tensor([0.0, 1.0]), 3, "integer class labels"),
    ("ce", torch.tensor([0, 3]), 3, r"\[0, 3\)"),
    ("ce", torch.tensor([-1, 0]), 3, r"\[0, 3\)"),
    ("ce", torch.zeros(2, 2, dtype=torch.long), 3, "one class label per sample"),
    ("mse", torch.zeros(2, 2), 3, r"shape \(N, 3\)"),
    ("mse", torch.zeros(2), 3, r"shape \(N, 3\)"),
    ("bce", torch.zeros(2, 4), 3, r"shape \(N, 3\)"),
    ("bce", torch.full((2, 3), 2.0), 3, r"\[0, 1\]"),
    ("mse", torch.tensor([[float("nan")], [0.0]]), 1, "NaN or Inf"),
])
def test_prepare_targets_rejects_bad_targets(name, targets, C, match):
    with pytest.raises(CurvscopeError, match=match):
        get_loss(name).prepare_targets(targets, C, torch.float32, "file.pt")


def test_registry_and_default_loss():
    assert default_loss_name(torch.tensor([1, 2])) == "ce"
    assert default_loss_name(torch.tensor([1.0, 2.0])) == "mse"
    with pytest.raises(CurvscopeError, match="unknown loss 'hinge'"):
        get_loss("hinge")
    assert F.cross_entropy is not None  # the reference above is torch's own functional loss
