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

from curvscope.curvature.gram import rows as generic
from curvscope.curvature.gram.rows import batched_grad

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


def _probe(packages: tuple[str, ...]) -> str:
    """A script running the CLI on its arguments, then printing the exit code and the loaded modules of
    ``packages`` as JSON (its last line)."""
    return f"""
import json, sys
sys.argv = ["curvscope", *sys.argv[1:]]
from curvscope.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({{"code": code, "modules": sorted(m for m in sys.modules if m.split(".")[0] in {packages!r})}}))
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
    probe = _probe(("sympy", "matplotlib", "transformers", "scipy"))
    for plots, expected in ((False, set()), (True, {"matplotlib"})):
        out = tmp_path / f"plots-{plots}"
        proc = subprocess.run([sys.executable, "-c", probe, *args, "--out", str(out),
                               *([] if plots else ["--no-plots"])], capture_output=True, text=True, timeout=120)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["code"] == 0, proc.stderr
        assert {m.split(".")[0] for m in result["modules"]} == expected
        assert (out / "spectrum.png").is_file() == plots


@pytest.mark.parametrize(("args", "expected"), [
    ([], False), (["--help"], False), (["spectrum", "--help"], False), (["spectrum", "m.pt", "-h"], False),
    (["spectrum", "m.pt", "--data", "d.pt"], True), (["info", "m.pt"], True), (["lr-suggest", "m.pt"], True),
    (["factors", "m.pt"], True), (["check", "out/report.json", "--rule", "loss_value < 1"], False),
    (["check", "m.pt", "--data", "d.pt", "--config", "c.toml"], True), (["check", "m.pt", "--data=d.pt"], True),
    (["show", "out"], False),
])
def test_which_command_lines_load_pytorch_up_front(args, expected):
    from curvscope.cli import needs_torch

    assert needs_torch(args) is expected


def test_help_and_gating_a_saved_report_start_without_pytorch(tmp_path):
    """``--help``, ``check REPORT --rule`` and ``show --no-plots`` import neither torch nor matplotlib: a CI gate
    on a saved report takes a fifth of a second, not PyTorch's import time."""
    out = tmp_path / "out"
    spectrum = subprocess.run([sys.executable, "-m", "curvscope", "spectrum",
                               str(ROOT / "sample_models/mlp-digits.safetensors"), "--data",
                               str(ROOT / "sample_models/digits.safetensors"), "--no-plots", "--out", str(out)],
                              capture_output=True, text=True, timeout=120)
    assert spectrum.returncode == 0, spectrum.stderr
    probe = _probe(("torch", "matplotlib"))
    for args, code in ((["--help"], 0), (["spectrum", "--help"], 0),
                       (["check", str(out / "report.json"), "--rule", "groups[0].lambda_max <= 50"], 0),
                       (["check", str(out / "report.json"), "--rule", "groups[0].lambda_max <= 1e-9"], 1),
                       (["show", str(out), "--no-plots"], 0)):
        proc = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["code"] == code, (args, proc.stderr)
        assert result["modules"] == [], (args, result["modules"])


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_a_terminal_sees_a_spinner_while_pytorch_loads(tmp_path):
    """On an interactive stderr the first thing shown is a spinner naming what is loading (PyTorch, then the
    model and data), before any number is computed."""
    import os
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "curvscope", "spectrum",
                             str(ROOT / "sample_models/mlp-digits.safetensors"), "--data",
                             str(ROOT / "sample_models/digits.safetensors"), "--no-plots", "--out",
                             str(tmp_path / "out")], stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the other end closed (Linux raises EIO at EOF)
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 0
    text = seen.decode(errors="replace")
    assert "Starting curvscope (loading PyTorch)" in text
    assert text.index("Starting curvscope") < text.index("Loading model and data")
