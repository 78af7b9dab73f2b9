"""Turn a :class:`~curvscope.curvature.gram.spectrum.SpectrumResult` into report fields and tensor files.

Writers only: every number here was computed by the engine. Field-by-field documentation: ``docs/report.md``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

DIRECTIONS_FILE = "directions.safetensors"


def _share_above_one(snr: Tensor) -> float | None:
    """Share of the entries with SNR > 1 (``None`` when no SNR is defined, e.g. a single sample)."""
    defined = ~torch.isnan(snr)
    if not bool(defined.any()):
        return None
    return float((snr[defined] > 1).sum()) / float(snr.numel())


def directions_fields(group) -> dict[str, Any] | None:
    """The ``directions`` object of one group (``None`` when directional quantities were not computed)."""
    d = group.directions
    if d is None:
        if group.top_k == 0 and group.rank == 0:  # no nonzero direction at all: the gradient is all flat
            return {"top_k": 0, "lambda": [], "gamma_abs": [], "lambda_snr": [], "gamma_snr": [],
                    "gradient_overlap": [], "flat_overlap": 1.0 if group.gradient_norm > 0 else 0.0,
                    "lambda_consistency": 0.0, "snr_gt1_share": None, "lambda_snr_gt1_share": None}
        return None
    return {
        "top_k": int(d.gamma_mean.numel()),
        "lambda": group.eigenvalues[:d.gamma_mean.numel()],
        "gamma_abs": d.gamma_mean.abs(),
        "lambda_snr": d.lambda_snr,
        "gamma_snr": d.gamma_snr,
        "gradient_overlap": d.gradient_overlap,
        "flat_overlap": float(d.flat_overlap),
        "lambda_consistency": float(d.lambda_consistency),
        "snr_gt1_share": _share_above_one(d.gamma_snr),
        "lambda_snr_gt1_share": _share_above_one(d.lambda_snr),
    }


def group_fields(group, directional: bool = True, floor: float | None = None) -> dict[str, Any]:
    """One entry of ``groups``; ``floor``: the eigenvalue below which the Gram's rounding dominates."""
    return {
        "name": group.name,
        "parameters": list(group.param_names),
        "num_params": int(group.num_params),
        "eigenvalues": group.eigenvalues,
        "rank": int(group.rank),
        "trace": float(group.trace),
        "lambda_max": float(group.lambda_max),
        "effective_rank": float(group.effective_rank),
        "stability_lr": float(group.stability_lr),
        "gradient_norm": float(group.gradient_norm),
        "eigenvalue_floor": floor,
        "directions": directions_fields(group) if directional else None,
    }


def eigenvalue_floors(result, dtype: torch.dtype | None) -> list[float | None]:
    """Per group, the precision floor ``lambda_max * N_cols * eps(dtype)`` of the rank threshold
    (``docs/conventions.md`` §2): eigenvalues below it are rounding noise of a Gram built in ``dtype``. A block
    uses the larger of its own and the whole model's lambda_max, as the rank does."""
    if dtype is None:
        return [None] * len(result.groups)
    eps = torch.finfo(dtype).eps
    total = float(result.groups[0].lambda_max) if result.grouping != "all" else 0.0
    return [max(float(g.lambda_max), total) * int(result.num_columns) * eps for g in result.groups]


def spectrum_fields(result, batch_size: int, directional: bool = True, dtype: torch.dtype | None = None
                    ) -> dict[str, Any]:
    """The top-level report fields of ``curvscope spectrum`` (before ``newton`` and ``files``).

    ``dtype``: the dtype the Gram was built in (the problem's), for the precision floor of each group.
    """
    subsample = result.subsample
    exact = result.mc_samples == 0 and (subsample is None or subsample >= batch_size)
    return {
        "loss_value": float(result.loss_value),
        "gradient_norm": float(result.gradient_norm),
        "approximation": {
            "mc_samples": int(result.mc_samples),
            "subsample": subsample,
            "curvature_samples": int(result.columns.num_samples),
            "num_columns": int(result.num_columns),
            "exact": bool(exact),
        },
        "grouping": result.grouping,
        "precision": None if dtype is None else str(dtype).replace("torch.", ""),
        "rules": {kind: [name for name, how in result.rules.items() if how == kind]
                  for kind in ("ghost", "materialize", "generic")},
        "groups": [group_fields(g, directional, floor)
                   for g, floor in zip(result.groups, eigenvalue_floors(result, dtype), strict=True)],
    }


def gram_section(result, batch_size: int, *, directional: bool, dtype: torch.dtype | None, path: str, step=None,
                 newton_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """The report's top-level fields of a Gram ``spectrum`` run (without ``notes`` and ``files``).

    Args:
        result: the :class:`~curvscope.curvature.gram.SpectrumResult`.
        batch_size: N, the problem's batch size.
        directional: whether the directional quantities were computed.
        dtype: the dtype the Gram was built in (the problem's).
        path: how the rows of V were computed (``vmap``, ``autograd``).
        step: the :class:`~curvscope.curvature.gram.newton.NewtonStep`, or ``None``.
        newton_file: where the Newton step is written (with ``step``).

    Returns:
        :func:`spectrum_fields`, then ``curvature``, ``method``, ``comparison``, ``landscape`` (``None``: the
        Gram has no Hessian comparison, the landscape is filled in by the caller when computed), ``path`` and
        ``newton``. Every key is set, so a merge replaces the stale sections of an older report of the problem.
    """
    fields = spectrum_fields(result, batch_size, directional=directional, dtype=dtype)
    fields.update(curvature="ggn", method="gram", comparison=None, landscape=None, path=path)
    fields["newton"] = None if step is None else newton_fields(step, newton_file)
    return fields


def newton_fields(step, file: str | os.PathLike) -> dict[str, Any]:
    """The ``newton`` section from a :class:`~curvscope.curvature.gram.newton.NewtonStep`."""
    return {
        "damping": step.damping,
        "predicted_decrease": float(step.predicted_decrease),
        "predicted_decrease_blocks": float(step.predicted_decrease_blocks),
        "realized_decrease": float(step.realized_decrease),
        "loss_before": float(step.loss_before),
        "loss_after": float(step.loss_after),
        "step_norm": float(step.step_norm),
        "blocks": list(step.blocks),
        "num_directions": int(step.num_directions),
        "skipped_directions": int(step.num_skipped),
        "file": str(file),
        "scale": getattr(step, "scale", None),
        "scaled_predicted_decrease": getattr(step, "scaled_predicted_decrease", None),
        "scaled_realized_decrease": getattr(step, "scaled_realized_decrease", None),
        "warnings": newton_warnings(step),
    }


def newton_warnings(step) -> list[str]:
    """When the damped Newton step is predicted or measured to hurt."""
    warnings = []
    blocks = len(step.blocks) > 1
    if float(step.realized_decrease) < 0 and blocks:
        interact = float(step.predicted_decrease) < float(step.predicted_decrease_blocks)
        cause = (f"the {len(step.blocks)} per-block steps interact: each lowers its own block's quadratic model "
                 f"(together {float(step.predicted_decrease_blocks):.3g}), but the whole model's predicts "
                 f"{float(step.predicted_decrease):.3g} for their sum" if interact else
                 f"predicted decrease {float(step.predicted_decrease):.3g}")
        scale = getattr(step, "scale", None)
        fix = (f"; scaled by {scale:.3g} (the whole model's optimal factor along it) it lowers the loss by "
               f"{float(step.scaled_realized_decrease):.3g}: take {scale:.3g} x the step, or one whole-model step "
               "(groups all)" if scale is not None else "; take one whole-model step (groups all)")
        warnings.append(f"the step raises the batch loss (realized {float(step.realized_decrease):.3g}): {cause}"
                        + fix)
    elif float(step.realized_decrease) < 0:
        warnings.append(f"the step raises the batch loss (predicted decrease {float(step.predicted_decrease):.3g}, "
                        f"realized {float(step.realized_decrease):.3g}): do not take it"
                        + ("; a larger constant damping shortens it" if step.damping == "bootstrap" else
                           "; use bootstrap damping or a larger constant damping"))
    if float(step.predicted_decrease) > float(step.loss_before) > 0:
        warnings.append(f"the predicted decrease {float(step.predicted_decrease):.3g} exceeds the loss itself "
                        f"({float(step.loss_before):.3g}): the quadratic model does not hold that far")
    return warnings


# -- tensor files ------------------------------------------------------------------------------------------

def _key_prefixes(result) -> list[str]:
    names = [g.name for g in result.groups]
    if len(set(names)) == len(names):
        return names
    return [f"{i}:{n}" for i, n in enumerate(names)]


def directions_tensors(result, newton=None) -> dict[str, Tensor]:
    """Per-sample arrays for ``directions.safetensors``: for each group with directions, ``{group}/gamma``
    ``(N, K)``, ``{group}/lambda`` ``(N_V, K)``, ``{group}/eigenvalues`` ``(K,)``; plus ``curvature_samples``
    ``(N_V,)`` (batch positions of the rows of ``lambda``) and, with a Newton step, ``{block}/newton_damping``
    and ``{block}/newton_step_length`` ``(K,)``."""
    tensors: dict[str, Tensor] = {}
    for prefix, g in zip(_key_prefixes(result), result.groups, strict=True):
        if g.directions is None:
            continue
        tensors[f"{prefix}/gamma"] = g.directions.gamma
        tensors[f"{prefix}/lambda"] = g.directions.lambdas
        tensors[f"{prefix}/eigenvalues"] = g.eigenvalues[:g.top_k]
    if not tensors:
        return {}
    tensors["curvature_samples"] = result.columns.samples.to(torch.int64)
    if newton is not None:
        prefixes = _key_prefixes(result)
        for b, deltas, coeff in zip(newton.block_indices, newton.deltas, newton.coefficients, strict=True):
            prefix = prefixes[b]
            tensors[f"{prefix}/newton_damping"] = deltas
            tensors[f"{prefix}/newton_step_length"] = coeff
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def eigenvector_tensors(vectors: dict[str, Tensor], eigenvalues: Tensor) -> dict[str, Tensor]:
    """``{k}/{param}`` -> the parameter-shaped slice of eigenvector k (k = 0 is the largest eigenvalue), and
    ``eigenvalues`` ``(k,)``."""
    tensors = {"eigenvalues": eigenvalues.detach().cpu().to(torch.float64).contiguous()}
    for name, v in vectors.items():
        for k in range(v.shape[0]):
            tensors[f"{k}/{name}"] = v[k].detach().cpu().contiguous()
    return tensors
