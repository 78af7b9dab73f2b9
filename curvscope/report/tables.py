"""Rich tables for the terminal, drawn from report fields (no maths here)."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from curvscope.report.format import num as fmt
from curvscope.report.format import share as _share

__all__ = ["facts_table", "fmt", "spectrum_summary", "spectrum_table"]


def natural_width(table: Table) -> int:
    """The width ``table`` takes when nothing is wrapped."""
    from rich.console import Console
    from rich.measure import Measurement

    console = Console(width=10_000)
    return Measurement.get(console, console.options, table).maximum


ELLIPSIS = "…"


def fit_names(build, names: list[str], width: int = 80, header: str = "group") -> list[Table]:
    """Tables whose name column never breaks a name: ``build(labels)`` makes the table with one label per
    name. When the names do not fit beside the numbers at ``width`` columns, the table drops its outer and
    inner vertical borders, and the names are shortened by eliding what they share (:func:`short_names`): the
    dotted prefix common to them (``transformer.``, said once under the table), then leading or middle
    components down to a label that is still unique (``…11…c_attn``); a legend below lists those names whole.
    Labels depend on the names and the width only, so every command labels a model's layers alike."""
    table = build(list(names))
    if natural_width(table) <= width:
        return [table]
    table = _compact(build(list(names)))
    if natural_width(table) <= width:
        return [table]
    base = natural_width(_compact(build([ELLIPSIS] * len(names))))
    room = max(6, width - (base - max(len(header), 1)))
    labels, prefix = short_names(names, room)
    tables = [_compact(build(labels))]
    legend = Table(show_header=False, box=None, pad_edge=False)
    legend.add_column(no_wrap=True, style="bold")
    legend.add_column(overflow="fold")
    if prefix:
        legend.add_row(ELLIPSIS, escape(f"{prefix} (the prefix common to the names)"))
    for label, name in zip(labels, names, strict=True):
        if label != name and not (prefix and name == prefix + label[len(ELLIPSIS):]):
            legend.add_row(escape(label), escape(name))
    if legend.row_count:
        tables.append(legend)
    return tables


def _compact(table: Table) -> Table:
    """``table`` without its outer frame and vertical rules (a header rule only), one space between columns:
    about 20 columns narrower."""
    from rich import box

    table.box = box.SIMPLE_HEAD
    table.show_edge = False
    table.pad_edge = False
    table.collapse_padding = True  # one space between columns, not two
    return table


def short_names(names: list[str], room: int) -> tuple[list[str], str]:
    """Labels of at most ``room`` characters for ``names``, and the dotted prefix elided from them (``""``:
    none).

    A name that fits stays whole. A longer one loses the dotted prefix common to every dotted name (``…``
    stands for it); one still too long becomes the most informative label that fits and that no other name
    shares: ``…tail`` or ``head…tail`` of its dotted components (``…11…c_attn``), else its last characters.
    Labels are unique when the names are (``#i`` is the last resort)."""
    dotted = [n.split(".") for n in names if "." in n]
    prefix = ""
    if len(dotted) >= 2:
        common: list[str] = []
        for parts in zip(*[d[:-1] for d in dotted], strict=False):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        prefix = ".".join(common) + "." if common else ""
    labels = []
    for name in names:
        if len(name) <= room:
            labels.append(name)
            continue
        rest, lead = (name[len(prefix):], ELLIPSIS) if prefix and name.startswith(prefix) else (name, "")
        label = lead + rest if len(lead + rest) <= room else _squeeze(name, rest, names, room)
        labels.append(label)
    for i, label in enumerate(labels):  # the last resort for labels that are not unique
        if labels.count(label) > 1 and sum(n == names[i] for n in names) == 1:
            labels[i] = f"#{i + 1}"
    used = prefix if any(lab.startswith(ELLIPSIS) and n.startswith(prefix) and lab[1:] == n[len(prefix):]
                         for lab, n in zip(labels, names, strict=True)) else ""
    return labels, used


def _squeeze(name: str, rest: str, names: list[str], room: int) -> str:
    """The longest label of ``rest``'s dotted components, ``…tail`` or ``[…]middle…tail`` (a run of components
    kept, the others elided), that fits ``room`` and identifies ``name`` among ``names``; else ``…`` and
    ``name``'s last characters."""
    parts = rest.split(".")
    n = len(parts)
    others = [o for o in names if o != name]
    best = ""
    for k in range(1, n):
        tail = parts[n - k:]
        for a in range(0, n - k):
            for b in range(a, n - k + 1):
                run = parts[a:b]
                if run:
                    label = (ELLIPSIS if a else "") + ".".join(run) + ELLIPSIS + ".".join(tail)
                    if b == n - k:  # nothing elided between the run and the tail
                        label = (ELLIPSIS if a else "") + ".".join(run + tail)
                else:
                    label = ELLIPSIS + ".".join(tail)
                if len(label) > room or len(label) <= len(best):
                    continue
                if not any(_matches(other, run, tail) for other in others):
                    best = label
    return best or ELLIPSIS + name[-(room - 1):]


def _matches(other: str, run: list[str], tail: list[str]) -> bool:
    """Whether ``other`` could be the name behind a label keeping ``run`` and ``tail`` (its components end with
    ``tail`` and hold ``run`` somewhere before it)."""
    parts = other.split(".")
    if len(parts) < len(run) + len(tail) or parts[len(parts) - len(tail):] != tail:
        return False
    if not run:
        return True
    return any(parts[i:i + len(run)] == run for i in range(len(parts) - len(tail) - len(run) + 1))


def spectrum_table(report: dict[str, Any], labels: list[str] | None = None) -> Table:
    """One row per group: rank, lambda_max, trace, effective rank, SNR > 1 shares, the GD bound 2/lambda_max.

    Narrow enough for an 80-column terminal or CI log; the top eigenvalues go into :func:`facts_table`.
    ``labels``: the row labels (default: the group names; see :func:`fit_names`).
    """
    approx = report.get("approximation") or {}
    kind = "exact" if approx.get("exact", True) else ", ".join(
        b for b in (f"MC {approx['mc_samples']}" if approx.get("mc_samples") else "",
                    f"subsample {approx['subsample']}" if approx.get("subsample") else "") if b)
    table = Table(title=f"GGN spectrum ({kind}, {approx.get('num_columns', '?')} columns)", title_justify="left")
    table.add_column("group", no_wrap=True)
    for header in ("params", "rank", "λ_max", "trace", "eff.\nrank", "SNR(γ)\n> 1", "SNR(λ)\n> 1",
                   "GD lr <\n2/λ_max"):
        table.add_column(header, justify="right", no_wrap=True)
    groups = report.get("groups", [])
    labels = labels or [str(g["name"]) for g in groups]
    for g, label in zip(groups, labels, strict=True):
        d = g.get("directions") or {}
        table.add_row(
            escape(label), fmt(g.get("num_params")), fmt(g.get("rank")),
            "<floor" if not g.get("rank") and (g.get("trace") or 0) > 0 else fmt(g.get("lambda_max")),
            fmt(g.get("trace")), fmt(g.get("effective_rank")),
            _share(d.get("snr_gt1_share")), _share(d.get("lambda_snr_gt1_share")),
            fmt(g.get("stability_lr")),
        )
    return table


def facts_table(report: dict[str, Any], out_dir: str | None = None, top_k: int = 5) -> Table:
    """Loss, gradient norm, the top eigenvalues, the Newton step and where the files went."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # paths stay whole (copy-pasteable); folded only when wider than the screen
    table.add_row("loss", fmt(report.get("loss_value"), 6))
    table.add_row("gradient norm", fmt(report.get("gradient_norm"), 4))
    for g in report.get("groups", [])[:1]:
        shown = (g.get("eigenvalues") or [])[:top_k]
        top = " ".join(fmt(v) for v in shown) or "-"
        table.add_row(f"top-{len(shown)} eigenvalues" if shown else "eigenvalues", f"{top} ({escape(str(g['name']))})")
        d = g.get("directions") or {}
        if d.get("flat_overlap") is not None:
            flat = d["flat_overlap"]
            share = f"{flat:.2%}" if abs(flat) >= 5e-5 else "< 0.01%"
            top_k, rank = d.get("top_k"), g.get("rank")
            if top_k is not None and rank is not None and top_k < rank:  # not all of it is flat: not computed
                table.add_row(f"gradient beyond the top-{top_k}", f"{share} (the other {rank - top_k:,} nonzero "
                              "directions, not computed, and the null space)")
            else:
                table.add_row("gradient in flat space", f"{share} (the null space: outside every nonzero direction)")
    first = (report.get("groups") or [{}])[0]
    if first.get("eigenvalue_floor") is not None:
        precision = report.get("precision") or "float32"
        run_dtype = (report.get("problem") or {}).get("dtype", precision)
        hint = "; dtype float64 resolves ~1e9x smaller ones" if precision == "float32" == run_dtype else ""
        if precision != run_dtype:  # the model computes below the run's dtype (problem.precision_note)
            hint = f"; the model computes in {precision} internally"
        table.add_row("precision floor", f"{fmt(first['eigenvalue_floor'])} ({precision}): smaller eigenvalues "
                      f"count as zero in rank and SNR shares{hint}")
    path = report.get("path")
    if path and path.startswith("autograd (") and report.get("method") != "lanczos":
        table.add_row("per-sample path", f"{escape(path)}: slower than vmap, same numbers")
    newton = report.get("newton")
    if newton:
        damping = newton.get("damping")
        damping = damping if isinstance(damping, str) else fmt(damping)
        table.add_row("Newton step", f"damping {damping}: predicted decrease {fmt(newton.get('predicted_decrease'))}"
                      f", realized {fmt(newton.get('realized_decrease'))} (|step| {fmt(newton.get('step_norm'))}, "
                      f"{newton.get('skipped_directions', 0)} of {newton.get('num_directions', 0)} directions "
                      "skipped)")
        for warning in newton.get("warnings") or []:
            table.add_row("[bold yellow]warning[/bold yellow]", f"Newton step: {escape(str(warning))}")
    from curvscope.report.matfree_report import comparison_rows

    for label, text in comparison_rows(report):
        table.add_row(escape(label), escape(text))
    land = report.get("landscape")
    if land:
        table.add_row("landscape", f"loss {fmt(land.get('loss0'), 4)} at 0, {fmt(min(land.get('loss_1d') or [0]), 4)}"
                      f" to {fmt(max(land.get('loss_1d') or [0]), 4)} for |t| <= {fmt(land.get('radius'))}")
    from curvscope.report.batch_report import batch_rows

    for label, text in batch_rows(report):
        table.add_row(label, text)
    for note in report.get("notes") or []:
        table.add_row("note", escape(str(note)))
    files = report.get("files") or {}
    if out_dir is not None:
        table.add_row("report", escape(f"{out_dir}/report.json"))
    for key, path in files.items():
        table.add_row(escape(key.replace("_", " ")), escape(str(path)))
    return table


def spectrum_summary(report: dict[str, Any], out_dir: str | None = None, width: int = 80) -> list[Table]:
    """What ``spectrum`` (and ``show``) print: the groups table for the method used (names never broken at
    ``width`` columns), then the facts."""
    names = [str(g["name"]) for g in report.get("groups", [])]
    if report.get("method") == "lanczos":
        from curvscope.report.matfree_report import matfree_table

        return [*fit_names(lambda labels: matfree_table(report, labels), names, width), facts_table(report, out_dir)]
    return [*fit_names(lambda labels: spectrum_table(report, labels), names, width), facts_table(report, out_dir)]
