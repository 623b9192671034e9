"""Job functions used by the workflow tests (run in-process by the async executor)."""

from __future__ import annotations

import collections

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
