"""Job functions used by the tests (importable by workers and child processes)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

from chancy import QueuedJob, Snooze, job

EVENTS: dict[str, threading.Event] = {}


def noop() -> None:
    return None


def add(a: int, b: int) -> int:
    return a + b


def echo(**kwargs: Any) -> dict[str, Any]:
    return kwargs


async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


def fail(message: str = "boom") -> None:
    raise ValueError(message)


def sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


async def async_sleep(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "slept"


def busy_loop(seconds: float) -> str:
    """Pure-Python CPU loop (interruptible by signals between bytecodes)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
    return "done"


def record_pid() -> int:
    return os.getpid()


def die(code: int = 13) -> None:
    os._exit(code)


def segfault() -> None:
    import ctypes

    ctypes.string_at(0)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def allocate(megabytes: int) -> int:
    block = bytearray(megabytes * 1024 * 1024)
    return len(block)


def with_job(*, job: QueuedJob) -> dict[str, Any]:
    job.meta["seen"] = job.attempts
    return {"id": str(job.id), "attempts": job.attempts}


def snooze_once(*, job: QueuedJob) -> str:
    if not job.meta.get("snoozed"):
        job.meta["snoozed"] = True
        raise Snooze(0)
    return "woke"


def fail_until(attempt: int, *, job: QueuedJob) -> int:
    if job.attempts < attempt:
        raise RuntimeError(f"attempt {job.attempts} fails")
    return job.attempts


def not_json() -> object:
    return object()


@job(queue="decorated", max_attempts=3)
def decorated_add(a: int, b: int = 2) -> int:
    return a + b


def nan() -> float:
    return float("nan")


def nul_output(*, job: QueuedJob) -> str:
    job.meta["note"] = "x\x00y"
    if job.attempts == 1:
        raise ValueError("bad \x00 byte")
    return "a\x00b"


def sleep_first_attempt(seconds: float, *, job: QueuedJob) -> int:
    """The first attempt sleeps ``seconds`` (past its time limit); the retry sleeps half
    as long, so the first attempt's thread returns while the retry still runs."""
    if job.attempts == 1:
        time.sleep(seconds)
        EVENTS.setdefault(f"first-attempt-{job.id}", threading.Event()).set()
    else:
        time.sleep(seconds / 2)
    return job.attempts


def fail_starting(**kwargs: Any) -> None:
    return None
