"""``curvscope info``: what the loaders see. The first command to run on a new checkpoint."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from curvscope.cli.common import (
    handle_errors,
    out,
)
from curvscope.cli.options import DebugOpt, ProblemArgs, problem_options
from curvscope.cli.root import app


@app.command("info")
@handle_errors
@problem_options()
def info(
    args: ProblemArgs,
    debug: DebugOpt = False,
) -> None:
    """Show the model's layers and parameter counts, the data, the loss, the batch loss and its metric.

    Loads the checkpoint and the batch exactly as every other command does, so it is the quickest way to
    check that curvscope understands your files.

    Example:
    [bold]curvscope info sample_models/mlp-digits.safetensors --data sample_models/digits.safetensors[/bold]
    """
    problem = args.load()
    summary = describe(problem)

    layers = Table(title="Layers with trainable parameters", title_justify="left")
    layers.add_column("module")
    layers.add_column("type")
    layers.add_column("parameters")
    layers.add_column("count", justify="right")
    for row in summary["layers"]:
        shapes = ", ".join(f"{n} {tuple(s)}" for n, s in row["shapes"].items())
        layers.add_row(escape(row["module"]), escape(row["type"]), escape(shapes), f"{row['count']:,}")
    out.print(layers)

    facts = Table(show_header=False, title="Problem", title_justify="left")
    facts.add_column(style="bold", no_wrap=True)
    facts.add_column(overflow="fold")  # paths stay whole (copy-pasteable), folded rather than cut
    for key, value in summary["facts"].items():
        facts.add_row(escape(key), escape(value))
    out.print(facts)


def describe(problem) -> dict:
    """Plain-data description of a Problem (used by ``info`` and by reports)."""
    import torch

    modules = dict(problem.model.named_modules())
    layers = []
    for group in problem.groups("layer"):
        owner = group.name if group.name in modules else ""
        module = modules[owner] if owner else None  # a parameter owned by the root module has no layer
        short = {n[len(owner) + 1:] if owner else n: problem.params[n].shape for n in group.param_names}
        kind = type(module).__name__ if module is not None else "Parameter"
        count = sum(problem.params[n].numel() for n in group.param_names)
        layers.append({"module": group.name, "type": kind, "shapes": short, "count": count})
    with torch.no_grad():
        outputs = problem.forward()
        loss_value = float(problem.loss(outputs, problem.targets))
    from curvscope.io.inputs import describe_inputs

    info = problem.info
    x_desc = describe_inputs(problem.dataset[0] if problem.dataset is not None else problem.inputs)
    y_shape = tuple(problem.dataset[1].shape) if problem.dataset is not None else tuple(problem.targets.shape)
    n = problem.batch_size
    which = ("a random subset (seed {})".format(info.get("seed")) if info.get("shuffle")
             else f"the first {n} in file order")
    facts = {
        "checkpoint": str(info.get("checkpoint") or "none (factory initialization)"),
        "model": str(info.get("model")),
        "parameters (D)": f"{problem.num_params:,}",
        "outputs (C)": (f"{problem.positions} positions x {problem.classes} classes" if problem.is_sequence
                        else str(problem.num_outputs)),
        "model output": str(info.get("output") or "the output tensor"),
        "data": str(info.get("data")),
        "dataset": f"inputs {x_desc}; targets {y_shape}",
        "batch": f"{n} samples: {which}",
        "batch indices": _indices(info.get("batch_indices")),
        **({"data notes": "; ".join(info["data_notes"])} if info.get("data_notes") else {}),
        "loss": problem.loss.name + (f" per token ({int(problem.loss.valid_tokens(problem.targets).sum()):,} "
                                     "valid tokens, -100 ignored)" if problem.is_sequence else "")
        + (", labels shifted (position t scores token t+1)" if getattr(problem, "shift_labels", False) else "")
        + (f" [{info['loss_default']}]" if info.get("loss_default") else ""),
        "batch loss": f"{loss_value:.6g}",
    }
    if info.get("architecture"):
        facts["architecture"] = f"{info['architecture']} (transformers {info.get('transformers', '?')})"
    from curvscope.metrics import batch_metrics

    for metric in batch_metrics(problem.loss, outputs, problem.targets):
        facts[metric.name] = metric.text
    facts["device / dtype"] = f"{problem.device} / {str(problem.dtype).replace('torch.', '')}"
    return {"layers": layers, "facts": facts, "loss_value": loss_value}


def _indices(indices: list[int] | None, shown: int = 8) -> str:
    """The batch's dataset rows, abbreviated (all of them are in every report's ``problem.batch_indices``)."""
    if not indices:
        return "-"
    if indices == list(range(indices[0], indices[0] + len(indices))):
        return f"{indices[0]}..{indices[-1]} (consecutive)"
    head = ", ".join(str(i) for i in indices[:shown])
    return head + (f", ... ({len(indices)} in all)" if len(indices) > shown else "")
