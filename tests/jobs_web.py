"""Job functions for the dashboard tests (run by in-process async workers)."""

from __future__ import annotations

#: Failures still to produce, per key, for :func:`flaky`.
FAILURES_LEFT: dict[str, int] = {}


async def explode(message: str) -> None:
    raise RuntimeError(message)


async def flaky(key: str) -> str:
    """Fails while ``FAILURES_LEFT[key]`` is positive, then succeeds."""
    if FAILURES_LEFT.get(key, 0) > 0:
        FAILURES_LEFT[key] -= 1
        raise RuntimeError(f"flaky job {key} failed on purpose")
    return f"{key} ok"


async def step(name: str) -> str:
    return name
