"""Per-product cost: curvscope's Hessian- and GGN-vector products against PyHessian's, in one process, alternating.

    python -m benchmarks.products                       # GPT-2 small (124M), 3 rounds: about 10 minutes on 1 core
    python -m benchmarks.products --model gpt2-tiny     # seconds

One process builds the model and batch (:mod:`benchmarks.scale_models`), curvscope's ``hessian_operator`` and
``ggn_operator`` and PyHessian's ``hessian`` object (its ``create_graph`` backward), checks that the products agree,
then times rounds of one product each, in a rotating order, on the same vector (one intra-op thread):

- ``hessian``: ``H.matvec(v)`` (a new flat tensor); ``hessian-out``: ``H.matvec(v, out=buf)`` (into a buffer);
- ``pyhessian``: ``hessian_vector_product(gradsH, params, v)`` (its list of per-parameter tensors);
- ``ggn`` and ``ggn-out``: the same for the GGN (PyHessian has none).

Peak memory per product is the process's peak RSS (``VmHWM``, reset before each product) above its RSS before it;
set ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go back to the system and the RSS before a product is what
is alive. The load of a shared machine changes between rounds: compare the medians' ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.memory import proc_status, reset_peak_rss
from benchmarks.scale_models import MODELS, Logits, build, shifted_ce

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.products", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2-small", choices=[m for m in MODELS if m.startswith("gpt2")])
    ap.add_argument("--rounds", type=int, default=3, help="timed products per variant")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder of products.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import importlib

    from curvscope import make_problem
    from curvscope.curvature.matfree.operators import ggn_operator, hessian_operator

    spec = MODELS[args.model]
    model, x, y = build(spec)
    problem = make_problem(Logits(model), x, y, loss="ce", shift_labels=True, device="cpu")
    H, G = hessian_operator(problem), ggn_operator(problem)
    ph = importlib.import_module("pyhessian.hessian")
    peer = ph.hessian(Logits(model), shifted_ce, data=(x, y), cuda=False)
    v = torch.randn(H.dim, generator=torch.Generator().manual_seed(1))
    parts, buf = H.split(v), torch.empty(H.dim)
    variants = {"hessian": lambda: H.matvec(v), "hessian-out": lambda: H.matvec(v, out=buf),
                "pyhessian": lambda: ph.hessian_vector_product(peer.gradsH, peer.params, parts),
                "ggn": lambda: G.matvec(v), "ggn-out": lambda: G.matvec(v, out=buf)}
    theirs = torch.cat([t.reshape(-1) for t in variants["pyhessian"]()])
    agree = {"hessian_equals_pyhessian": bool(torch.equal(H.matvec(v), theirs)),
             "ggn_out_equals_ggn": bool(torch.equal(G.matvec(v), G.matvec(v, out=buf).clone()))}
    del theirs
    times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, list[int]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            before = proc_status()["VmRSS"]
            reset_peak_rss()
            t = time.perf_counter()
            out = variants[name]()
            times[name].append(time.perf_counter() - t)
            peaks[name].append(proc_status()["VmHWM"] - before)
            del out
            print(f"round {r} {name:12s} {times[name][-1]:7.2f} s  {peaks[name][-1] / 2**20:7.0f} MiB  "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    med = {k: {"seconds": statistics.median(times[k]), "peak_mib": statistics.median(peaks[k]) / 2**20}
           for k in variants}
    base = med["pyhessian"]["seconds"]
    result = {"model": spec.name, "params": H.dim, "threads": args.threads, "rounds": args.rounds, "agree": agree,
              "median": med, "time_ratio_to_pyhessian": {k: m["seconds"] / base for k, m in med.items()},
              "times": times, "peaks": peaks}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "products.json").write_text(json.dumps(result, indent=1))
    for k, m in med.items():
        print(f"{k:12s} median {m['seconds']:7.2f} s ({m['seconds'] / base:.2f} x PyHessian), "
              f"peak {m['peak_mib']:.0f} MiB")
    print(json.dumps(agree))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
