"""Long LAPACK calls that Ctrl-C can still stop.

Python runs signal handlers in the main thread between bytecodes, so a SIGINT that arrives during a single long
C call (``torch.linalg.eigh`` of a 20,000 x 20,000 Gram matrix: minutes) waits until the call returns.
:func:`responsive` runs such a call in a worker thread while the main thread waits in short joins: the handler
runs within :data:`POLL` seconds, ``KeyboardInterrupt`` (or the CLI's SIGTERM exception) is raised in the main
thread, and the command unwinds and exits at once. The worker cannot be stopped; it is a daemon thread, so the
process does not wait for it (the CLI exits with ``os._exit``), and a Python caller that catches the
interrupt gets the CPU back when the call finishes. PyTorch releases the GIL inside its operators, so the main
thread stays responsive meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL = 0.1
"""Seconds between the main thread's checks for a signal while a worker computes."""


def responsive(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)``, run in a worker thread when called from the main thread, so that a signal can
    interrupt the wait. Exceptions of ``fn`` are raised in the caller; the result is the same object."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="curvscope-linalg", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(POLL)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
