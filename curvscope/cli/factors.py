"""``curvscope factors``: symmetry-structured curvature factors, their ensemble ground truth and the SymO step.

:func:`run_factors` does the work (compute everything, then write the files) so that other code can run it
without the CLI; the typer command builds the Problem, calls it and prints the summary.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import inspect
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from curvscope.cli.common import (
    BatchSizeOpt,
    CheckpointArg,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    LossOpt,
    ModelKwargsOpt,
    ModelOpt,
    SeedOpt,
    ShuffleOpt,
    as_flags,
    build_problem,
    console,
    handle_errors,
    out,
)
from curvscope.cli.root import app
from curvscope.errors import CurvscopeError
from curvscope.io.atomic import check_writable

FACTORS_HELP = "Factors"
ENSEMBLE_HELP = "Ensemble ground truth"
FILES_HELP = "Output"
FACTORS_FILE = "factors.safetensors"
PLOT_FILE = "factors.png"

DEFAULTS: dict[str, Any] = {
    "symmetry": "orthogonal",
    "source": "batch",
    "layers": None,
    "mc_samples": 0,
    "subsample": None,
    "structure_check": True,
    "ensemble": 0,
    "ensemble_checkpoints": None,
    "init": "normal",
    "ensemble_chunk": 0,
    "symo_step": None,
    "eps": 1e-8,
    "plots": True,
    "seed": None,
}
"""``run_factors`` options and their defaults (the command's). ``seed`` None: the problem's seed (else 0)."""


def _options(options: dict[str, Any] | None) -> dict[str, Any]:
    opts = dict(DEFAULTS)
    for key, value in (options or {}).items():
        if key not in DEFAULTS:
            raise ValueError(f"run_factors: unknown option '{key}' (known: {', '.join(DEFAULTS)})")
        opts[key] = value
    return opts


def validate_options(opts: dict[str, Any]) -> list[Path]:
    """Check the options that need no Problem (before anything loads); returns the ensemble checkpoints."""
    from curvscope.curvature.symmetry.chain import parse_layers
    from curvscope.curvature.symmetry.ensemble import INITS
    from curvscope.curvature.symmetry.estimate import SOURCES
    from curvscope.curvature.symmetry.groups import SYMMETRIES

    if opts["symmetry"] not in SYMMETRIES:
        raise CurvscopeError(f"--symmetry '{opts['symmetry']}': choose one of {', '.join(SYMMETRIES)}")
    if opts["source"] not in SOURCES:
        raise CurvscopeError(f"--source '{opts['source']}': choose one of {', '.join(SOURCES)}")
    parse_layers(opts["layers"])
    if opts["mc_samples"] is None or opts["mc_samples"] < 0:
        raise CurvscopeError(f"--mc-samples must be 0 (exact) or positive, got {opts['mc_samples']}")
    if (opts["mc_samples"] or opts["subsample"] is not None) and opts["source"] != "ggn":
        raise CurvscopeError("--mc-samples and --subsample apply to --source ggn only")
    if opts["subsample"] is not None and opts["subsample"] < 1:
        raise CurvscopeError(f"--subsample must be at least 1, got {opts['subsample']}")
    if opts["init"] not in INITS:
        raise CurvscopeError(f"--init '{opts['init']}': choose one of {', '.join(INITS)}")
    if not (isinstance(opts["eps"], (int, float)) and math.isfinite(opts["eps"]) and opts["eps"] > 0):
        raise CurvscopeError(f"--eps must be a positive number, got {opts['eps']}")
    if opts["ensemble"] is None or opts["ensemble"] < 0 or opts["ensemble"] == 1:
        raise CurvscopeError(f"--ensemble must be 0 (off) or at least 2 models, got {opts['ensemble']}")
    if opts["ensemble_chunk"] is None or opts["ensemble_chunk"] < 0:
        raise CurvscopeError(f"--ensemble-chunk must be 0 (automatic) or positive, got {opts['ensemble_chunk']}")
    checkpoints: list[Path] = []
    if opts["ensemble_checkpoints"]:
        if opts["ensemble"]:
            raise CurvscopeError("use either --ensemble M (models from the initialization) or "
                                 "--ensemble-checkpoints GLOB, not both")
        pattern = str(opts["ensemble_checkpoints"])
        checkpoints = [Path(p) for p in sorted(glob.glob(pattern)) if Path(p).is_file()]
        if not checkpoints:
            raise CurvscopeError(f"--ensemble-checkpoints '{pattern}': no file matches")
        if len(checkpoints) < 2:
            raise CurvscopeError(f"--ensemble-checkpoints '{pattern}': an ensemble needs at least 2 "
                                 f"checkpoints, found 1 ({checkpoints[0]})")
    if (opts["ensemble"] or checkpoints) and opts["source"] != "batch":
        raise CurvscopeError("the ensemble ground truth averages single-gradient factors: use --source batch "
                             "with --ensemble / --ensemble-checkpoints")
    if opts["symo_step"] is not None:
        check_writable(Path(opts["symo_step"]), "--symo-step")
    return checkpoints


def _load_members(problem, paths: list[Path]) -> list[dict]:
    """Parameters of each checkpoint (the problem's architecture), keyed like ``problem.params``."""
    from curvscope.io.checkpoints import apply_state_dict, load_checkpoint

    members = []
    for path in paths:
        ckpt = load_checkpoint(path)
        net = copy.deepcopy(problem.model)
        apply_state_dict(net, ckpt.state_dict, str(path))
        values = dict(net.named_parameters())
        members.append({n: values[n].detach().to(device=problem.device, dtype=problem.dtype)
                        for n in problem.params})
    return members


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[Any]:
    """A ``progress(stage, done, total)`` callback drawing one rich progress bar per stage (on stderr)."""
    if quiet:
        yield lambda _stage, _done, _total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    labels = {"per-sample": "per-sample gradients (samples)", "ensemble": "ensemble (models)",
              "symo": "SymO line search", "write": "writing files"}
    tasks: dict[str, Any] = {}
    with Progress(TextColumn("{task.description:<32}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(labels.get(stage, stage), total=max(total, 1))
            bar.update(tasks[stage], completed=done, total=max(total, 1))

        yield update


def _cpu(t) -> Any:
    return t.detach().to("cpu").contiguous()


def run_factors(problem, out_dir: Path, options: dict[str, Any] | None = None, quiet: bool = False
                ) -> dict[str, Any]:
    """Compute the symmetry-structured factors of ``problem`` and write ``out_dir/factors.safetensors``,
    ``factors.png`` and the ``factors`` section of ``out_dir/report.json``.

    Args:
        options: the command's options in snake_case (``symmetry``, ``source``, ``layers``, ``mc_samples``,
            ``subsample``, ``structure_check``, ``ensemble``, ``ensemble_checkpoints``, ``init``,
            ``ensemble_chunk``, ``symo_step``, ``eps``, ``plots``, ``seed``); missing keys take :data:`DEFAULTS`.
        quiet: no progress bars.
    Returns:
        The ``factors`` section written. Everything is computed before the first file is written, so a failure
        leaves no partial output; ``report.json`` is written last.
    """
    from curvscope.curvature.symmetry.ensemble import ensemble_factors
    from curvscope.curvature.symmetry.estimate import compute_factors
    from curvscope.curvature.symmetry.symo import symo_step
    from curvscope.report.schema import build_report, write_report

    out_dir = Path(out_dir)
    opts = _options(options)
    paths = validate_options(opts)
    if out_dir.exists() and not out_dir.is_dir():
        raise CurvscopeError(f"--out {out_dir}: exists and is not a directory")
    check_writable(out_dir / "report.json", "--out")
    if opts["subsample"] is not None and opts["subsample"] > problem.batch_size:
        raise CurvscopeError(f"--subsample {opts['subsample']} is larger than the batch "
                             f"({problem.batch_size} samples)")
    seed = opts["seed"] if opts["seed"] is not None else int(problem.info.get("seed") or 0)

    with _progress(quiet) as progress:
        result = compute_factors(
            problem, symmetry=opts["symmetry"], source=opts["source"], layers=opts["layers"],
            mc_samples=opts["mc_samples"], subsample=opts["subsample"], seed=seed,
            structure_check=opts["structure_check"], progress=progress)
        ensemble = None
        if opts["ensemble"] or paths:
            members = _load_members(problem, paths) if paths else None
            ensemble = ensemble_factors(problem, result.structure, models=opts["ensemble"], init=opts["init"],
                                        members=members, seed=seed, chunk=opts["ensemble_chunk"],
                                        progress=progress)
        symo = None
        if opts["symo_step"] is not None:
            progress("symo", 0, 1)
            symo = symo_step(problem, result, eps=float(opts["eps"]))
            progress("symo", 1, 1)

        # everything to write is prepared in memory first
        blocks = {name: _cpu(t) for name, t in result.factors.blocks().items()}
        section = factors_section(result, ensemble, symo, opts, paths)
        tensors = dict(blocks)
        if ensemble is not None:
            tensors.update({f"ground_truth/{n}": _cpu(t) for n, t in ensemble.ground_truth.blocks().items()})
            tensors.update({f"correlation/{n}": _cpu(t) for n, t in ensemble.correlation.items()})
        meta = {"format": "curvscope.factors", "symmetry": result.structure.symmetry, "source": result.source,
                "layers": ",".join(result.structure.chain.modules),
                "widths": json.dumps(list(result.structure.chain.widths)),
                "blocks": json.dumps({b["name"]: b["component"] for b in section["blocks"]})}
        if ensemble is not None:
            meta["ensemble_models"] = str(ensemble.models)
            meta["ensemble_init"] = ensemble.init
        pngs: list[tuple[Path, bytes]] = []
        files = {"factors": str(out_dir / FACTORS_FILE)}
        if opts["plots"]:
            pngs.append((out_dir / PLOT_FILE, _render(problem, result, ensemble, blocks, section)))
            files["plot"] = str(out_dir / PLOT_FILE)
        if symo is not None:
            files["symo_step"] = str(opts["symo_step"])
        section["files"] = files
        report = build_report("factors", problem, {"factors": section})

        total = 2 + len(pngs) + (symo is not None)
        progress("write", 0, total)
        _save_tensors(out_dir / FACTORS_FILE, tensors, meta)
        if symo is not None:
            _save_tensors(Path(opts["symo_step"]), {n: _cpu(t) for n, t in symo.direction.items()},
                          {"format": "curvscope.symo_step", "symmetry": result.structure.symmetry,
                           "source": result.source, "eps": repr(symo.eps),
                           "layers": ",".join(result.structure.chain.modules),
                           "update": "theta - step * direction"})
        for path, data in pngs:
            _write_bytes(path, data)
        write_report(out_dir, report)
        progress("write", total, total)
    return report["factors"]


def factors_section(result, ensemble, symo, opts: dict[str, Any], paths: list[Path]) -> dict[str, Any]:
    """The report's ``factors`` section (plain data)."""
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
    if result.source == "ggn":
        section["mc_samples"] = opts["mc_samples"]
        section["subsample"] = opts["subsample"]
    if ensemble is not None:
        section["ensemble"] = {
            "models": ensemble.models, "init": ensemble.init,
            "checkpoints": [str(p) for p in paths] if paths else None,
            "correlation": ensemble.summary(),
            "loss_mean": float(ensemble.losses.mean()),
        }
    if symo is not None:
        best = None
        if symo.best_step is not None:
            i = [float(s) for s in symo.steps].index(symo.best_step)
            best = {"step": symo.best_step, "predicted": float(symo.predicted[i]),
                    "realized": float(symo.realized[i])}
        section["symo"] = {
            "eps": symo.eps, "g_dot_direction": symo.g_dot_u, "curvature": symo.curvature,
            "quadratic_step": symo.g_dot_u / symo.curvature if symo.curvature > 0 else None,
            "line_search": [{"step": float(s), "predicted": float(p), "predicted_linear": float(q),
                             "realized": float(r)}
                            for s, p, q, r in zip(symo.steps, symo.predicted, symo.predicted_linear,
                                                  symo.realized, strict=True)],
            "best": best,
        }
    return section


def _render(problem, result, ensemble, blocks, section) -> bytes:
    from curvscope.report import factors_plots

    chain = result.structure.chain
    title = (f"curvscope factors: {section['symmetry']} symmetry, source {section['source']}, "
             f"widths {'-'.join(str(w) for w in chain.widths)}")
    mats = {n: t.double().numpy() for n, t in blocks.items()}
    params = {b["name"]: " x ".join(b["params"]) for b in section["blocks"]}
    if ensemble is None:
        return factors_plots.render_png(factors_plots.factors_figure(mats, title, params=params))
    example = {n: _cpu(t).double().numpy() for n, t in ensemble.example.blocks().items()}
    truth = {n: _cpu(t).double().numpy() for n, t in ensemble.ground_truth.blocks().items()}
    title += f"; ensemble of {ensemble.models} ({ensemble.init})"
    return factors_plots.render_png(factors_plots.factors_figure(
        example, title, ground_truth=truth, correlation=section["ensemble"]["correlation"],
        example_label="ensemble model 0", example_r={n: float(r[0]) for n, r in ensemble.correlation.items()},
        params=params))


def _save_tensors(path: Path, tensors: dict, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from curvscope.io.atomic import write_atomic

    try:
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    except OSError as exc:
        raise CurvscopeError(f"{path}: cannot write ({exc.strerror or exc})") from exc


def _write_bytes(path: Path, data: bytes) -> None:
    from curvscope.io.atomic import write_atomic

    try:
        write_atomic(path, lambda tmp: tmp.write_bytes(data))
    except OSError as exc:
        raise CurvscopeError(f"{path}: cannot write ({exc.strerror or exc})") from exc


# -- summary tables -------------------------------------------------------------------------------------------

def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def factors_tables(section: dict[str, Any]) -> list[Table]:
    """The rich summary: one row per named factor, then the facts."""
    corr = (section.get("ensemble") or {}).get("correlation", {})
    table = Table(title=f"Factors ({section['symmetry']}, source {section['source']})", title_justify="left")
    for col, kw in (("factor", {}), ("shape", {}), ("parameters", {}), ("value or norm", {"justify": "right"})):
        table.add_column(col, **kw)
    if corr:
        table.add_column("r vs truth", justify="right", no_wrap=True)
    for b in section["blocks"]:
        shape = "x".join(str(s) for s in b["shape"]) or "scalar"
        value = _fmt(b.get("value", b["frobenius"]))
        row = [escape(b["name"]), shape, escape(", ".join(b["params"])), value]
        if corr:
            c = corr.get(b["name"], {})
            row.append("-" if c.get("mean") is None else f"{c['mean']:.3f} ± {c['std']:.3f}")
        table.add_row(*row)
    facts = Table(show_header=False, title="Summary", title_justify="left")
    facts.add_column(style="bold")
    facts.add_column()
    widths = "-".join(map(str, section["widths"]))
    facts.add_row("chain", escape(f"{', '.join(section['layers'])} (widths {widths})"))
    allowed = section["activation_symmetry"] or "unknown (--layers)"
    facts.add_row("symmetry", f"{section['symmetry']} (activations allow: {allowed})")
    count = section["num_vectors"]
    facts.add_row("source", f"{section['source']} ({count} vector{'s' if count != 1 else ''})")
    for key, value in section["structure_error"].items():
        text = "skipped" if value is None else f"{value:.4f} (relative Frobenius)"
        facts.add_row(f"structure error ({key})", text)
    if section.get("ensemble"):
        e = section["ensemble"]
        facts.add_row("ensemble", f"{e['models']} models ({e['init']}), mean loss {_fmt(e['loss_mean'])}")
    if section.get("symo"):
        s = section["symo"]
        best = s["best"]
        text = (f"g·u {_fmt(s['g_dot_direction'])}, u·Hu {_fmt(s['curvature'])}; " +
                (f"best step {best['step']:.3g}: predicted {best['predicted']:.4g}, realized {best['realized']:.4g}"
                 if best else "no step lowers the loss"))
        facts.add_row("SymO", text)
    for note in section["notes"]:
        facts.add_row("note", escape(note))
    for key, path in section["files"].items():
        facts.add_row(key, escape(path))
    return [table, facts]


# -- the command ---------------------------------------------------------------------------------------------

@app.command("factors")
@handle_errors
def factors(
    checkpoint: CheckpointArg = None,
    data: DataOpt = None,
    model: ModelOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    batch_size: BatchSizeOpt = 128,
    shuffle: ShuffleOpt = False,
    seed: SeedOpt = 0,
    loss: LossOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    symmetry: Annotated[str, typer.Option(
        "--symmetry", help="Weight-space symmetry group of the hidden units: orthogonal and signed-permutation "
        "(same factors: Phi_1, phi_l, Phi_L, bias factors, Psi_1 for two-layer nets), permutation (ReLU-type: "
        "all-ones and complement parts, cross-layer terms) or none (the dense matrix; small chains only).",
        rich_help_panel=FACTORS_HELP)] = "orthogonal",
    source: Annotated[str, typer.Option(
        "--source", help="What is projected: batch (the full-batch gradient g g^T, the paper's estimate), "
        "per-sample (mean of g_n g_n^T: a structured empirical Fisher) or ggn (the GGN V V^T from the spectrum "
        "engine's columns).", rich_help_panel=FACTORS_HELP)] = "batch",
    layers: Annotated[Optional[str], typer.Option(
        "--layers", help="Comma-separated Linear module names forming the chain, in order (e.g. 1,3,5). Default: "
        "the Linear layers of an nn.Sequential MLP.", rich_help_panel=FACTORS_HELP, show_default=False)] = None,
    mc_samples: Annotated[int, typer.Option(
        "--mc-samples", help="--source ggn: 0 for the exact loss-Hessian square root, M > 0 for M Monte-Carlo "
        "columns per sample.", rich_help_panel=FACTORS_HELP)] = 0,
    subsample: Annotated[Optional[int], typer.Option(
        "--subsample", help="--source ggn: build the GGN from the first K samples of the batch only.",
        rich_help_panel=FACTORS_HELP, show_default=False)] = None,
    structure_check: Annotated[bool, typer.Option(
        "--structure-check/--no-structure-check", help="Report the relative Frobenius error between the "
        "per-sample-gradient second moment and its structured projection (skipped for very large N x D).",
        rich_help_panel=FACTORS_HELP)] = True,
    ensemble: Annotated[int, typer.Option(
        "--ensemble", help="Draw M models from the initialization (see --init), compute the ground truth (the "
        "average of their single-gradient factors) and each model's correlation with it. 0: off.",
        rich_help_panel=ENSEMBLE_HELP)] = 0,
    ensemble_checkpoints: Annotated[Optional[str], typer.Option(
        "--ensemble-checkpoints", help="Use the checkpoints matching this glob (quote it, e.g. 'runs/seed*.pt') "
        "as the ensemble instead of drawing models.", rich_help_panel=ENSEMBLE_HELP, show_default=False)] = None,
    init: Annotated[str, typer.Option(
        "--init", help="--ensemble initialization: normal (Linear weights N(0, 1/fan_in), biases zero) or "
        "default (each module's reset_parameters).", rich_help_panel=ENSEMBLE_HELP)] = "normal",
    ensemble_chunk: Annotated[int, typer.Option(
        "--ensemble-chunk", help="Models per vectorized chunk (0: automatic, from a 256 MiB activation budget).",
        rich_help_panel=ENSEMBLE_HELP)] = 0,
    symo_step: Annotated[Optional[Path], typer.Option(
        "--symo-step", help="Write the SymO direction (Sigma + eps I)^(-1/2) g to this safetensors file (one "
        "tensor per parameter, zeros outside the chain; the update is theta - step * direction) and report a "
        "line search: predicted vs realized loss change.", rich_help_panel=FILES_HELP, show_default=False)] = None,
    eps: Annotated[float, typer.Option(
        "--eps", help="Damping of the SymO inverse square root.", rich_help_panel=FILES_HELP)] = 1e-8,
    out_dir: Annotated[Path, typer.Option(
        "--out", "-o", help="Output directory for report.json (section 'factors'), factors.safetensors and "
        "factors.png (a report of the same problem there is merged, not replaced).",
        rich_help_panel=FILES_HELP)] = Path("curvscope-out"),
    plots: Annotated[bool, typer.Option(
        "--plots/--no-plots", help="Write factors.png: heatmaps of the matrix factors (beside the ground truth "
        "with an ensemble) and a bar chart of the correlations.", rich_help_panel=FILES_HELP)] = True,
    debug: DebugOpt = False,
) -> None:
    """Symmetry-structured curvature factors of a Linear chain, their ensemble ground truth, and SymO.

    Averaging the gradient's second moment over a weight-space symmetry group (permuting, sign-flipping or
    rotating hidden units) leaves a few small factors: Phi_1 (input x input), Phi_L (output x output), scalars
    for hidden-to-hidden weights and Psi_1 coupling the two layers of a two-layer net (Bernacchia; conventions
    in CURVATURE.md section 7). From a single gradient they estimate the global curvature; --ensemble measures
    how well, against the average over many models; --symo-step writes the preconditioned direction.

    Example:
    [bold]curvscope factors sample_models/mlp-digits.safetensors --data sample_models/digits.safetensors
    --symo-step symo.safetensors[/bold]

    Ensemble from the initialization (no checkpoint):
    [bold]curvscope factors --model mlp --model-kwargs '{"hidden": [128], "activation": "tanh"}'
    --data sample_models/digits.safetensors --batch-size 1797 --ensemble 200[/bold]
    """
    options = {
        "symmetry": symmetry, "source": source, "layers": layers, "mc_samples": mc_samples,
        "subsample": subsample, "structure_check": structure_check, "ensemble": ensemble,
        "ensemble_checkpoints": ensemble_checkpoints, "init": init, "ensemble_chunk": ensemble_chunk,
        "symo_step": symo_step, "eps": eps, "plots": plots, "seed": seed,
    }
    with as_flags():
        validate_options(_options(options))  # bad options fail before the files load
        problem = build_problem(checkpoint, data, model, model_kwargs, batch_size, shuffle, seed, loss, device,
                                dtype)
        section = run_factors(problem, out_dir, options)
    for table in factors_tables(section):
        out.print(table)


def _one_line_paragraphs(doc: str) -> str:
    """typer's rich help keeps single line breaks: join each paragraph of a docstring into one flowing line (a
    line that ends with ':' keeps its break), so the help text wraps to the terminal."""
    out = []
    for paragraph in inspect.cleandoc(doc).split("\n\n"):
        lines = paragraph.split("\n")
        text = lines[0]
        for line in lines[1:]:
            text += ("\n" if text.endswith(":") else " ") + line.strip()
        out.append(text)
    return "\n\n".join(out)


factors.__doc__ = _one_line_paragraphs(factors.__doc__ or "")
