"""The typed options every command that loads a model and a batch shares (typer ``Annotated`` aliases)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

PROBLEM_HELP = "Model and data"
DEFAULT_OUT = Path("curvscope-out")
"""The output directory of every command that writes a report (``--out``)."""

CheckpointArg = Annotated[Optional[Path], typer.Argument(
    help="Checkpoint: a .safetensors state dict (self-describing ones name their model) or a .pt/.pth "
         "state dict (loaded with weights_only=True). Leave out to use --model's own initialization.",
    show_default=False)]
DataOpt = Annotated[Optional[Path], typer.Option(
    "--data", "-d",
    help="Data: a file with tensors 'x' (inputs) and 'y' (targets), or keyword inputs and 'y'/'labels' "
         "(.safetensors, .npz, .pt); a .parquet or .arrow file or a Hugging Face save_to_disk directory (columns "
         "by name); or a data factory 'path/to/file.py:factory' / 'package.module:factory' returning a Dataset, "
         "DataLoader, iterable of batches or dict of tensors (docs/loading.md).",
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
    help="Loss: ce, mse, bce, nll (on log-probabilities), huber, smooth-l1, or your own 'file.py:fn' (per-sample "
    "losses of (outputs, targets), whose mean is the batch loss). Default: the checkpoint's, else ce for integer "
    "targets, mse for float.",
    rich_help_panel=PROBLEM_HELP, show_default=False)]
DeviceOpt = Annotated[str, typer.Option(
    "--device", help="auto (cuda when available), cpu, cuda or cuda:N.", rich_help_panel=PROBLEM_HELP)]
DtypeOpt = Annotated[str, typer.Option(
    "--dtype", help="Computation dtype: auto (float64 on the CPU for models up to 10M parameters, float32 above "
    "them and on a GPU), float32 (fast) or float64. "
    "The Gram matrix is built in it, so eigenvalues below about lambda_max * columns * eps (eps 1.2e-7 in float32, "
    "2.2e-16 in float64) are rounding noise: rank and SNR shares depend on it (the report's eigenvalue_floor and "
    "precision say where).",
    rich_help_panel=PROBLEM_HELP)]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-model-code", help="Let the checkpoint's metadata (or a config's [problem] model) name a model "
    "factory outside curvscope's built-ins, and a config's [problem] data or loss name code. Importing it runs its "
    "code: only for files you trust. Without it such a checkpoint is refused; --model SPEC is always trusted (you "
    "named it).",
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
LabelSmoothingOpt = Annotated[float, typer.Option(
    "--label-smoothing", help="ce's label smoothing in [0, 1] (PyTorch's label_smoothing): the loss and gradient "
    "change, the GGN's loss Hessian does not.", rich_help_panel=PROBLEM_HELP)]
ClassWeightsOpt = Annotated[Optional[str], typer.Option(
    "--class-weights", help="ce/nll class weights, one per class: '1,2,0.5' or a file of them (PyTorch's weight: "
    "the batch loss is the weighted mean).", rich_help_panel=PROBLEM_HELP, show_default=False)]
HuberDeltaOpt = Annotated[Optional[float], typer.Option(
    "--huber-delta", help="huber's delta (> 0; default 1).", rich_help_panel=PROBLEM_HELP, show_default=False)]
SmoothL1BetaOpt = Annotated[Optional[float], typer.Option(
    "--smooth-l1-beta", help="smooth-l1's beta (>= 0; default 1; 0 is the L1 loss).", rich_help_panel=PROBLEM_HELP,
    show_default=False)]
DataKwargsOpt = Annotated[Optional[str], typer.Option(
    "--data-kwargs", help="JSON object of keyword arguments for a data factory (--data file.py:factory).",
    rich_help_panel=PROBLEM_HELP, show_default=False)]
SplitOpt = Annotated[Optional[str], typer.Option(
    "--split", help="The split of a Hugging Face DatasetDict (save_to_disk directory or a factory's), e.g. "
    "train; needed when it has more than one.", rich_help_panel=PROBLEM_HELP, show_default=False)]
ColumnsOpt = Annotated[Optional[str], typer.Option(
    "--columns", help="Rename data columns before inputs and targets are chosen: NAME=COLUMN,... e.g. "
    "'x=image,y=label' (x: the positional input, y: the targets; other names: keyword inputs).",
    rich_help_panel=PROBLEM_HELP, show_default=False)]
PadTokenOpt = Annotated[Optional[int], typer.Option(
    "--pad-token", help="Pad ragged list columns of Parquet/Arrow/Hugging Face data to the longest row: inputs "
    "with this id, masks with 0, targets with -100 (no loss). Without it ragged lists are an error.",
    rich_help_panel=PROBLEM_HELP, show_default=False)]
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
ReportJsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print the report (report.json as written) on stdout; the summary tables go to stderr.",
    rich_help_panel=OUTPUT_HELP)]
OutDirOpt = Annotated[Path, typer.Option(
    "--out", "-o", help="Output directory when TARGET is a checkpoint: DIR/report.json and what the "
    "computations write beside it (a report of the same problem there is merged, not replaced).",
    rich_help_panel=OUTPUT_HELP)]


# -- the shared problem options, declared once ---------------------------------------------------------------

PROBLEM_PARAMS = (
    ("checkpoint", CheckpointArg),
    ("data", DataOpt),
    ("model", ModelOpt),
    ("model_kwargs", ModelKwargsOpt),
    ("batch_size", BatchSizeOpt),
    ("shuffle", ShuffleOpt),
    ("seed", SeedOpt),
    ("loss", LossOpt),
    ("device", DeviceOpt),
    ("dtype", DtypeOpt),
    ("trust_model_code", TrustOpt),
    ("output", OutputOpt),
    ("shift_labels", ShiftLabelsOpt),
    ("label_smoothing", LabelSmoothingOpt),
    ("class_weights", ClassWeightsOpt),
    ("huber_delta", HuberDeltaOpt),
    ("smooth_l1_beta", SmoothL1BetaOpt),
    ("data_kwargs", DataKwargsOpt),
    ("split", SplitOpt),
    ("columns", ColumnsOpt),
    ("pad_token", PadTokenOpt),
)
"""The options of every command that loads a model and a batch: (name, typer annotation); their defaults are
those of :class:`ProblemArgs`."""


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
    dtype: str = "auto"
    trust_model_code: bool = False
    output: str | None = None
    shift_labels: bool | None = None
    label_smoothing: float = 0.0
    class_weights: str | None = None
    huber_delta: float | None = None
    smooth_l1_beta: float | None = None
    data_kwargs: str | None = None
    split: str | None = None
    columns: str | None = None
    pad_token: int | None = None

    def load(self, **overrides):
        """The Problem these options describe (``overrides`` replace values, e.g. a rank's ``device``)."""
        from curvscope.cli.common import build_problem

        return build_problem(**{**dataclasses.asdict(self), **overrides})


def problem_options(checkpoint: bool = True):
    """Decorator: the command gets every shared problem option (declared once, in :data:`PROBLEM_PARAMS`) and
    receives their values as one ``args: ProblemArgs`` argument. ``checkpoint=False`` leaves out the
    CHECKPOINT argument (``check`` names its own TARGET)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ProblemArgs)}

    def decorate(fn):
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "args"]
        shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults[name],
                                    annotation=annotation)
                  for name, annotation in PROBLEM_PARAMS if checkpoint or name != "checkpoint"]
        arguments = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        first = [p for p in shared if p.name == "checkpoint"]
        params = [*first, *arguments, *[p for p in shared if p.name != "checkpoint"]]
        names = {name for name, _ in PROBLEM_PARAMS}

        @functools.wraps(fn)
        def wrapper(**kwargs):
            values = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            return fn(args=ProblemArgs(**values), **kwargs)

        _set_signature(wrapper, params)
        return wrapper

    return decorate


def _set_signature(wrapper, params: list[inspect.Parameter]) -> None:
    wrapper.__signature__ = inspect.Signature(params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}


# -- the options of a workflow: defaults and help from its options dataclass ---------------------------------

@dataclass(frozen=True)
class Flag:
    """How one field of a workflow's options dataclass appears on the command line. Its default and help text
    are the field's (:func:`curvscope.workflows.options.option`): written there, once."""

    field: str
    """The options field (``top_k``)."""
    decls: tuple[str, ...]
    """typer's parameter declarations (``"--top-k", "-k"``; default: the field's flag)."""
    panel: str
    """The help panel the flag is listed in."""


def flag(field: str, *decls: str, panel: str) -> Flag:
    """A :class:`Flag` for options field ``field`` (declarations default to ``--field-name``)."""
    return Flag(field, decls or ("--" + field.replace("_", "-"),), panel)


RENAMED = {"out_dir": "--out"}
"""Options whose flag is not ``--field-name``."""


def flag_name(field: str, flags: dict[str, str] | None = None) -> str:
    """The flag of an options field in help texts (``top_k`` -> ``--top-k``; ``flags`` and :data:`RENAMED`
    override)."""
    return (flags or {}).get(field) or RENAMED.get(field) or "--" + field.replace("_", "-")


def flag_help(text: str, flags: dict[str, str] | None = None) -> str:
    """An options help text in the CLI's words: ````name```` becomes the flag ``--name`` (``flags`` overrides),
    ````name=value```` ``--name value``, ````name=False```` ``--no-name`` and ````name=True```` ``--name``."""
    def render(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        if value == "False":
            return "--no-" + name.replace("_", "-")
        label = flag_name(name, flags)
        return label if value in (None, "True") else f"{label} {value}"

    return re.sub(r"``([a-z_][a-z0-9_]*)(?:=([^`]+))?``", render, text)


def _cli_type(hint: Any) -> Any:
    """The command-line type of an options field's type: ``str`` for a field that also takes a string (``str |
    float``: parsed by the options), ``Optional[T]`` for an optional one."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    members = [a for a in args if a is not type(None)]
    kind = members[0] if len(members) == 1 else str
    return Optional[kind] if type(None) in args else kind  # noqa: UP045  (typer needs Optional)


def workflow_options(options_type: type, flags: tuple[Flag | str, ...], names: dict[str, str] | None = None):
    """Decorator: the command gets one typer option per :class:`Flag` (type, default and help text from the field
    of ``options_type``) and receives their values as one ``options: options_type`` argument.

    ``flags`` orders the command's options; a plain string in it places the command's own parameter of that name
    (``"out_dir"``), so the help lists the options in the same order as before. ``names``: flag names that differ
    from ``--field-name`` (for the help texts' references to other options)."""
    hints = typing.get_type_hints(options_type)
    fields = {f.name: f for f in dataclasses.fields(options_type)}

    def decorate(fn):
        own = {p.name: p for p in inspect.signature(fn, eval_str=True).parameters.values()}
        generated = {}
        for entry in flags:
            if isinstance(entry, Flag):
                f = fields[entry.field]
                option = typer.Option(*entry.decls, help=flag_help(f.metadata["help"], names),
                                      rich_help_panel=entry.panel, show_default=f.default is not None)
                generated[entry.field] = inspect.Parameter(
                    entry.field, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                    annotation=Annotated[_cli_type(hints[entry.field]), option])
        placed = [p for p in flags if isinstance(p, str)]
        params = [p for name, p in own.items() if name in ("args", "ctx")]
        params += [generated[e.field] if isinstance(e, Flag) else own[e].replace(kind=inspect.Parameter.KEYWORD_ONLY)
                   for e in flags]
        params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for name, p in own.items()
                   if name not in ("args", "ctx", "options", *placed)]

        @functools.wraps(fn)
        def wrapper(**kwargs):
            values = {k: kwargs.pop(k) for k in list(kwargs) if k in generated}
            return fn(options=options_type(**values), **kwargs)

        _set_signature(wrapper, params)
        return wrapper

    return decorate
