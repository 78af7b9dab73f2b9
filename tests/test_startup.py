"""What a run costs before and after the numbers: the CLI's lazy imports (a quick start should add no more than
``import torch`` again) and the plain-autograd vector-Jacobian products that avoid torch's batched backward for
a handful of cotangents."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from curvscope.curvature import generic
from curvscope.curvature.generic import batched_grad

ROOT = Path(__file__).resolve().parents[1]


def _dense_vjps(model: nn.Module, x: torch.Tensor, cot: torch.Tensor) -> list[torch.Tensor]:
    """``cot[j]^T J`` for each parameter, from the full Jacobian (plain autograd, one output at a time)."""
    params = list(model.parameters())
    out = model(x)
    rows = []
    for i in range(out.numel()):
        grads = torch.autograd.grad(out.reshape(-1)[i], params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    jac = torch.stack(rows)  # (outputs, D)
    flat = cot.reshape(cot.shape[0], -1) @ jac
    sizes = [p.numel() for p in params]
    return [part.reshape(cot.shape[0], *p.shape) for part, p in zip(flat.split(sizes, dim=1), params, strict=True)]


@pytest.mark.parametrize("m", [1, 3, generic.FEW_COTANGENTS, generic.FEW_COTANGENTS + 1,
                               generic.COTANGENT_CHUNK + 5])
def test_batched_grad_matches_the_jacobian_on_either_side_of_the_few_cutoff(m):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    unused = torch.zeros(2, dtype=torch.float64, requires_grad=True)  # not in the graph: zeros
    x = torch.randn(5, 4, dtype=torch.float64)
    cot = torch.randn(m, 5, 3, dtype=torch.float64)
    expected = _dense_vjps(model, x, cot)
    out = model(x)
    got = batched_grad(out, [*model.parameters(), unused], cot)
    for g, e in zip(got[:-1], expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[-1], torch.zeros(m, 2, dtype=torch.float64))
    # cotangents built a chunk at a time give the same products
    chunked = batched_grad(out, list(model.parameters()), lambda a, b: cot[a:b], count=m)
    for g, e in zip(chunked, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


_PROBE = """
import json, sys
sys.argv = ["curvscope", *sys.argv[1:]]
baseline = set(sys.modules)
from curvscope.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(m for m in sys.modules if m.split(".")[0] in
                                                  ("sympy", "matplotlib", "transformers", "scipy"))}))
"""


def _torch_alone_imports(name: str) -> bool:
    proc = subprocess.run([sys.executable, "-c", f"import sys, torch; print({name!r} in sys.modules)"],
                          capture_output=True, text=True, check=True)
    return proc.stdout.strip() == "True"


def test_the_quick_start_imports_no_plotting_or_symbolic_libraries_it_does_not_use(tmp_path):
    """``spectrum --no-plots`` on the bundled MLP loads neither matplotlib nor sympy (0.3 s and 0.25 s of a
    two-second run), nor transformers or scipy; with plots, matplotlib only."""
    if _torch_alone_imports("sympy"):
        pytest.skip("this torch imports sympy itself")
    args = ["spectrum", str(ROOT / "sample_models/mlp-digits.safetensors"), "--data",
            str(ROOT / "sample_models/digits.safetensors")]
    for plots, expected in ((False, set()), (True, {"matplotlib"})):
        out = tmp_path / f"plots-{plots}"
        proc = subprocess.run([sys.executable, "-c", _PROBE, *args, "--out", str(out),
                               *([] if plots else ["--no-plots"])], capture_output=True, text=True, timeout=120)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["code"] == 0, proc.stderr
        assert {m.split(".")[0] for m in result["modules"]} == expected
        assert (out / "spectrum.png").is_file() == plots
