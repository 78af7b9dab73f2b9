"""Peak memory of one tool in a fresh subprocess, and the largest batch size under a memory cap.

A measurement runs ``python -m benchmarks.memory SPEC`` (``SPEC``: JSON, see :func:`child`), which builds the
case, prepares the tool (not measured), then records the memory baseline, runs the computation once and
reports on stdout (one line starting with ``RESULT_MARK``):

- CPU: the peak resident set size above the baseline. The kernel's high-water mark ``VmHWM`` is reset just
  before the run (``/proc/self/clear_refs``, value 5), so imports and set-up do not count.
- CUDA: ``torch.cuda.max_memory_allocated`` above the allocated baseline (PyTorch's allocator; the CUDA
  context is not counted).

A memory *cap* makes the child fail where the tool would need more: on CPU ``RLIMIT_AS`` (address space) is
set to the baseline's ``VmSize`` plus the cap, so an allocation beyond the cap raises inside PyTorch and the
child reports ``ok: false``; on CUDA ``torch.cuda.set_per_process_memory_fraction``. :func:`max_batch`
doubles N until the tool fails under the cap, then bisects.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULT_MARK = "BENCH_RESULT "
GIB = 2**30


# -- inside the child ----------------------------------------------------------------------------------------

def proc_status() -> dict[str, int]:
    """``VmHWM``, ``VmRSS``, ``VmSize`` of this process in bytes (Linux)."""
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmHWM", "VmRSS", "VmSize")}


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (``VmHWM``); ``False`` where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or any(s in text for s in (
        "can't allocate memory", "out of memory", "cannot allocate memory", "not enough memory",
        "std::bad_alloc"))


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one computation. ``spec``: ``case``, ``n``, ``tool``, ``task``, ``device``, ``dtype``, optional
    ``cap`` (bytes beyond the baseline), ``max_memory`` (curvscope's budget), ``repeats`` (extra timed runs
    after the measured one), ``threads``."""
    import torch

    from benchmarks.cases import build_workload
    from benchmarks.peers import prepare

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    out: dict[str, Any] = {"ok": False, "spec": spec}
    if spec.get("warmup_n"):  # pay one-time costs (lazy imports, first vmap, thread pools) on a tiny batch
        warm = build_workload(spec["case"], int(spec["warmup_n"]), device, dtype)
        prepare(spec["tool"], spec["task"], warm, max_memory=spec.get("max_memory"))()
        del warm
    w = build_workload(spec["case"], spec.get("n"), device, dtype)
    run = prepare(spec["tool"], spec["task"], w, max_memory=spec.get("max_memory"))
    torch.ones(64, 64, dtype=dtype) @ torch.ones(64, 64, dtype=dtype)  # start the thread pools first
    gc.collect()
    cap = spec.get("cap")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        if cap:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, (base + cap) / total), device)
    else:
        st = proc_status()
        base = st["VmRSS"]
        out["hwm_reset"] = reset_peak_rss()
        if cap:
            resource.setrlimit(resource.RLIMIT_AS, (st["VmSize"] + int(cap), resource.RLIM_INFINITY))
    times = []
    try:
        t0 = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            st = proc_status()
            peak = (st["VmHWM"] if out["hwm_reset"] else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                    ) - base
        for _ in range(int(spec.get("repeats", 0))):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        out.update(ok=True, peak_bytes=int(peak), baseline_bytes=int(base), seconds=times,
                   num_eigenvalues=int(result.eigenvalues.numel()), top10=result.eigenvalues[:10].tolist(),
                   lambdas10=None if result.lambdas is None else result.lambdas[:, :10].tolist(),
                   num_directions=None if result.lambdas is None else int(result.lambdas.shape[1]))
    except (RuntimeError, MemoryError) as exc:
        out.update(oom=is_oom(exc), error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
    return out


# -- in the parent ---------------------------------------------------------------------------------------------

def measure(spec: dict[str, Any], timeout: float = 1800.0, python: str | None = None) -> dict[str, Any]:
    """Run :func:`child` with ``spec`` in a fresh interpreter; a crash or timeout comes back as ``ok: false``."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if spec.get("threads"):  # before torch loads: OpenMP and MKL read these once
        env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([python or sys.executable, "-m", "benchmarks.memory", json.dumps(spec)], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "spec": spec, "error": f"timed out after {timeout:.0f} s", "wall": timeout}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            res = json.loads(line[len(RESULT_MARK):])
            res["wall"] = time.perf_counter() - t0
            return res
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
    oom = proc.returncode in (-9, 137) or is_oom(RuntimeError(proc.stderr[-2000:]))
    return {"ok": False, "spec": spec, "oom": oom, "error": f"exit {proc.returncode}: {tail}",
            "wall": time.perf_counter() - t0}


def max_batch(spec: dict[str, Any], cap: int, n_start: int, n_max: int, rel_tol: float = 0.1,
              timeout: float = 900.0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The largest N at which ``spec``'s computation succeeds with at most ``cap`` bytes beyond its baseline.

    Doubles N from ``n_start`` until a failure (or ``n_max``), then bisects until the bracket is within
    ``rel_tol`` (relative) or 8 samples. Only out-of-memory failures and timeouts end the search as
    "too large"; any other error is reported.
    """
    probes: list[dict[str, Any]] = []

    def ok(n: int) -> bool:
        r = measure({**spec, "n": n, "cap": cap}, timeout=timeout)
        probes.append({"n": n, "ok": r["ok"], "peak_bytes": r.get("peak_bytes"), "wall": round(r["wall"], 1),
                       "error": r.get("error")})
        log(f"    N={n}: {'ok' if r['ok'] else 'fails'} ({r['wall']:.0f} s"
            f"{', peak %.2f GiB' % (r['peak_bytes'] / GIB) if r['ok'] else ''})")
        if not r["ok"] and not (r.get("oom") or "timed out" in r.get("error", "")):
            raise RuntimeError(f"max-batch probe at N={n} failed: {r.get('error')}")
        return r["ok"]

    lo, hi = 0, None
    n = n_start
    while n <= n_max:
        if ok(n):
            lo, n = n, n * 2
        else:
            hi = n
            break
    if hi is None:
        return {"n_max": lo, "bounded": False, "probes": probes}
    if lo == 0:
        return {"n_max": 0, "bounded": True, "probes": probes}
    while hi - lo > max(8, math.ceil(rel_tol * lo)):
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return {"n_max": lo, "first_failure": hi, "bounded": True, "probes": probes}


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


if __name__ == "__main__":
    result = child(json.loads(sys.argv[1]))
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
