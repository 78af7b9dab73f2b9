"""The scaling plot: curvscope's time and peak memory against the batch size N and the width (log-log)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LABELS = {"n_mlp": "MLP 784-1024-1024-10", "n_cnn": "3c3d CNN", "width": "MLP 784-w-w-10, N = 128"}


def plot_scaling(scaling: dict[str, Any], path: Path) -> Path:
    """A 2x2 grid: time (top) and peak memory (bottom) against N (left) and width (right), each series
    labelled with its fitted exponent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex="col")
    for key, s in scaling.items():
        col = 1 if key == "width" else 0
        pts = [p for p in s["points"] if p.get("median_s")]
        if not pts:
            continue
        x = [p["x"] for p in pts]
        label = LABELS.get(key, key)
        for row, (field, scale, exp) in enumerate((("median_s", 1.0, s.get("time_exponent")),
                                                   ("peak_bytes", 2.0**-20, s.get("memory_exponent")))):
            ax = axes[row][col]
            ax.loglog(x, [p[field] * scale for p in pts], "o-",
                      label=label + (f" (slope {exp:.2f})" if exp is not None else ""))
    for col, xlabel in enumerate(("batch size N", "hidden width w")):
        axes[1][col].set_xlabel(xlabel)
        for row, ylabel in enumerate(("time (s)", "peak memory above baseline (MiB)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="upper left")
    axes[0][0].set_title("curvscope, all GGN eigenvalues, vs N")
    axes[0][1].set_title("curvscope, all GGN eigenvalues, vs width")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    import json
    import sys

    results = json.loads(Path(sys.argv[1]).read_text())
    print(plot_scaling(results["scaling"], Path(sys.argv[2]) if len(sys.argv) > 2 else Path("scaling.png")))
