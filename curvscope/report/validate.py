"""The shape of a report, checked before anything prints, draws or gates on it.

A report is plain JSON that anyone can edit, copy from a CI run or forge. :func:`validate_report` checks the
fields that ``curvscope show`` prints and draws and that ``curvscope check`` reads: a string where a number
belongs, a list where an object belongs, a non-finite number, a value nested absurdly deep. It raises one
:class:`MalformedReport` naming the field (``groups[0].eigenvalues[3]: expected a number or null, got a
string``), so a bad report is exit 2 with one line, never a crash while drawing. Fields curvscope does not know
are allowed (any JSON, finite and not nested too deeply).

The spec below is the one description of the report's shape that the readers rely on; ``docs/report.md`` documents
the meaning of each field.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable
from typing import Any

from curvscope.errors import CurvscopeError

MAX_DEPTH = 64
"""The deepest nesting a report may have (curvscope writes at most 6 levels; a model's keyword arguments more)."""


_COMPLETE = contextvars.ContextVar("complete", default=True)
"""Whether the objects' required fields must be present (:func:`validate_report`'s ``complete``)."""


class MalformedReport(CurvscopeError):
    """A report whose field ``field`` does not have the shape curvscope writes."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"field {field or '(top level)'}: {message}")


Check = Callable[[Any, str], None]


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _bad(path: str, expected: str, value: Any) -> MalformedReport:
    return MalformedReport(path, f"expected {expected}, got {_kind(value)}")


def _number(nullable: bool, integer: bool = False) -> Check:
    expected = ("an integer" if integer else "a number") + (" or null" if nullable else "")

    def check(value: Any, path: str) -> None:
        if value is None and nullable:
            return
        if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
            raise _bad(path, expected, value)
        if isinstance(value, float) and not math.isfinite(value):
            raise MalformedReport(path, f"non-finite number {value} (a report writes null for those)")

    return check


def _string(nullable: bool) -> Check:
    def check(value: Any, path: str) -> None:
        if not (isinstance(value, str) or (value is None and nullable)):
            raise _bad(path, "a string" + (" or null" if nullable else ""), value)

    return check


def _boolean(value: Any, path: str) -> None:
    if value is not None and not isinstance(value, bool):
        raise _bad(path, "true, false or null", value)


NUM, INT, INTN, STR, STRN, BOOL = (_number(True), _number(False, True), _number(True, True), _string(False),
                                   _string(True), _boolean)


def ANY(value: Any, path: str) -> None:  # noqa: N802  (a spec, named like the others)
    """Any JSON value (finite, not nested too deeply: :func:`check_json`)."""


def one_of(*checks: Check, expected: str) -> Check:
    """A value that passes one of ``checks``."""
    def check(value: Any, path: str) -> None:
        for c in checks:
            try:
                c(value, path)
                return
            except MalformedReport:
                continue
        raise _bad(path, expected, value)

    return check


def list_of(item: Check, nullable: bool = False) -> Check:
    """A list whose every element passes ``item``."""
    def check(value: Any, path: str) -> None:
        if value is None and nullable:
            return
        if not isinstance(value, list):
            raise _bad(path, "a list" + (" or null" if nullable else ""), value)
        for i, v in enumerate(value):
            item(v, f"{path}[{i}]")

    return check


def map_of(item: Check) -> Check:
    """An object whose every value passes ``item`` (any keys)."""
    def check(value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise _bad(path, "an object", value)
        for k, v in value.items():
            item(v, _join(path, k))

    return check


def obj(fields: dict[str, Check], required: tuple[str, ...] = (), nullable: bool = False) -> Check:
    """An object: each listed field, when present, passes its check; ``required`` ones must be present."""
    def check(value: Any, path: str) -> None:
        if value is None and nullable:
            return
        if not isinstance(value, dict):
            raise _bad(path, "an object" + (" or null" if nullable else ""), value)
        for key in required if _COMPLETE.get() else ():
            if key not in value:
                raise MalformedReport(_join(path, key), "missing")
        for key, spec in fields.items():
            if key in value:
                spec(value[key], _join(path, key))

    return check


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


NUMS = list_of(NUM)
STRS = list_of(STR)

PROBLEM = obj({"checkpoint": STRN, "model": STRN, "data": STRN, "loss": STRN, "batch_size": INTN,
               "batch_indices": list_of(INT, nullable=True), "dtype": STRN, "device": STRN, "num_params": INTN,
               "num_outputs": INTN, "output": STRN, "architecture": STRN, "positions": INTN, "seed": INTN,
               "model_kwargs": ANY}, nullable=True)
DIRECTIONS = obj({"top_k": INTN, **{k: NUMS for k in ("lambda", "gamma_abs", "lambda_snr", "gamma_snr",
                                                      "gradient_overlap")},
                  **{k: NUM for k in ("flat_overlap", "lambda_consistency", "snr_gt1_share",
                                      "lambda_snr_gt1_share")}}, nullable=True)
GROUP = obj({"name": STR, "parameters": STRS, "num_params": INT, "rank": INTN, "matvecs": INTN,
             **{k: list_of(NUM, nullable=True) for k in ("eigenvalues", "eigenvalues_bottom", "residuals",
                                                         "residuals_bottom")},
             **{k: NUM for k in ("trace", "trace_stderr", "lambda_max", "lambda_min", "negative_mass",
                                 "effective_rank", "stability_lr", "gradient_norm", "eigenvalue_floor",
                                 "tolerance")},
             "converged": BOOL, "curvature": STRN, "method": STRN, "trace_method": STRN,
             "density": obj({"grid": NUMS, "values": NUMS, "sigma": NUM}, nullable=True),
             "directions": DIRECTIONS}, required=("name", "num_params"))
APPROXIMATION = obj({"mc_samples": INTN, "subsample": INTN, "curvature_samples": INTN, "num_columns": INTN,
                     "exact": BOOL, "method": STRN, "curvature": STRN, "matvecs": INTN, "seed": INTN},
                    nullable=True)
LANDSCAPE = obj({"directions": STRN, "eigenvalues": NUMS, **{k: NUM for k in ("loss0", "slope", "curvature",
                                                                              "radius", "radius_2d")},
                 **{k: NUMS for k in ("t", "loss_1d", "quadratic_1d")},
                 **{k: list_of(NUM, nullable=True) for k in ("grid_s", "grid_t")},
                 "loss_2d": list_of(NUMS, nullable=True)}, required=("t", "loss_1d", "quadratic_1d"), nullable=True)
NEWTON = obj({"damping": one_of(STR, NUM, expected="a string or a number"),
              **{k: NUM for k in ("predicted_decrease", "predicted_decrease_blocks", "realized_decrease",
                                  "loss_before", "loss_after", "step_norm")},
              "blocks": STRS, "num_directions": INTN, "skipped_directions": INTN, "file": STRN, "warnings": STRS},
             nullable=True)
COMPARISON = obj({**{k: NUM for k in ("hessian_lambda_max", "hessian_lambda_min", "hessian_trace", "ggn_lambda_max",
                                      "ggn_trace", "trace_ratio", "negative_mass")}, "ggn_method": STRN},
                 nullable=True)
RATES = ("lr_newton", "lr_diag", "lr_stability", "lr_cubic", "recommended")
LR_GROUP = obj({"name": STR, "parameters": STRS, "num_params": INT, "diag_note": STR, "rule": STR, "noisy": STRS,
                **{k: NUM for k in ("g_hat", "h_bar_diag", "lambda_max", "d3")},
                **{f"{k}{s}": NUM for k in RATES for s in ("", "_mean", "_std")}},
               required=("name", "num_params", "g_hat", "h_bar_diag", "diag_note", "rule", "recommended"))
LR_STEP = obj({"rates": NUMS, **{k: NUM for k in ("predicted_decrease", "realized_decrease",
                                                  "realized_decrease_holdout", "predicted_decrease_cubic")}},
              required=("predicted_decrease", "realized_decrease"))
LR = obj({"partition": STR, "curvature": STR, "direction": STR, "rule": STRN, "ridge": NUM, "g_hat": NUMS,
          "h_bar": list_of(NUMS), "h_bar_eigenvalues": NUMS, "h_bar_positive_definite": BOOL,
          "h_bar_correlation": list_of(NUMS), "newton_eta": list_of(NUM, nullable=True), "newton_note": STRN,
          **{k: NUM for k in ("lambda_max_global", "lr_stability_global", "loss_before", "predicted_decrease",
                              "realized_decrease", "realized_decrease_holdout")},
          "groups": list_of(LR_GROUP), "halvings": INTN, "steps": map_of(LR_STEP), "batches": INT, "holdout": INT,
          "per_batch": list_of(obj({"batch_indices": list_of(INT), "loss_before": NUM, "recommended": NUMS,
                                    "realized_decrease": NUM, "h_bar_positive_definite": BOOL})),
          "cubic": obj({"weight": NUM, "note": STRN, "eta": list_of(NUM, nullable=True)}),
          "warnings": STRS, "plot": STRN},
         required=("partition", "curvature", "direction", "h_bar_eigenvalues", "h_bar_positive_definite",
                   "h_bar_correlation", "newton_eta", "newton_note", "lr_stability_global", "lambda_max_global",
                   "groups", "loss_before", "steps", "batches", "holdout", "warnings"))
BEST = obj({"step": NUM, "predicted_decrease": NUM, "realized_decrease": NUM},
           required=("step", "predicted_decrease", "realized_decrease"), nullable=True)
FACTORS = obj({"symmetry": STR, "source": STR, "layers": STRS, "widths": list_of(INT), "activations": STRS,
               "activation_symmetry": STRN, "num_vectors": INT, "chain_params": INTN, "symmetry_choice": STRN,
               "components": list_of(obj({"code": STR, "size": INT, "irrep_dim": INT, "params": STRS})),
               "blocks": list_of(obj({"name": STR, "kind": STR, "shape": list_of(INT), "layers": STRS,
                                      "params": STRS, "component": STR, "frobenius": NUM, "value": NUM},
                                     required=("name", "shape", "params", "frobenius"))),
               "structure_error": map_of(NUM), "notes": STRS, "files": map_of(STR),
               "ensemble": obj({"models": INT, "init": STR, "loss_mean": NUM, "checkpoints": list_of(STR, True),
                                "correlation": map_of(obj({"mean": NUM, "std": NUM}))},
                               required=("models", "init", "loss_mean"), nullable=True),
               "symo": obj({"eps": NUM, "g_dot_direction": NUM, "curvature": NUM, "quadratic_step": NUM,
                            "line_search": list_of(obj({k: NUM for k in ("step", "predicted_decrease",
                                                                         "predicted_decrease_linear",
                                                                         "realized_decrease")})),
                            "best": BEST}, required=("g_dot_direction", "curvature", "best"), nullable=True)},
              required=("symmetry", "source", "layers", "widths", "activation_symmetry", "num_vectors", "blocks",
                        "structure_error", "notes"))
REPORT = obj({"schema_version": STR, "command": STRN, "commands": STRS, "curvscope_version": STRN, "created": STRN,
              "problem": PROBLEM, "loss_value": NUM, "gradient_norm": NUM, "approximation": APPROXIMATION,
              "grouping": STRN, "precision": STRN, "method": STRN, "curvature": STRN, "path": STRN,
              "groups": list_of(GROUP), "comparison": COMPARISON, "landscape": LANDSCAPE, "newton": NEWTON,
              "rules": obj({k: STRS for k in ("ghost", "materialize", "generic")}, nullable=True),
              "notes": STRS, "files": map_of(STR), "lr": obj({}, nullable=True), "factors": obj({}, nullable=True)},
             required=("schema_version",))
"""The report's shape (``lr`` and ``factors`` are checked by :data:`LR` and :data:`FACTORS` when non-empty)."""


def check_json(value: Any, path: str = "", depth: int = 0) -> None:
    """Every number finite, every key a string, nothing nested deeper than :data:`MAX_DEPTH`."""
    if depth > MAX_DEPTH:
        raise MalformedReport(path, f"nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, float) and not math.isfinite(value):
        raise MalformedReport(path, f"non-finite number {value} (a report writes null for those)")
    if isinstance(value, dict):
        for k, v in value.items():
            check_json(v, _join(path, k), depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_json(v, f"{path}[{i}]", depth + 1)


def validate_report(report: Any, complete: bool = True) -> dict[str, Any]:
    """``report`` when it has the shape curvscope writes (:data:`REPORT`); else :class:`MalformedReport` naming
    the first bad field. Returns the report.

    ``complete=False`` checks the type of every field present but lets fields be missing: a report gated by
    ``curvscope check`` needs only the fields its rules read (a missing one is the rule's error), while
    ``curvscope show`` prints and draws all of them (``complete=True``).
    """
    token = _COMPLETE.set(complete)
    try:
        check_json(report)
        REPORT(report, "")
        if report.get("lr"):
            LR(report["lr"], "lr")
        if report.get("factors"):
            FACTORS(report["factors"], "factors")
    finally:
        _COMPLETE.reset(token)
    return report
