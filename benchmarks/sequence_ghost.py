"""The ghost rule with T positions on a small GPT: the Gram of a causal language model with the per-layer fast
rule (every nn.Linear on (N, T, d) activations, batched matmuls) against the generic path (materialized rows
of V for every layer), same numbers, in one process.

    python -m benchmarks.sequence_ghost            # the bundled charlm-pysource model, a few batch sizes

Prints a table (and writes ``benchmarks/results/sequence_ghost.md``): seconds for ``compute_spectrum`` with
``ghost=True`` and ``ghost=False`` (eigenvalues only, Monte-Carlo: one column per token), their ratio, and the
largest relative difference of the eigenvalues (the two paths must agree). Nothing here is a test.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def sample_problem(batch_size: int):
    """The bundled charlm-pysource (dim 32, 16 tokens) on its first ``batch_size`` sequences."""
    from curvscope.io.load import load_problem

    return load_problem(ROOT / "sample_models/charlm-pysource.safetensors",
                        ROOT / "sample_models/pysource.safetensors", batch_size=batch_size)


def wide_problem(dim: int, tokens: int, batch_size: int = 16, vocab: int = 60):
    """A randomly initialized ``char_lm`` of width ``dim`` on random tokens (a wider small GPT; a larger
    ``vocab`` makes the embedding and the output layer large)."""
    from curvscope.models import char_lm
    from curvscope.problem import make_problem

    torch.manual_seed(0)
    model = char_lm(vocab=vocab, seq_len=tokens, dim=dim, heads=4, depth=2).eval()
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, vocab, (batch_size, tokens), generator=g),
            torch.randint(0, vocab, (batch_size, tokens), generator=g))
    return make_problem(model, x, y, loss="ce")


def measure(name: str, problem, repeats: int = 3) -> dict:
    from curvscope.curvature.gram.spectrum import compute_spectrum

    times, evals = {}, {}
    for ghost in (True, False):
        compute_spectrum(problem, mc_samples=1, directional=False, ghost=ghost)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            result = compute_spectrum(problem, mc_samples=1, directional=False, ghost=ghost)
            best = min(best, time.perf_counter() - start)
        times[ghost], evals[ghost] = best, result.groups[0].eigenvalues
    k = min(evals[True].numel(), evals[False].numel())
    diff = float(((evals[True][:k] - evals[False][:k]).abs() / evals[False][0]).max()) if k else 0.0
    return {"case": name, "columns": int(result.num_columns), "ghost_s": times[True],
            "generic_s": times[False], "ratio": times[True] / times[False], "max_rel_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/sequence_ghost.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [(f"charlm-pysource, N={n}, d=32, T=16", lambda n=n: sample_problem(n)) for n in (8, 32)]
    cases += [(f"char_lm d={d}, T={t}, N=16", lambda d=d, t=t: wide_problem(d, t)) for d, t in ((128, 16), (256, 8))]
    cases += [(f"char_lm vocab {v:,}, d=64, T=16, N={n}", lambda v=v, n=n: wide_problem(64, 16, n, v))
              for v, n in ((5000, 16), (20000, 8))]  # the embedding's rule
    rows = [measure(name, make()) for name, make in cases]
    lines = ["| case | columns | ghost (s) | generic (s) | ghost / generic | max rel. diff |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['columns']} | {r['ghost_s']:.3f} | {r['generic_s']:.3f} | {r['ratio']:.2f} | "
              f"{r['max_rel_diff']:.1e} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(f"float32, one thread, best of 3, Monte-Carlo (one column per token)\n\n{text}\n")


if __name__ == "__main__":
    main()
