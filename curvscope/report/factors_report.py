"""The ``factors`` report section, the tensors of ``factors.safetensors`` and the SymO file, and the rich tables.

Plain data out of the engine's results (:mod:`curvscope.curvature.symmetry`); no maths here. The fields are
documented in ``docs/factors.md`` (Outputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from curvscope.report.format import num

if TYPE_CHECKING:
    from rich.table import Table
    from torch import Tensor

    from curvscope.curvature.symmetry.ensemble import EnsembleResult
    from curvscope.curvature.symmetry.estimate import FactorsResult
    from curvscope.curvature.symmetry.symo import SymoResult


def factors_section(result: FactorsResult, ensemble: EnsembleResult | None, symo: SymoResult | None,
                    ggn: dict[str, Any] | None, checkpoints: list[Path], symmetry_choice: str | None = None
                    ) -> dict[str, Any]:
    """The report's ``factors`` section (plain data) without its ``files``.

    Args:
        result: the estimated factors (:func:`~curvscope.curvature.symmetry.compute_factors`).
        ensemble: the ensemble ground truth and per-model correlations, or ``None`` without an ensemble.
        symo: the SymO direction and its line search, or ``None`` when not computed.
        ggn: ``{"mc_samples", "subsample"}`` of the GGN columns with source ``ggn`` (else ``None``).
        checkpoints: the ensemble's checkpoint files (empty when the models were drawn).
        symmetry_choice: what symmetry ``auto`` chose and why (``None`` when the symmetry was given): the
            section's ``symmetry_choice`` and its first note (instead of the note suggesting another symmetry).
    """
    structure = result.structure
    chain = structure.chain
    comps = structure.components
    values = result.factors.blocks()
    module_of = {t.name: t.name.rpartition(".")[0] for t in chain.tensors}
    blocks = []
    for spec in structure.blocks():
        t = values[spec.name]
        blocks.append({"name": spec.name, "kind": spec.kind, "shape": list(spec.shape),
                       "layers": sorted({module_of[p] for p in spec.params}, key=list(chain.modules).index),
                       "params": list(spec.params), "component": comps[spec.component].code,
                       "frobenius": float(t.double().norm()),
                       **({"value": float(t)} if spec.kind == "scalar" else {})})
    section: dict[str, Any] = {
        "symmetry": structure.symmetry,
        "source": result.source,
        "layers": list(chain.modules),
        "widths": list(chain.widths),
        "activations": list(chain.activations),
        "activation_symmetry": chain.activation_symmetry,
        "num_vectors": result.num_vectors,
        "chain_params": chain.num_params,
        "components": [{"code": c.code, "size": c.size, "irrep_dim": c.irrep_dim,
                        "params": [chain.tensors[m.index].name for m in c.members]} for c in comps],
        "blocks": blocks,
        "structure_error": dict(result.structure_error),
        "notes": list(result.notes),
    }
    if ggn is not None:
        section.update(ggn)
    if ensemble is not None:
        section["ensemble"] = {
            "models": ensemble.models, "init": ensemble.init,
            "checkpoints": [str(p) for p in checkpoints] if checkpoints else None,
            "correlation": ensemble.summary(),
            "loss_mean": float(ensemble.losses.mean()),
        }
    if symo is not None:
        section["symo"] = symo_fields(symo)
    if symmetry_choice:
        section["symmetry_choice"] = symmetry_choice
        section["notes"] = [symmetry_choice, *[n for n in section.get("notes", []) if "try symmetry" not in n]]
    return section


def symo_fields(symo: SymoResult) -> dict[str, Any]:
    """The ``factors.symo`` fields: the line search and its best step."""
    best = None  # decreases, as everywhere in the report: positive = the loss went down
    if symo.best_step is not None:
        i = [float(s) for s in symo.steps].index(symo.best_step)
        best = {"step": symo.best_step, "predicted_decrease": -float(symo.predicted[i]),
                "realized_decrease": -float(symo.realized[i])}
    return {
        "eps": symo.eps, "g_dot_direction": symo.g_dot_u, "curvature": symo.curvature,
        "quadratic_step": symo.g_dot_u / symo.curvature if symo.curvature > 0 else None,
        "line_search": [{"step": float(s), "predicted_decrease": -float(p), "predicted_decrease_linear": -float(q),
                         "realized_decrease": -float(r)}
                        for s, p, q, r in zip(symo.steps, symo.predicted, symo.predicted_linear, symo.realized,
                                              strict=True)],
        "best": best,
    }


def _cpu(t: Tensor) -> Tensor:
    return t.detach().to("cpu").contiguous()


def factors_tensors(result: FactorsResult, ensemble: EnsembleResult | None) -> dict[str, Tensor]:
    """The tensors of ``factors.safetensors``: every named factor; with an ensemble ``ground_truth/<name>``,
    ``correlation/<name>`` ``(M,)`` and ``example/<name>`` (ensemble model 0's factor, the one factors.png
    shows beside the ground truth)."""
    tensors = {name: _cpu(t) for name, t in result.factors.blocks().items()}
    if ensemble is not None:
        tensors.update({f"ground_truth/{n}": _cpu(t) for n, t in ensemble.ground_truth.blocks().items()})
        tensors.update({f"example/{n}": _cpu(t) for n, t in ensemble.example.blocks().items()})
        tensors.update({f"correlation/{n}": _cpu(t) for n, t in ensemble.correlation.items()})
    return tensors


def factors_metadata(section: dict[str, Any]) -> dict[str, Any]:
    """The metadata of ``factors.safetensors`` (from the section)."""
    meta: dict[str, Any] = {"format": "curvscope.factors", "symmetry": section["symmetry"],
                            "source": section["source"], "layers": ",".join(section["layers"]),
                            "widths": section["widths"],
                            "blocks": {b["name"]: b["component"] for b in section["blocks"]}}
    if section.get("ensemble"):
        meta["ensemble_models"] = str(section["ensemble"]["models"])
        meta["ensemble_init"] = section["ensemble"]["init"]
    return meta


def symo_tensors(symo: SymoResult) -> dict[str, Tensor]:
    """The SymO direction file: one tensor per parameter."""
    return {n: _cpu(t) for n, t in symo.direction.items()}


def symo_metadata(section: dict[str, Any]) -> dict[str, Any]:
    """The metadata of the SymO direction file."""
    return {"format": "curvscope.symo_step", "symmetry": section["symmetry"], "source": section["source"],
            "eps": repr(section["symo"]["eps"]), "layers": ",".join(section["layers"]),
            "update": "theta - step * direction"}


def factors_tables(section: dict[str, Any]) -> list[Table]:
    """The rich summary: one row per named factor, then the facts."""
    from rich.markup import escape
    from rich.table import Table

    corr = (section.get("ensemble") or {}).get("correlation", {})
    table = Table(title=escape(f"Factors ({section['symmetry']}, source {section['source']})"), title_justify="left")
    for col, kw in (("factor", {}), ("shape", {}), ("parameters", {}), ("value or norm", {"justify": "right"})):
        table.add_column(col, **kw)
    if corr:
        table.add_column("r vs truth", justify="right", no_wrap=True)
    for b in section["blocks"]:
        shape = "x".join(str(s) for s in b["shape"]) or "scalar"
        row = [escape(str(b["name"])), escape(shape), escape(", ".join(b["params"])),
               num(b.get("value", b["frobenius"]), 4)]
        if corr:
            c = corr.get(b["name"], {})
            row.append("-" if c.get("mean") is None else f"{num(c['mean'])} ± {num(c['std'])}")
        table.add_row(*row)
    facts = Table(show_header=False, title="Summary", title_justify="left")
    facts.add_column(style="bold")
    facts.add_column()
    widths = escape("-".join(map(str, section["widths"])))
    facts.add_row("chain", escape(f"{', '.join(section['layers'])} (widths {widths})"))
    allowed = section["activation_symmetry"] or "unknown (named layers)"
    facts.add_row("symmetry", escape(f"{section['symmetry']} (activations allow: {allowed})"))
    count = section["num_vectors"]
    facts.add_row("source", f"{escape(str(section['source']))} ({count} vector{'s' if count != 1 else ''})")
    for key, value in section["structure_error"].items():
        text = "skipped" if value is None else f"{num(value, 4)} (relative Frobenius)"
        facts.add_row(escape(f"structure error ({key})"), text)
    if section.get("ensemble"):
        e = section["ensemble"]
        facts.add_row("ensemble",
                      f"{e['models']} models ({escape(str(e['init']))}), mean loss {num(e['loss_mean'], 4)}")
    if section.get("symo"):
        s = section["symo"]
        best = s["best"]
        text = (f"g·u {num(s['g_dot_direction'], 4)}, u·Hu {num(s['curvature'], 4)}; " +
                (f"best step {num(best['step'])}: predicted decrease {num(best['predicted_decrease'], 4)}, "
                 f"realized {num(best['realized_decrease'], 4)}" if best else "no step lowers the loss"))
        facts.add_row("SymO", text)
    for note in section["notes"]:
        facts.add_row("note", escape(str(note)))
    for key, path in section.get("files", {}).items():
        facts.add_row(escape(str(key)), escape(str(path)))
    return [table, facts]
