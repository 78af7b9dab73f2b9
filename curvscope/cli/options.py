"""The typed options every command that loads a model and a batch shares (typer ``Annotated`` aliases)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

PROBLEM_HELP = "Model and data"

CheckpointArg = Annotated[Optional[Path], typer.Argument(
    help="Checkpoint: a .safetensors state dict (self-describing ones name their model) or a .pt/.pth "
         "state dict (loaded with weights_only=True). Leave out to use --model's own initialization.",
    show_default=False)]
DataOpt = Annotated[Optional[Path], typer.Option(
    "--data", "-d",
    help="Dataset file with tensors 'x' (inputs) and 'y' (targets): .safetensors, .npz or .pt.",
    rich_help_panel=PROBLEM_HELP, show_default=False)]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m",
    help="Model factory: 'path/to/file.py:factory', 'package.module:factory' or a built-in (mlp, cnn, "
         "transformer). Overrides the checkpoint's metadata.",
    rich_help_panel=PROBLEM_HELP, show_default=False)]
ModelKwargsOpt = Annotated[Optional[str], typer.Option(
    "--model-kwargs", help="JSON object of keyword arguments for the factory, e.g. '{\"hidden\": [32, 32]}'.",
    rich_help_panel=PROBLEM_HELP, show_default=False)]
BatchSizeOpt = Annotated[int, typer.Option(
    "--batch-size", "-n", min=1,
    help="Number of samples in the batch: the first N in file order (capped at the dataset size).",
    rich_help_panel=PROBLEM_HELP)]
ShuffleOpt = Annotated[bool, typer.Option(
    "--shuffle/--no-shuffle", help="Take a random batch (seeded by --seed) instead of the first N samples.",
    rich_help_panel=PROBLEM_HELP)]
SeedOpt = Annotated[int, typer.Option(
    "--seed", help="Seed for --shuffle, Monte-Carlo sampling and --model initialization.",
    rich_help_panel=PROBLEM_HELP)]
LossOpt = Annotated[Optional[str], typer.Option(
    "--loss",
    help="Loss: ce, mse or bce. Default: the checkpoint's, else ce for integer targets, mse for float.",
    rich_help_panel=PROBLEM_HELP, show_default=False)]
DeviceOpt = Annotated[str, typer.Option(
    "--device", help="auto (cuda when available), cpu, cuda or cuda:N.", rich_help_panel=PROBLEM_HELP)]
DtypeOpt = Annotated[str, typer.Option(
    "--dtype", help="Computation dtype: float32 (fast) or float64. The Gram matrix is built in it, so "
    "eigenvalues below about lambda_max * columns * eps (eps 1.2e-7 in float32, 2.2e-16 in float64) are rounding "
    "noise: rank and SNR shares depend on it (the report's eigenvalue_floor says where). float64 for "
    "reference-quality numbers.",
    rich_help_panel=PROBLEM_HELP)]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-model-code", help="Let the checkpoint's metadata (or a config's [problem] model) name a model "
    "factory outside curvscope's built-ins. Importing it runs its code: only for files you trust. Without "
    "it such a checkpoint is refused; --model SPEC is always trusted (you named it).",
    rich_help_panel=PROBLEM_HELP)]
OutputOpt = Annotated[Optional[str], typer.Option(
    "--output", help="Which output of a structured model output (a Hugging Face ModelOutput, a dict or a tuple) "
    "is scored: an attribute or key name, or an index. Default: the output itself when it is a tensor, else "
    "its 'logits', else its first element. `curvscope info` says what was chosen.",
    rich_help_panel=PROBLEM_HELP, show_default=False)]
ShiftLabelsOpt = Annotated[Optional[bool], typer.Option(
    "--shift-labels/--no-shift-labels", help="Causal language models: score position t against token t+1 "
    "(logits[:, :-1] against labels[:, 1:], as Hugging Face does). Default: the checkpoint's metadata or the "
    "architecture (on for ...ForCausalLM), else off.", rich_help_panel=PROBLEM_HELP, show_default=False)]
DebugOpt = Annotated[bool, typer.Option(
    "--debug", help="Show the full traceback on errors.", rich_help_panel="Output")]

# -- curvscope check ---------------------------------------------------------------------------------------

CHECK_HELP = "Rules and baselines"
OUTPUT_HELP = "Output"

TargetArg = Annotated[Path, typer.Argument(
    help="A report to check (a .json file written by spectrum / lr-suggest / factors, or their output "
         "directory), or a checkpoint: then check computes the report first (needs --data; options from "
         "--config).", show_default=False)]
RuleOpt = Annotated[Optional[list[str]], typer.Option(
    "--rule", "-r", help="A rule 'PATH OP NUMBER' (OP: < <= > >= == !=), e.g. 'groups[0].lambda_max <= 50' "
    "or 'groups[*].rank >= 10' ([*]: every element must pass). Repeatable; quote it in the shell.",
    rich_help_panel=CHECK_HELP, show_default=False)]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="TOML file with rules = [...], a \\[baseline] table and the options of the "
    "computations (\\[problem], \\[spectrum], \\[lr], \\[factors]). See docs/ci.md.",
    rich_help_panel=CHECK_HELP, show_default=False)]
BaselineOpt = Annotated[Optional[Path], typer.Option(
    "--baseline", help="An older report to compare with (--max-increase / --max-decrease). Overrides the "
    "config's \\[baseline] report.", rich_help_panel=CHECK_HELP, show_default=False)]
MaxIncreaseOpt = Annotated[Optional[list[str]], typer.Option(
    "--max-increase", help="PATH=AMOUNT: fail when the value rose by more than AMOUNT over the baseline: a "
    "percentage of the baseline value ('groups[0].lambda_max=20%') or an absolute amount "
    "('loss_value=0.05'). Repeatable.", rich_help_panel=CHECK_HELP, show_default=False)]
MaxDecreaseOpt = Annotated[Optional[list[str]], typer.Option(
    "--max-decrease", help="PATH=AMOUNT: fail when the value fell by more than AMOUNT below the baseline "
    "(percentage or absolute, as --max-increase). Repeatable.",
    rich_help_panel=CHECK_HELP, show_default=False)]
JunitOpt = Annotated[Optional[Path], typer.Option(
    "--junit", help="Also write JUnit XML to this file: one testcase per rule, failures with value and "
    "threshold (written atomically; not written on bad input).",
    rich_help_panel=OUTPUT_HELP, show_default=False)]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print a JSON summary on stdout instead of the table (the table goes to stderr).",
    rich_help_panel=OUTPUT_HELP)]
OutDirOpt = Annotated[Path, typer.Option(
    "--out", "-o", help="Output directory when TARGET is a checkpoint: DIR/report.json and what the "
    "computations write beside it (a report of the same problem there is merged, not replaced).",
    rich_help_panel=OUTPUT_HELP)]


# -- the shared problem options, declared once ---------------------------------------------------------------

PROBLEM_PARAMS = (
    ("checkpoint", CheckpointArg, None),
    ("data", DataOpt, None),
    ("model", ModelOpt, None),
    ("model_kwargs", ModelKwargsOpt, None),
    ("batch_size", BatchSizeOpt, 128),
    ("shuffle", ShuffleOpt, False),
    ("seed", SeedOpt, 0),
    ("loss", LossOpt, None),
    ("device", DeviceOpt, "auto"),
    ("dtype", DtypeOpt, "float32"),
    ("trust_model_code", TrustOpt, False),
    ("output", OutputOpt, None),
    ("shift_labels", ShiftLabelsOpt, None),
)
"""The options of every command that loads a model and a batch: (name, typer annotation, default)."""


@dataclass
class ProblemArgs:
    """The values of the shared problem options, as one object (see :func:`problem_options`)."""

    checkpoint: Path | None = None
    data: Path | None = None
    model: str | None = None
    model_kwargs: str | None = None
    batch_size: int = 128
    shuffle: bool = False
    seed: int = 0
    loss: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    trust_model_code: bool = False
    output: str | None = None
    shift_labels: bool | None = None

    def load(self, **overrides):
        """The Problem these options describe (``overrides`` replace values, e.g. a rank's ``device``)."""
        from curvscope.cli.common import build_problem

        return build_problem(**{**dataclasses.asdict(self), **overrides})


def problem_options(checkpoint: bool = True):
    """Decorator: the command gets every shared problem option (declared once, in :data:`PROBLEM_PARAMS`) and
    receives their values as one ``args: ProblemArgs`` argument. ``checkpoint=False`` leaves out the
    CHECKPOINT argument (``check`` names its own TARGET)."""

    def decorate(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "args"]
        shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
                  for name, annotation, default in PROBLEM_PARAMS if checkpoint or name != "checkpoint"]
        arguments = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        first = [p for p in shared if p.name == "checkpoint"]
        params = [*first, *arguments, *[p for p in shared if p.name != "checkpoint"]]
        names = {name for name, _, _ in PROBLEM_PARAMS}

        @functools.wraps(fn)
        def wrapper(**kwargs):
            values = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            return fn(args=ProblemArgs(**values), **kwargs)

        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate
