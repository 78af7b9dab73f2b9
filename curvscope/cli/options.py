"""The typed options every command that loads a model and a batch shares (typer ``Annotated`` aliases)."""

from __future__ import annotations

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
DebugOpt = Annotated[bool, typer.Option(
    "--debug", help="Show the full traceback on errors.", rich_help_panel="Output")]
