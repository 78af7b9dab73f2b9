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
