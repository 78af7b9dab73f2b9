"""Every file curvscope writes goes through here: all the outputs of a run appear together, or none do.

:class:`Outputs` collects a run's files (checked up front: writable, a regular file or absent, no two outputs
on one path), stages each one as a hidden temporary file beside its target, and only when every file is
staged moves them into place. A failure, Ctrl-C or SIGTERM before that removes the staged files and leaves
the earlier outputs untouched; while the files are moved into place, SIGINT and SIGTERM are held back
(delivered once all are in place), and a failure there puts the previous files back.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from curvscope.errors import CurvscopeError, OptionError
from curvscope.progress import Progress, or_silent

_COMMITTED: list[Path] = []
"""Every file this process has moved into place, in order (:func:`committed`)."""


def committed() -> list[Path]:
    """The files this process has written (moved into place) so far: a run stopped by a signal says whether its
    outputs were already replaced."""
    return list(_COMMITTED)


Writer = Callable[[Path], None]
"""``write(tmp_path)``: writes the whole content of one output file to ``tmp_path``."""


def check_writable(path: str | os.PathLike, option: str) -> Path:
    """Fail early (before any computation) when an output file cannot be written: a one-line
    :class:`~curvscope.errors.OptionError` of ``option`` (the name of the parameter that gave the path). A target
    that exists must be a regular file (a directory, FIFO or device is never replaced). Returns ``path`` as a
    ``Path``."""
    path = Path(path)
    _check_name_lengths(path, option)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:
        raise OptionError(option, f"{path}: a parent of it is not a directory") from None
    except OSError as exc:
        raise OptionError(option, f"{path}: cannot be inspected ({exc.strerror or exc})") from exc
    if mode is not None:
        if stat.S_ISDIR(mode):
            raise OptionError(option, f"{path}: is a directory, expected a file name")
        if not stat.S_ISREG(mode):
            raise OptionError(option, f"{path}: exists and is not a regular file (a device, FIFO or socket is "
                              "never replaced); choose another path")
    parent = path.parent if str(path.parent) else Path(".")
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OptionError(option, f"{path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK):
        raise OptionError(option, f"{path}: {existing} is not writable")
    return path


def _check_name_lengths(path: Path, option: str) -> None:
    """Refuse a path with a component (or a whole) too long for the file system it would be made on."""
    existing = Path(os.path.abspath(path))
    while not os.path.exists(existing):  # the file system it would be made on: its nearest existing parent's
        existing = existing.parent
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        name_max, path_max = 255, 4096
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise OptionError(option, f"{path}: the name '{part[:24]}...' is {len(os.fsencode(part))} bytes, "
                              f"longer than the file system allows ({name_max}); choose a shorter one")
    if len(os.fsencode(os.path.abspath(path))) >= path_max:
        raise OptionError(option, f"{path}: the path is longer than the file system allows ({path_max} bytes)")


def check_directory(path: str | os.PathLike, option: str) -> Path:
    """An output directory: absent (it will be made) or a writable directory."""
    path = Path(path)
    _check_name_lengths(path, option)
    try:
        if path.exists() and not path.is_dir():
            raise OptionError(option, f"{path}: exists and is not a directory")
    except OSError as exc:
        raise OptionError(option, f"{path}: cannot be inspected ({exc.strerror or exc})") from None
    check_writable(path / ".curvscope-probe", option)
    return path


@dataclass
class _Output:
    path: Path
    write: Writer
    option: str


class Outputs:
    """The files of one run, written all together or not at all.

    Example::

        outputs = Outputs()
        outputs.add_text(out_dir / "report.json", text, "out_dir")
        outputs.add_bytes(out_dir / "spectrum.png", png, "out_dir")
        outputs.commit()          # both appear, or neither (and the old ones stay)
    """

    def __init__(self) -> None:
        self._outputs: dict[Path, _Output] = {}
        self._removals: list[Path] = []

    def __len__(self) -> int:
        return len(self._outputs)

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str | os.PathLike) and _key(Path(path)) in self._outputs

    @property
    def paths(self) -> list[Path]:
        """The target paths, in the order they were added."""
        return [o.path for o in self._outputs.values()]

    def claim(self, path: str | os.PathLike, option: str) -> Path:
        """Check ``path`` as a target of ``option`` (writable, regular or absent, not already another output's
        target) without giving its content yet; :meth:`add` it later."""
        path = check_writable(path, option)
        other = self._outputs.get(_key(path))
        if other is not None and other.option != option:
            raise _same_file(option, path, other.option)
        self._outputs.setdefault(_key(path), _Output(path, _unset, option))
        return path

    def add(self, path: str | os.PathLike, write: Writer, option: str = "path") -> Path:
        """Add the file ``path`` whose content ``write(tmp_path)`` produces (called at :meth:`commit`)."""
        path = Path(path)
        key = _key(path)
        claimed = self._outputs.get(key)
        if claimed is None:
            self.claim(path, option)
        elif claimed.write is not _unset or claimed.option != option:
            raise _same_file(option, path, claimed.option)
        self._outputs[key] = _Output(path, write, option)
        return path

    def add_bytes(self, path: str | os.PathLike, data: bytes, option: str = "path") -> Path:
        """Add a file with the content ``data``."""
        return self.add(path, lambda tmp: tmp.write_bytes(data), option)

    def add_text(self, path: str | os.PathLike, text: str, option: str = "path") -> Path:
        """Add a UTF-8 text file."""
        return self.add(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), option)

    def remove(self, path: str | os.PathLike) -> None:
        """Remove the regular file ``path`` as part of the commit (put back if the commit fails)."""
        path = Path(path)
        if _key(path) in self._outputs:
            raise CurvscopeError(f"{path}: cannot both write and remove it")
        if path.is_file() and _key(path) not in {_key(p) for p in self._removals}:
            self._removals.append(path)

    def commit(self, progress: Progress | None = None) -> list[Path]:
        """Stage every file, then move them all into place. Returns the paths written.

        Raises:
            CurvscopeError: a file could not be written (nothing changed on disk).
        """
        progress = or_silent(progress)
        pending = [o for o in self._outputs.values() if o.write is not _unset]
        temporary: list[Path] = []  # every staged file's name, recorded before the file is created
        made: list[Path] = []  # directories this commit created: removed again when it fails
        done = False
        try:
            staged: list[tuple[_Output, Path]] = []
            for i, output in enumerate(pending):
                progress("write", i, len(pending))
                staged.append((output, _stage(output, made, temporary)))
            with _signals_held():  # a signal is delivered after the block: the files are in place, and recorded
                _move_all(staged, self._removals)
                done = True
                _COMMITTED.extend(o.path for o in pending)
            progress("write", len(pending), len(pending))
        finally:
            if not done:
                with _signals_held():  # a second signal does not cut the clean-up short
                    for tmp in temporary:
                        with contextlib.suppress(OSError):
                            tmp.unlink(missing_ok=True)
                    for directory in reversed(made):
                        with contextlib.suppress(OSError):
                            directory.rmdir()  # only when empty: nothing else was put there meanwhile
        return [o.path for o in pending]


def _unset(_tmp: Path) -> None:  # placeholder of a claimed output whose content is not known yet
    raise AssertionError("an output was claimed but never added")


def _key(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _make_parents(directory: Path, made: list[Path]) -> None:
    """``mkdir -p directory``, recording in ``made`` each directory created (outermost first)."""
    missing = []
    while not os.path.exists(directory):
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        made.append(d)


def _os_error(exc: BaseException) -> OSError | None:
    """``exc`` as an :class:`OSError` when it is one, or a writer library's wrapping of one (safetensors reports a
    full disk as ``SafetensorError: ... I/O error: No space left on device (os error 28)``)."""
    if isinstance(exc, OSError):
        return exc
    text = str(exc)
    match = re.search(r"I/O error: (.*?) \(os error (\d+)\)", text)
    if match:
        return OSError(int(match.group(2)), match.group(1))
    return None


def _stage(output: _Output, made: list[Path] | None = None, temporary: list[Path] | None = None) -> Path:
    """Write one output to a hidden temporary file beside its target (same file system: the rename is atomic).
    Each directory created is appended to ``made``, the temporary file's name to ``temporary`` before the file
    exists (so that a signal at any moment leaves nothing the caller cannot remove)."""
    path = output.path
    temporary = temporary if temporary is not None else []
    try:
        _make_parents(path.parent, made if made is not None else [])
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        temporary.append(tmp)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the usual permissions (umask)
    except OSError as exc:
        raise OptionError(output.option, f"{path}: cannot write ({exc.strerror or exc})") from exc
    try:
        output.write(tmp)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        error = _os_error(exc) if isinstance(exc, Exception) else None
        if error is None:
            raise
        raise OptionError(output.option, f"{path}: cannot write ({error.strerror or error}); nothing was "
                          "written or changed") from None
    return tmp


def _move_all(staged: list[tuple[_Output, Path]], removals: list[Path] = ()) -> None:
    """Rename every staged file over its target and remove ``removals``; on a failure, put back the targets
    already replaced or removed."""
    backups: list[tuple[Path, Path | None]] = []  # (target, hard-linked copy of the old file or None)
    try:
        for target in removals:
            backup = target.with_name(f".{target.name}.{os.getpid()}.bak")
            os.replace(target, backup)
            backups.append((target, backup))
        for output, tmp in staged:
            target = output.path
            if target.exists() and not target.is_file():  # appeared since the check: never replace it
                raise OptionError(output.option, f"{target}: exists and is not a regular file")
            backup = None
            if target.exists():
                backup = target.with_name(f".{target.name}.{os.getpid()}.bak")
                with contextlib.suppress(OSError):
                    backup.unlink(missing_ok=True)
                    os.link(target, backup)
                if not backup.exists():
                    backup = None
            os.replace(tmp, target)
            backups.append((target, backup))
    except BaseException:
        for target, backup in reversed(backups):
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.replace(backup, target)
                else:
                    target.unlink(missing_ok=True)
        raise
    finally:
        for _, backup in backups:
            if backup is not None:
                with contextlib.suppress(OSError):
                    backup.unlink(missing_ok=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back during the block and deliver them after it (main thread only).

    The Python-level handlers are swapped for one that only records the signal, then restored, and a recorded
    signal is raised again. (A thread's signal mask would not do: a process-directed signal goes to any thread
    that does not block it, PyTorch's worker threads included, and Python then runs the handler in the main
    thread at once.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def defer(signum, frame):  # noqa: ARG001
        pending.append(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError, TypeError):
            previous[sig] = signal.signal(sig, defer)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)


def _same_file(option: str, path: Path, other: str) -> OptionError:
    return OptionError(option, lambda name: f"{name(option)} {path}: the same file as {name(other)}; give each "
                       "output its own path")


def write_atomic(path: str | os.PathLike, write: Writer, option: str = "path") -> None:
    """Write one file atomically: ``write(tmp_path)`` on a temporary file beside ``path``, then rename."""
    outputs = Outputs()
    outputs.add(path, write, option)
    outputs.commit()


def write_text_atomic(path: str | os.PathLike, text: str, option: str = "path") -> None:
    """Write ``text`` to ``path`` atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), option)


def replace_text(path: str | os.PathLike, text: str, option: str = "path") -> Path:
    """Replace one UTF-8 text file in an existing directory atomically, by a rename alone: the cheap rewrite of a
    file that changes often (a growing run's report, :mod:`curvscope.report.track_live`). :class:`Outputs` keeps a
    backup of every target, which a set of files needs to be put back together; one file does not. A failure or
    a signal before the rename leaves the previous file as it was and no temporary file."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    moved = False
    try:
        with open(tmp, "x", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
        moved = True
        _COMMITTED.append(path)
    except OSError as exc:
        raise OptionError(option, f"{path}: cannot write ({exc.strerror or exc}); it was left as it was") from None
    finally:
        if not moved:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return path
