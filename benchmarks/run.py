"""Run the benchmark of issue 7 and write ``results.md``, ``results.json`` and ``scaling.png``.

    python -m benchmarks.run                 # the full benchmark (about 20 minutes on 2 CPU cores)
    python -m benchmarks.run --quick         # smoke run into benchmarks/results-quick (about 3 minutes)
    python -m benchmarks.run --device cuda --out benchmarks/results-cuda

Protocol. Every measurement is one computation in a fresh interpreter (``benchmarks.memory``): the case is
built, the tool is set up (not timed), one warm-up computation on a tiny batch of the same case pays the
one-time costs (lazy imports, first ``vmap`` trace, thread pools), then the measured computation runs once and
reports its wall time and its peak memory above the baseline. For each (case, task), curvscope and the peer
alternate (pair r runs curvscope first when r is even, the peer first when r is odd) for several pairs;
the table gives the median time of each tool, the median of the per-pair ratios curvscope / peer, and the
median peak memory. The number of pairs is ``--repeats`` unless the first pair shows that they would not fit
in ``--budget`` seconds (then fewer, at least ``--min-repeats``). The top-10 eigenvalues of the tools must
agree to ``--rtol`` (float64); a disagreement fails the run (exit status 1) after the results are written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.cases import CASES, CNN_CASES, MLP_CASES
from benchmarks.memory import GIB, max_batch, measure
from benchmarks.peers import TASK_TITLES, TASKS, peer_missing

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
PEER_NAMES = {"vivit": "ViViT", "curvlinops": "curvlinops+eigsh"}


# -- configuration ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small batches, 2 pairs, tiny scaling")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    ap.add_argument("--repeats", type=int, default=None, help="pairs per (case, task) (default 3, quick 2)")
    ap.add_argument("--min-repeats", type=int, default=None,
                    help="pairs kept even over budget, unless one pair alone exceeds it (default 2)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of wall time per (case, task) before pairs are cut (default 60)")
    ap.add_argument("--n", type=int, default=None,
                    help="batch size of every case (default: each case's own; at most 32 with --quick)")
    ap.add_argument("--cases", default=None, help=f"comma-separated subset of {', '.join(CASES)}")
    ap.add_argument("--tasks", default="eig,dd,top10,maxbatch,scaling",
                    help="comma-separated subset of eig, dd, top10, maxbatch, scaling")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads for every measurement (default 1 on CPU, see docs/benchmarks.md)")
    ap.add_argument("--cap-gib", type=float, default=None, help="memory cap for maxbatch (default 2, quick 0.5)")
    ap.add_argument("--safety-gib", type=float, default=None,
                    help="address-space limit of every measurement, so a peer cannot exhaust the machine "
                         "(default 60%% of the available memory)")
    ap.add_argument("--rtol", type=float, default=1e-4, help="top-10 eigenvalue agreement (relative)")
    ap.add_argument("--out", default=None,
                    help="output folder (default benchmarks/results; benchmarks/results-quick with --quick)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    args.out = args.out or str(ROOT / "benchmarks" / ("results-quick" if args.quick else "results"))
    args.repeats = args.repeats or (2 if args.quick else 3)
    args.min_repeats = min(args.repeats, args.min_repeats or 2)
    args.budget = args.budget if args.budget is not None else (20.0 if args.quick else 60.0)
    args.cap_gib = args.cap_gib or (0.5 if args.quick else 2.0)
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.safety_gib is None:
        args.safety_gib = 0.6 * available_bytes() / GIB
    if args.cases:
        unknown = [c for c in args.cases.split(",") if c not in CASES]
        if unknown:
            ap.error(f"unknown case(s) {', '.join(unknown)}: choose from {', '.join(CASES)}")
        args.case_list = args.cases.split(",")
    else:
        args.case_list = ["mlp-digits", "cnn-digits", "transformer-digits"] if args.quick else list(CASES)
    args.task_list = args.tasks.split(",")
    return args


def available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GIB


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmarks.peers import cpu_name

    cpu = cpu_name()
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("backpack", "vivit", "curvlinops", "scipy", "numpy"):
        try:
            from importlib.metadata import version

            dist = {"backpack": "backpack-for-pytorch", "vivit": "vivit-for-pytorch",
                    "curvlinops": "curvlinops-for-pytorch"}.get(mod, mod)
            versions[mod] = version(dist)
        except Exception:  # noqa: BLE001 - a missing peer is reported elsewhere
            versions[mod] = None
    info = {"nproc": os.cpu_count(), "cpu": cpu, "platform": platform.platform(), "versions": versions,
            "threads": args.threads, "mem_total_gib": round(_meminfo("MemTotal") / GIB, 1),
            "loadavg_start": _loadavg()}
    if args.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _meminfo(key: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def case_n(case: str, args: argparse.Namespace) -> int:
    """The batch size of a case: ``--n``, else the case's own (at most 32 with ``--quick``)."""
    if args.n:
        return args.n
    return min(CASES[case].batch_size, 32) if args.quick else CASES[case].batch_size


# -- one (case, task) comparison -----------------------------------------------------------------------------

def spec_for(args: argparse.Namespace, case: str, n: int, tool: str, task: str, **extra: Any) -> dict[str, Any]:
    spec = {"case": case, "n": n, "tool": tool, "task": task, "device": args.device, "dtype": args.dtype,
            "threads": args.threads or None, "warmup_n": min(4, n), **extra}
    if args.device == "cpu" and "cap" not in extra:
        spec["cap"] = int(args.safety_gib * GIB)  # a safety net, not the maxbatch cap
    return spec


def rel_diff(a: list[float], b: list[float], k: int = 10) -> float:
    k = min(k, len(a), len(b))
    if k == 0:
        return float("inf")
    return max(abs(x - y) / max(abs(y), 1e-300) for x, y in zip(a[:k], b[:k], strict=True))


def lambda_diff(a: list[list[float]] | None, b: list[list[float]] | None) -> float | None:
    """Largest difference of the per-sample curvatures along the top directions, relative per direction."""
    if not a or not b:
        return None
    k = min(len(a[0]), len(b[0]))
    worst = 0.0
    for j in range(k):
        scale = max(max(abs(r[j]) for r in b), 1e-300)
        worst = max(worst, max(abs(ra[j] - rb[j]) for ra, rb in zip(a, b, strict=True)) / scale)
    return worst


def compare(args: argparse.Namespace, case: str, task: str, log) -> dict[str, Any]:
    """Alternate curvscope and the task's peer in fresh processes; medians, ratios, memory, agreement."""
    n = case_n(case, args)
    peer = TASKS[task][1]
    row: dict[str, Any] = {"case": case, "n": n, "task": task, "peer": peer, "notes": []}
    why_not = peer_missing(peer)
    if peer == "vivit" and case in CASES and not CASES[case].vivit:
        why_not = f"ViViT cannot run this model: {CASES[case].note}"
    tools = ["curvscope"] if why_not else ["curvscope", peer]
    if why_not:
        row["notes"].append(why_not)
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in tools}
    failed: dict[str, str] = {}
    pairs = args.repeats
    r = 0
    while r < pairs:
        order = tools if r % 2 == 0 else tools[::-1]
        for tool in order:
            if tool in failed:
                continue
            res = measure(spec_for(args, case, n, tool, task))
            if not res["ok"]:
                failed[tool] = res.get("error", "failed")
                log(f"    {tool}: FAILED {failed[tool]}")
                continue
            runs[tool].append(res)
            log(f"    {tool}: {res['seconds'][0]:.3f} s, peak {res['peak_bytes'] / MIB:.0f} MiB")
        if len(failed) == len(tools):
            break
        if r == 0:  # size the number of pairs to the budget (wall time, process start included)
            pair = sum(runs[t][0]["wall"] for t in tools if runs[t])
            if pair > 0:
                floor = 1 if pair > args.budget else args.min_repeats
                pairs = max(floor, min(args.repeats, int(args.budget // pair)))
        r += 1
    for tool in tools:
        ts = [x["seconds"][0] for x in runs[tool]]
        mem = [x["peak_bytes"] for x in runs[tool]]
        row[tool] = {"times": ts, "median_s": statistics.median(ts) if ts else None,
                     "peak_bytes": int(statistics.median(mem)) if mem else None,
                     "num_eigenvalues": runs[tool][0]["num_eigenvalues"] if runs[tool] else None,
                     "num_directions": runs[tool][0].get("num_directions") if runs[tool] else None,
                     "error": failed.get(tool)}
    if peer in tools and runs["curvscope"] and runs[peer]:
        ratios = [a["seconds"][0] / b["seconds"][0] for a, b in zip(runs["curvscope"], runs[peer], strict=False)]
        row["ratios"] = ratios
        row["time_ratio"] = statistics.median(ratios)
        row["memory_ratio"] = row["curvscope"]["peak_bytes"] / max(row[peer]["peak_bytes"], 1)
        a, b = runs["curvscope"][0], runs[peer][0]
        row["top10_curvscope"], row["top10_peer"] = a["top10"], b["top10"]
        row["agreement"] = rel_diff(a["top10"], b["top10"])
        row["agree"] = row["agreement"] <= args.rtol
        if task == "dd":
            row["lambda_agreement"] = lambda_diff(a["lambdas10"], b["lambdas10"])
            if a.get("num_directions") != b.get("num_directions"):
                row["notes"].append(f"directions: curvscope {a.get('num_directions')}, "
                                    f"peer {b.get('num_directions')}")
    elif peer in failed:
        row["notes"].append(f"{PEER_NAMES[peer]} failed: {failed[peer]}")
    return row


# -- targets -------------------------------------------------------------------------------------------------

def targets_for(row: dict[str, Any]) -> list[tuple[str, str, float, str]]:
    """``(label, key, bound, "<=" or ">=")`` of the issue's targets that apply to a result row."""
    case, task = row["case"], row["task"]
    out = []
    if task == "eig" and case in CNN_CASES:
        out += [("time", "time_ratio", 0.5, "<="), ("memory", "memory_ratio", 0.5, "<=")]
    if task == "dd" and case in CNN_CASES:
        out += [("time", "time_ratio", 0.25, "<="), ("memory", "memory_ratio", 0.5, "<=")]
    if task == "eig" and case in MLP_CASES:
        out.append(("time", "time_ratio", 1.0, "<="))
    if task == "dd" and case in MLP_CASES:
        out.append(("time", "time_ratio", 0.25, "<="))
    if task == "top10":
        out.append(("time", "time_ratio", 1.0, "<="))
    return out


def verdicts(row: dict[str, Any]) -> str:
    parts = []
    for label, key, bound, op in targets_for(row):
        val = row.get(key)
        if val is None:
            parts.append(f"{label} {op} {bound:g}: n/a")
            continue
        ok = val <= bound if op == "<=" else val >= bound
        parts.append(f"{label} {op} {bound:g}: {'holds' if ok else 'MISSED'}")
    return "; ".join(parts) or "-"


# -- max batch size and scaling -------------------------------------------------------------------------------

def run_max_batch(args: argparse.Namespace, log) -> list[dict[str, Any]]:
    """Largest N under the cap: curvscope vs ViViT, eigenvalues, on the 3c3d CNN (cnn-digits with --quick)."""
    cap = int(args.cap_gib * GIB)
    case = "cnn-digits" if args.quick else "3c3d-n64"
    limit = 512 if args.quick else 256
    out = []
    for tool in ("vivit", "curvscope"):
        if tool != "curvscope" and peer_missing(tool):
            out.append({"case": case, "tool": tool, "cap_bytes": cap, "error": peer_missing(tool)})
            continue
        log(f"  maxbatch {case} {tool} (cap {args.cap_gib:g} GiB)")
        # curvscope gets its documented knob: a budget for materialized rows of V inside the cap
        extra = {"max_memory": cap // 2} if tool == "curvscope" else {}
        spec = spec_for(args, case, 4, tool, "eig", cap=cap, **extra)
        spec.pop("n")
        try:
            res = max_batch(spec, cap, n_start=16, n_max=limit, log=log)
        except RuntimeError as exc:
            res = {"error": str(exc)}
        out.append({"case": case, "tool": tool, "task": "eig", "cap_bytes": cap, "search_limit": limit, **res})
    return out


def run_scaling(args: argparse.Namespace, log) -> dict[str, Any]:
    """curvscope time and peak memory vs N (3c3d CNN and the wide MLP) and vs width (MLP 784-w-w-10)."""
    if args.quick:
        series = {"n_mlp": ("mlp-digits", "mlp-digits", [16, 32, 64], None),
                  "width": (None, "MLP 784-w-w-10", [64, 128, 256], 32)}
    else:
        series = {"n_mlp": ("wide-mlp", "MLP 784-1024-1024-10", [32, 64, 128, 256, 512], None),
                  "n_cnn": ("3c3d-n64", "3c3d CNN", [32, 64, 128, 256], None),
                  "width": (None, "MLP 784-w-w-10", [256, 512, 1024, 2048, 4096], 128)}
    out: dict[str, Any] = {}
    for key, (case, model, values, n_fixed) in series.items():
        points = []
        for v in values:
            name, n = (case, v) if case else (f"mlp-w{v}", n_fixed)
            spec = spec_for(args, name, n, "curvscope", "eig")
            res = measure(spec)
            if not res["ok"]:
                log(f"  scaling {key} {v}: FAILED {res.get('error')}")
                points.append({"x": v, "error": res.get("error")})
                continue
            t = statistics.median(res["seconds"])
            log(f"  scaling {key} {v}: {t:.3f} s, peak {res['peak_bytes'] / MIB:.0f} MiB")
            points.append({"x": v, "n": n, "seconds": res["seconds"], "median_s": t,
                           "peak_bytes": res["peak_bytes"]})
        out[key] = {"case": case or "mlp-w*", "model": model, "n": n_fixed, "points": points,
                    "time_exponent": fit_exponent(points, "median_s"),
                    "memory_exponent": fit_exponent(points, "peak_bytes")}
    return out


def fit_exponent(points: list[dict[str, Any]], key: str) -> float | None:
    """Least-squares slope of log(y) against log(x): y ~ x^slope."""
    xy = [(math.log(p["x"]), math.log(p[key])) for p in points if p.get(key)]
    if len(xy) < 2:
        return None
    mx = sum(x for x, _ in xy) / len(xy)
    my = sum(y for _, y in xy) / len(xy)
    sxx = sum((x - mx) ** 2 for x, _ in xy)
    return sum((x - mx) * (y - my) for x, y in xy) / sxx if sxx else None


# -- output -----------------------------------------------------------------------------------------------------

def _f(x: float | None, fmt: str = "{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / MIB:.0f}"


def markdown(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    lines = [
        "# curvscope benchmark results",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {m['nproc']} CPU cores ({m['cpu']}), {m['mem_total_gib']} GiB; torch {m['versions']['torch']}, "
        f"backpack {m['versions'].get('backpack')}, vivit {m['versions'].get('vivit')}, "
        f"curvlinops {m['versions'].get('curvlinops')}, scipy {m['versions'].get('scipy')}; "
        f"device {cfg['device']}, dtype {cfg['dtype']}, threads {m['threads'] or 'default'}; "
        f"load average at start {m.get('loadavg_start')}, at end {results.get('loadavg_end')}.  ",
        f"Started {results['started']}, took {results.get('wall_minutes', 0):.1f} min.",
        "",
        "Times are medians over the pairs (each run in a fresh process after a warm-up on 4 samples); the ratio is "
        "the median of the per-pair ratios curvscope / peer (< 1: curvscope faster). Memory: peak above the "
        "post-setup baseline (RSS on CPU), median over runs. Agreement: max relative difference of the top-10 "
        "eigenvalues.",
        "",
        "| case | N | task | peer | curvscope s | peer s | time ratio | pairs | curvscope MiB | peer MiB "
        "| memory ratio | top-10 rel. diff | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        peer = row["peer"]
        cs, pr = row.get("curvscope", {}), row.get(peer, {})
        lines.append(
            f"| {row['case']} | {row['n']} | {row['task']} | {PEER_NAMES[peer]} | {_f(cs.get('median_s'))} "
            f"| {_f(pr.get('median_s')) if pr else 'n/a'} | {_f(row.get('time_ratio'), '{:.2f}')} "
            f"| {len(row.get('ratios', cs.get('times', [])))} | {_mib(cs.get('peak_bytes'))} "
            f"| {_mib(pr.get('peak_bytes')) if pr else 'n/a'} | {_f(row.get('memory_ratio'), '{:.2f}')} "
            f"| {_f(row.get('agreement'), '{:.1e}')} | {verdicts(row)} |")
    notes = [(r["case"], r["task"], n) for r in results["rows"] for n in r["notes"]]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {c} / {t}: {n}" for c, t, n in notes]
    if results.get("max_batch"):
        lines += ["", f"## Largest batch size under a {cfg['cap_gib']:g} GiB cap (eigenvalues)", "",
                  "| case | tool | largest N that ran | first N that failed | probes |", "|---|---|---|---|---|"]
        by_tool = {}
        for r in results["max_batch"]:
            by_tool[r["tool"]] = r.get("n_max")
            first = r.get("first_failure") if r.get("bounded") else f"none up to {r.get('search_limit')}"
            probes = ", ".join(f"{p['n']}{'' if p['ok'] else ' x'}" for p in r.get("probes", []))
            lines.append(f"| {r['case']} | {r['tool']} | {r.get('n_max', r.get('error'))} | {first} | {probes} |")
        if by_tool.get("vivit") and by_tool.get("curvscope") is not None:
            ratio = by_tool["curvscope"] / by_tool["vivit"]
            lines += ["", f"Ratio curvscope / ViViT: {ratio:.1f}x (target >= 2: "
                          f"{'holds' if ratio >= 2 else 'MISSED'})."]
    if results.get("scaling"):
        lines += ["", "## Scaling (curvscope, eigenvalues)", "",
                  "| series | x | time s | peak MiB |", "|---|---|---|---|"]
        for key, s in results["scaling"].items():
            for p in s["points"]:
                lines.append(f"| {key} ({s.get('model', s['case'])}) | {p['x']} | {_f(p.get('median_s'))} "
                             f"| {_mib(p.get('peak_bytes'))} |")
        lines += [""] + [f"- {key}: time ~ x^{_f(s['time_exponent'], '{:.2f}')}, memory ~ "
                         f"x^{_f(s['memory_exponent'], '{:.2f}')}" for key, s in results["scaling"].items()]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    results: dict[str, Any] = {
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(args),
        "config": {k: v for k, v in vars(args).items() if k not in ("case_list", "task_list")}, "rows": [],
    }
    for peer in ("vivit", "curvlinops"):
        if peer_missing(peer):
            log(f"peer {peer} unavailable: {peer_missing(peer)}")
    for case in args.case_list:
        for task in ("eig", "dd", "top10"):
            if task not in args.task_list:
                continue
            log(f"{case} (N={case_n(case, args)}) {task}: {TASK_TITLES[task]}")
            row = compare(args, case, task, log)
            results["rows"].append(row)
            if "time_ratio" in row:
                log(f"  ratio {row['time_ratio']:.2f}, memory ratio {row['memory_ratio']:.2f}, "
                    f"top-10 rel. diff {row['agreement']:.1e}; {verdicts(row)}")
            write(results, out)
    if "maxbatch" in args.task_list:
        results["max_batch"] = run_max_batch(args, log)
        write(results, out)
    if "scaling" in args.task_list:
        results["scaling"] = run_scaling(args, log)
    results["wall_minutes"] = (time.time() - t0) / 60
    results["loadavg_end"] = _loadavg()
    write(results, out)
    if results.get("scaling") and not args.no_plot:
        from benchmarks.plot import plot_scaling

        plot_scaling(results["scaling"], out / "scaling.png")
    print(markdown(results))
    bad = [f"{r['case']}/{r['task']} ({r['agreement']:.1e})" for r in results["rows"] if r.get("agree") is False]
    if bad:
        print(f"eigenvalues disagree beyond rtol {args.rtol:g}: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
