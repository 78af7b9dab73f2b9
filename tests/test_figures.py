"""The figures a reader looks at (#23), checked on the Figure objects rather than pixels: plain-Unicode labels
(no mathtext shown as ``$\\mathdefault{..}$``, no literal ``λ_max``), tick labels that do not overlap, legends
beside the lines instead of over them, a GGN density that has no mass below 0, error bars and non-positive
rates that stay visible on a log axis, one labelled colour scale per factor, a landscape with a title and a
labelled marker, and the gradient share outside the top-k named for what it is."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.text import Text as MplText
from rich.console import Console

from curvscope.report.render import render_png

PROBLEM = {"model": "mlp", "checkpoint": "runs/mlp-digits.safetensors", "batch_size": 128, "num_params": 8970,
           "loss": "ce", "dtype": "float64"}


@pytest.fixture
def no_mathtext(monkeypatch):
    """Fails the test when matplotlib's mathtext parser runs (plain Unicode is the house style: it is fast)."""
    import matplotlib.mathtext as mathtext

    parsed: list[str] = []
    original = mathtext.MathTextParser.parse
    monkeypatch.setattr(mathtext.MathTextParser, "parse",
                        lambda self, s, *a, **k: parsed.append(s) or original(self, s, *a, **k))
    yield parsed
    assert parsed == []


def _texts(fig) -> list[str]:
    """Every visible text of the drawn figure: titles, labels, tick labels, legends, colour bars, notes."""
    fig.canvas.draw()
    return [t.get_text() for t in fig.findobj(MplText) if t.get_visible() and t.get_text()]


def _assert_plain(fig, underscores: bool = False) -> list[str]:
    texts = _texts(fig)
    assert not [t for t in texts if "$" in t or "mathdefault" in t], texts
    if not underscores:  # the fixtures' names have none: an underscore is a subscript drawn literally
        assert not [t for t in texts if "_" in t], texts
    return texts


def _assert_ticks_apart(fig) -> None:
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for axis, lo, hi in ((ax.xaxis, 0, 2), (ax.yaxis, 1, 3)):
            boxes = sorted((b.extents[lo], b.extents[hi]) for t in axis.get_ticklabels()
                           if t.get_visible() and t.get_text() and (b := t.get_window_extent(renderer)).width > 0
                           and ax.get_window_extent(renderer).expanded(1.2, 1.2).overlaps(b))
            for (_, a1), (b0, _) in zip(boxes, boxes[1:], strict=False):
                assert a1 <= b0 + 0.5, (ax.get_title(), [t.get_text() for t in axis.get_ticklabels()])


def _assert_legend_off_the_axes(fig, ax) -> None:
    renderer = fig.canvas.get_renderer()
    legends = [*fig.legends, *([ax.get_legend()] if ax.get_legend() else [])]
    assert legends
    area = ax.get_window_extent(renderer)
    for legend in legends:
        assert not legend.get_window_extent(renderer).overlaps(area)


# -- the SLQ density --------------------------------------------------------------------------------------


def _density_group(curvature: str) -> dict:
    """A density like SLQ's: most weight at 0 (smoothed below 0 by the kernel), a few outliers up to 3."""
    nodes = np.array([0.0, 0.004, 1.5, 3.0] + ([-0.4] if curvature == "hessian" else []))
    weights = np.array([0.6, 0.3, 0.05, 0.03] + ([0.02] if curvature == "hessian" else []))
    weights /= weights.sum()
    sigma = 0.03
    grid = np.linspace(nodes.min() - 5 * sigma, nodes.max() + 5 * sigma, 400)
    values = (weights[:, None] * np.exp(-(grid[None] - nodes[:, None]) ** 2 / (2 * sigma**2))).sum(0)
    values /= sigma * math.sqrt(2 * math.pi)
    group = {"name": "all", "curvature": curvature, "num_params": 8970, "lambda_max": 3.0, "trace": 21.5,
             "trace_stderr": 0.36, "density": {"grid": grid.tolist(), "values": values.tolist(), "sigma": sigma},
             "lambda_min": -0.4 if curvature == "hessian" else None,
             "negative_mass": 0.02 if curvature == "hessian" else None}
    return group


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_the_density_reads_like_pyhessian(curvature, no_mathtext):
    from curvscope.report.matfree_report import density_figure

    fig = density_figure(_density_group(curvature), PROBLEM)
    ax = fig.axes[0]
    texts = _assert_plain(fig)
    assert ax.get_xscale() == "linear" and ax.get_yscale() == "log"  # PyHessian: log density, linear λ
    assert "mlp-digits.safetensors | N=128, D=8,970, loss=ce" in ax.get_title(loc="left")
    assert any(t.startswith("λₘₐₓ = 3") for t in texts)
    assert any(t.startswith("λₘᵢₙ = -0.4") for t in texts) == (curvature == "hessian")
    _assert_ticks_apart(fig)
    _assert_legend_off_the_axes(fig, ax)
    lines = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    renderer = fig.canvas.get_renderer()
    for line in lines:  # the λ lines inside the axes, and no legend or facts text over them
        x = ax.transData.transform((line.get_xdata()[0], 1.0))[0]
        assert ax.get_window_extent(renderer).x0 <= x <= ax.get_window_extent(renderer).x1
        for text in ax.texts:
            box = text.get_window_extent(renderer)
            assert not box.x0 <= x <= box.x1
    assert render_png(fig).startswith(b"\x89PNG")


def test_a_ggn_density_has_no_mass_below_zero():
    from curvscope.report.matfree_report import density_figure, psd_density

    group = _density_group("ggn")
    grid, values = np.array(group["density"]["grid"]), np.array(group["density"]["values"])
    assert np.trapezoid(values[grid < 0], grid[grid < 0]) > 0.3  # the kernel put about half of 0's weight below 0
    fig = density_figure(group, PROBLEM)
    ax = fig.axes[0]
    curve = ax.get_lines()[0]
    x, y = np.asarray(curve.get_xdata()), np.asarray(curve.get_ydata())
    assert x.min() == 0.0 and ax.get_xlim()[0] >= 0.0
    assert np.trapezoid(y, x) == pytest.approx(1.0, abs=2e-3)  # mirrored at 0: still a density
    g, v = psd_density(grid, values)
    assert g[0] == 0 and v[0] == pytest.approx(2 * np.interp(0.0, grid, values))
    render_png(fig)


def test_a_density_without_values_still_draws():
    from curvscope.report.matfree_report import density_figure

    group = _density_group("hessian")
    group["density"] = None
    fig = density_figure(group, None)
    assert any("no density" in t for t in _texts(fig))
    render_png(fig)


# -- the loss landscape ------------------------------------------------------------------------------------


def test_the_landscape_has_a_title_and_a_labelled_marker(no_mathtext):
    from curvscope.report.matfree_report import landscape_figure

    t = np.linspace(-0.3, 0.3, 7)
    s = np.linspace(-0.3, 0.3, 5)
    land = {"eigenvalues": [3.69, 2.96], "loss0": 0.05, "slope": 0.01, "curvature": 3.69, "radius": 0.3,
            "t": t.tolist(), "loss_1d": (0.05 + 1.8 * t**2).tolist(), "quadratic_1d": (0.05 + 1.85 * t**2).tolist(),
            "grid_s": s.tolist(), "grid_t": s.tolist(), "loss_2d": (0.05 + s[:, None] ** 2 + s[None] ** 2).tolist()}
    fig = landscape_figure(land, PROBLEM, "hessian")
    texts = _assert_plain(fig)
    title = fig.get_suptitle()
    assert "Loss landscape" in title and "Hessian" in title and "mlp-digits.safetensors" in title
    stars = [line for ax in fig.axes for line in ax.get_lines() if line.get_marker() == "*"]
    assert len(stars) == 2  # t = 0 on the curve and (0, 0) on the plane
    legend = fig.legends[0]
    labels = [text.get_text() for text in legend.get_texts()]
    assert any(label.startswith("checkpoint") for label in labels)
    assert any("e₂ (λ = 2.96)" in text for text in texts)
    _assert_legend_off_the_axes(fig, fig.axes[0])
    render_png(fig)


# -- lr.png ------------------------------------------------------------------------------------------------


def _lr_section() -> dict:
    def row(name, newton, diag, stab, rec, newton_std, rec_std):
        return {"name": name, "parameters": [f"{name}.weight"], "num_params": 100, "lr_newton": newton,
                "lr_diag": diag, "lr_stability": stab, "recommended": rec, "lr_newton_std": newton_std,
                "lr_diag_std": 0.02, "lr_stability_std": 0.01, "recommended_std": rec_std}

    return {"partition": "layer", "curvature": "hessian", "direction": "gradient",
            "groups": [row("fc1", None, 0.33, 0.59, 0.12, None, 0.01),  # a negative joint Newton rate
                       row("fc2", 4.8, 10.7, 17.5, 3.75, 270.0, 0.77),  # std 270 > 4.8: no lower end on a log axis
                       row("out", 5.9, None, 11.1, 3.26, 2.1, 0.93)],  # diag not defined
            "newton_eta": [-0.02, 4.8, 5.9], "lr_stability_global": 0.55,
            "h_bar_correlation": [[1.0, 0.95, 0.89], [0.95, 1.0, 0.93], [0.89, 0.93, 1.0]],
            "h_bar_positive_definite": True}


def test_lr_figure_labels_bars_and_missing_rates(no_mathtext):
    from curvscope.report.lr_plots import lr_figure

    fig = lr_figure(_lr_section(), PROBLEM)
    ax = fig.axes[0]
    texts = _assert_plain(fig)
    assert "learning rate ηₛ (log scale)" in texts and "H̄ₛₜ / √|H̄ₛₛ H̄ₜₜ|" in texts
    assert "mlp-digits.safetensors" in fig.get_suptitle()
    _assert_ticks_apart(fig)
    lo, hi = ax.get_ylim()
    assert lo >= 0.12 / 10  # the axis is not stretched down to value / 1000 by a bar that cannot end
    dotted = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert len(dotted) == 1 and min(dotted[0].get_ydata()) == pytest.approx(lo)  # down to the edge, drawn
    assert max(dotted[0].get_ydata()) == pytest.approx(4.8)
    edge = [line for line in ax.get_lines() if line.get_markerfacecolor() in ("white", (1.0, 1.0, 1.0, 1.0))]
    assert len(edge) == 2  # fc1's Newton rate (≤ 0) and out's diagonal rate (n/a), on the bottom edge
    assert all(line.get_ydata()[0] == 0.0 and line.get_transform().contains_branch_seperately(ax.transAxes)[1]
               for line in edge)
    notes = [t.get_text() for t in ax.texts]
    assert sorted(notes) == ["n/a", "≤0"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("≤0 or n/a" in t for t in legend) and any("lower end" in t for t in legend)
    assert any(t.startswith("whole-model bound 2/λₘₐₓ(G)") for t in legend)
    _assert_legend_off_the_axes(fig, ax)
    render_png(fig)


# -- factors.png -------------------------------------------------------------------------------------------


def test_factors_figure_is_narrow_with_one_labelled_scale_per_factor(no_mathtext):
    from curvscope.report.factors_plots import factors_figure

    rng = np.random.default_rng(0)
    factors = {"PhiA": 1e-5 * rng.standard_normal((64, 64)), "PhiB": 2e-5 * rng.standard_normal((10, 10)),
               "PhiC": 1e-4 * rng.standard_normal((10, 10))}
    fig = factors_figure(factors, "factors")
    assert fig.get_figwidth() <= 10.0
    _assert_plain(fig)
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert sorted(ax.get_ylabel() for ax in bars) == ["PhiA entry (×10⁻⁵)", "PhiB entry (×10⁻⁵)",
                                                      "PhiC entry (×10⁻⁴)"]
    for bar in bars:  # plain mantissas, the power of ten in the label: no offset text above the bar
        assert bar.yaxis.get_offset_text().get_text() == ""
        ticks = [t.get_text() for t in bar.get_yticklabels() if t.get_text()]
        assert ticks and all(len(t) <= 5 and "e" not in t for t in ticks), ticks
    render_png(fig)


def test_a_factor_and_its_ground_truth_share_one_colour_scale(no_mathtext):
    from curvscope.report.factors_plots import factors_figure

    rng = np.random.default_rng(1)
    mine = {"PhiA": 4e-4 * rng.standard_normal((8, 8)), "PhiB": rng.standard_normal((5, 5))}
    truth = {"PhiA": 1e-3 * rng.standard_normal((8, 8)), "PhiB": 0.2 * rng.standard_normal((5, 5))}
    fig = factors_figure(mine, "factors", ground_truth=truth,
                         correlation={"PhiA": {"mean": 0.8, "std": 0.1}, "PhiB": {"mean": 0.5, "std": 0.2}},
                         example_label="ensemble model 0", example_r={"PhiA": 0.7, "PhiB": 0.4})
    assert fig.get_figwidth() <= 10.0
    images = [ax.get_images()[0] for ax in fig.axes if ax.get_images()]
    assert len(images) == 4
    for model, gt, name in ((images[0], images[1], "PhiA"), (images[2], images[3], "PhiB")):
        assert model.norm.vmax == gt.norm.vmax == -model.norm.vmin
        assert model.norm.vmax == pytest.approx(max(np.abs(mine[name]).max(), np.abs(truth[name]).max()))
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert [ax.get_ylabel() for ax in bars] == ["PhiA entry (×10⁻³), both panels", "PhiB entry, both panels"]
    render_png(fig)


# -- the gradient share outside the top-k ------------------------------------------------------------------


def _gram_group(top_k: int, rank: int) -> dict:
    lam = sorted(np.random.default_rng(0).lognormal(-1, 1, top_k).tolist(), reverse=True)
    overlap = np.full(top_k, 0.9 / top_k)
    return {"name": "all", "rank": rank, "eigenvalues": lam, "trace": 30.0, "num_params": 1000,
            "directions": {"top_k": top_k, "lambda": lam, "gamma_abs": [0.1] * top_k,
                           "gradient_overlap": overlap.tolist(), "flat_overlap": 0.1,
                           "lambda_snr": [1.0] * top_k, "gamma_snr": [1.0] * top_k}}


@pytest.mark.parametrize(("top_k", "rank", "label"), [(20, 1151, "beyond the top-20 (1 − sum): 10.00%"),
                                                      (20, 20, "null space (1 − sum): 10.00%")])
def test_the_remainder_of_the_gradient_is_named_for_what_it_is(top_k, rank, label, no_mathtext):
    from curvscope.report.plots import directions_figure
    from curvscope.report.tables import facts_table

    fig = directions_figure(_gram_group(top_k, rank), PROBLEM)
    facts = next(t.get_text() for t in fig.axes[1].texts if "directions:" in t.get_text())
    assert label in facts and "flat space" not in facts
    assert ("the other 1,131 nonzero directions" in facts) == (top_k < rank)
    render_png(fig)
    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(facts_table({"loss_value": 0.1, "groups": [_gram_group(top_k, rank)]}))
    text = console.export_text()
    if top_k < rank:
        assert "gradient beyond the top-20" in text and "1,131 nonzero directions, not computed" in text
    else:
        assert "gradient in flat space" in text and "the null space" in text
