"""Which files in an output directory curvscope wrote itself, recognised by name and content.

A rerun replaces or removes the files of the previous run in ``--out``; a report's ``files`` section is plain
JSON that anyone can edit, so it is never trusted to say what may be deleted. Only a file that has one of
curvscope's own names (:data:`OWN_FILES`), lies directly in the output directory, is a regular file (not a
link) and whose content is of the kind curvscope writes under that name (a PNG drawn by matplotlib, a
safetensors file whose metadata names a ``curvscope.*`` format, a curvscope report) is ever removed or
overwritten there. Any other file is left as it is: a rerun refuses to overwrite it (one line, exit 2) and
never removes it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from curvscope.errors import CurvscopeError

PNG = "png"
REPORT = "report"
OWN_FILES = {
    "report.json": REPORT,
    "spectrum.png": PNG,
    "directions.png": PNG,
    "layers.png": PNG,
    "landscape.png": PNG,
    "lr.png": PNG,
    "factors.png": PNG,
    "track.png": PNG,
    "directions.safetensors": "curvscope.directions",
    "factors.safetensors": "curvscope.factors",
}
"""The names curvscope gives the files it writes into an output directory, and what each one holds: a PNG
figure, the report, or a safetensors file of that ``format`` (metadata)."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_WRITERS = (b"curvscope", b"Matplotlib")
"""A PNG counts as curvscope's when its ``Software`` text names one of these (matplotlib writes its own name)."""
MAX_HEADER = 64 * 2**20


def is_own_name(path: str | os.PathLike) -> bool:
    """Whether ``path`` has one of curvscope's own output names."""
    return Path(path).name in OWN_FILES


def written_by_curvscope(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file (not a link) with one of :data:`OWN_FILES`' names and the content
    curvscope writes under that name. A missing file is not."""
    path = Path(path)
    kind = OWN_FILES.get(path.name)
    if kind is None:
        return False
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        with open(path, "rb") as f:
            head = f.read(4096)
            if kind == PNG:
                return head.startswith(PNG_SIGNATURE) and any(w in head for w in PNG_WRITERS)
            if kind == REPORT:
                f.seek(0)
                return _is_report(f.read())
            return _safetensors_format(head, f) == kind
    except (OSError, ValueError, RecursionError):
        return False


def _is_report(data: bytes) -> bool:
    doc = json.loads(data.decode("utf-8"))
    return isinstance(doc, dict) and "schema_version" in doc


def _safetensors_format(head: bytes, f) -> str | None:
    """The ``format`` entry of a safetensors file's metadata (``None`` when it is not one)."""
    if len(head) < 8:
        return None
    size = int.from_bytes(head[:8], "little")
    if not 2 <= size <= MAX_HEADER:
        return None
    f.seek(8)
    header = json.loads(f.read(size).decode("utf-8"))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    value = meta.get("format") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def check_replaceable(path: str | os.PathLike) -> None:
    """Refuse to overwrite a file with one of curvscope's names that curvscope did not write.

    Raises:
        CurvscopeError: ``path`` exists and is not recognisably curvscope's (it is left as it is).
    """
    path = Path(path)
    if is_own_name(path) and os.path.lexists(path) and not written_by_curvscope(path):
        raise CurvscopeError(f"{path}: exists and was not written by curvscope (curvscope writes its own "
                             f"{path.name} there); move it away or choose another output directory")
