"""Job functions used by the workflow tests (run in-process by the async executor)."""

from __future__ import annotations

import collections
import threading

ATTEMPTS: collections.Counter[str] = collections.Counter()


def step(name: str) -> str:
    return name


def fail(message: str = "step failed") -> None:
    raise RuntimeError(message)


def flaky(key: str, failures: int) -> int:
    """Fails its first ``failures`` calls for ``key``, then succeeds."""
    ATTEMPTS[key] += 1
    if ATTEMPTS[key] <= failures:
        raise RuntimeError(f"attempt {ATTEMPTS[key]} of {key} fails")
    return ATTEMPTS[key]


def noop() -> None:
    return None


GATES: dict[str, threading.Event] = {}


def gate(key: str) -> str:
    """Blocks until the test opens ``GATES[key]`` (or 30 s pass)."""
    GATES.setdefault(key, threading.Event()).wait(30)
    return key
