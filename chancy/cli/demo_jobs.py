"""Job functions run by ``chancy demo`` (importable by any worker)."""

from __future__ import annotations

import asyncio


class DemoFailure(Exception):
    """Raised by demo jobs asked to fail, to show failures in the summary."""


def square(n: int, fail: bool = False) -> dict[str, int]:
    """A tiny CPU job for thread and process executors."""
    if fail:
        raise DemoFailure(f"demo job {n} failed on purpose")
    return {"n": n, "square": n * n}


async def async_square(n: int, fail: bool = False) -> dict[str, int]:
    """The coroutine twin of :func:`square`, for the async executor."""
    await asyncio.sleep(0)
    return square(n, fail)
