"""Model specs: ``path/to/file.py:factory``, ``package.module:factory`` or a built-in name (``mlp``)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvscope.errors import CurvscopeError, Metavar, OptionError

BUILTIN = ("mlp", "cnn", "transformer", "char_lm")


def parse_model_kwargs(text: str | None, source: str | None = None) -> dict[str, Any]:
    """Parse a JSON object of factory keyword arguments.

    Raises:
        OptionError: of ``model_kwargs``, named so unless ``source`` names where the text came from.
    """
    if text is None or text == "":
        return {}

    def error(message: str) -> OptionError:
        return OptionError("model_kwargs", lambda name: f"{source or name('model_kwargs')}: {message}")

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"not valid JSON ({exc.msg} at position {exc.pos})") from exc
    except (RecursionError, ValueError) as exc:  # nested too deeply, or an integer of thousands of digits
        raise error(f"cannot be read ({type(exc).__name__}: nested too deeply or a number too large)") from None
    if not isinstance(value, dict):
        raise error("expected a JSON object like '{\"hidden\": [32, 32]}'")
    return value


def relative_to(spec: str, base: str | os.PathLike) -> str:
    """A ``file.py:factory`` spec that a file names (checkpoint metadata, a config) with a relative path is
    relative to that file's directory ``base``, not to the current directory; other specs are returned as
    they are."""
    import re

    match = re.fullmatch(r"(.+\.py)(:[A-Za-z_][A-Za-z0-9_]*)?", spec)
    if not match or Path(match.group(1)).is_absolute():
        return spec
    return str(Path(base) / match.group(1)) + (match.group(2) or "")


def canonical_spec(spec: str | None) -> str | None:
    """The spec with built-in short names expanded: ``mlp`` -> ``curvscope.models:mlp``."""
    if spec in BUILTIN:
        return f"curvscope.models:{spec}"
    return spec


def is_builtin(spec: str | None) -> bool:
    """Whether ``spec`` names one of curvscope's own model factories (safe to build from metadata)."""
    return spec is not None and canonical_spec(spec) in {f"curvscope.models:{name}" for name in BUILTIN}


def check_trusted(spec: str, source: str, trusted: bool) -> None:
    """Refuse a model spec that came from a file (checkpoint metadata, a config) and names code outside
    curvscope's built-in models, unless the user allowed it: importing it would run that code.

    Raises:
        OptionError: of ``trust_model_code``, naming what the file asks to import and how to allow it.
    """
    if trusted or is_builtin(spec):
        return
    raise OptionError("trust_model_code", lambda name: f"{source} asks to import and run '{spec}', code outside "
                      f"curvscope's built-in models ({', '.join(BUILTIN)}); nothing was imported. If you trust it, "
                      f"pass {name('trust_model_code', True)}, or name the model yourself with "
                      f"{name('model', Metavar('SPEC'))}")


def resolve_factory(spec: str, kind: str = "model"):
    """The callable a spec names.

    ``package.module`` is imported from the installed packages, else from the current directory (as with
    ``python -m``); ``path/to/file.py`` is executed as a fresh module. ``kind`` names the spec in messages
    (``model``, ``loss``).
    """
    if kind != "model" and ":" not in spec:
        raise CurvscopeError(f"{kind} spec '{spec}': expected 'path/to/file.py:function' or "
                             "'package.module:function'")
    if ":" not in spec and spec not in BUILTIN:
        raise CurvscopeError(
            f"{kind} spec '{spec}': expected 'path/to/file.py:factory', 'package.module:factory' or one "
            f"of the built-ins {', '.join(BUILTIN)}")
    spec = canonical_spec(spec) if kind == "model" else spec
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise CurvscopeError(
            f"{kind} spec '{spec}': expected 'path/to/file.py:factory' or 'package.module:factory'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise CurvscopeError(f"{kind} spec '{spec}': file {path} not found")
        module_name = f"curvscope_user_{kind}_{abs(hash(str(path.resolve())))}"
        try:
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(module_name, None)
            raise CurvscopeError(f"{kind} spec '{spec}': importing {path} failed: {type(exc).__name__}: "
                                 f"{_one_line(exc)}") from exc
    else:
        cwd = os.getcwd()
        added = cwd not in sys.path and "" not in sys.path
        if added:
            sys.path.append(cwd)
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise CurvscopeError(f"{kind} spec '{spec}': cannot import module '{target}': "
                                 f"{type(exc).__name__}: {_one_line(exc)}") from exc
        finally:
            if added and cwd in sys.path:
                sys.path.remove(cwd)
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise CurvscopeError(f"{kind} spec '{spec}': '{name}' is not a callable in {target}")
    return factory


def build_model(spec: str, kwargs: dict[str, Any] | None = None, seed: int | None = None) -> nn.Module:
    """Call the factory a spec names with ``kwargs``; with ``seed``, the initialization is seeded."""
    factory = resolve_factory(spec)
    kwargs = dict(kwargs or {})
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some callables (C extensions) have no signature: let the call decide
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            raise CurvscopeError(f"model spec '{spec}': bad keyword arguments {sorted(kwargs)}: {exc}"
                                 ) from exc
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise CurvscopeError(f"model spec '{spec}': the factory raised {type(exc).__name__}: {_one_line(exc)}"
                             ) from exc
    if not isinstance(model, nn.Module):
        raise CurvscopeError(f"model spec '{spec}': the factory returned {type(model).__name__}, "
                             "not a torch.nn.Module")
    return model


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""
