"""``factors``: symmetry-structured curvature factors, their ensemble ground truth and the SymO step.

:class:`FactorsOptions` are the knobs, :func:`run_factors` computes (no files) and :func:`write_factors` adds the
``factors`` section, ``factors.safetensors``, the SymO direction file and ``factors.png`` to a
:class:`~curvscope.report.writer.ReportWriter`. Conventions: ``docs/conventions.md §7``.
"""

from __future__ import annotations

import copy
import glob
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from curvscope import commands
from curvscope.progress import counter
from curvscope.workflows.base import Workflow
from curvscope.workflows.options import OptionError, Options, at_least, at_most, one_of, option

if TYPE_CHECKING:
    from torch import Tensor

    from curvscope.curvature.symmetry.ensemble import EnsembleResult
    from curvscope.curvature.symmetry.estimate import FactorsResult
    from curvscope.curvature.symmetry.symo import SymoResult
    from curvscope.problem import Problem
    from curvscope.progress import Progress
    from curvscope.report.writer import ReportWriter

COMMAND = commands.get("factors")
FACTORS_FILE = "factors.safetensors"
MAXIMA = {"mc_samples": 1_000, "ensemble": 10_000, "ensemble_chunk": 10_000}
"""The largest value of each count (refused up front; docs/factors.md)."""
PLOT_FILE = "factors.png"


@dataclass
class FactorsOptions(Options):
    """Options of the factors computation (the ``curvscope factors`` flags, in snake_case)."""

    command: ClassVar[str] = COMMAND.command

    symmetry: str = option("auto", "Weight-space symmetry group of the hidden units: auto (the largest group the "
                           "chain's activations allow, said in the summary: orthogonal for linear chains, "
                           "signed-permutation for odd activations such as tanh, permutation for the rest, e.g. "
                           "ReLU), orthogonal, signed-permutation (the same factors as orthogonal), permutation, or "
                           "none (the dense second moment; small chains only). A gated MLP (Llama) has no orthogonal "
                           "symmetry: auto gives signed-permutation (sign flips of up and down).")
    source: str = option("batch", "What is projected: batch (the full-batch gradient g g^T, the paper's estimate), "
                         "per-sample (mean of g_n g_n^T: a structured empirical Fisher) or ggn (the GGN V V^T from "
                         "the spectrum engine's columns).")
    layers: str | None = option(None, "Comma-separated Linear module names forming the chain, in order (e.g. "
                                "1,3,5), two Conv/Conv1D layers a,b, or a gated MLP as gate*up,down. Default: the "
                                "Linear layers of an nn.Sequential MLP, else the first chain found in the model.")
    mc_samples: int = option(0, "``source=ggn``: 0 for the exact loss-Hessian square root, M > 0 for M "
                             "Monte-Carlo columns per sample (at most 1000).")
    subsample: int | None = option(None, "``source=ggn``: build the GGN from the first K samples of the batch "
                                   "only.")
    structure_check: bool = option(True, "Report the relative Frobenius error between the per-sample-gradient "
                                   "second moment and its structured projection (skipped for very large N x D).")
    ensemble: int = option(0, "Draw M models from the initialization (see ``init``), compute the ground truth (the "
                           "average of their single-gradient factors) and each model's correlation with it. 0: "
                           "off. At most 10000.")
    ensemble_checkpoints: str | None = option(None, "Use the checkpoints matching this glob (quote it, e.g. "
                                              "'runs/seed*.pt') as the ensemble instead of drawing models.")
    init: str = option("normal", "``ensemble`` initialization: normal (Linear weights N(0, 1/fan_in), biases "
                       "zero) or default (each module's reset_parameters).")
    ensemble_chunk: int = option(0, "Models per vectorized chunk (0: automatic, from a 256 MiB activation "
                                 "budget; at most 10000).")
    symo_step: Path | None = option(None, "Write the SymO direction (Sigma + eps I)^(-1/2) g to this safetensors "
                                    "file (one tensor per parameter, zeros outside the chain; the update is theta - "
                                    "step * direction) and report a line search: predicted vs realized loss "
                                    "change.")
    eps: float = option(1e-8, "Damping of the SymO inverse square root.")
    plots: bool = option(True, "Write factors.png: heatmaps of the matrix factors (beside the ground truth with an "
                         "ensemble) and a bar chart of the correlations.")
    seed: int | None = option(None, "Seed of drawn models and Monte-Carlo columns (None: the problem's seed, else "
                              "0).")

    def validate(self) -> None:
        """Check every value that needs no Problem (the ensemble glob is matched here)."""
        from curvscope.curvature.symmetry.chain import parse_layers
        from curvscope.curvature.symmetry.ensemble import INITS
        from curvscope.curvature.symmetry.estimate import SOURCES
        from curvscope.curvature.symmetry.groups import SYMMETRIES

        super().validate()
        one_of("symmetry", self.symmetry, ("auto", *SYMMETRIES))
        one_of("source", self.source, SOURCES)
        parse_layers(self.layers)
        if self.mc_samples < 0:
            raise OptionError("mc_samples", f"must be 0 (exact) or positive, got {self.mc_samples}")
        at_least("subsample", self.subsample, 1, optional=True)
        for name in ("mc_samples", "subsample"):
            if getattr(self, name) not in (0, None) and self.source != "ggn":
                raise OptionError(name, lambda label, name=name: f"{label(name)} applies to {label('source')} ggn "
                                  "only")
        one_of("init", self.init, INITS)
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise OptionError("eps", f"must be a positive number, got {self.eps}")
        if self.ensemble < 0 or self.ensemble == 1:
            raise OptionError("ensemble", f"must be 0 (off) or at least 2 models, got {self.ensemble}")
        if self.ensemble_chunk < 0:
            raise OptionError("ensemble_chunk", f"must be 0 (automatic) or positive, got {self.ensemble_chunk}")
        for name, high in MAXIMA.items():
            at_most(name, getattr(self, name), high)
        if (self.checkpoints() or self.ensemble) and self.source != "batch":
            raise OptionError("source", lambda name: f"{name('source')} '{self.source}': the ensemble ground truth "
                              f"averages single-gradient factors; use {name('source')} batch with "
                              f"{name('ensemble')} / {name('ensemble_checkpoints')}")

    def checkpoints(self) -> list[Path]:
        """The files matching ``ensemble_checkpoints`` (sorted; empty when it is not set)."""
        if not self.ensemble_checkpoints:
            return []
        if self.ensemble:
            raise OptionError("ensemble", lambda name: f"{name('ensemble')} and {name('ensemble_checkpoints')}: use "
                              "one of them, not both")
        pattern = str(self.ensemble_checkpoints)
        paths = [Path(p) for p in sorted(glob.glob(pattern)) if Path(p).is_file()]
        if not paths:
            raise OptionError("ensemble_checkpoints", f"'{pattern}': no file matches")
        if len(paths) < 2:
            raise OptionError("ensemble_checkpoints", f"'{pattern}': an ensemble needs at least 2 checkpoints, "
                              f"found 1 ({paths[0]})")
        return paths

    def check_problem(self, problem: Problem) -> None:
        """Checks that need the Problem (before the long computation)."""
        if self.subsample is not None and self.subsample > problem.batch_size:
            raise OptionError("subsample", f"{self.subsample} is larger than the batch ({problem.batch_size} "
                              "samples)")


@dataclass
class FactorsRun:
    """What :func:`run_factors` computed: the engine's results and the choices made (no report fields;
    :func:`write_factors` makes those)."""

    result: FactorsResult
    ensemble: EnsembleResult | None = None
    symo: SymoResult | None = None
    checkpoints: list[Path] = field(default_factory=list)
    """The ensemble's checkpoint files (empty when the models were drawn)."""
    symmetry_choice: str | None = None
    """What symmetry ``auto`` chose and why (``None`` when the symmetry was given)."""

    def __repr__(self) -> str:
        return (f"FactorsRun(symmetry={self.result.structure.symmetry!r}, source={self.result.source!r}, "
                f"blocks={len(self.result.structure.blocks())}, ensemble={'yes' if self.ensemble else 'no'}, "
                f"symo={'yes' if self.symo else 'no'})")


def resolve_symmetry(problem: Problem, options: FactorsOptions) -> tuple[str, str | None]:
    """``(symmetry, note)``: ``auto`` becomes the largest group the chain's activations allow (permutation
    when the chain is named by ``layers`` and its activations are unknown); the note says what was chosen."""
    if options.symmetry != "auto":
        return options.symmetry, None
    from curvscope.curvature.symmetry.discover import problem_chain

    chain = problem_chain(problem, options.layers)
    chosen = chain.activation_symmetry or "permutation"
    why = (f"the activations ({', '.join(chain.activations)}) allow it" if chain.activation_symmetry
           else "named layers: their activations are unknown, permutation holds for any elementwise one")
    return chosen, f"symmetry auto: {chosen} ({why})"


def run_factors(problem: Problem, options: FactorsOptions | None = None, progress: Progress | None = None
                ) -> FactorsRun:
    """Compute the factors of ``problem``, the ensemble ground truth and the SymO step as ``options`` ask (no
    files, no report fields). ``progress(stage, done, total)`` gets stages ``per-sample``, ``ensemble`` and
    ``symo`` (:mod:`curvscope.progress`)."""
    from curvscope.curvature.finite import check_finite, check_outputs
    from curvscope.curvature.symmetry.ensemble import ensemble_factors
    from curvscope.curvature.symmetry.estimate import compute_factors
    from curvscope.curvature.symmetry.symo import symo_step

    options = options or FactorsOptions()
    options.validate()
    options.check_problem(problem)
    check_outputs(problem)
    paths = options.checkpoints()
    seed = options.seed if options.seed is not None else int(problem.info.get("seed") or 0)
    symmetry, choice = resolve_symmetry(problem, options)
    result = compute_factors(problem, symmetry=symmetry, source=options.source, layers=options.layers,
                             mc_samples=options.mc_samples, subsample=options.subsample, seed=seed,
                             structure_check=options.structure_check, progress=progress)
    check_finite("the symmetry factors", **{n.replace(".", "_"): t for n, t in result.factors.blocks().items()})
    ensemble = None
    if options.ensemble or paths:
        ensemble = ensemble_factors(problem, result.structure, models=options.ensemble, init=options.init,
                                    members=_load_members(problem, paths) if paths else None, seed=seed,
                                    chunk=options.ensemble_chunk, progress=progress)
    symo = None
    if options.symo_step is not None:
        advance = counter(progress, "symo", 1)
        symo = symo_step(problem, result, eps=float(options.eps))
        advance()
    return FactorsRun(result, ensemble, symo, paths, choice)


def _load_members(problem: Problem, paths: list[Path]) -> list[dict[str, Tensor]]:
    """Parameters of each checkpoint (the problem's architecture), keyed like ``problem.params``."""
    from curvscope.io.checkpoints import apply_state_dict, load_checkpoint

    members = []
    for path in paths:
        net = copy.deepcopy(problem.model)
        apply_state_dict(net, load_checkpoint(path).state_dict, str(path))
        values = dict(net.named_parameters())
        members.append({n: values[n].detach().to(device=problem.device, dtype=problem.dtype)
                        for n in problem.params})
    return members


def claim_factors(writer: ReportWriter, options: FactorsOptions) -> None:
    """Claim the user-given output file (the SymO direction) before computing."""
    if options.symo_step is not None:
        writer.claim_option(options.symo_step, "symo_step")


def write_factors(writer: ReportWriter, problem: Problem, run: FactorsRun, options: FactorsOptions) -> None:
    """Add the ``factors`` section, ``factors.safetensors``, the SymO file and ``factors.png`` to ``writer``."""
    from curvscope.report import factors_report as fr
    from curvscope.report.factors_plots import factors_file_plot

    ggn = {"mc_samples": options.mc_samples, "subsample": options.subsample} if run.result.source == "ggn" else None
    section = fr.factors_section(run.result, run.ensemble, run.symo, ggn, run.checkpoints, run.symmetry_choice)
    files = {"factors": str(writer.out_dir / FACTORS_FILE)}
    if options.plots:
        files["plot"] = str(writer.out_dir / PLOT_FILE)
    if run.symo is not None:
        files["symo_step"] = str(options.symo_step)
    section["files"] = files
    writer.section(COMMAND.command, {COMMAND.key: section})
    tensors = fr.factors_tensors(run.result, run.ensemble)
    writer.tensors("factors", files["factors"], tensors, fr.factors_metadata(section))
    if run.symo is not None:
        writer.tensors("symo_step", options.symo_step, fr.symo_tensors(run.symo), fr.symo_metadata(section),
                       "symo_step")
    if options.plots:  # drawn from what is written: the report section and factors.safetensors
        writer.plot("factors_plot", PLOT_FILE, lambda report: factors_file_plot(report["factors"], tensors))


WORKFLOW = Workflow(COMMAND.name, options=FactorsOptions, run=run_factors, write=write_factors, claim=claim_factors)
