"""Job functions for the acceptance tests (imported by real workers and their children).

Jobs that must prove "ran exactly once" append ``start <tag>`` and ``end <tag>`` lines to a
journal file; one ``write`` of a short line to a file opened with ``O_APPEND`` is atomic,
so concurrent processes and threads never interleave their lines.
"""

from __future__ import annotations

import os
import signal
import time

from chancy import QueuedJob

WORKER_PID_ENV = "CHANCY_ACCEPTANCE_WORKER_PID"


def _journal(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def journal_sleep(path: str, tag: str, seconds: float) -> str:
    """Record the start, sleep ``seconds``, record the end."""
    _journal(path, f"start {tag}")
    time.sleep(seconds)
    _journal(path, f"end {tag}")
    return tag


def slow_first_attempt(path: str, tag: str, first: float, later: float, *, job: QueuedJob) -> int:
    """Sleep ``first`` seconds on attempt 1 and ``later`` seconds afterwards; journal both."""
    _journal(path, f"start {tag} {job.attempts}")
    time.sleep(first if job.attempts <= 1 else later)
    _journal(path, f"end {tag} {job.attempts}")
    return job.attempts


def kill_worker(path: str) -> None:
    """kill -9 the whole worker process running this job (not just an executor child)."""
    _journal(path, f"kill {os.environ.get(WORKER_PID_ENV)}")
    # A pending SIGKILL lets the target run no more user code, so no outcome is recorded.
    os.kill(int(os.environ.get(WORKER_PID_ENV) or os.getpid()), signal.SIGKILL)


def stubborn_sleep(path: str, tag: str, seconds: float) -> str:
    """Sleep ``seconds`` and swallow every interruption meanwhile (a badly behaved job)."""
    _journal(path, f"start {tag}")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(max(deadline - time.monotonic(), 0))
        except BaseException:
            _journal(path, f"ignored {tag}")
    _journal(path, f"end {tag}")
    return tag
