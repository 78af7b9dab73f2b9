"""Plots a person would look at: large factors as block means, percentages instead of rounding noise."""

from __future__ import annotations

import numpy as np

from curvscope.report.factors_plots import MAX_CELLS, block_means, factors_figure
from curvscope.report.render import render_png


def test_block_means_of_a_large_factor():
    m = np.arange(300 * 301, dtype=float).reshape(300, 301)
    means, k = block_means(m)
    assert k == 3 and means.shape == (100, 101) and max(means.shape) <= MAX_CELLS
    assert np.isclose(means[0, 0], m[:3, :3].mean()) and np.isclose(means[-1, -1], m[297:, 300:].mean())
    small = np.eye(5)
    assert block_means(small)[1] == 1 and block_means(small)[0] is small


def test_a_3072_wide_factor_renders_as_block_means():
    rng = np.random.default_rng(0)
    fig = factors_figure({"Phi_1": rng.standard_normal((3072, 3072))}, "factors")
    titles = [ax.get_title() for ax in fig.axes]
    assert any("means of 24x24 blocks" in t for t in titles), titles
    assert render_png(fig).startswith(b"\x89PNG")


def test_log_tick_labels_are_plain_unicode_in_one_style():
    from curvscope.report.render import log_tick_labels

    assert log_tick_labels([1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]) == ["10⁻³", "10⁻²", "10⁻¹", "1", "10", "10²"]
    assert log_tick_labels([0.05, 0.1, 0.2, 0.5]) == ["0.05", "0.1", "0.2", "0.5"]  # not "0.05, 10⁻¹, ..."
    assert log_tick_labels([4e-4, 5e-4]) == ["0.0004", "0.0005"]


def _visible_tick_labels(lo: float, hi: float) -> list[str]:
    from curvscope.report.render import lean_log, pyplot

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([lo, hi], [lo, hi])
    lean_log(ax)
    ax.set_xlim(lo, hi)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
    plt.close(fig)
    return labels


def test_a_narrow_log_axis_still_has_labels():
    """No minor ticks are drawn (they were most of a log plot's drawing time), so a narrow axis gets 1-2-5 or
    1..9 major ticks instead of none."""
    assert _visible_tick_labels(0.3, 0.9) == ["0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9"]
    assert _visible_tick_labels(2.0, 30.0) == ["2", "5", "10", "20"]
    assert _visible_tick_labels(1e-6, 10.0)[:2] == ["10⁻⁶", "10⁻⁵"]


def test_spectrum_figures_need_no_mathtext(monkeypatch):
    """The house figures are drawn without matplotlib's mathtext parser (half of a figure's drawing time)."""
    import matplotlib.mathtext as mathtext

    from curvscope.report.plots import directions_figure, layers_figure, spectrum_figure

    parsed = []
    original = mathtext.MathTextParser.parse
    monkeypatch.setattr(mathtext.MathTextParser, "parse", lambda self, s, *a, **k: parsed.append(s) or
                        original(self, s, *a, **k))
    rng = np.random.default_rng(0)
    lam = sorted(rng.lognormal(-3, 2, 40).tolist(), reverse=True)
    group = {"name": "all", "eigenvalues": lam, "rank": 40, "trace": sum(lam), "num_params": 1000,
             "eigenvalue_floor": 1e-4,
             "directions": {"top_k": 40, "lambda": lam, "gamma_abs": rng.lognormal(-4, 1, 40).tolist(),
                            "gradient_overlap": rng.dirichlet(np.ones(40)).tolist(), "flat_overlap": 0.01,
                            "lambda_snr": rng.lognormal(0, 1, 40).tolist(),
                            "gamma_snr": rng.lognormal(-1, 1, 40).tolist()}}
    blocks = [{"name": f"layer{i}", "lambda_max": lam[i], "trace": 2 * lam[i], "num_params": 10} for i in range(3)]
    for fig in (spectrum_figure(group), directions_figure(group), layers_figure(blocks)):
        assert render_png(fig).startswith(b"\x89PNG")
    assert parsed == []
