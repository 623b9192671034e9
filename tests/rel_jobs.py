"""Job functions for the reliability suite (importable by workers and their children).

Journaled jobs append ``start <tag> <attempt>`` / ``end <tag> <attempt>`` lines to a file
opened with ``O_APPEND``: one short ``write`` is atomic, so concurrent processes and
threads never interleave lines.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import os
import threading
import time

from chancy import QueuedJob

#: Not a function: a job pointing here must fail with "not callable".
NOT_CALLABLE = 42

#: In-process record of every run, for soak tests with an in-process worker.
RUNS: collections.Counter[str] = collections.Counter()
RUNS_LOCK = threading.Lock()


def journal(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


async def async_slow_first(
    path: str, tag: str, first: float, later: float, *, job: QueuedJob
) -> int:
    """Sleep ``first`` seconds on attempt 1 and ``later`` afterwards; journal both ends."""
    journal(path, f"start {tag} {job.attempts}")
    await asyncio.sleep(first if job.attempts <= 1 else later)
    journal(path, f"end {tag} {job.attempts}")
    return job.attempts


def poison(path: str, tag: str, how: str, *, job: QueuedJob) -> None:
    """Journal the start, then die the way ``how`` says."""
    journal(path, f"start {tag} {job.attempts}")
    if how == "exit":
        os._exit(17)
    elif how == "segfault":
        ctypes.string_at(0)
    elif how == "memory":
        blocks = []
        for _ in range(64):
            blocks.append(bytearray(64 * 1024 * 1024))
    raise AssertionError(f"poison {how} survived")


def cpu_loop_in_thread(seconds: float) -> str:
    """Ignore every cancellation: spin the CPU in a thread of its own, and wait for it."""
    done = threading.Event()

    def spin() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            pass
        done.set()

    threading.Thread(target=spin, daemon=False, name="rel-spin").start()
    while not done.is_set():
        try:
            done.wait()
        except BaseException:
            pass
    return "spun"


def record(tag: str) -> str:
    """Count a run of ``tag`` in this process (soak tests)."""
    with RUNS_LOCK:
        RUNS[tag] += 1
    return tag


async def async_record(tag: str) -> str:
    with RUNS_LOCK:
        RUNS[tag] += 1
    return tag
