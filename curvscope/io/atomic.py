"""Atomic file writes: a reader (or a crashed run) never leaves a partial file behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from curvscope.errors import CurvscopeError


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


def check_writable(path: str | os.PathLike, option: str) -> Path:
    """Fail early (before any computation) when an output file cannot be written: a one-line
    :class:`CurvscopeError` naming ``option``. Returns ``path`` as a ``Path``."""
    path = Path(path)
    if path.is_dir():
        raise CurvscopeError(f"{option} {path}: is a directory, expected a file name")
    parent = path.parent if str(path.parent) else Path(".")
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CurvscopeError(f"{option} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK):
        raise CurvscopeError(f"{option} {path}: {existing} is not writable")
    return path


