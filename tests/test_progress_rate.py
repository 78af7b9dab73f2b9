"""The CLI's progress line shows products per second for the matrix-free stages (issue #20)."""

from __future__ import annotations

import io
import re

from rich.console import Console

from curvscope.cli.progress import JUMP, RATE_UNITS, Rate, bars


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_counts_units_over_time_and_skips_jumps():
    clock = Clock()
    rate = Rate("products", 0, clock)
    assert rate.update(0) == ""  # nothing done yet
    clock.now += 2.0
    assert rate.update(4) == "2 products/s"
    clock.now += 2.0
    assert rate.update(4 + JUMP + 1) == "1 products/s"  # a skip to the stage's end adds time, not units
    clock.now += 4.0
    assert rate.update(4 + JUMP + 2) == "1.6 s/product"  # 5 units in 8 s
    clock.now += 32.0
    assert rate.update(4 + JUMP + 3) == "6.67 s/product"  # 6 units in 40 s


def test_matrix_free_stages_show_products_per_second():
    assert {RATE_UNITS[s] for s in ("lanczos", "trace", "density")} == {"products"}
    out = io.StringIO()
    with bars(Console(file=out, force_terminal=True, width=80)) as progress:
        for done in range(0, 8, 2):
            progress("lanczos", done, 400)
        progress("gram", 1, 2)
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue())
    assert re.search(r"Lanczos .* [0-9.e+]+ (products/s|s/product)", text)
    assert all(len(line) <= 80 for line in re.split(r"[\r\n]", text))
