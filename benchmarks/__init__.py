"""Benchmarks of curvscope's exact GGN spectrum against ViViT, BackPACK and curvlinops (issue 7).

Run ``python -m benchmarks.run`` from the repository root (peers come with the ``bench`` extra); see
``docs/benchmarks.md`` for the protocol and the committed results.
"""
