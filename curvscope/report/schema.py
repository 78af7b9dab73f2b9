"""The versioned JSON report: one file, ``DIR/report.json``, that every command writes into.

Each command contributes its own keys: ``spectrum`` writes the top-level spectrum fields (``loss_value``,
``groups``, ...), ``factors`` the ``factors`` section, ``lr-suggest`` the ``lr`` section. When the output
directory already holds a report for the *same problem* (same checkpoint, model, data, loss, batch), the new
keys are merged into it, so that ``curvscope check`` can gate on all of them at once; otherwise it is replaced.
Field-by-field documentation: ``docs/report.md``.
"""

from __future__ import annotations

import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from curvscope import __version__
from curvscope.errors import CurvscopeError

SCHEMA_VERSION = "1.0"
REPORT_NAME = "report.json"
PROBLEM_IDENTITY = ("checkpoint", "model", "model_kwargs", "data", "loss", "batch_indices", "loss_options")


def problem_section(problem) -> dict[str, Any]:
    """The ``problem`` section: where the numbers come from."""
    info = problem.info
    return {
        "checkpoint": info.get("checkpoint"),
        "model": info.get("model"),
        "model_kwargs": info.get("model_kwargs", {}),
        "data": info.get("data"),
        "loss": problem.loss.name,
        "batch_size": problem.batch_size,
        "batch_indices": info.get("batch_indices"),
        "shuffle": info.get("shuffle", False),
        "num_params": problem.num_params,
        "num_outputs": problem.num_outputs,
        "device": str(problem.device),
        "dtype": str(problem.dtype).replace("torch.", ""),
        "seed": info.get("seed"),
        "output": info.get("output"),
        "positions": getattr(problem, "positions", 1),
        "shift_labels": bool(getattr(problem, "shift_labels", False)),
        "architecture": info.get("architecture"),
        "compute_dtype": str(getattr(problem, "precision", problem.dtype)).replace("torch.", ""),
        **({"loss_options": problem.loss.options()} if getattr(problem.loss, "options", None) and
           problem.loss.options() else {}),
        "precision_note": info.get("precision_note"),
    }


def to_jsonable(value: Any) -> Any:
    """Tensors to lists, non-finite floats to ``None`` (JSON has no NaN/Inf), paths to strings."""
    torch = sys.modules.get("torch")  # a tensor exists only once PyTorch is loaded; reading reports needs no torch
    if torch is not None and isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return to_jsonable(value.item())
    return value


def parse_json(text: str) -> Any:
    """JSON text as Python values; absurd input (nested thousands deep, a 5000-digit integer) is a one-line
    :class:`ValueError`, like any other invalid JSON (:func:`curvscope.jsontext.loads`)."""
    from curvscope.jsontext import loads

    return loads(text)


def read_report(path: str | os.PathLike, complete: bool = False) -> dict[str, Any]:
    """Load a report, with a one-line error when it is missing, not a curvscope report, or malformed (a field
    of the wrong type, a non-finite number: :func:`curvscope.report.validate.validate_report`; ``complete``:
    also every field that ``show`` prints present)."""
    from curvscope.report.validate import MalformedReport, validate_report

    path = Path(path)
    if path.is_dir():
        raise CurvscopeError(f"{path}: no {REPORT_NAME} in this directory")
    if not path.is_file():
        raise CurvscopeError(f"{path}: report file not found")
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CurvscopeError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise CurvscopeError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise CurvscopeError(f"{path}: not a curvscope report (no 'schema_version')")
    major = str(data["schema_version"]).split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise CurvscopeError(f"{path}: report schema {str(data['schema_version'])[:40]} is not supported by "
                             f"curvscope {__version__} (schema {SCHEMA_VERSION})")
    try:
        return validate_report(data, complete)
    except MalformedReport as exc:
        raise CurvscopeError(f"{path}: malformed report, {exc}") from None


def build_report(command: str, problem, fields: dict[str, Any]) -> dict[str, Any]:
    """A fresh report dict for ``command`` with the given top-level ``fields``."""
    report = {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "commands": [command],
        "curvscope_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "problem": problem_section(problem),
    }
    report.update(fields)
    return to_jsonable(report)


def existing_report(path: str | os.PathLike) -> dict[str, Any] | None:
    """The report at ``path`` when it is a curvscope report, ``None`` when there is no file.

    Raises:
        CurvscopeError: the file exists but is not a readable curvscope report (it is never overwritten).
    """
    from curvscope.report.validate import MalformedReport, validate_report

    path = Path(path)
    if not path.exists():
        return None
    try:
        old = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CurvscopeError(f"{path}: exists and is not a curvscope report ({type(exc).__name__}); move it away "
                             "or choose another output directory") from None
    if not isinstance(old, dict) or "schema_version" not in old:
        raise CurvscopeError(f"{path}: exists and is not a curvscope report; move it away or choose another "
                             "output directory")
    try:
        validate_report(old, complete=False)
    except MalformedReport as exc:
        raise CurvscopeError(f"{path}: exists and is a malformed curvscope report ({exc}); move it away or "
                             "choose another output directory") from None
    return old


def merge_reports(old: dict[str, Any] | None, report: dict[str, Any]) -> dict[str, Any]:
    """``report`` merged into ``old`` (an existing report) when that one is of the same problem and schema (the
    new keys win, ``commands`` lists both); else ``report`` itself."""
    if old is None or not _same_problem(old.get("problem"), report.get("problem")) or \
            old.get("schema_version") != report.get("schema_version"):
        return report
    merged = {**old, **report}
    new_commands = report.get("commands", [report["command"]])
    commands = [c for c in old.get("commands", [old.get("command")]) if c and c not in new_commands]
    merged["commands"] = [*commands, *new_commands]
    return merged


def same_problem(a: Any, b: Any) -> bool:
    """Whether two ``problem`` sections describe the same problem (:data:`PROBLEM_IDENTITY`)."""
    return _same_problem(to_jsonable(a), to_jsonable(b))


def _same_problem(a: Any, b: Any) -> bool:
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    return all(a.get(k) == b.get(k) for k in PROBLEM_IDENTITY)
