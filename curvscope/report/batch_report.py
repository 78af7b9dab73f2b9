"""Report fields of a spectrum over several batches (``batches``): each batch's numbers (``per_batch``) and their
spread (``batch_stats``). Writers only: every number was computed by the engine, batch by batch.

- ``per_batch[i]``: ``batch_indices``, ``loss_value``, ``gradient_norm`` and ``groups``, with the fields of the
  report's own ``groups`` (``per_batch[0]`` is the report's own batch);
- ``batch_stats``: ``batches`` (their number) and the same fields with ``{mean, std, min, max}`` in place of each
  number (``batch_stats.groups[0].lambda_max.mean``); ``std`` is the sample standard deviation (``n - 1``), ``null``
  for one value. Lists (eigenvalues, per-direction arrays) are per batch only; strings (group names) are kept
  when every batch has the same.
"""

from __future__ import annotations

import math
from typing import Any

from curvscope.report.format import num

BATCH_FIELDS = ("loss_value", "gradient_norm")
"""Top-level fields each batch keeps besides its ``groups``."""


def batch_entry(fields: dict[str, Any], batch_indices: list[int]) -> dict[str, Any]:
    """One ``per_batch`` entry from a batch's report fields (as :func:`~curvscope.workflows.spectrum.report_fields`
    makes them for the report's top level)."""
    return {"batch_indices": [int(i) for i in batch_indices], **{k: fields.get(k) for k in BATCH_FIELDS},
            "groups": fields["groups"]}


def stats(values: list[float]) -> dict[str, float | None]:
    """``{mean, std, min, max}`` of numbers (``std`` with ``n - 1``; ``None`` for a single value)."""
    n = len(values)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _mirror(values: list[Any]) -> Any:
    """The statistics of one field over the batches, mirroring its structure (see the module docstring);
    ``_SKIP`` for a field that has none (lists, booleans, strings that differ)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(_number(v) for v in present):
        return stats([float(v) for v in present])
    if all(isinstance(v, dict) for v in present):
        out = {}
        for key in present[0]:
            value = _mirror([v.get(key) for v in present])
            if value is not _SKIP:
                out[key] = value
        return out
    if all(isinstance(v, str) for v in present) and len(set(present)) == 1:
        return present[0]
    return _SKIP


_SKIP = object()


def batch_stats(per_batch: list[dict[str, Any]]) -> dict[str, Any]:
    """``batch_stats`` from the ``per_batch`` entries (every batch has the same groups)."""
    out: dict[str, Any] = {"batches": len(per_batch)}
    for key in BATCH_FIELDS:
        value = _mirror([b.get(key) for b in per_batch])
        out[key] = None if value is _SKIP else value
    groups = []
    for i in range(len(per_batch[0]["groups"])):
        value = _mirror([b["groups"][i] for b in per_batch])
        groups.append({} if value is _SKIP or value is None else value)
    out["groups"] = groups
    return out


def batch_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary rows of a report over several batches: ``λ_max 25.1 ± 0.8 (8 batches)`` for the first group
    (the whole model), with its trace and the loss."""
    spread = report.get("batch_stats")
    if not spread or not spread.get("groups"):
        return []
    k = spread.get("batches")

    def pm(s: dict[str, Any] | None) -> str:
        if not s:
            return "-"
        return num(s.get("mean")) + (f" ± {num(s['std'], 2)}" if s.get("std") is not None else "")

    first = spread["groups"][0]
    parts = [f"λ_max {pm(first.get('lambda_max'))}"]
    if isinstance(first.get("trace"), dict):
        parts.append(f"trace {pm(first.get('trace'))}")
    parts.append(f"loss {pm(spread.get('loss_value'))}")
    return [("over batches", f"{', '.join(parts)} ({k} batches)")]
