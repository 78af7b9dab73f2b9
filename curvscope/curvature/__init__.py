"""The curvature engine: pure functions on a Problem, returning dataclasses of tensors. No I/O, no printing."""
