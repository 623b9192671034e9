"""Job functions for tests/test_thread_executor.py (Threaded executor, in-process)."""

from __future__ import annotations

import contextvars
import threading

#: Jobs of ``wait_gate`` block until the test opens this gate.
GATE = threading.Event()
#: ``meet`` jobs wait here until ``parties`` of them run at the same time.
MEETING: list[threading.Barrier] = []
#: Set by ``leave_mark``; each job should start without it.
MARK: contextvars.ContextVar[str | None] = contextvars.ContextVar("test_mark", default=None)


def wait_gate() -> str:
    GATE.wait(timeout=30)
    return "through"


def meet() -> int:
    """Returns once every party of the meeting has arrived (raises after 10 s)."""
    return MEETING[0].wait(timeout=10)


def leave_mark(value: str) -> str | None:
    """Returns the mark this job found, then leaves its own."""
    found = MARK.get()
    MARK.set(value)
    return found


def noop() -> None:
    pass
