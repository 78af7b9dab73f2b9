"""The ``lr`` report section of ``curvscope lr-suggest`` and what is made from it: tables, notes, code.

:func:`lr_section` turns an :class:`~curvscope.curvature.lr.LRResult` into the JSON-able section; everything
else here reads only that section (so a saved report prints the same tables). Plot: :mod:`.lr_plots`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from rich import box
from rich.markup import escape
from rich.table import Table

from curvscope.curvature.lr import RECOMMENDED_RULE
from curvscope.report.format import finite_or_none, num

if TYPE_CHECKING:
    from curvscope.curvature.lr import LRResult


def lr_section(result: LRResult) -> dict[str, Any]:
    """The report's ``lr`` section of a result (formatting only; tensors are made JSON-able by the writer).

    Args:
        result: the rates of every batch (:func:`curvscope.workflows.lr.run_lr`).

    Returns:
        The fields listed in ``docs/lr.md`` (Outputs): per group and for the problem's own batch, with means and
        standard deviations over the batches when there are several.
    """
    main = result.main
    stats = result.statistics() if len(result.batches) > 1 else {}
    groups = []
    for s, group in enumerate(result.groups):
        row: dict[str, Any] = {
            "name": group.name,
            "parameters": list(group.param_names),
            "num_params": result.num_params[s],
            "g_hat": finite_or_none(main.g_hat[s]),
            "h_bar_diag": finite_or_none(main.h_bar[s, s]),
            "lr_newton": finite_or_none(main.lr_newton[s]),
            "lr_diag": finite_or_none(main.lr_diag[s]),
            "diag_note": main.diag_notes[s],
            "lambda_max": finite_or_none(main.lambda_max[s]),
            "lr_stability": finite_or_none(main.lr_stability[s]),
            "recommended": finite_or_none(main.recommended[s]),
            "rule": main.rules[s],
        }
        if main.lr_cubic is not None:
            row["lr_cubic"] = finite_or_none(main.lr_cubic[s])
        if main.d3 is not None:
            row["d3"] = finite_or_none(main.d3[s])
        noisy = []
        for name, st in stats.items():
            row[f"{name}_mean"] = finite_or_none(st.mean[s])
            row[f"{name}_std"] = finite_or_none(st.std[s])
            if st.noisy[s]:
                noisy.append(name)
        if stats:
            row["noisy"] = noisy
        groups.append(row)
    rec = main.steps["recommended"]
    section: dict[str, Any] = {
        "partition": result.partition,
        "curvature": result.curvature,
        "direction": result.direction,
        "ridge": result.ridge,
        "rule": RECOMMENDED_RULE,
        "g_hat": main.g_hat,
        "h_bar": main.h_bar,
        "h_bar_eigenvalues": main.h_bar_eigenvalues,
        "h_bar_positive_definite": main.h_bar_positive_definite,
        "h_bar_correlation": main.h_bar_correlation,
        "newton_eta": main.newton_eta,
        "newton_note": main.newton_note,
        "lambda_max_global": finite_or_none(main.lambda_max_global),
        "lr_stability_global": finite_or_none(main.lr_stability_global),
        "joint_sharpness": finite_or_none(main.joint_sharpness),
        "groups": groups,
        "loss_before": main.loss_before,
        "predicted_decrease": rec.predicted,
        "realized_decrease": rec.realized,
        "realized_decrease_holdout": rec.realized_holdout,
        "halvings": main.halvings,
        "steps": {name: {"rates": c.rates, "predicted_decrease": c.predicted, "realized_decrease": c.realized,
                         "realized_decrease_holdout": c.realized_holdout,
                         **({"predicted_decrease_cubic": c.predicted_cubic} if c.predicted_cubic is not None
                            else {})}
                  for name, c in main.steps.items()},
        "batches": len(result.batches),
        "holdout": result.holdout_size,
        "per_batch": [{"batch_indices": b.batch_indices, "loss_before": b.loss_before,
                       "recommended": b.recommended, "realized_decrease": b.steps["recommended"].realized,
                       "h_bar_positive_definite": b.h_bar_positive_definite} for b in result.batches],
    }
    if result.path is not None:
        section["path"] = result.path
    if result.cubic_weight is not None:
        section["cubic"] = {"weight": result.cubic_weight, "note": main.cubic_note, "eta": main.cubic_eta}
    section["warnings"] = rate_warnings(section)
    return section


def rate_warnings(section: dict[str, Any]) -> list[str]:
    """The ways the recommended rates are predicted or measured to hurt: a higher batch or held-out loss after
    the step, or a group rate beyond the whole-model stability bound 2/lambda_max(G)."""
    warnings = []
    realized = section.get("realized_decrease")
    if realized is not None and realized < 0:
        warnings.append(f"the recommended rates raise the batch loss (realized decrease {num(realized)})")
    held = section.get("realized_decrease_holdout")
    if held is not None and held < 0:
        warnings.append(f"the recommended rates raise the held-out loss (realized decrease {num(held)}): they fit "
                        "this batch, not the data")
    bound = section.get("lr_stability_global")
    joint = section.get("joint_sharpness")
    if joint is not None:  # the bound of per-group rates: lambda_max(R^1/2 G R^1/2) < 2
        if joint > 2.0 * (1 + 1e-3):
            warnings.append(f"the recommended rates exceed the stability bound of per-group rates: "
                            f"lambda_max(R^1/2 G R^1/2) = {num(joint)} > 2; such a step can diverge")
    elif bound is not None:
        over = [g["name"] for g in section["groups"] if g.get("recommended") is not None and g["recommended"] > bound]
        if over:
            warnings.append(f"{len(over)} group(s) get a rate above the whole-model stability bound 2/lambda_max = "
                            f"{num(bound)} ({', '.join(over[:3])}{', ...' if len(over) > 3 else ''}): together "
                            "with the others such a step can diverge")
    return warnings


def _rate_cell(row: dict[str, Any], key: str, missing: str = "-") -> str:
    """The rate, and under it ``±std`` over the batches (red with ``!`` when std > mean)."""
    text = num(row.get(key), missing=missing)
    std = row.get(f"{key}_std")
    if std is not None:
        text += f"\n±{num(std, digits=2)}"
        if key in row.get("noisy", []):
            text = f"[red]{text}![/red]"
    return text


def rule_legend(section: dict[str, Any]) -> list[str]:
    """The distinct rules of the recommended rates, in order of first use (the table cites them by number)."""
    return list(dict.fromkeys(row["rule"] for row in section["groups"]))


SHORT_HEADERS = {"stability": "stab.", "recommended": "rec."}
"""The two long headers abbreviated, when the table with them would not fit the width (said in its caption)."""


def rates_tables(section: dict[str, Any], width: int = 80) -> list[Table]:
    """:func:`rates_table` with group names never broken at ``width`` columns (a legend for long names), and no
    header or number cut: when the whole words do not fit, the two longest headers are abbreviated
    (:data:`SHORT_HEADERS`, spelled out under the table)."""
    from curvscope.report.tables import fit_names, natural_width

    names = [row["name"] for row in section["groups"]]
    tables = fit_names(lambda labels: rates_table(section, labels), names, width)
    if natural_width(tables[0]) <= width:
        return tables
    return fit_names(lambda labels: rates_table(section, labels, short=True), names, width)


def rates_table(section: dict[str, Any], labels: list[str] | None = None, short: bool = False) -> Table:
    """The per-group table of the rates (``labels``: row labels, default the group names).

    Columns: group, #params, g-hat, H-bar_ss, then the rates newton, diag, stability, (cubic) (the report's
    lr_newton, ...), recommended, and the number of the rule that gave the recommended rate
    (:func:`rule_legend`); every header one whole word (``short``: :data:`SHORT_HEADERS`, said in the caption).
    """
    batches = section["batches"]
    title = escape(f"Learning rates per {section['partition']} group ({section['curvature']}, direction "
                   f"{section['direction']})")
    if batches > 1:
        title += f"\n±std over {batches} batches, ! = std > mean"
    caption = ", ".join(f"{v} = {k}" for k, v in SHORT_HEADERS.items()) if short else None
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=0,
                  caption=caption, caption_justify="left")
    table.add_column("group", no_wrap=True, min_width=5)
    # one whole word per header (the report keys without "lr_": the title says these are learning rates)
    headers = ["#params", "g-hat", "H-bar_ss", "newton", "diag", "stability"]
    cubic = "cubic" in section
    if cubic:
        headers.append("cubic")
    for name in headers:
        table.add_column(SHORT_HEADERS.get(name, name) if short else name, justify="right", no_wrap=True)
    table.add_column(SHORT_HEADERS["recommended"] if short else "recommended", justify="right", style="bold",
                     no_wrap=True)
    table.add_column("rule", justify="right", no_wrap=True)
    legend = rule_legend(section)
    newton_missing = "n/a" if section["newton_eta"] is None else "<=0"
    for row, label in zip(section["groups"], labels or [row["name"] for row in section["groups"]], strict=True):
        moves = not row["diag_note"].startswith("zero gradient")
        cells = [escape(label), f"{row['num_params']:,}", num(row["g_hat"]), num(row["h_bar_diag"]),
                 _rate_cell(row, "lr_newton", newton_missing if moves else "n/a"), _rate_cell(row, "lr_diag", "n/a"),
                 _rate_cell(row, "lr_stability", "n/a")]
        if cubic:
            cells.append(_rate_cell(row, "lr_cubic", "n/a"))
        cells += [_rate_cell(row, "recommended"), f"[{legend.index(row['rule']) + 1}]"]
        table.add_row(*cells)
    return table


def truth_table(section: dict[str, Any]) -> Table:
    """Each rate set as a step: predicted and realized loss decrease (batch, holdout)."""
    holdout = section["holdout"] > 0
    table = Table(title=f"Truth test: take the step, re-evaluate the loss (before: {num(section['loss_before'], 6)})",
                  title_justify="left")
    table.add_column("rates")
    table.add_column("predicted decrease", justify="right")
    table.add_column("realized (batch)", justify="right")
    if holdout:
        table.add_column(f"realized (holdout {section['holdout']})", justify="right")
    if "cubic" in section:
        table.add_column("predicted (cubic model)", justify="right")
    for name, step in section["steps"].items():
        realized = step["realized_decrease"]
        style = "green" if realized is not None and realized > 0 else "red"
        cells = [escape(str(name)), num(step["predicted_decrease"]), f"[{style}]{num(realized)}[/{style}]"]
        if holdout:
            cells.append(num(step["realized_decrease_holdout"]))
        if "cubic" in section:
            cells.append(num(step.get("predicted_decrease_cubic")))
        table.add_row(*cells)
    return table


def notes(section: dict[str, Any]) -> list[str]:
    """One-line remarks under the tables (H-bar definiteness, Newton, stability)."""
    lines = [f"rule [{i}]: {escape(rule)}" for i, rule in enumerate(rule_legend(section), start=1)]
    lines += [f"[bold yellow]warning:[/bold yellow] {escape(w)}" for w in section.get("warnings", [])]
    evals = section["h_bar_eigenvalues"]
    if section["h_bar_positive_definite"]:
        lines.append(f"H-bar is positive definite (eigenvalues {num(evals[0])} .. {num(evals[-1])}).")
    else:
        lines.append(f"[yellow]H-bar is NOT positive definite[/yellow] (smallest eigenvalue {num(evals[0])}): "
                     "the quadratic model has no minimum; joint Newton rates are not defined.")
    if section["newton_note"] != "ok":
        lines.append(f"joint Newton: {escape(section['newton_note'])}")
    if section["lr_stability_global"] is not None:
        lines.append(f"whole-model stability bound 2/lambda_max(G) = {num(section['lr_stability_global'], 4)} "
                     f"(lambda_max = {num(section['lambda_max_global'], 4)})")
    joint = section.get("joint_sharpness")
    if joint is not None:
        bound = section.get("lr_stability_global")
        above = [g["name"] for g in section["groups"] if bound is not None and g.get("recommended") is not None
                 and g["recommended"] > bound]
        lines.append(f"stability of the recommended per-group rates R: lambda_max(R^1/2 G R^1/2) = {num(joint, 4)} "
                     "(stable below 2)" + (f"; {len(above)} group(s) exceed the single-rate bound 2/lambda_max(G), "
                                           "which applies to one rate for all, not to per-group rates" if above
                                           else ""))
    if "cubic" in section and section["cubic"]["note"] != "ok":
        lines.append(f"cubic: {escape(str(section['cubic']['note']))}")
    return lines


def emit_torch(section: dict[str, Any]) -> str:
    """Python source: ``optimizer = torch.optim.SGD([...])`` (needs ``model`` in scope).

    One param group per group, with its recommended rate.
    """
    lines = [f"# curvscope lr-suggest: recommended rates, one param group per {section['partition']} group"]
    lines += [f"# WARNING: {w}" for w in section.get("warnings", [])]
    lines += ["import torch", "", "optimizer = torch.optim.SGD(["]
    for row in section["groups"]:
        params = ", ".join(f"model.get_parameter({n!r})" for n in row["parameters"])
        lines.append(f"    {{\"params\": [{params}], \"lr\": {row['recommended']!r}}},  # {row['name']}: "
                     f"{row['rule']}")
    lines.append("])")
    return "\n".join(lines)


def emit_json(section: dict[str, Any]) -> str:
    """JSON object: parameter name -> recommended rate."""
    return json.dumps({n: row["recommended"] for row in section["groups"] for n in row["parameters"]}, indent=2)
