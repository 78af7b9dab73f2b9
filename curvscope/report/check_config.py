"""The ``curvscope check --config FILE`` file: rules, computation options and a baseline, in TOML.

```toml
rules = ["groups[0].lambda_max <= 50", "lr.groups[*].recommended > 1e-5"]

[problem]          # data, batch_size, batches, shuffle, seed, loss, device, dtype, model, ... (CLI flags win)
data = "data/val.safetensors"      # relative to this file; a data factory 'file.py:fn' needs --trust-model-code
batch_size = 128

[spectrum]         # options of `curvscope spectrum`, snake_case; likewise [lr] and [factors]
mc_samples = 0

[baseline]         # paths relative to this file
report = "baseline/report.json"
max_increase = { "groups[0].lambda_max" = "20%" }
max_decrease = { "loss_value" = 0.05 }
```
"""

from __future__ import annotations

import difflib
import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curvscope import commands
from curvscope.errors import CurvscopeError, OptionError
from curvscope.report.check import Key, Limit, Rule, Step, make_limit, parse_rule

ENGINES = commands.names()
"""Computations config mode can run, in the order it runs them (each merges into the same report); the
registry's (:data:`curvscope.commands.COMMANDS`)."""
TOP_LEVEL = ("rules", "problem", "baseline", *ENGINES)
PROBLEM_KEYS = {"batch_size": int, "shuffle": bool, "seed": int, "loss": str, "device": str, "dtype": str,
                "model": str, "model_kwargs": (dict, str), "output": str, "shift_labels": bool,
                "label_smoothing": (int, float), "class_weights": (list, str), "huber_delta": (int, float),
                "smooth_l1_beta": (int, float), "data": str, "data_kwargs": (dict, str), "split": str,
                "columns": (str, dict), "pad_token": int, "batches": int}
BASELINE_KEYS = ("report", "max_increase", "max_decrease")


@dataclass
class CheckConfig:
    """What a config file holds (everything empty when there is no file)."""

    path: Path | None = None
    rules: list[Rule] = field(default_factory=list)
    problem: dict[str, Any] = field(default_factory=dict)
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)
    baseline: Path | None = None
    limits: list[Limit] = field(default_factory=list)


def _toml():
    """``tomllib`` (Python 3.11+), else the ``tomli`` backport, else a clear error."""
    for name in ("tomllib", "tomli"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise OptionError("config", lambda label: f"reading {label('config')} needs Python 3.11+ (tomllib) or the "
                      "'tomli' package: pip install tomli")


def _suggest(word: str, choices) -> str:
    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


def load_config(path: str | Path) -> CheckConfig:
    """Read and validate a config file; any mistake is a one-line :class:`CurvscopeError` naming the file."""
    path = Path(path)
    toml = _toml()
    if not path.is_file():
        raise CurvscopeError(f"{path}: config file not found")
    try:
        data = toml.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CurvscopeError(f"{path}: not a text file ({exc.reason})") from None
    except toml.TOMLDecodeError as exc:
        raise CurvscopeError(f"{path}: invalid TOML: {exc}") from None
    except (RecursionError, ValueError) as exc:  # absurdly nested tables or a 5000-digit integer
        raise CurvscopeError(f"{path}: cannot be read ({type(exc).__name__}: nested too deeply or a number "
                             "too large)") from None
    return parse_config(data, path)


def parse_config(data: dict[str, Any], path: Path) -> CheckConfig:
    """Validate the parsed TOML ``data`` of the file at ``path``."""
    config = CheckConfig(path=path)
    for key in data:
        if key not in TOP_LEVEL:
            raise CurvscopeError(f"{path}: unknown key {key!r}{_suggest(key, TOP_LEVEL)}; "
                                 f"known: {', '.join(TOP_LEVEL)}")
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise CurvscopeError(f"{path}: 'rules' must be a list of strings, e.g. "
                             "rules = [\"loss_value < 0.5\"]")
    config.rules = [parse_rule(r, source=f"{path} rules[{i}]") for i, r in enumerate(rules)]

    problem = data.get("problem", {})
    if not isinstance(problem, dict):
        raise CurvscopeError(f"{path}: [problem] must be a table")
    for key, value in problem.items():
        if key not in PROBLEM_KEYS:
            raise CurvscopeError(f"{path}: unknown key {key!r} in [problem]{_suggest(key, PROBLEM_KEYS)}; "
                                 f"known: {', '.join(PROBLEM_KEYS)}")
        kind = PROBLEM_KEYS[key]
        if (isinstance(value, bool) and kind is int) or not isinstance(value, kind):
            raise CurvscopeError(f"{path}: [problem] {key} = {value!r} has the wrong type")
    problem = dict(problem)
    for key in ("model_kwargs", "data_kwargs"):
        if isinstance(problem.get(key), dict):
            problem[key] = json.dumps(problem[key])
    if isinstance(problem.get("columns"), dict):
        problem["columns"] = ",".join(f"{name}={column}" for name, column in problem["columns"].items())
    if "data" in problem:
        problem["data"] = _relative_data(problem["data"], path.parent)
    if "model" in problem:
        problem["model"] = _relative_model(problem["model"], path.parent)
    if ":" in str(problem.get("loss", "")):  # a user loss 'file.py:fn', relative to the config too
        problem["loss"] = _relative_model(problem["loss"], path.parent)
    config.problem = problem

    for name in ENGINES:
        if name in data:
            if not isinstance(data[name], dict):
                raise CurvscopeError(f"{path}: [{name}] must be a table of option values")
            config.engines[name] = dict(data[name])

    baseline = data.get("baseline")
    if baseline is not None:
        if not isinstance(baseline, dict):
            raise CurvscopeError(f"{path}: [baseline] must be a table")
        for key in baseline:
            if key not in BASELINE_KEYS:
                raise CurvscopeError(f"{path}: unknown key {key!r} in [baseline]"
                                     f"{_suggest(key, BASELINE_KEYS)}; known: {', '.join(BASELINE_KEYS)}")
        if "report" in baseline:
            if not isinstance(baseline["report"], str):
                raise CurvscopeError(f"{path}: [baseline] report must be a path string")
            config.baseline = path.parent / baseline["report"]
        for direction in ("increase", "decrease"):
            table = baseline.get(f"max_{direction}", {})
            if not isinstance(table, dict):
                raise CurvscopeError(f"{path}: [baseline] max_{direction} must be a table of "
                                     "\"PATH\" = amount, e.g. { \"loss_value\" = \"10%\" }")
            config.limits += [make_limit(p, amount, direction, f"{path} [baseline] max_{direction}")
                              for p, amount in table.items()]
    return config


def _relative_model(spec: str, base: Path) -> str:
    """``file.py:factory`` paths in a config file are relative to the config file."""
    match = re.fullmatch(r"(.+\.py)(:[A-Za-z_][A-Za-z0-9_]*)?", spec)
    if not match or Path(match.group(1)).is_absolute():
        return spec
    return str(base / match.group(1)) + (match.group(2) or "")


DATA_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
"""A data factory in an installed package, ``package.module:factory`` (``curvscope.io.factory.SPEC``)."""


def _relative_data(data: str, base: Path) -> str:
    """``[problem] data`` relative to the config file: a data file or directory, or a ``file.py:factory``; a
    ``package.module:factory`` stays as it is (unless such a path exists beside the config)."""
    if re.fullmatch(r".+\.py:[A-Za-z_]\w*", data):
        return _relative_model(data, base)
    if Path(data).is_absolute() or (DATA_SPEC.fullmatch(data) and not (base / data).exists()):
        return data
    return str(base / data)


def engine_for(path: tuple[Step, ...]) -> str:
    """The computation that writes a path: the command whose report section the path's first key names
    (``lr.`` -> lr, ``factors.`` -> factors), else the one whose fields are the report's top level (spectrum)."""
    first = path[0].name if path and isinstance(path[0], Key) else None
    return commands.section_owner(first).name


def engines_needed(config: CheckConfig, paths: list[tuple[Step, ...]]) -> list[str]:
    """Which computations to run: those with a table in the config and those the rules' paths read."""
    wanted = set(config.engines) | {engine_for(p) for p in paths}
    return [name for name in ENGINES if name in wanted]
