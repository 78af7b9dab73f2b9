"""Integrations with training frameworks (optional extras): :mod:`curvscope.integrations.transformers`."""
