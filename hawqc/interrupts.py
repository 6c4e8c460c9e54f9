"""Ctrl-C for the ``hawqc`` command: "interrupted", exit status 130, nothing half-written, no hang.

While :func:`handling` is active, the first SIGINT records the request and raises
``KeyboardInterrupt`` where Python runs next, so ``finally`` blocks and the atomic writers of
:mod:`hawqc.fileio` clean up as the exception unwinds. TVM may turn a ``KeyboardInterrupt`` raised
inside one of its Python callbacks (a MetaSchedule builder, an RPC session) into a ``RuntimeError``
or a failed candidate; code that catches broad exceptions around TVM calls :func:`check`, which
raises ``KeyboardInterrupt`` again once the user has asked to stop. :func:`exit_now` ends the process
without Python's shutdown (which joins TVM's worker threads and may hang or crash in TVM's
destructors), killing its worker processes first. A second Ctrl-C, or unwinding that takes longer
than :data:`GRACE_S`, ends it at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

EXIT_STATUS = 130
"""128 + SIGINT, what shells report for a process ended by Ctrl-C."""
GRACE_S = 10.0
"""How long unwinding may take after the first Ctrl-C before the process is ended anyway."""

_requested = False
_message = "interrupted"


def requested() -> bool:
    """Whether the user pressed Ctrl-C while :func:`handling` was active."""
    return _requested


def check() -> None:
    """Raise ``KeyboardInterrupt`` if the user asked to stop (call it where broad exceptions are caught)."""
    if _requested:
        raise KeyboardInterrupt


@contextmanager
def handling(message: str = "interrupted") -> Iterator[None]:
    """Handle SIGINT as described above while the block runs (main thread only); ``message`` is the
    line :func:`exit_now` prints."""
    global _requested, _message
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested, _message = False, message
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        if not _requested:  # after a Ctrl-C, a second one must still end the process at once
            signal.signal(signal.SIGINT, previous)


def _on_sigint(signum: int, frame: Any) -> None:
    global _requested
    if _requested:
        exit_now()
    _requested = True
    watchdog = threading.Timer(GRACE_S, exit_now)
    watchdog.daemon = True
    watchdog.start()
    raise KeyboardInterrupt


def exit_now(message: str | None = None) -> NoReturn:
    """Print ``message`` (default: the one given to :func:`handling`) on stderr, kill this process's
    children (TVM's build and run workers) and exit with status 130 at once."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C (or one forwarded) must not interrupt this
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    os.write(2, f"{message or _message}\n".encode())
    _kill_children()
    os._exit(EXIT_STATUS)


def _kill_children() -> None:
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(children, timeout=2)
    except Exception:  # noqa: BLE001 - ending the process matters more than its children
        pass
